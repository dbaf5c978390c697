#!/bin/bash
# The roofline's equal-cost point at 6k: 29 streaming groups (costs.md: groups = kl8 at 6144 tokens,
# window 256) on all 24 of the eval's 6144-token pass-key prompts (the cell 36 groups missed).
cd /tmp/ttftwt
PYTHONPATH=/tmp/ttftwt /work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out /tmp/kv29 \
  --scores /work/main/bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05/scores-w256.json \
  --lengths 6144 --samples 8 --kinds passkey --configs stream29
