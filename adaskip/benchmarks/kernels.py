"""Microbenchmarks of adaskip.ops (`adaskip bench kernels`).

On a GPU: each op at LLaMA-3.1-8B (4096) and 70B (8192) hidden sizes, 1 to 32k tokens, in
bf16 / fp16 / fp32. Times are CUDA-event medians over repeats of a CUDA graph of back-to-back
calls, after warm-up; the calls rotate over enough input sets that L2 cannot serve them.
Achieved bandwidth counts the bytes each op must move (inputs read once, outputs written once)
and is compared with a device-to-device copy measured in the same run: the ceiling that says
how good a memory-bound op is. Also: statistics on vs off, scale_rms_norm (what a sublayer skipped
by a plan costs: its compensation and the next norm), torch's unfused add + rms_norm and
mul + rms_norm for context, and the decode FFN through the gated GEMVs against cuBLAS, and cuBLAS
inside a CUDA-graph conditional node (`--only-ffn`), and the decode attention kernel against SDPA
on the same cache, and the attention projections and lm_head through the decode GEMVs against
cuBLAS (`--only-decode`).
On a CPU machine: the PyTorch reference at small sizes, labelled as such (a smoke run, not a
performance figure).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from adaskip import ops
from adaskip.runtime import conditional
from adaskip.skipping.costs import time_in_graph

from .common import device_info, git_commit, now_iso


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--out-dir", type=Path, help="write the JSON to DIR/ops-<device>-<date>.json "
                   "(ffn-gated-... with --only-ffn)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed repeat")
    p.add_argument("--max-sets", type=int, default=64, help="most rotating input sets per size")
    p.add_argument("--no-ffn", dest="ffn", action="store_false", help="skip the gated decode FFN (GPU)")
    p.add_argument("--only-ffn", action="store_true", help="only the gated decode FFN (GPU)")
    p.add_argument("--only-decode", action="store_true", help="only decode attention and the projection GEMVs (GPU)")
    p.add_argument("--contexts", default="8192,32768", help="decode attention: comma-separated KV lengths")


def result_prefix(args) -> str:
    return "ffn-gated" if args.only_ffn else "decode-kernels" if args.only_decode else "ops"


def time_gpu(fn, n_sets: int, warmup: int, repeats: int, calls: int) -> float:
    """Median seconds per call. The calls (cycling over every input set) are captured in one
    CUDA graph and its replays are timed, so host launch overhead does not hide kernel time
    at small sizes; decode runs our ops inside graphs too."""
    return time_in_graph(lambda k: fn(k % n_sets), max(calls, n_sets), warmup, repeats)


def time_cpu(fn, n_sets: int, warmup: int, repeats: int, calls: int) -> float:
    for i in range(warmup):
        fn(i % n_sets)
    samples, k = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(k % n_sets)
            k += 1
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (cudaMemcpyAsync,
    launched eagerly: inside a CUDA graph it becomes a copy-engine node, which is slower)."""
    n = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    if device == "cuda":
        dst.copy_(src)
        torch.cuda.synchronize()
        samples = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                dst.copy_(src)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / 5)
        t = statistics.median(samples)
    else:
        t = time_cpu(lambda i: dst.copy_(src), 1, 1, 3, 1)
    return 2 * n / t


def bench_size(hidden, tokens, dtype, device, timer, copy_bw, args) -> list[dict]:
    elem = torch.finfo(dtype).bits // 8
    tensor_bytes = tokens * hidden * elem
    # Rotate over sets covering at least 4x the L2 so every call reads from device memory.
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) if device == "cuda" else 0
    n_sets = max(1, min(args.max_sets, math.ceil(4 * l2 / (2 * tensor_bytes)))) if device == "cuda" else 1
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype) for _ in range(n_sets)]
    rs = [torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype) * 4 for _ in range(n_sets)]
    w = torch.randn(hidden, generator=g, device=device, dtype=dtype)
    stats = ops.new_stats(2, 1, device)
    gates = ops.new_gates(2, 1, device, state=ops.GATE_SKIP)
    scales = torch.full((2, 1), 1.0, device=device)  # scale 1 keeps values bounded over repeats
    skip_scale = 1.0  # likewise for the plan-skip compensation
    eps = 1e-5
    # The fused op rewrites its inputs; values stay finite (residual grows by x each call, and
    # the normalized x has unit RMS), so repeated calls measure real data.
    cases = {
        "add_rmsnorm+stats": (lambda i: ops.fused_add_rms_norm(xs[i], rs[i], w, eps, stats=stats, sublayer=0), 4),
        "add_rmsnorm": (lambda i: ops.fused_add_rms_norm(xs[i], rs[i], w, eps), 4),
        # A plan-skipped sublayer: residual read and written, x (the next sublayer's input) written.
        "scale_rmsnorm": (lambda i: ops.scale_rms_norm(xs[i], rs[i], w, eps, skip_scale), 3),
        "io_similarity_stats": (lambda i: ops.io_similarity_stats(xs[i], rs[i], stats, 1), 2),
        "skip_or_scale(skip)": (lambda i: ops.skip_or_scale(rs[i], gates, scales, 0), 2),
        "torch add_+rms_norm": (lambda i: xs[i].copy_(F.rms_norm(rs[i].add_(xs[i]), (hidden,), w, eps)), 4),
        "torch mul_+rms_norm": (lambda i: xs[i].copy_(F.rms_norm(rs[i].mul_(skip_scale), (hidden,), w, eps)), 3),
    }
    rows = []
    for name, (fn, passes) in cases.items():
        t = timer(fn, n_sets, args.warmup, args.repeats, args.calls)
        gbps = passes * tensor_bytes / t / 1e9
        rows.append({"op": name, "dtype": str(dtype).replace("torch.", ""), "hidden": hidden,
                     "tokens": tokens, "time_us": round(t * 1e6, 3), "bytes": passes * tensor_bytes,
                     "gbps": round(gbps, 1), "pct_copy_bw": round(100 * gbps * 1e9 / copy_bw, 1),
                     "buffer_sets": n_sets})
    on = next(r for r in rows if r["op"] == "add_rmsnorm+stats")["time_us"]
    off = next(r for r in rows if r["op"] == "add_rmsnorm")["time_us"]
    rows[0]["stats_overhead_pct"] = round(100 * (on / off - 1), 2)
    return rows


def bench_gated_ffn(hidden, ffn, tokens, dtype, copy_bw, args) -> list[dict]:
    """The decode FFN through the gated GEMVs (gated on / off; up to 8 tokens) against cuBLAS
    (F.linear), and cuBLAS inside a CUDA-graph conditional node (predicate true / false: what
    skipping from the device costs where the gated GEMVs do not serve)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g, device="cuda", dtype=dtype)
    wg, wu = (torch.randn(ffn, hidden, generator=g, device="cuda", dtype=dtype) * 0.02 for _ in range(2))
    wd = torch.randn(hidden, ffn, generator=g, device="cuda", dtype=dtype) * 0.02
    act = torch.empty(tokens, ffn, device="cuda", dtype=dtype)
    out = torch.empty(tokens, hidden, device="cuda", dtype=dtype)
    on, off = ops.new_gates(1, tokens, "cuda"), ops.new_gates(1, tokens, "cuda", state=ops.GATE_SKIP)

    def ours(gates):
        def fn(i):
            ops.gated_swiglu_up(x, wg, wu, gates, 0, act)
            ops.gated_linear(act, wd, gates, 0, out)
        return fn

    def cublas(i):
        F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def cublas_if(run: bool):
        predicate = torch.tensor(run, device="cuda")

        def fn(i):
            with conditional.only_if(predicate):
                torch.matmul(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd.t(), out=out)
        return fn

    cases = []
    if tokens <= 8:
        cases += [("ffn gated on", ours(on)), ("ffn gated off", ours(off))]
    cases.append(("ffn cuBLAS", cublas))
    if conditional.supported():
        cases += [("ffn cuBLAS if on", cublas_if(True)), ("ffn cuBLAS if off", cublas_if(False))]
    weight_bytes = 3 * hidden * ffn * x.element_size()
    rows = []
    for name, fn in cases:
        t = time_gpu(fn, 1, args.warmup, args.repeats, args.calls)
        gbps = weight_bytes / t / 1e9
        rows.append({"op": name, "dtype": str(dtype).replace("torch.", ""), "hidden": hidden, "ffn": ffn,
                     "tokens": tokens, "time_us": round(t * 1e6, 3), "bytes": weight_bytes,
                     "gbps": round(gbps, 1), "pct_copy_bw": round(100 * gbps * 1e9 / copy_bw, 1)})
    return rows


def _sets_beyond_l2(nbytes: int, most: int = 64) -> int:
    """Input sets to rotate over so that together they cover 4x the L2: every call reads memory."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(most, math.ceil(4 * l2 / nbytes)))


# Split counts per (sequence, KV head) the decode attention benchmark also times, beside the
# kernel's own choice.
SPLIT_SWEEP = (4, 8, 16, 33, 66, 132)


def bench_decode_attention(context: int, batch: int, dtype, copy_bw, args, heads: int = 32, kv_heads: int = 8,
                           dim: int = 128) -> list[dict]:
    """One query token per sequence over `context` cached tokens (LLaMA-3.1-8B heads by default):
    the split-KV decode kernel against SDPA as graph decode ran it before (the whole static cache
    under a boolean mask of the positions) and SDPA over exactly the filled slots (no mask: its
    fused kernels; needs the length on the host). Bandwidth counts the K and V bytes read once."""
    g = torch.Generator(device="cuda").manual_seed(0)
    kv_bytes = 2 * batch * kv_heads * context * dim * torch.finfo(dtype).bits // 8
    n_sets = _sets_beyond_l2(kv_bytes, most=8)
    caches = [(torch.randn(batch, kv_heads, context, dim, generator=g, device="cuda", dtype=dtype),
               torch.randn(batch, kv_heads, context, dim, generator=g, device="cuda", dtype=dtype))
              for _ in range(n_sets)]
    q = torch.randn(batch, heads, dim, generator=g, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.long)
    mask = (torch.arange(context, device="cuda")[None] < lens[:, None])[:, None, None]  # [B, 1, 1, L]
    q4 = q[:, :, None]

    def kernel(i):
        ops.decode_attention(q, caches[i][0], caches[i][1], lens, out=out)

    def sdpa_masked(i):
        F.scaled_dot_product_attention(q4, caches[i][0], caches[i][1], attn_mask=mask, enable_gqa=True)

    def sdpa_exact(i):
        F.scaled_dot_product_attention(q4, caches[i][0], caches[i][1], enable_gqa=True)

    # Check before timing: the kernel and SDPA agree on this cache.
    kernel(0)
    want = F.scaled_dot_product_attention(q4.float(), caches[0][0].float(), caches[0][1].float(),
                                          enable_gqa=True)[:, :, 0]
    rel_err = ((out.float() - want).norm() / want.norm()).item()
    rows = []
    for name, fn in (("decode attention kernel", kernel), ("SDPA, masked whole cache", sdpa_masked),
                     ("SDPA, exact length", sdpa_exact)):
        t = time_gpu(fn, n_sets, args.warmup, args.repeats, args.calls)
        gbps = kv_bytes / t / 1e9
        rows.append({"op": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "context": context,
                     "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "time_us": round(t * 1e6, 3),
                     "kv_bytes": kv_bytes, "gbps": round(gbps, 1), "pct_copy_bw": round(100 * gbps * 1e9 / copy_bw, 1),
                     "buffer_sets": n_sets})
    ours = rows[0]["time_us"]
    rows[0]["rel_err_vs_fp32_sdpa"] = round(rel_err, 6)
    rows[0]["speedup_vs_sdpa_masked"] = round(rows[1]["time_us"] / ours, 3)
    rows[0]["speedup_vs_sdpa_exact"] = round(rows[2]["time_us"] / ours, 3)
    # The kernel at split counts other than its own choice: where the automatic one stands.
    for splits in SPLIT_SWEEP:
        t = time_gpu(lambda i: ops.decode_attention(q, caches[i][0], caches[i][1], lens, out=out, num_splits=splits),
                     n_sets, args.warmup, args.repeats, args.calls)
        gbps = kv_bytes / t / 1e9
        rows.append({**rows[0], "op": f"kernel, {splits} splits", "num_splits": splits, "time_us": round(t * 1e6, 3),
                     "gbps": round(gbps, 1), "pct_copy_bw": round(100 * gbps * 1e9 / copy_bw, 1),
                     "speedup_vs_sdpa_masked": round(rows[1]["time_us"] / (t * 1e6), 3),
                     "speedup_vs_sdpa_exact": round(rows[2]["time_us"] / (t * 1e6), 3)})
        rows[-1].pop("rel_err_vs_fp32_sdpa", None)
    return rows


# LLaMA-3.1-8B's decode projections: (name, out_features, in_features).
PROJECTIONS = (("q_proj / o_proj", 4096, 4096), ("k_proj / v_proj", 1024, 4096), ("q/k/v fused", 6144, 4096),
               ("down_proj", 4096, 14336), ("lm_head", 128256, 4096))


@contextmanager
def _gemv_pipeline(mode: str):
    """The one-row GEMV kernel forced (`on`: pipelined, `off`: plain) or chosen per launch
    (`auto`, the default) while timing; captured graphs keep the kernel they were captured with."""
    old = os.environ.get("ADASKIP_GEMV_PIPELINE")
    os.environ["ADASKIP_GEMV_PIPELINE"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ADASKIP_GEMV_PIPELINE", None)
        else:
            os.environ["ADASKIP_GEMV_PIPELINE"] = old


def bench_projections(tokens: int, dtype, copy_bw, args) -> list[dict]:
    """Each decode projection through the (ungated) decode GEMV against cuBLAS (F.linear); the
    GEMV as chosen per launch, and its plain and pipelined one-row kernels forced."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n_out, n_in in PROJECTIONS:
        w_bytes = n_out * n_in * torch.finfo(dtype).bits // 8
        n_sets = _sets_beyond_l2(w_bytes, most=16)
        ws = [torch.randn(n_out, n_in, generator=g, device="cuda", dtype=dtype) * 0.02 for _ in range(n_sets)]
        x = torch.randn(tokens, n_in, generator=g, device="cuda", dtype=dtype)
        out = torch.empty(tokens, n_out, device="cuda", dtype=dtype)
        pair = {}
        gemv = lambda i: ops.gated_linear(x, ws[i], None, 0, out)  # noqa: E731
        for label, fn, mode in (("GEMV plain", gemv, "off"), ("GEMV pipelined", gemv, "on"),
                                ("cuBLAS", lambda i: torch.matmul(x, ws[i].t(), out=out), "auto"),
                                ("GEMV", gemv, "auto")):
            with _gemv_pipeline(mode):
                t = time_gpu(fn, n_sets, args.warmup, args.repeats, args.calls)
            pair[label] = t
            gbps = w_bytes / t / 1e9
            rows.append({"op": f"{name} {label}", "projection": name, "path": label, "tokens": tokens,
                         "dtype": str(dtype).replace("torch.", ""), "out_features": n_out, "in_features": n_in,
                         "time_us": round(t * 1e6, 3), "bytes": w_bytes, "gbps": round(gbps, 1),
                         "pct_copy_bw": round(100 * gbps * 1e9 / copy_bw, 1)})
        rows[-1]["speedup_vs_cublas"] = round(pair["cuBLAS"] / pair["GEMV"], 3)
    return rows


def run(args) -> dict:
    """Measures, prints the tables, returns the result (the caller decides where it goes)."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if on_gpu and ops.backend() != "cuda":
        raise ValueError(f"a GPU is present but the CUDA extension is not loaded: {ops.extension_error()}")
    if on_gpu:
        hiddens = [4096, 8192]
        token_counts = [1, 16, 128, 1024, 8192, 32768] if not args.quick else [1, 8192]
        dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
        timer = time_gpu
    else:
        hiddens, token_counts, dtypes = [576], [1, 16, 64], [torch.float32, torch.bfloat16]
        args.repeats, args.calls, args.warmup = min(args.repeats, 5), min(args.calls, 3), 1
        timer = time_cpu
    if args.quick:
        args.repeats = min(args.repeats, 5)

    info = device_info()
    path = "CUDA kernels" if on_gpu else "PyTorch reference on CPU (smoke run, not a performance figure)"
    copy_bw = copy_bandwidth(device)
    print(f"adaskip ops benchmark: {info['device']} | {path} | torch {info['torch']}")
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    rows = []
    for dtype in ([] if args.only_ffn or args.only_decode else dtypes):
        for hidden in hiddens:
            for tokens in token_counts:
                if on_gpu and dtype == torch.float32 and tokens * hidden * 4 > (1 << 30):
                    continue  # fp32 at 32k x 8192: 1 GiB per tensor, not a case we serve
                rows += bench_size(hidden, tokens, dtype, device, timer, copy_bw, args)

    ffn_rows = []
    if on_gpu and args.ffn and not args.only_decode:
        for hidden, ffn in ((4096, 14336), (8192, 28672)):
            for tokens in (1, 2, 4, 8, 32):
                ffn_rows += bench_gated_ffn(hidden, ffn, tokens, torch.bfloat16, copy_bw, args)
    elif args.only_ffn:
        print("the gated decode FFN runs on a GPU only: nothing to measure here")
    attention_rows, projection_rows = [], []
    if on_gpu and not args.only_ffn:
        contexts = [int(c) for c in str(args.contexts).split(",") if c.strip()]
        if not contexts or min(contexts) < 1:
            raise ValueError(f"--contexts must be comma-separated lengths >= 1, got {args.contexts!r}")
        for context in contexts:
            for batch in (1, 4):
                attention_rows += bench_decode_attention(context, batch, torch.bfloat16, copy_bw, args)
        for tokens in (1, 2):
            projection_rows += bench_projections(tokens, torch.bfloat16, copy_bw, args)
    elif args.only_decode:
        print("the decode kernels run on a GPU only: nothing to measure here")
    print_tables(rows, ffn_rows)
    print_decode_tables(attention_rows, projection_rows)
    return {"benchmark": "adaskip.ops", "path": path, "date": now_iso(), "ffn_rows": ffn_rows,
            "decode_attention_rows": attention_rows, "projection_rows": projection_rows,
            "git_commit": git_commit(), **info, "copy_gbps": round(copy_bw / 1e9, 1),
            "timing": {"warmup": args.warmup, "repeats": args.repeats, "calls_per_repeat": args.calls,
                       "statistic": "median"},
            "rows": rows}


def print_tables(rows: list, ffn_rows: list) -> None:
    if rows:
        hdr = (f"{'op':<22}{'dtype':>9}{'hidden':>7}{'tokens':>7}{'time us':>11}{'GB/s':>9}{'% copy':>8}"
               f"{'stats +%':>9}")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            extra = f"{r['stats_overhead_pct']:>9.2f}" if "stats_overhead_pct" in r else ""
            print(f"{r['op']:<22}{r['dtype']:>9}{r['hidden']:>7}{r['tokens']:>7}{r['time_us']:>11.2f}"
                  f"{r['gbps']:>9.1f}{r['pct_copy_bw']:>8.1f}{extra}")
    if ffn_rows:
        print(f"\n{'decode FFN':<18}{'hidden':>7}{'ffn':>7}{'tokens':>7}{'time us':>10}{'GB/s':>9}{'% copy':>8}")
        for r in ffn_rows:
            print(f"{r['op']:<18}{r['hidden']:>7}{r['ffn']:>7}{r['tokens']:>7}{r['time_us']:>10.2f}"
                  f"{r['gbps']:>9.1f}{r['pct_copy_bw']:>8.1f}")


def print_decode_tables(attention_rows: list, projection_rows: list) -> None:
    if attention_rows:
        print(f"\n{'decode attention':<26}{'batch':>6}{'context':>8}{'time us':>10}{'GB/s':>9}{'% copy':>8}"
              f"{'x masked':>9}{'x exact':>9}")
        for r in attention_rows:
            extra = (f"{r['speedup_vs_sdpa_masked']:>9.2f}{r['speedup_vs_sdpa_exact']:>9.2f}"
                     if "speedup_vs_sdpa_masked" in r else "")
            print(f"{r['op']:<26}{r['batch']:>6}{r['context']:>8}{r['time_us']:>10.2f}{r['gbps']:>9.1f}"
                  f"{r['pct_copy_bw']:>8.1f}{extra}")
    if projection_rows:
        print(f"\n{'decode projection':<26}{'tokens':>7}{'time us':>10}{'% copy':>8}{'x cuBLAS':>10}")
        for r in projection_rows:
            extra = f"{r['speedup_vs_cublas']:>10.2f}" if "speedup_vs_cublas" in r else ""
            print(f"{r['op']:<26}{r['tokens']:>7}{r['time_us']:>10.2f}{r['pct_copy_bw']:>8.1f}{extra}")
