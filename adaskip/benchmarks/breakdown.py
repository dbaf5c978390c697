"""Where the milliseconds of one CUDA-graph decode step go (`adaskip bench e2e --breakdown`).

A decode step of the runtime is captured in a CUDA graph as generation captures it (same
schedule, same kernels), replayed over a prompt of the given length, and timed with CUDA events
(median per replay). The torch profiler then records the kernels of more replays, and their
device time is summed per kind of kernel. The step is set against its roofline: the bytes it
must move (every weight it reads once, the KV cache of the attention layers that run once)
over the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import statistics
from typing import Optional

import torch

from adaskip._util import cuda_event_seconds
from adaskip.runtime.decode import DecodeState, decode_one_token
from adaskip.runtime.generation import prefill
from adaskip.runtime.sampling import SamplingParams
from adaskip.runtime.schedule import DecodePaths, schedule_step

# Kernel kinds by name, first match wins (names are lower-cased).
KINDS = (
    ("attention: decode kernel", ("split_kv_kernel", "merge_splits_kernel")),
    ("attention: SDPA", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMVs (ours: FFN, projections)", ("gated_gemv",)),
    ("cuBLAS GEMM / GEMV", ("gemm", "gemv", "xmma", "nvjet", "cutlass", "cublas", "splitk")),
    ("add + RMSNorm / skips (ours)", ("add_rms", "rms_norm", "scale_rms", "skip_or_scale", "similarity",
                                      "update_gates", "residual")),
    ("rotary, KV writes, sampling, other", ("",)),
)


def kind_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    for kind, needles in KINDS:
        if any(n in name for n in needles):
            return kind
    return KINDS[-1][0]


def roofline_bytes(model, context: int, batch: int = 1, plan=None) -> dict:
    """Bytes one decode step must move at `context` cached tokens: every weight a running
    sublayer reads (and the norms, the lm_head; of the embedding one row per sequence), and the
    K and V of every attention layer that runs."""
    skipped = set(plan.phase("decode").skip_scales) if plan is not None else set()
    skipped |= set(model.args.absent_sublayers)
    layers = model.model.layers
    weights = 0
    for i, layer in enumerate(layers):
        for s, module in ((2 * i, layer.self_attn), (2 * i + 1, layer.mlp)):
            if s not in skipped:
                weights += sum(p.numel() * p.element_size() for p in module.parameters())
        weights += sum(p.numel() * p.element_size() for p in (layer.input_layernorm.weight,
                                                                layer.post_attention_layernorm.weight))
    head = model.lm_head.weight
    weights += head.numel() * head.element_size() + model.model.norm.weight.numel() * head.element_size()
    weights += batch * model.args.hidden_size * head.element_size()  # the embedding rows
    a = model.args
    running_attention = sum(1 for i in range(a.num_layers) if 2 * i not in skipped)
    kv = 2 * batch * running_attention * a.num_kv_heads * (context + 1) * a.head_dim * head.element_size()
    return {"weight_bytes": weights, "kv_bytes": kv, "total_bytes": weights + kv}


def _capture(model, state, schedule):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_one_token(model, state, schedule)
        state.record()
    return graph


@torch.inference_mode()
def graph_decode_breakdown(model, context: int, *, batch: int = 1, plan=None, paths: Optional[DecodePaths] = None,
                           steps: int = 16, repeats: int = 5, copy_bw: Optional[float] = None,
                           profile: bool = True, seed: int = 0) -> dict:
    """One graph-decode step after a random prompt of `context` tokens: its median time, the
    device time of its kernels by kind (profiled replays), and its roofline. `paths` (default:
    the model's own) chooses the decode kernels for this measurement only; the model's caches
    and decode graphs are left as they were."""
    device = model.lm_head.weight.device
    if device.type != "cuda":
        raise ValueError("adaskip: the decode breakdown times CUDA-graph replays: it needs a GPU")
    if steps < 1 or repeats < 1:
        raise ValueError(f"adaskip: need steps >= 1 and repeats >= 1, got {steps} and {repeats}")
    saved_paths = model.decode_paths
    if paths is not None:
        model.decode_paths = paths
    needed = context + steps + 2
    gen = torch.Generator().manual_seed(seed)
    try:
        with model.scratch_caches(batch, needed, model.attention_layers_for(plan)):
            ids = torch.randint(0, model.args.vocab_size, (batch, context), generator=gen).to(device)
            lens = torch.full((batch,), context, dtype=torch.long, device=device)
            token = prefill(model, ids, lens, plan=plan, chunk=context).argmax(-1)
            state = DecodeState(batch, needed, 1, device)
            eos = torch.full((1,), -1, dtype=torch.long, device=device)  # never produced: every step runs
            schedule = schedule_step(model, batch=batch, tokens=1, plan=plan.phase("decode") if plan else None,
                                     capturing=True)

            def restart():
                state.start(token, lens, steps + 1, eos, SamplingParams(), None, None, None)

            restart()
            decode_one_token(model, state, schedule)  # eager warm-up (kernels loaded, workspaces sized)
            restart()
            graph = _capture(model, state, schedule)
            step_s = statistics.median(_step_times(graph, restart, steps, repeats))
            kinds, top, source = {}, [], None
            if profile:
                kinds, top = _profile(graph.replay, restart, steps)
                source = "CUDA-graph replays"
                if sum(kinds.values()) < 0.1 * step_s * 1e3:
                    # This profiler does not see the kernels inside graph replays: the same step
                    # run eagerly has the same kernels (its launch gaps aside).
                    def eager_step():
                        decode_one_token(model, state, schedule)
                        state.record()

                    kinds, top = _profile(eager_step, restart, steps)
                    source = "the same step run eagerly"
            del graph
    finally:
        model.decode_paths = saved_paths
    paths_used = {"attention": schedule.decode_attention, "projections": "gemv" if schedule.gemv_projections else "cublas",
                  "lm_head": "gemv" if schedule.gemv_lm_head else "cublas"}
    out = {"context": context, "batch": batch, "step_ms": round(step_s * 1e3, 4), "paths": paths_used,
           **roofline_bytes(model, context, batch, plan)}
    if copy_bw:
        floor = out["total_bytes"] / copy_bw
        out.update({"roofline_ms": round(floor * 1e3, 4), "of_roofline": round(floor / step_s, 4)})
    if kinds:
        kernels_ms = sum(kinds.values())
        out["kernel_ms"] = round(kernels_ms, 4)
        out["kinds_ms"] = {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        out["kinds_share"] = {k: round(v / kernels_ms, 4) for k, v in out["kinds_ms"].items()}
        out["gaps_ms"] = round(step_s * 1e3 - kernels_ms, 4)  # launch gaps and idle time inside the step
        out["top_kernels"] = top
        out["profiled"] = source
    return out


def kernel_ms(prof) -> dict:
    """Device milliseconds per kernel name in a finished torch profile (the attribute is
    self_device_time_total in recent torch, self_cuda_time_total before)."""
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and str(getattr(e, "device_type", "")).endswith("CUDA"):
            out[e.key] = out.get(e.key, 0.0) + t / 1e3
    return out


def _step_times(graph, restart, steps: int, repeats: int) -> list:
    """Seconds per decode step: `steps - 1` replays after a warm one, from a restarted state
    (single replays when there is one step)."""
    if steps > 1:
        def warm():
            restart()
            graph.replay()

        def rest():
            for _ in range(steps - 1):
                graph.replay()

        return cuda_event_seconds(rest, repeats, before=warm, per_call=steps - 1)
    return cuda_event_seconds(graph.replay, repeats, before=restart)


def _profile(run_step, restart, steps: int):
    """Device time per step of the kernels of `steps` calls of run_step, by kind, and the ten
    costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    restart()
    run_step()
    torch.cuda.synchronize()
    restart()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
    per_kernel = {name: ms / steps for name, ms in kernel_ms(prof).items()}
    kinds = {}
    for name, ms in per_kernel.items():
        if name.lower().startswith(("memcpy", "memset")) and ms == 0:
            continue
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    top = [{"kernel": n[:120], "kind": kind_of(n), "ms": round(ms, 4)}
           for n, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10]]
    return kinds, top


def print_breakdown(r: dict) -> None:
    p = r["paths"]
    line = (f"  graph decode step at {r['context']} tokens (attention {p['attention']}, projections "
            f"{p['projections']}, lm_head {p['lm_head']}): {r['step_ms']:.3f} ms")
    if "roofline_ms" in r:
        line += (f"; roofline {r['roofline_ms']:.3f} ms ({r['total_bytes'] / 1e9:.2f} GB: weights "
                 f"{r['weight_bytes'] / 1e9:.2f}, KV {r['kv_bytes'] / 1e9:.2f}) -> {100 * r['of_roofline']:.1f} %")
    print(line)
    if "kinds_ms" in r:
        for kind, ms in r["kinds_ms"].items():
            print(f"    {kind:<40}{ms:>9.3f} ms{100 * r['kinds_share'][kind]:>7.1f} %")
        print(f"    {'kernels in all / gaps':<40}{r['kernel_ms']:>9.3f} ms / {r['gaps_ms']:.3f} ms "
              f"(profiled: {r['profiled']})")


@torch.inference_mode()
def prefill_breakdown(model, context: int, *, batch: int = 1, plan=None, repeats: int = 2, seed: int = 0) -> dict:
    """One prefill pass of `context` random tokens (one chunk, as `bench e2e` runs it): its
    median time (CUDA events) and the device time of its kernels by kind (one profiled pass).
    Set against the full model's, it shows what a plan's skipped sublayers still cost and where
    the rest of the gap to the ideal goes."""
    from torch.profiler import ProfilerActivity, profile

    device = model.lm_head.weight.device
    if device.type != "cuda":
        raise ValueError("adaskip: the prefill breakdown times CUDA kernels: it needs a GPU")
    gen = torch.Generator().manual_seed(seed)
    with model.scratch_caches(batch, context, model.attention_layers_for(plan)):
        ids = torch.randint(0, model.args.vocab_size, (batch, context), generator=gen).to(device)
        lens = torch.full((batch,), context, dtype=torch.long, device=device)
        prefill(model, ids, lens, plan=plan, chunk=context)  # warm-up
        times = [s * 1e3 for s in cuda_event_seconds(lambda: prefill(model, ids, lens, plan=plan, chunk=context),
                                                     repeats)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill(model, ids, lens, plan=plan, chunk=context)
            torch.cuda.synchronize()
    kinds = {}
    for name, ms in kernel_ms(prof).items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    prefill_ms = statistics.median(times)
    kernels_ms = sum(kinds.values())
    return {"context": context, "batch": batch, "prefill_ms": round(prefill_ms, 4), "kernel_ms": round(kernels_ms, 4),
            "gaps_ms": round(prefill_ms - kernels_ms, 4),
            "kinds_ms": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}


def print_prefill_breakdown(r: dict, label: str) -> None:
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["kinds_ms"].items())
    print(f"  prefill {r['context']} ({label}): {r['prefill_ms']:.1f} ms, kernels {r['kernel_ms']:.1f} ms "
          f"(gaps {r['gaps_ms']:.1f}): {kinds}")
