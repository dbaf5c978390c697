#!/bin/bash
# After run3.sh (pid 18407): 6k, the 2nd and 3rd prompt of each depth (run2.sh ran the 1st).
set -x
cd /work/wt-29kv
R=bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05
while kill -0 18407 2>/dev/null; do sleep 5; done
date -u
env PYTHONPATH=/work/wt-29kv /work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out $R \
  --configs stream36 --lengths 6144 --samples 3 --skip-samples 1
date -u
