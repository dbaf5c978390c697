#!/bin/bash
# Issue 29: Prune&Comp-style refit of the greedy-kl plans' stand-ins under the plan (grid16 profile).
set -x
cd /work/main
date -u
OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/experiments/refit_stand_ins.py \
  --profile bench/results/eval-smollm2-retrieval-grid16-cpu-2026-12-05/smollm2-essays-search16-profile.json \
  --budgets 8,16 --documents essays --documents /root/.pyenv/versions/3.11.7/lib/python3.11/pydoc_data/topics.py \
  --documents stdlib --retrieval-budgets 8 --retrieval-lengths 4096 --retrieval-samples 8 --retrieval-batch 2 \
  --out /tmp/refit
date -u
