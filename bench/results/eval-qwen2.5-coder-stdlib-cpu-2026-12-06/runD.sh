#!/bin/bash
# Issue 31: the adaskip / shortgpt decode tasks of the Qwen rerun (runC.sh) on its new adaskip
# profile, once runA.sh is done and runC.sh has written that profile. Clean worktree of dcfdea5,
# one thread; output outside the tree.
set -x
cd /tmp/wt31
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31
PY=/work/main/.venv/bin/python
Q=/tmp/r31/eval-qwen2.5-coder-stdlib-cpu-2026-12-06
until grep -q "online-betas exit" /tmp/r31/runA.log && [ -f $Q/profile.json ] && [ -f $Q/eval.json ]; do sleep 20; done
mkdir -p $Q/speculative $Q/generation
date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $Q/profile.json --strategies adaskip --budgets 8,16,24 \
  --tasks speculative --documents stdlib --generation-lengths 1024 --generation-prompts 2 --generation-tokens 32 \
  --speculative-draft-tokens 2,4 --out $Q/speculative > $Q/speculative/eval.log 2>&1
echo "qwen adaskip speculative exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $Q/profile.json --strategies adaskip,shortgpt --budgets 4,8 \
  --tasks generation --documents stdlib --generation-lengths 2048 --generation-prompts 2 --generation-tokens 32 \
  --out $Q/generation > $Q/generation/eval.log 2>&1
echo "qwen adaskip generation exit $?"; date -u
