"""Per-sublayer costs at a context length, and the cost-aware choice of sublayers to skip.

The paper's planner counts a sublayer as half a layer (alpha = M / (M - m)). Attention and FFN do
not cost the same: attention grows with the context (the KV-cache read in decode, the n^2 score
work in prefill), the FFN does not. This module gives

- `sublayer_costs`: a roofline (FLOP / byte) model of each sublayer's time on a device,
- `measure_sublayer_costs`: the same, timed on a real model of the runtime,
- `select_by_cost`: the set of sublayers that reaches a requested speedup with the least
  importance lost (a 0/1 knapsack, exact up to the discretisation of the costs),
- `paper_speedup`: the paper's equal-cost estimate, for comparison.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .._util import cuda_event_seconds
from ..runtime.config import ModelArgs
from ..runtime.schedule import schedule_step

MODES = ("prefill", "decode")


@dataclass(frozen=True)
class DeviceSpec:
    """The two ceilings of the roofline."""

    flops_per_s: float  # dense matmul rate in the model dtype
    bytes_per_s: float  # memory bandwidth
    name: str = "custom device"

    def __post_init__(self):
        if not (self.flops_per_s > 0 and self.bytes_per_s > 0):
            raise ValueError(f"adaskip: a DeviceSpec needs positive rates, got {self.flops_per_s} FLOP/s "
                             f"and {self.bytes_per_s} B/s")


# Below the datasheet peaks (989 TFLOP/s, 3.35 TB/s), which are never reached: the copy bandwidth
# is measured (2976-3004 GB/s in bench/results/), the 790 TFLOP/s is an assumption no result file holds.
H100_SPEC = DeviceSpec(flops_per_s=7.9e14, bytes_per_s=3.0e12,
                       name="H100 (bf16 dense; 790 TFLOP/s assumed, 3.0 TB/s copy measured)")
# The paper's GPU (Ada, sm_89): datasheet figures (about 120 TFLOP/s bf16 dense, 864 GB/s).
L20_SPEC = DeviceSpec(flops_per_s=1.2e14, bytes_per_s=8.64e11, name="L20 (bf16 dense)")


@dataclass
class SublayerCosts:
    per_sublayer: list  # seconds, length 2 * num_layers: index 2i attention, 2i + 1 FFN
    fixed: float  # seconds of the part no plan skips
    context_len: int
    mode: str
    source: str  # "model" (FLOP/byte model), "measured" or "measured in CUDA graphs"
    device: str = ""
    batch: int = 1
    # Only for source "model": the work behind each sublayer's time.
    flops: Optional[list] = None
    bytes_moved: Optional[list] = None
    # Only for source "model": the roofline it was computed on (a plan with streaming KV-head groups
    # is priced on the same one, streaming_plan_costs).
    spec: Optional[DeviceSpec] = None

    def __post_init__(self):
        self.per_sublayer = [float(c) for c in self.per_sublayer]
        self.fixed = float(self.fixed)
        if len(self.per_sublayer) % 2:
            raise ValueError(f"adaskip: per_sublayer needs an even length (attention, FFN per layer), "
                             f"got {len(self.per_sublayer)}")
        if any(not (math.isfinite(c) and c >= 0) for c in self.per_sublayer + [self.fixed]):
            raise ValueError("adaskip: sublayer costs must be finite and >= 0")

    @property
    def num_layers(self) -> int:
        return len(self.per_sublayer) // 2

    @property
    def total(self) -> float:
        """Seconds of the whole model at this context: every sublayer plus the fixed part."""
        return math.fsum(self.per_sublayer) + self.fixed

    def saving(self, skipped: Iterable[int]) -> float:
        """Seconds saved by skipping these sublayers (each counted once)."""
        return math.fsum(self.per_sublayer[s] for s in self._check(skipped))

    def speedup(self, skipped: Iterable[int], added: float = 0.0) -> float:
        """total / (total - sum of the skipped sublayers' costs + `added` seconds of work the
        plan brings, e.g. its linear stand-ins)."""
        total = self.total
        left = total - self.saving(skipped) + added
        return math.inf if left <= 0 else total / left

    def _check(self, skipped: Iterable[int]) -> list:
        out = sorted({int(s) for s in skipped})
        bad = [s for s in out if not 0 <= s < len(self.per_sublayer)]
        if bad:
            raise ValueError(f"adaskip: sublayers {bad} are out of range for {len(self.per_sublayer)} sublayers")
        return out


def paper_speedup(num_layers: int, num_skipped_sublayers: int, added_layers: float = 0.0) -> float:
    """The paper's equal-cost estimate: M / (M - k/2), a sublayer being half a layer; plus
    `added_layers` of work the plan brings (e.g. its linear stand-ins), in layers."""
    if num_layers < 1 or not 0 <= num_skipped_sublayers <= 2 * num_layers:
        raise ValueError(f"adaskip: cannot skip {num_skipped_sublayers} sublayers of a model with {num_layers} layers")
    left = num_layers - num_skipped_sublayers / 2 + added_layers
    return math.inf if left <= 0 else num_layers / left


def paper_num_skipped(num_layers: int, target_speedup: float) -> int:
    """The paper's alpha -> sublayer count: m = M - M / alpha layers, round(2m) sublayers."""
    return int(round(2 * (num_layers - num_layers / target_speedup)))


# -- the FLOP / byte model -----------------------------------------------------------------


def _roofline(flops: float, nbytes: float, spec: DeviceSpec) -> float:
    return max(flops / spec.flops_per_s, nbytes / spec.bytes_per_s)


def sublayer_costs(args: ModelArgs, context_len: int, mode: str, *, batch: int = 1,
                   dtype_bytes: int = 2, spec: DeviceSpec = L20_SPEC) -> SublayerCosts:
    """Roofline time of every sublayer (and of the fixed part) at `context_len` tokens.

    prefill: one pass over a prompt of `context_len` tokens per sequence (no chunking).
    decode: one step of one token per sequence with `context_len` tokens in the KV cache.
    A sublayer's time is max(FLOPs / flops_per_s, bytes / bytes_per_s): one roofline per sublayer.
    """
    if mode not in MODES:
        raise ValueError(f"adaskip: unknown cost mode {mode!r}; expected 'prefill' or 'decode'")
    if isinstance(context_len, bool) or int(context_len) != context_len or context_len < 1:
        raise ValueError(f"adaskip: context_len must be an integer >= 1, got {context_len!r}")
    if batch < 1 or dtype_bytes <= 0:
        raise ValueError(f"adaskip: batch must be >= 1 and dtype_bytes > 0, got {batch} and {dtype_bytes}")
    n, b, e = int(context_len), int(batch), float(dtype_bytes)
    hidden, inter, vocab = args.hidden_size, args.intermediate_size, args.vocab_size
    tokens = b * n if mode == "prefill" else b  # tokens that go through the projections

    attn_flops, attn_bytes = _attention_work(args, n, b, e, mode)

    # FFN (SwiGLU): gate, up, down; per token x in, gate/up out and back in, their product out
    # and back in, the output.
    ffn_weights = 3 * hidden * inter + (2 * inter + hidden) * args.mlp_bias
    ffn_bytes = e * (ffn_weights + tokens * (2 * hidden + 6 * inter))
    ffn_flops = 2 * tokens * 3 * hidden * inter

    # Fixed: what runs whatever the plan. The embedding gather; the residual add + RMSNorm after
    # each sublayer (a skipped sublayer is replaced by a scale + RMSNorm of the same traffic) and
    # the first input norm; the lm_head on the one token per sequence whose logits are kept.
    # Each is its own kernel, so their times add.
    m = args.num_layers
    fixed = (_roofline(0, e * 2 * tokens * hidden, spec)  # embedding rows read and written
             + _roofline(0, e * (4 * 2 * m + 2) * tokens * hidden, spec)  # norms
             + _roofline(2 * b * hidden * vocab, e * (hidden * vocab + b * (hidden + vocab)), spec))

    flops, nbytes = [], []
    for _ in range(m):
        flops += [float(attn_flops), float(ffn_flops)]
        nbytes += [float(attn_bytes), float(ffn_bytes)]
    return SublayerCosts(per_sublayer=[_roofline(f, x, spec) for f, x in zip(flops, nbytes)], fixed=fixed,
                         context_len=n, mode=mode, source="model", device=spec.name, batch=b,
                         flops=flops, bytes_moved=nbytes, spec=spec)


def _band_pairs(n: int, sink: int, window: int) -> int:
    """Query-key pairs of causal prefill over n tokens when each query sees only the first `sink`
    keys and the last `window` up to its own (a streaming head)."""
    total = 0
    for i in range(n):  # query i sees keys 0..i
        recent = min(i + 1, window)
        total += recent + min(sink, i + 1 - recent)
    return total


def _attention_work(args: ModelArgs, n: int, b: int, e: float, mode: str, streaming_groups: int = 0,
                    sink: int = 0, window: int = 0) -> tuple:
    """(FLOPs, bytes) of one attention sublayer at n tokens (see sublayer_costs). streaming_groups:
    that many of its KV-head groups see only `sink` + `window` keys (adaskip.runtime.streaming):
    their query heads score fewer pairs, and in decode read only that much of their cache; in
    prefill every key is still read once, by the queries whose window holds it."""
    hidden = args.hidden_size
    q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    tokens = b * n if mode == "prefill" else b  # tokens that go through the projections
    # Attention. Weights (and biases) are read once per pass. GQA: K/V have num_kv_heads heads,
    # and the kernels (SDPA enable_gqa, flash-attn) read each KV head once for its whole query
    # group, so the cache read is kv_dim wide, not q_dim.
    attn_weights = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden
    attn_weights += (q_dim + 2 * kv_dim) * args.qkv_bias + hidden * args.o_bias
    # Per token: x in, q/k/v out, k/v into the cache, the attention output written and read by
    # o_proj, o_proj's output.
    attn_act = tokens * (2 * hidden + 4 * q_dim + 4 * kv_dim)
    # K/V of the whole context read once by the attention kernel (prefill: tiled on chip, so
    # once; decode: the cache read that dominates at long context).
    kv_read = b * n * 2 * kv_dim
    rep = args.num_heads // args.num_kv_heads
    streamed = streaming_groups * args.head_dim  # KV width of the streaming groups
    if mode == "decode" and streaming_groups:
        kv_read -= b * 2 * streamed * max(0, n - min(n, sink + window))
    attn_bytes = e * (attn_weights + attn_act + kv_read)
    # Query-key pairs: causal prefill sees n(n+1)/2, a decode step sees the n cached keys.
    # Sliding windows are not discounted: this runtime keeps full caches and masks them.
    pairs = b * (n * (n + 1) // 2 if mode == "prefill" else n)
    attn_flops = 2 * tokens * hidden * (2 * q_dim + 2 * kv_dim) + 4 * pairs * args.num_heads * args.head_dim
    if streaming_groups:
        band = b * (_band_pairs(n, sink, window) if mode == "prefill" else min(n, sink + window))
        attn_flops -= 4 * (pairs - band) * streaming_groups * rep * args.head_dim
    return float(attn_flops), float(attn_bytes)


def streaming_plan_costs(args: ModelArgs, context_len: int, mode: str, skipped: Iterable[int] = (),
                         streaming: Optional[dict] = None, *, sink: int = 4, window: int = 256, batch: int = 1,
                         dtype_bytes: int = 2, spec: DeviceSpec = L20_SPEC, added_s: float = 0.0) -> dict:
    """The roofline time of a plan that skips the sublayers `skipped` and makes `streaming`
    {layer: number of streaming KV-head groups} see only sink + window keys
    (adaskip.runtime.streaming; an experiment: no kernel exists that would save this, so every
    figure is a prediction). added_s: seconds of work the plan brings (its linear stand-ins,
    strategies.stand_in_cost). Returns {"full_s", "plan_s", "saving_s", "speedup",
    "kv_entries_full", "kv_entries_plan"} (KV-cache entries, one per token per KV head per layer,
    after a prompt of context_len tokens: what a cache of sink + window entries for a streaming
    group would hold)."""
    base = sublayer_costs(args, context_len, mode, batch=batch, dtype_bytes=dtype_bytes, spec=spec)
    streaming = {int(k): int(v) for k, v in (streaming or {}).items() if v}
    skipped = set(base._check(skipped))
    n, b, e = int(context_len), int(batch), float(dtype_bytes)
    per = list(base.per_sublayer)
    entries_plan = 0
    for i in range(args.num_layers):
        g = streaming.get(i, 0)
        if not 0 <= g <= args.num_kv_heads:
            raise ValueError(f"adaskip: layer {i} has {args.num_kv_heads} KV-head groups, not {g}")
        if 2 * i in skipped:
            continue  # no attention, no cache
        entries_plan += (args.num_kv_heads - g) * n + g * min(n, sink + window)
        if g:
            per[2 * i] = _roofline(*_attention_work(args, n, b, e, mode, g, sink, window), spec)
    for s in skipped:
        per[s] = 0.0
    plan_s = math.fsum(per) + base.fixed + float(added_s)
    return {"full_s": base.total, "plan_s": plan_s, "saving_s": base.total - plan_s, "speedup": base.total / plan_s,
            "kv_entries_full": args.num_layers * args.num_kv_heads * n, "kv_entries_plan": entries_plan}


# -- measurement ---------------------------------------------------------------------------------


def _timer(device: torch.device, repeats: int, warmup: int) -> Callable[[Callable[[], object]], float]:
    def time_it(fn) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.synchronize()
                times = cuda_event_seconds(fn, repeats, back_to_back=True)
        else:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return time_it


def time_in_graph(fn: Callable[[int], object], calls: int, warmup: int, repeats: int) -> float:
    """Median seconds per call of fn(0), ..., fn(calls - 1) captured in one CUDA graph (after
    `warmup` eager calls on a side stream, as torch advises) and replayed `repeats` times: the
    device time of the work, without the host's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = cuda_event_seconds(graph.replay, repeats, per_call=calls)
    del graph
    return statistics.median(samples)


def _graph_timer(device: torch.device, repeats: int, warmup: int,
                 calls: int = 16) -> Callable[[Callable[[], object]], float]:
    """What a sublayer costs inside the graph decode step: `calls` calls per graph."""
    def time_it(fn) -> float:
        with torch.cuda.device(device):
            return time_in_graph(lambda i: fn(), calls, max(warmup, 1), repeats)

    return time_it


def measure_sublayer_costs(model, context_len: int, mode: str, *, repeats: int = 5,
                           warmup: int = 2, graphs: bool = False,
                           cache_len: Optional[int] = None, batch: int = 1) -> SublayerCosts:
    """Times each sublayer of an adaskip Transformer, `batch` sequences, on its own device and dtype.

    prefill: `context_len` random hidden states through each layer's attention (causal, writing
    its KV cache as the runtime's prefill does) and through its FFN.
    decode: one token at position `context_len` through each attention, reading a KV cache of
    context_len + 1 slots, and one token through each FFN.
    fixed: the embedding, the lm_head on one token, and 2M + 1 residual-add + RMSNorm passes.
    Median over `repeats` after `warmup` calls, on KV caches of its own (Transformer.scratch_caches):
    the model's caches, and decode graphs captured on them, are left as they were.

    Unlike the FLOP/byte model these timings include what the eager runtime spends launching
    kernels, which dominates batch-1 decode on a fast GPU.

    graphs (decode on a GPU): time each sublayer as the CUDA-graph decode step runs it: calls
    captured in a graph and replayed (no launch overhead), attention over the whole cache of
    `cache_len` slots (default context_len + 1) under the mask of the token's position.
    """
    if mode not in MODES:
        raise ValueError(f"adaskip: unknown cost mode {mode!r}; expected 'prefill' or 'decode'")
    if isinstance(context_len, bool) or int(context_len) != context_len or context_len < 1:
        raise ValueError(f"adaskip: context_len must be an integer >= 1, got {context_len!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"adaskip: need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"adaskip: batch must be an integer >= 1, got {batch!r}")
    args = model.args
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    n = int(context_len)
    if graphs:
        if mode != "decode" or device.type != "cuda":
            raise ValueError("adaskip: graphs=True times the CUDA-graph decode step: mode 'decode' on a GPU")
        if cache_len is not None and cache_len < n + 1:
            raise ValueError(f"adaskip: cache_len {cache_len} does not hold the {n + 1} tokens of the context")
    elif cache_len is not None:
        raise ValueError("adaskip: cache_len applies to graphs=True (whole-cache attention) only")
    time_it = _graph_timer(device, repeats, warmup) if graphs else _timer(device, repeats, warmup)
    gen = torch.Generator(device=device).manual_seed(0)

    if mode == "prefill":
        t, start, kv_len = n, 0, n
    else:
        t, start, kv_len = 1, n, (cache_len or n + 1) if graphs else n + 1
    # Caches of its own for the timing: the model's caches and the decode graphs captured on them
    # stay as they are.
    with torch.inference_mode(), model.scratch_caches(batch, kv_len):  # a clear error beyond the context
        q_pos = (torch.arange(t, device=device) + start)[None].expand(batch, t)
        cos, sin = model.rotary(q_pos, kv_len, dtype)
        # The graph step reads the whole cache under a mask of the positions (no shared start).
        masks = model.attention_masks(q_pos, kv_len, None if graphs else start)
        x = torch.randn(batch, t, args.hidden_size, generator=gen, device=device, dtype=torch.float32).to(dtype)
        # Every sublayer is timed, not one per kind: layers differ in sliding window (mask
        # path), and on a GPU the placement of each layer's weights can matter. Cheap enough.
        # The decode kernels the runtime's step would choose (schedule_step decides).
        sched = schedule_step(model, batch=batch, tokens=t)
        decode = None
        if sched.decode_rotary:
            first = q_pos[:, 0].contiguous()
            decode = (first, first + 1 if sched.decode_attention == "kernel" else None)
        per = []
        for layer in model.model.layers:
            attn = layer.self_attn
            mask = masks[attn.window]
            per.append(time_it(lambda: attn(x, cos, sin, mask, q_pos, kv_len, decode, sched.gemv_projections)))
            per.append(time_it(lambda: layer.mlp(x)))
        fixed = _measure_fixed(model, batch, t, time_it, gen, sched.gemv_lm_head)
    return SublayerCosts(per_sublayer=per, fixed=fixed, context_len=n, mode=mode,
                         source="measured in CUDA graphs" if graphs else "measured",
                         device=device_name(device), batch=int(batch))


def _measure_fixed(model, batch: int, tokens: int, time_it, gen, gemv_lm_head: bool) -> float:
    from .. import ops
    from ..runtime.model import project

    args = model.args
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids = torch.randint(0, args.vocab_size, (batch, tokens), generator=gen, device=device)
    last = torch.randn(batch, args.hidden_size, generator=gen, device=device, dtype=torch.float32).to(dtype)
    out = torch.randn(batch, tokens, args.hidden_size, generator=gen, device=device,
                      dtype=torch.float32).to(dtype)
    h = out.clone()
    norm = model.model.norm

    def norm_pass():
        # In place on out and h, as in the runtime: the values drift, the time does not.
        ops.fused_add_rms_norm(out, h, norm.weight, norm.eps)

    embed = time_it(lambda: model.model.embed_tokens(ids))
    head = time_it(lambda: project(model.lm_head, last, gemv_lm_head))
    one_norm = time_it(norm_pass)
    return embed + head + (2 * args.num_layers + 1) * one_norm


def device_name(device: torch.device) -> str:
    """The GPU's name (as torch reports it), or the device as written for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


# -- the cost-aware selection -----------------------------------------------------------------------


@dataclass
class CostSelection:
    sublayers: list  # sorted
    predicted_speedup: float
    importance_lost: float
    explanation: str
    # No set reaching the target loses less importance (from the rounded-up DP); equal to
    # importance_lost when the selection is provably optimal for these costs.
    importance_bound: float = 0.0


def select_by_cost(importance: Sequence[float], costs: SublayerCosts, target_speedup: float, *,
                   allowed: Optional[Sequence[int]] = None, resolution: int = 4000) -> CostSelection:
    """The set S of sublayers minimizing sum(importance[S]) with costs.speedup(S) >= target.

    importance[s] >= 0 is what skipping s loses (e.g. 1 - its mean IO cosine similarity). A 0/1
    covering knapsack over the costs discretised to `resolution` steps of the required saving,
    each rounded down, so a set the DP accepts really saves enough; the result is then checked
    with the exact costs (and completed if rounding left it short) and pruned of members it does
    not need. It is optimal among the sets that save at least the required time plus one step
    per member. A second DP with the costs rounded up bounds the optimum from below
    (`importance_bound`), and its set is taken when the exact costs confirm it and it loses less.
    """
    n = len(costs.per_sublayer)
    imp = [float(v) for v in importance]
    if len(imp) != n:
        raise ValueError(f"adaskip: {len(imp)} importances for {n} sublayers")
    if any(not math.isfinite(v) or v < -1e-6 for v in imp):
        raise ValueError("adaskip: importances must be finite and >= 0")
    imp = [max(v, 0.0) for v in imp]  # 1 - cos can come out a rounding error below 0
    target = float(target_speedup)
    if not target >= 1:
        raise ValueError(f"adaskip: target speedup must be >= 1, got {target_speedup}")
    if resolution < 1:
        raise ValueError(f"adaskip: resolution must be >= 1, got {resolution}")
    items = costs._check(range(n) if allowed is None else allowed)

    if costs.speedup([]) >= target:  # target 1.0
        return _selection([], imp, costs, target, items)
    best = costs.speedup(items)
    if best < target:
        raise ValueError(f"adaskip: a {target:.4g}x speedup is out of reach: skipping all {len(items)} allowed "
                         f"sublayers gives at most {best:.4f}x ({costs.mode} at {costs.context_len} tokens)")

    total = costs.total
    unit = (total - total / target) / resolution  # one step of the required saving
    steps = [costs.per_sublayer[s] / unit for s in items]
    # Rounded down (the 1e-9 only absorbs float noise on costs that are whole steps): a set whose
    # steps reach `resolution` truly saves enough. Rounded up: every set that truly saves enough
    # reaches `resolution`, so that DP's optimum bounds the true one from below, and its set,
    # when the exact costs confirm it, is optimal.
    down, _ = _knapsack(items, [math.floor(x * (1 + 1e-9)) for x in steps], imp, resolution)
    up, bound = _knapsack(items, [math.ceil(x * (1 - 1e-9)) for x in steps], imp, resolution)

    chosen = _complete(set(down), items, imp, costs, target)
    if costs.speedup(up) >= target:
        up = _complete(set(up), items, imp, costs, target)
        if math.fsum(imp[s] for s in up) < math.fsum(imp[s] for s in chosen):
            chosen = up
    if costs.speedup(chosen) < target:  # cannot happen after the reachability check above
        raise RuntimeError("adaskip: internal error: the selection does not reach the target")
    return _selection(sorted(chosen), imp, costs, target, items, bound)


def _knapsack(items: list, weights: list, imp: list, resolution: int):
    """Covering 0/1 knapsack: the set of least importance whose weights add up to >= resolution
    (or, if none does, to the most it can), and that least importance (inf if none)."""
    weights = [min(resolution, max(0, int(w))) for w in weights]
    # dp[j]: least importance of a set whose weights add up to >= j.
    dp = np.full(resolution + 1, np.inf)
    dp[0] = 0.0
    take = np.zeros((len(items), resolution + 1), dtype=bool)
    for k, (s, w) in enumerate(zip(items, weights)):
        if w == 0:
            continue  # saves less than a step: only the completion may use it
        prev = np.empty_like(dp)
        prev[:w] = dp[0]
        prev[w:] = dp[: resolution + 1 - w]
        cand = prev + imp[s]
        take[k] = cand < dp  # strict: equal importance never adds a member
        dp = np.where(take[k], cand, dp)
    j = resolution if np.isfinite(dp[resolution]) else int(np.flatnonzero(np.isfinite(dp)).max())
    chosen = []
    for k in range(len(items) - 1, -1, -1):
        if take[k, j]:
            chosen.append(items[k])
            j = max(0, j - weights[k])
    return chosen, float(dp[resolution])


def _complete(chosen: set, items: list, imp: list, costs: SublayerCosts, target: float) -> set:
    # Add the best importance per second saved while the exact costs fall short of the target.
    while costs.speedup(chosen) < target:
        rest = [s for s in items if s not in chosen and costs.per_sublayer[s] > 0]
        if not rest:
            break
        chosen.add(min(rest, key=lambda s: (imp[s] / costs.per_sublayer[s], -costs.per_sublayer[s])))
    # Drop members that are not needed, the most important first.
    for s in sorted(chosen, key=lambda s: (-imp[s], costs.per_sublayer[s])):
        if costs.speedup(chosen - {s}) >= target:
            chosen.discard(s)
    return chosen


def _selection(chosen: list, imp: list, costs: SublayerCosts, target: float, items: list,
               bound: float = 0.0) -> CostSelection:
    reached = costs.speedup(chosen)
    lost = math.fsum(imp[s] for s in chosen)
    bound = min(bound, lost)
    gap = lost - bound
    m = costs.num_layers
    n_attn = sum(1 for s in chosen if s % 2 == 0)
    attn = [costs.per_sublayer[s] for s in range(0, 2 * m, 2)]
    ffn = [costs.per_sublayer[s] for s in range(1, 2 * m, 2)]
    ratio = math.fsum(attn) / math.fsum(ffn) if math.fsum(ffn) > 0 else math.inf
    source = "FLOP/byte model" if costs.source == "model" else "measured timings"
    if costs.device:
        source += f" on {costs.device}"
    lines = [
        f"cost-aware plan for a {target:.4g}x speedup: {costs.mode} at {costs.context_len} tokens, batch "
        f"{costs.batch}, costs from {source}",
        f"reached {reached:.4f}x by skipping {len(chosen)} of {len(items)} allowed sublayers: "
        f"{n_attn} attention, {len(chosen) - n_attn} FFN",
        f"importance lost {lost:.6g} ("
        + ("optimal for these costs" if gap <= 1e-9 * max(1.0, lost) else
           f"no set reaching the target loses less than {bound:.6g}: cost discretisation") + ")",
        f"here an attention sublayer costs {ratio:.3g}x an FFN one (means over layers); the equal-cost "
        f"rule would skip {paper_num_skipped(m, target)} sublayers for {target:.4g}x and credits "
        f"{len(chosen)} with {paper_speedup(m, len(chosen)):.4f}x",
    ]
    return CostSelection(sublayers=list(chosen), predicted_speedup=reached, importance_lost=lost,
                         explanation="\n".join(lines), importance_bound=bound)
