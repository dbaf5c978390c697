#!/bin/bash
# Issue 29, streaming KV-head groups on SmolLM2 (CPU fp32, shared 2-core machine).
# score (done first, 19:12-19:24 UTC): python bench/experiments/kv_head_groups.py score --window 256
# pilot (19:24-19:42): ... eval --out $R/pilot --scores $R/scores-w256.json --configs stream36 kl4+stream17 \
#   --lengths 4096 --samples 1 --ppl
# Then, in this order: the full model on one cell of the grid (2k passkey at depth 0.5: 7 of 8 there),
# stream36 at 4k and 2k with the grid's 24 prompts a cell, then 6k with 12 a cell if time allows.
set -x
cd /work/wt-29kv
R=bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05
X="env PYTHONPATH=/work/wt-29kv /work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out $R"
date -u
$X --configs full --lengths 2048 --depths 0.5 --kinds passkey --samples 8
date -u
$X --configs stream36 --lengths 4096 --samples 8 --ppl
date -u
$X --configs stream36 --lengths 2048 --samples 8
date -u
$X --configs stream36 --lengths 6144 --samples 4
date -u
