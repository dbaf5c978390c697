#!/bin/bash
# Issue 31: rerun of eval-smollm2-retrieval-cpu-2026-11-22 with today's code, the command its
# README section records, on the profile the essays rerun wrote (eval-smollm2-essays-cpu-2026-12-06/profile.json);
# 1 thread, output outside the tree so it stays clean.
set -x
cd /tmp/wt31
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31
PY=/work/main/.venv/bin/python
O=/tmp/r31/eval-smollm2-retrieval-cpu-2026-12-06
mkdir -p $O
date -u
$PY -m adaskip eval --model smollm2 --profile /tmp/r31/eval-smollm2-essays-cpu-2026-12-06/profile.json \
  --strategies adaskip,greedy-loss,shortgpt,early-exit,skipdecode,unified --budgets 8,16 \
  --tasks passkey,needle --retrieval-lengths 1024,2048 --retrieval-depths 0.1,0.5,0.9 \
  --retrieval-samples 2 --retrieval-batch 6 --out $O > $O/eval.log 2>&1
echo "exit $?"
date -u
