#!/bin/bash
# After runB.sh (pid given): eval-smollm2-kl-weighting-cpu-2026-12-05's calibration again, from the
# clean worktree of 02772de: the kl search with --search-weighting uniform, the other settings as
# that profile recorded them (scalar stand-in, retrieval weight 4, 4 probes, 6 candidates, 8 steps;
# the defaults now, given anyway). One thread.
while kill -0 $1 2>/dev/null; do sleep 20; done
cd /tmp/wt32
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt32
PY=/work/main/.venv/bin/python
O=/tmp/r32/uniform
date -u
$PY -m adaskip calibrate --model smollm2 --data essays --num-requests 8 --prompt-len 2048 \
  --search kl --search-candidates 6 --search-max 8 --search-weighting uniform \
  --search-stand-in scalar --search-retrieval-weight 4 --search-probes 4 \
  --out $O/smollm2-essays-kl-uniform-profile.json > $O/calibrate.log 2>&1
echo "calibrate exit $?"
date -u
