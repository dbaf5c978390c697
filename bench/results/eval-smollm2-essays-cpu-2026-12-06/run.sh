#!/bin/bash
# Issue 31: rerun of eval-smollm2-essays-cpu-2026-11-22 with today's code, the command its
# README section records; 1 thread (OMP_NUM_THREADS=1), output outside the tree so it stays clean.
set -x
cd /tmp/wt31
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31
PY=/work/main/.venv/bin/python
O=/tmp/r31/eval-smollm2-essays-cpu-2026-12-06
mkdir -p $O
date -u
$PY -m adaskip eval --model smollm2 --calibration-data essays --num-requests 20 --prompt-len 1024 \
  --strategies adaskip,greedy-loss,greedy-similarity,shortgpt,early-exit,skipdecode,unified \
  --budgets 4,8,12,16 --speedups 1.1,1.2,1.3 --context-len 8192 --phase prefill \
  --tasks ppl --window-len 2048 --windows 4 --out $O > $O/eval.log 2>&1
echo "exit $?"
date -u
