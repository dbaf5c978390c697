#!/bin/bash
# Issue 29, two kl-search variants against grid16's greedy-kl (late weighting, 4 probes, weight 4):
#   uniform/  --search-weighting uniform (does the late weighting help at 2k?)
#   probes8/  --search-probes 8 (do more probes keep the needle at 8 sublayers?)
# Same data, requests, shortlist and eval seeds as eval-smollm2-retrieval-grid16-cpu-2026-12-05.
# Run from a worktree at the commit under test, so the provenance is that commit.
set -x
cd /tmp/x29wt
export PYTHONPATH=/tmp/x29wt
A=/work/main/.venv/bin/adaskip
O=/tmp/x29
for V in uniform probes8; do
  mkdir -p $O/$V/grid $O/$V/ppl-essays $O/$V/ppl-pydoc $O/$V/ppl-stdlib
  P=$O/$V/smollm2-essays-kl-$V-profile.json
  if [ $V = uniform ]; then X="--search-weighting uniform"; else X="--search-probes 8"; fi
  date -u
  $A calibrate --model smollm2 --data essays --num-requests 8 --prompt-len 2048 \
    --search kl --search-candidates 6 --search-max 8 $X --out $P > $O/$V/calibrate.log 2>&1 || exit 1
  date -u
  $A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks passkey,needle \
    --retrieval-lengths 2048,4096 --retrieval-samples 8 --retrieval-batch 2 --out $O/$V/grid > $O/$V/grid/eval.log 2>&1
  date -u
done
for V in uniform probes8; do
  P=$O/$V/smollm2-essays-kl-$V-profile.json
  $A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks ppl --documents essays \
    --window-len 2048 --windows 4 --out $O/$V/ppl-essays > $O/$V/ppl-essays/eval.log 2>&1
  $A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks ppl \
    --documents /root/.pyenv/versions/3.11.7/lib/python3.11/pydoc_data/topics.py \
    --window-len 2048 --windows 4 --out $O/$V/ppl-pydoc > $O/$V/ppl-pydoc/eval.log 2>&1
  $A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8 --tasks ppl --documents stdlib \
    --window-len 2048 --windows 4 --out $O/$V/ppl-stdlib > $O/$V/ppl-stdlib/eval.log 2>&1
  date -u
done
