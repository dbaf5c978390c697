#!/bin/bash
# stop runB.sh once its SmolLM2 runs are done (its Qwen runs move to runC.sh / runD.sh, on new profiles)
until grep -q "smollm2 large budgets exit" /tmp/r31/runB.log; do sleep 10; done
pkill -f runB.sh; sleep 1; pkill -f "eval-qwen2.5-coder-decode-cpu-2026-12-06"
nohup /tmp/r31/runC.sh > /tmp/r31/runC.log 2>&1 &
nohup /tmp/r31/runD.sh > /tmp/r31/runD.log 2>&1 &
