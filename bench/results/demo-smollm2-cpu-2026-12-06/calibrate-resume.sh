#!/bin/bash
# Issue 29: the demo's profile (commit a2b317c's make demo calibration, its kl search kept by --resume)
# validated again with 36 streaming KV-head groups alone and on the 4- and 8-sublayer plans, at the
# demo's 6000-token validation length; then which plan --min-retrieval 0.9 chooses at 6000 tokens.
set -x
cd /tmp/wt29
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt29
PY=/work/main/.venv/bin/python
O=/tmp/r29
date -u
$PY -m adaskip calibrate --model smollm2 --data essays \
  --num-requests 8 --prompt-len 2048 --search kl --search-max 8 \
  --validate-budgets 4,8 --validate-strategies greedy-kl --validation-requests 9 \
  --validation-len 6000 --validation-probes 8 --streaming-probes 8 --validate-streaming 36 \
  --out $O/smollm2-essays-kl-demo-profile.json --resume
date -u
