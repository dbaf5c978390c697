#!/bin/bash
# Issue 31: rerun of eval-smollm2-generation-cpu-2026-11-26 (whose JSON named the wrong commit and
# had no log), with the command its README section records, from a clean worktree of dcfdea5,
# one thread, beside runB.sh on the other core; output outside the tree.
set -x
cd /tmp/wt31
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31
PY=/work/main/.venv/bin/python
P=/tmp/wt31/bench/results/eval-smollm2-standins-cpu-2026-11-26/profile.json
O=/tmp/r31/eval-smollm2-generation-cpu-2026-12-06
mkdir -p $O/online-betas
date -u
$PY -m adaskip eval --model smollm2 --profile $P --strategies greedy-kl,adaskip,shortgpt --budgets 4,8 \
  --tasks generation --generation-lengths 1024,4096 --generation-prompts 4 --generation-tokens 64 \
  --out $O > $O/eval.log 2>&1
echo "generation exit $?"; date -u
$PY -m adaskip eval --model smollm2 --profile $P --strategies greedy-kl,adaskip --budgets 4 \
  --tasks generation --generation-lengths 1024 --generation-prompts 4 --generation-tokens 64 \
  --generation-online-betas 0.97,0.95,0.9,0.85 --out $O/online-betas > $O/online-betas/eval.log 2>&1
echo "online-betas exit $?"; date -u
