#!/bin/bash
# Issue 29 grid: one calibration (kl default / loss / blockpruner to 16 on a 6-candidate shortlist),
# then perplexity off the essays and the 24-prompt retrieval grid.
set -x
cd /work/main
A=.venv/bin/adaskip
O=/tmp/g16
P=$O/smollm2-essays-search16-profile.json
date -u
$A calibrate --model smollm2 --data essays --num-requests 8 --prompt-len 2048 \
  --search kl,loss,blockpruner --search-candidates 6 --search-max 16 --out $P > $O/calibrate.log 2>&1 || exit 1
date -u
mkdir -p $O/ppl-essays $O/ppl-pydoc $O/ppl-stdlib $O/grid
S=full,greedy-kl,greedy-loss,blockpruner
$A eval --model smollm2 --profile $P --strategies $S --budgets 8,16 --tasks ppl --documents essays \
  --window-len 2048 --windows 4 --out $O/ppl-essays > $O/ppl-essays/eval.log 2>&1
$A eval --model smollm2 --profile $P --strategies $S --budgets 8,16 --tasks ppl \
  --documents /root/.pyenv/versions/3.11.7/lib/python3.11/pydoc_data/topics.py \
  --window-len 2048 --windows 4 --out $O/ppl-pydoc > $O/ppl-pydoc/eval.log 2>&1
$A eval --model smollm2 --profile $P --strategies $S --budgets 8,16 --tasks ppl --documents stdlib \
  --window-len 2048 --windows 4 --out $O/ppl-stdlib > $O/ppl-stdlib/eval.log 2>&1
date -u
$A eval --model smollm2 --profile $P --strategies full,greedy-kl --budgets 8,16 --tasks passkey,needle \
  --retrieval-lengths 2048,4096,6144 --retrieval-samples 8 --retrieval-batch 2 --out $O/grid > $O/grid/eval.log 2>&1
date -u
