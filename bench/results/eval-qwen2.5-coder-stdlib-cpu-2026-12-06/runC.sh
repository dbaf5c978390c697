#!/bin/bash
# Issue 31: rerun of eval-qwen2.5-coder-stdlib-cpu-2026-11-26 (no log, `command` not the argv): the
# two evals that calibrate (adaskip / shortgpt, and greedy-loss with its 1-request loss search)
# with the settings their JSONs record, then the greedy-loss decode tasks on the new greedy-loss
# profile. Clean worktree of dcfdea5, one thread, beside runA.sh / runD.sh; output outside the tree.
set -x
cd /tmp/wt31
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31
PY=/work/main/.venv/bin/python
Q=/tmp/r31/eval-qwen2.5-coder-stdlib-cpu-2026-12-06
mkdir -p $Q/greedy-loss/speculative $Q/greedy-loss/generation
date -u
$PY -m adaskip eval --model qwen2.5-coder --calibration-data stdlib --num-requests 8 --prompt-len 1024 \
  --strategies adaskip,shortgpt --budgets 4,8,12,16 --tasks ppl --documents stdlib --window-len 1024 --windows 4 \
  --out $Q > $Q/eval.log 2>&1
echo "qwen adaskip/shortgpt ppl exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --calibration-data stdlib --num-requests 8 --prompt-len 1024 \
  --search-requests 1 --search-candidates 4 --strategies greedy-loss --budgets 4,8,12,16 --tasks ppl \
  --documents stdlib --window-len 1024 --windows 4 --out $Q/greedy-loss > $Q/greedy-loss/eval.log 2>&1
echo "qwen greedy-loss ppl exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $Q/greedy-loss/profile.json --strategies greedy-loss --budgets 8,16 \
  --tasks speculative --documents stdlib --generation-lengths 1024 --generation-prompts 2 --generation-tokens 32 \
  --speculative-draft-tokens 2,4 --out $Q/greedy-loss/speculative > $Q/greedy-loss/speculative/eval.log 2>&1
echo "qwen greedy-loss speculative exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $Q/greedy-loss/profile.json --strategies greedy-loss --budgets 4,8 \
  --tasks generation --documents stdlib --generation-lengths 2048 --generation-prompts 2 --generation-tokens 32 \
  --generation-online-betas 0.95,0.9 --out $Q/greedy-loss/generation > $Q/greedy-loss/generation/eval.log 2>&1
echo "qwen greedy-loss generation exit $?"; date -u
