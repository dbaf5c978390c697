#!/bin/bash
# Continuation of run.sh (stopped after its first calibrate had started; the CPU was too slow
# for both variants): wait for that calibrate (pid 28542), then the uniform variant's evals only.
set -x
cd /tmp/x29wt
export PYTHONPATH=/tmp/x29wt
A=/work/main/.venv/bin/adaskip
O=/tmp/x29
V=uniform
P=$O/$V/smollm2-essays-kl-$V-profile.json
while kill -0 28542 2>/dev/null; do sleep 10; done
date -u
test -f $P || exit 1
$A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks passkey,needle \
  --retrieval-lengths 2048,4096 --retrieval-samples 8 --retrieval-batch 2 --out $O/$V/grid > $O/$V/grid/eval.log 2>&1
date -u
$A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks ppl --documents essays \
  --window-len 2048 --windows 4 --out $O/$V/ppl-essays > $O/$V/ppl-essays/eval.log 2>&1
date -u
$A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks ppl --documents stdlib \
  --window-len 2048 --windows 4 --out $O/$V/ppl-stdlib > $O/$V/ppl-stdlib/eval.log 2>&1
date -u
