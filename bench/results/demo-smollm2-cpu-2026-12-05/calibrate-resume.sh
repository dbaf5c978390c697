#!/bin/bash
# The demo's profile on today's defaults (kl, scalar stand-ins, retrieval weight 4): the Makefile's
# calibrate command with --resume, from a partial made of the grid16 calibration (same data, requests,
# search settings; its kl search went to 16, so resuming keeps it and only validation runs).
set -x
cd /work/main
date -u
.venv/bin/python -m adaskip calibrate --model smollm2 --data essays \
  --num-requests 8 --prompt-len 2048 --search kl --search-max 8 \
  --validate-budgets 4,6,8 --validate-strategies greedy-kl --validation-requests 9 \
  --validation-len 6000 --validation-probes 8 --out .cache/smollm2-essays-kl-demo-profile.json --resume
date -u
