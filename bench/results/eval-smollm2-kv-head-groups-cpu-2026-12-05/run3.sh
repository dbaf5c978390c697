#!/bin/bash
# After run2.sh (pid 14496): a pilot of the 16-sublayer equivalent at 4k (72 groups ~ greedy-kl 16's
# predicted prefill saving at 4k, costs.md), 1 prompt per depth, with perplexity.
set -x
cd /work/wt-29kv
R=bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05
while kill -0 14496 2>/dev/null; do sleep 5; done
date -u
env PYTHONPATH=/work/wt-29kv /work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out $R/pilot \
  --scores $R/scores-w256.json --configs stream72 --lengths 4096 --samples 1 --ppl
date -u
