#!/bin/bash
# After run.sh: the 6k needle cell of the same 29 groups (ranked on 6000-token probes), 24 prompts.
set -x
cd /tmp/wt29b
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt29b
date -u
/work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out /tmp/kv6k \
  --scores /tmp/r29/smollm2-essays-kl-demo-profile.json --lengths 6144 --samples 8 --kinds needle --configs stream29
date -u
