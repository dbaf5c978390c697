#!/bin/bash
# Continuation of run.sh after its calibrate (pid 14634): perplexity off the essays, then the grid:
# 24 prompts a cell at 2k / 4k, 12 at 6k (the session's CPU time did not allow 24 at 6k).
set -x
cd /work/main
A=.venv/bin/adaskip
O=/tmp/g16
P=$O/smollm2-essays-search16-profile.json
while kill -0 14634 2>/dev/null; do sleep 10; done
date -u
test -f $P || exit 1
mkdir -p $O/ppl-essays $O/ppl-pydoc $O/ppl-stdlib $O/grid $O/grid6k
S=full,greedy-kl,greedy-loss,blockpruner
$A eval --model smollm2 --profile $P --strategies $S --budgets 8,16 --tasks ppl --documents essays \
  --window-len 2048 --windows 4 --out $O/ppl-essays > $O/ppl-essays/eval.log 2>&1
$A eval --model smollm2 --profile $P --strategies $S --budgets 8,16 --tasks ppl \
  --documents /root/.pyenv/versions/3.11.7/lib/python3.11/pydoc_data/topics.py \
  --window-len 2048 --windows 4 --out $O/ppl-pydoc > $O/ppl-pydoc/eval.log 2>&1
$A eval --model smollm2 --profile $P --strategies $S --budgets 8,16 --tasks ppl --documents stdlib \
  --window-len 2048 --windows 4 --out $O/ppl-stdlib > $O/ppl-stdlib/eval.log 2>&1
date -u
$A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8,16 --tasks passkey,needle \
  --retrieval-lengths 2048,4096 --retrieval-samples 8 --retrieval-batch 2 --out $O/grid > $O/grid/eval.log 2>&1
date -u
$A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8,16 --tasks passkey,needle \
  --retrieval-lengths 6144 --retrieval-samples 4 --retrieval-batch 2 --out $O/grid6k > $O/grid6k/eval.log 2>&1
date -u
