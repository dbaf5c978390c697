#!/bin/bash
# Issue 29: the targets run at 4k as two evals, pass keys and needles (run2.sh's 4k eval of both
# was stopped after its full-model pass keys: alone at the end it would not finish in the session).
# One thread each, beside run.sh's 6k and run2.sh's 2k evals.
set -x
cd /tmp/wt-eval
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt-eval
PY=/work/main/.venv/bin/python
P=/tmp/ev29/profile/smollm2-essays-kl-demo-profile.json  # make demo's profile from .cache: the JSON of demo-smollm2-cpu-2026-12-06/profile/, with its stand-ins file
O=/tmp/ev29/eval-smollm2-targets-cpu-2026-12-06
rm -rf $O/4k
mkdir -p $O/4k-passkey $O/4k-needle
date -u
for task in passkey needle; do
  $PY -m adaskip eval --model smollm2 --profile $P --strategies greedy-kl --budgets 8,16 \
    --streaming-groups 29 --min-agreement 0.8 --min-retrieval 0.9 --context-len 6144 --phase prefill \
    --tasks $task --retrieval-lengths 4096 --retrieval-samples 8 --retrieval-batch 2 \
    --out $O/4k-$task > $O/4k-$task/eval.log 2>&1 &
done
wait; echo "4k exit $?"; date -u
