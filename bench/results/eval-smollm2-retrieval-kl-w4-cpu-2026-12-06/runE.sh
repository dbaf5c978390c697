#!/bin/bash
# Issue 31: rerun of eval-smollm2-retrieval-kl-w4-cpu-2026-12-05 (its JSON's `command` is not the
# argv, no dirty state; its profile has no record of its run) with the commands its README
# section records, from a clean worktree of ceafa42 (calibrate writes provenance into the
# profile), one thread beside the last Qwen rerun (after runD.sh); output outside the tree.
set -x
cd /tmp/wt31e
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt31e
PY=/work/main/.venv/bin/python
O=/tmp/r31/eval-smollm2-retrieval-kl-w4-cpu-2026-12-06
P=$O/smollm2-essays-kl-retrieval-w4-profile.json
until grep -q "qwen adaskip generation exit" /tmp/r31/runD.log; do sleep 20; done
mkdir -p $O
date -u
$PY -m adaskip calibrate --model smollm2 --data essays --num-requests 8 --prompt-len 2048 --search kl \
  --search-stand-in linear --search-max 8 --search-probes 4 --search-retrieval-weight 4 --out $P > $O/calibrate.log 2>&1
echo "calibrate exit $?"; date -u
$PY -m adaskip eval --model smollm2 --profile $P \
  --strategies full,greedy-kl --budgets 6,8 --tasks ppl,passkey,needle --documents essays \
  --window-len 2048 --windows 4 --retrieval-lengths 2048,4096 --retrieval-samples 2 --retrieval-batch 2 \
  --out $O > $O/eval.log 2>&1
echo "eval exit $?"; date -u
