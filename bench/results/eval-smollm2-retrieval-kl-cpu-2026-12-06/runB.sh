#!/bin/bash
# Issue 31: eval-smollm2-retrieval-kl-cpu-2026-12-05 again, from a clean worktree of 02772de: its
# profile's calibration with the settings it recorded (linear stand-in, retrieval weight 1, 8 steps,
# validated at 4/6/8 on 9 windows and 8 probes of 6000 tokens), then the folder's eval, then the
# stdlib stand-ins eval (eval-smollm2-stdlib-standins-cpu-2026-12-05) on that profile. One thread.
cd /tmp/wt32
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt32
PY=/work/main/.venv/bin/python
O=/tmp/r32/kl
P=$O/smollm2-essays-kl-retrieval-profile.json
mkdir -p $O/eval $O/stdlib
date -u
$PY -m adaskip calibrate --model smollm2 --data essays --num-requests 8 --prompt-len 2048 \
  --search kl --search-stand-in linear --search-retrieval-weight 1 --search-max 8 \
  --validate-budgets 4,6,8 --validate-strategies greedy-kl --validation-requests 9 \
  --validation-len 6000 --validation-probes 8 --out $P > $O/calibrate.log 2>&1 || exit 1
date -u
$PY -m adaskip eval --model smollm2 --profile $P \
  --strategies full,greedy-kl --budgets 4,6,8 --tasks ppl,passkey,needle --documents essays \
  --window-len 2048 --windows 4 --retrieval-lengths 2048,4096 --retrieval-samples 2 --retrieval-batch 2 \
  --out $O/eval > $O/eval/eval.log 2>&1
echo "eval exit $?"
date -u
$PY -m adaskip eval --model smollm2 --profile $P \
  --strategies full,greedy-kl,adaskip,shortgpt --budgets 4,8 --stand-ins scalar,channel,linear \
  --tasks ppl --documents stdlib --window-len 2048 --windows 2 --out $O/stdlib > $O/stdlib/eval.log 2>&1
echo "stdlib exit $?"
date -u
