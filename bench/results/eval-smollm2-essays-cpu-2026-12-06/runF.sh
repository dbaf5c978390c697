#!/bin/bash
# Issue 31: rerun of eval-smollm2-essays-cpu-2026-12-06, whose profile (written by the eval's own
# calibration) predates profiles recording their run: the same command, from a clean worktree of
# ceafa42, one thread beside runE.sh; output outside the tree.
set -x
cd /tmp/wt31e
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31e
PY=/work/main/.venv/bin/python
O=/tmp/r31/eval-smollm2-essays-cpu-2026-12-06b
mkdir -p $O
date -u
$PY -m adaskip eval --model smollm2 --calibration-data essays --num-requests 20 --prompt-len 1024 \
  --strategies adaskip,greedy-loss,greedy-similarity,shortgpt,early-exit,skipdecode,unified \
  --budgets 4,8,12,16 --speedups 1.1,1.2,1.3 --context-len 8192 --phase prefill \
  --tasks ppl --window-len 2048 --windows 4 --out $O > $O/eval.log 2>&1
echo "exit $?"
date -u
