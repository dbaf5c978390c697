#!/bin/bash
# Issue 29: Qwen2.5-Coder-0.5B passkey at 4k (24 prompts) and 8k (8 prompts) with the greedy-loss
# plan of 16 sublayers from the 2026-11-26 profile (loss search on 8 x 1024 stdlib tokens).
set -x
cd /work/main
A=.venv/bin/adaskip
O=/tmp/qwen
P=bench/results/eval-qwen2.5-coder-stdlib-cpu-2026-11-26/greedy-loss/profile.json
date -u
mkdir -p $O/passkey-4k $O/passkey-8k
$A eval --model qwen2.5-coder --profile $P --strategies full,greedy-loss --budgets 16 --tasks passkey \
  --retrieval-lengths 8192 --retrieval-depths 0.1,0.3,0.7,0.9 --retrieval-samples 2 --retrieval-batch 2 \
  --out $O/passkey-8k > $O/passkey-8k/eval.log 2>&1
date -u
$A eval --model qwen2.5-coder --profile $P --strategies full,greedy-loss --budgets 16 --tasks passkey \
  --retrieval-lengths 4096 --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 8 --retrieval-batch 4 \
  --out $O/passkey-4k > $O/passkey-4k/eval.log 2>&1
date -u
