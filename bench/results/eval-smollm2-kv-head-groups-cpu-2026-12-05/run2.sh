#!/bin/bash
# Continuation of run.sh after its stream36 4k stage (pid 14451): run.sh was stopped before its 6k
# line because 12 prompts a cell at 6k do not fit the session's CPU time on the shared machine;
# 6k gets 1 prompt per depth (3 a cell) instead.
set -x
cd /work/wt-29kv
R=bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-05
X="env PYTHONPATH=/work/wt-29kv /work/main/.venv/bin/python bench/experiments/kv_head_groups.py eval --out $R"
while kill -0 14451 2>/dev/null; do sleep 5; done
date -u
$X --configs stream36 --lengths 2048 --samples 8
date -u
$X --configs stream36 --lengths 6144 --samples 1
date -u
