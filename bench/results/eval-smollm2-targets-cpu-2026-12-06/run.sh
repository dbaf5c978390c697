#!/bin/bash
# Issue 29: the targets run. Two evals side by side, one thread each, on the demo's profile
# (make demo's calibration, committed under demo-smollm2-cpu-2026-12-06/profile/), from a clean
# worktree of the commit that adds eval --streaming-groups / --min-retrieval; output outside it.
set -x
cd /tmp/wt-eval
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt-eval
PY=/work/main/.venv/bin/python
P=/tmp/ev29/profile/smollm2-essays-kl-demo-profile.json  # make demo's profile from .cache: the JSON of demo-smollm2-cpu-2026-12-06/profile/, with its stand-ins file
O=/tmp/ev29/eval-smollm2-targets-cpu-2026-12-06
mkdir -p $O/2k-4k $O/6k
date -u
$PY -m adaskip eval --model smollm2 --profile $P --strategies greedy-kl --budgets 8,16 \
  --streaming-groups 29 --min-agreement 0.8 --min-retrieval 0.9 --context-len 6144 --phase prefill \
  --tasks ppl,passkey,needle --documents essays --window-len 2048 --windows 4 \
  --retrieval-lengths 2048,4096 --retrieval-samples 8 --retrieval-batch 2 --out $O/2k-4k > $O/2k-4k/eval.log 2>&1 &
A=$!
$PY -m adaskip eval --model smollm2 --profile $P --strategies greedy-kl --budgets 8 \
  --streaming-groups 29 --min-agreement 0.8 --min-retrieval 0.9 --context-len 6144 --phase prefill \
  --tasks passkey,needle --retrieval-lengths 6144 --retrieval-samples 4 --retrieval-batch 2 \
  --out $O/6k > $O/6k/eval.log 2>&1 &
B=$!
wait $A; echo "2k-4k exit $?"; date -u
wait $B; echo "6k exit $?"; date -u
