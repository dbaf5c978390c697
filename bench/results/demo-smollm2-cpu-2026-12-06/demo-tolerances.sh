#!/bin/bash
# make demo's run step on the profile validated with 36 streaming groups (run.sh): the tolerance
# alone (--min-retrieval 0.9), then with --min-agreement 0.8 as well.
set -x
cd /tmp/wt29
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt29
PY=/work/main/.venv/bin/python
P=/tmp/r29/smollm2-essays-kl-demo-profile.json
date -u
$PY -m adaskip demo --profile $P --strategy greedy-kl --min-retrieval 0.9 --max-new-tokens 64 --repeats 3 --window 0 > /tmp/r29/demo-retrieval.log 2>&1
date -u
$PY -m adaskip demo --profile $P --strategy greedy-kl --min-retrieval 0.9 --min-agreement 0.8 --max-new-tokens 64 --repeats 3 --window 0 > /tmp/r29/demo-retrieval-agreement.log 2>&1
date -u
