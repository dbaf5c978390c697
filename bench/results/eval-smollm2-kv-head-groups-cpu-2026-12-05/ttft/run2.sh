#!/bin/bash
# After the 4k ttft run: the same at 2k and 6k (3 rounds), appended to ttft.json.
cd /tmp/ttftwt
while pgrep -f "kv_head_groups.py ttft --out /tmp/ttft --scores" >/dev/null; do sleep 10; done
PYTHONPATH=/tmp/ttftwt /work/main/.venv/bin/python bench/experiments/kv_head_groups.py ttft --out /tmp/ttft \
  --scores /work/main/bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05/scores-w256.json \
  --configs full kl8 stream36 --ttft-lengths 2048 6144 --repeats 3 --threads 1
