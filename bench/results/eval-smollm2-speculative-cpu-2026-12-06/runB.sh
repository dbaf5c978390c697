#!/bin/bash
# Issue 31: reruns of the speculative and generation evals of 2026-11-26 (no log, `command` not the
# argv) on the same profiles, with the settings their JSONs record, from a clean worktree of
# dcfdea5, one thread, beside runA.sh on the other core; output outside the tree.
set -x
cd /tmp/wt31
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31
PY=/work/main/.venv/bin/python
R=/tmp/wt31/bench/results
SP=$R/eval-smollm2-standins-cpu-2026-11-26/profile.json
QP=$R/eval-qwen2.5-coder-stdlib-cpu-2026-11-26/profile.json
QL=$R/eval-qwen2.5-coder-stdlib-cpu-2026-11-26/greedy-loss/profile.json
S=/tmp/r31/eval-smollm2-speculative-cpu-2026-12-06
Q=/tmp/r31/eval-qwen2.5-coder-decode-cpu-2026-12-06
mkdir -p $S/large-budgets $Q/speculative $Q/greedy-loss/speculative $Q/generation $Q/greedy-loss/generation
date -u
$PY -m adaskip eval --model smollm2 --profile $SP --strategies greedy-kl,adaskip --budgets 4,8,16 \
  --tasks speculative --generation-lengths 1024 --generation-prompts 2 --generation-tokens 48 \
  --speculative-draft-tokens 2,4 --out $S > $S/eval.log 2>&1
echo "smollm2 speculative exit $?"; date -u
$PY -m adaskip eval --model smollm2 --profile $SP --strategies adaskip --budgets 24,30 \
  --tasks speculative --generation-lengths 1024 --generation-prompts 2 --generation-tokens 48 \
  --speculative-draft-tokens 2,4 --out $S/large-budgets > $S/large-budgets/eval.log 2>&1
echo "smollm2 large budgets exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $QP --strategies adaskip --budgets 8,16,24 \
  --tasks speculative --documents stdlib --generation-lengths 1024 --generation-prompts 2 --generation-tokens 32 \
  --speculative-draft-tokens 2,4 --out $Q/speculative > $Q/speculative/eval.log 2>&1
echo "qwen adaskip speculative exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $QL --strategies greedy-loss --budgets 8,16 \
  --tasks speculative --documents stdlib --generation-lengths 1024 --generation-prompts 2 --generation-tokens 32 \
  --speculative-draft-tokens 2,4 --out $Q/greedy-loss/speculative > $Q/greedy-loss/speculative/eval.log 2>&1
echo "qwen greedy-loss speculative exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $QP --strategies adaskip,shortgpt --budgets 4,8 \
  --tasks generation --documents stdlib --generation-lengths 2048 --generation-prompts 2 --generation-tokens 32 \
  --out $Q/generation > $Q/generation/eval.log 2>&1
echo "qwen adaskip generation exit $?"; date -u
$PY -m adaskip eval --model qwen2.5-coder --profile $QL --strategies greedy-loss --budgets 4,8 \
  --tasks generation --documents stdlib --generation-lengths 2048 --generation-prompts 2 --generation-tokens 32 \
  --generation-online-betas 0.95,0.9 --out $Q/greedy-loss/generation > $Q/greedy-loss/generation/eval.log 2>&1
echo "qwen greedy-loss generation exit $?"; date -u
