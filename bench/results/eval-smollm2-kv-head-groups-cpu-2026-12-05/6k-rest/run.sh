#!/bin/bash
# The 6k cells of issue 29's table at 24 prompts a cell: the eval's 6144-token passkey / needle tasks
# (seed 0, depths 0.1/0.5/0.9, 8 samples a depth) that earlier runs did not cover: 36 streaming groups
# on samples 3..7 (samples 0..2 are in eval.json of the folder above), the full model on samples 4..7
# (0..3 are in the grid16 folder's grid6k/).
cd /tmp/ttftwt
while pgrep -f "kv_head_groups.py ttft" >/dev/null; do sleep 10; done
S=/work/main/bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05/scores-w256.json
X="/work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out /tmp/kv6k --scores $S --lengths 6144 --samples 8"
PYTHONPATH=/tmp/ttftwt $X --configs stream36 --skip-samples 3
PYTHONPATH=/tmp/ttftwt $X --configs full --skip-samples 4
