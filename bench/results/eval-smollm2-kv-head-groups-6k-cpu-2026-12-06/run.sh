#!/bin/bash
# Issue 29's 6k pass-key cell with the groups ranked on 6000-token probes (the demo profile's
# calibration, /tmp/r29): the 6k equal-cost point of greedy-kl 8 (29 groups), 24 pass-key prompts.
set -x
cd /tmp/wt29b
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt29b
date -u
/work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out /tmp/kv6k \
  --scores /tmp/r29/smollm2-essays-kl-demo-profile.json --lengths 6144 --samples 8 --kinds passkey --configs stream29
date -u
