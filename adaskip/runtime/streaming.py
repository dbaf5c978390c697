"""Streaming KV-head groups: a finer unit than a sublayer (SkipPlan.streaming).

DuoAttention keeps the full context for a few "retrieval" heads and gives every other head only a
few attention sinks plus a recent window. Here the unit is a KV-head group of one layer (a KV head
and the query heads that share it under GQA): the group's query heads attend to the first `sink`
positions and to the last `window` positions up to and including their own, in prefill and in
decode; the other groups of the layer keep full causal attention.

A plan names the groups (SkipPlan.streaming, carried into every step's schedule); the runtime's
attention then reads, for those groups, only the keys of their band: block-wise in a prefill
whose positions every sequence shares, gathered per sequence in decode. The full K/V cache is
still kept (a cache of sink + window entries for those groups is not built), so what this saves
is attention work, not cache memory; adaskip.skipping.costs.streaming_plan_costs prices both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StreamingGroups:
    """The streaming KV-head groups of one attention layer."""

    groups: tuple  # KV-head indices, sorted
    sink: int  # the first `sink` positions stay visible to every query
    window: int  # and the last `window` positions up to the query's own (window >= 1)

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"adaskip: a streaming group needs sink >= 0 and window >= 1, got {self.sink} and "
                             f"{self.window}")
        if list(self.groups) != sorted(set(self.groups)) or not self.groups:
            raise ValueError(f"adaskip: streaming groups must be distinct sorted KV-head indices, got {self.groups}")


def band_mask(q_pos: torch.Tensor, kv_len: int, sink: int, window: int) -> torch.Tensor:
    """Boolean [B, T, kv_len]: key j is visible to the query at position i when j <= i and
    (j < sink or i - j < window)."""
    return _in_band(q_pos, torch.arange(kv_len, device=q_pos.device), sink, window)


def _in_band(q_pos: torch.Tensor, keys: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Boolean [..., len(keys)]: which of the key slots `keys` the queries at q_pos [...] see."""
    dist = q_pos[..., None] - keys
    return (dist >= 0) & ((keys < sink) | (dist < window))


def _groups_of(t: torch.Tensor, groups: list) -> torch.Tensor:
    """t[:, groups]: a view when the groups are consecutive (no copy of a KV cache in a decode
    step), else a gathered copy."""
    if groups == list(range(groups[0], groups[-1] + 1)):
        return t[:, groups[0]:groups[-1] + 1]
    return t[:, groups]


# Queries per block of the banded prefill: each block reads sink + window + block keys, so a query
# costs about window + block keys instead of its position; smaller blocks mean more launches.
BAND_BLOCK = 128


def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, q_pos: torch.Tensor,
                        spec: StreamingGroups, q_start: Optional[int] = None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, KV, kv_len, D] (GQA: query head h reads KV head
    h // (H / KV)) where the query heads of spec.groups see only sink + window and the others
    attend under `mask` (a boolean [B, 1, T, kv_len] mask, or "causal" / None as SDPA takes it).
    q_pos [B, T]: the queries' positions (= their key slots). q_start: the first query's
    position when every sequence's queries are q_start, q_start + 1, ... (a host int), else None.

    The streaming groups read only the keys they may see: a decode query (T = 1) gathers its
    sink + window slots on the device (no host sync: legal in a captured CUDA graph); a prefill
    with q_start known runs blocks of BAND_BLOCK queries over their own band. Only a prefill with
    per-sequence positions (q_start None) attends over the whole cache under the band mask. The
    band always includes causality, and `mask` (padding, cache lengths, a sliding window) still
    applies. Returns [B, H, T, D]."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    rep = h // kv
    if any(not 0 <= g < kv for g in spec.groups):
        raise ValueError(f"adaskip: streaming groups {spec.groups} out of range for {kv} KV heads")
    stream = list(spec.groups)
    full = [g for g in range(kv) if g not in set(stream)]
    y = torch.empty_like(q)

    def heads(groups):
        return [g * rep + r for g in groups for r in range(rep)]

    if full:
        hq, causal = heads(full), isinstance(mask, str)
        y[:, hq] = F.scaled_dot_product_attention(_groups_of(q, hq), _groups_of(k, full), _groups_of(v, full),
                                                  attn_mask=None if causal else mask, is_causal=causal,
                                                  enable_gqa=rep > 1)
    hq = heads(stream)
    qs, ks, vs = _groups_of(q, hq), _groups_of(k, stream), _groups_of(v, stream)
    extra = mask if isinstance(mask, torch.Tensor) else None
    if t == 1:
        y[:, hq] = _band_gather(qs, ks, vs, extra, q_pos[:, 0], spec, rep)
    elif q_start is not None:
        y[:, hq] = _band_blocks(qs, ks, vs, extra, q_start, spec, rep)
    else:
        band = band_mask(q_pos, k.shape[2], spec.sink, spec.window)
        if extra is not None:
            band = band & extra[:, 0]
        y[:, hq] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band[:, None], enable_gqa=rep > 1)
    return y


def _band_gather(q, k, v, mask, pos, spec: StreamingGroups, rep: int) -> torch.Tensor:
    """One query per sequence at pos [B] over its sink slots and the `window` slots ending at pos,
    gathered from k, v [B, G, L, D] (sink + window keys read, whatever L)."""
    b, g, length, d = k.shape
    sink, window = spec.sink, spec.window
    recent = pos[:, None] - window + 1 + torch.arange(window, device=pos.device)
    slots = torch.cat([torch.arange(sink, device=pos.device).expand(b, sink), recent], 1)  # [B, sink + window]
    valid = (slots >= 0) & (slots < length) & _in_band(pos, slots, sink, window)
    valid[:, sink:] &= recent >= sink  # a recent slot inside the sink is counted once, as a sink
    slots = slots.clamp(0, length - 1)
    if mask is not None:  # [B or 1, 1, 1, L]: padding, cache lengths, a sliding window
        valid &= mask[:, 0, 0].expand(b, length).gather(1, slots)
    index = slots[:, None, :, None].expand(b, g, slots.shape[1], d)
    return F.scaled_dot_product_attention(q, k.gather(2, index), v.gather(2, index), attn_mask=valid[:, None, None],
                                          enable_gqa=rep > 1)


def _band_blocks(q, k, v, mask, q_start: int, spec: StreamingGroups, rep: int) -> torch.Tensor:
    """Queries at positions q_start .. q_start + T - 1 (every sequence alike), in blocks of
    BAND_BLOCK, each over the sink slots and the slots from its first query's window start to
    its last query: the keys of its band and no others."""
    t = q.shape[2]
    sink, window = spec.sink, spec.window
    out = torch.empty_like(q)
    for a in range(0, t, BAND_BLOCK):
        e = min(a + BAND_BLOCK, t)
        first, last = q_start + a, q_start + e - 1
        lo = max(sink, first - window + 1)
        keys = torch.cat([torch.arange(min(sink, last + 1)), torch.arange(min(lo, last + 1), last + 1)]).to(q.device)
        allowed = _in_band(torch.arange(first, last + 1, device=q.device), keys, sink, window)  # [block, keys]
        if mask is not None:
            allowed = allowed & mask[:, 0, a:e][..., keys]
        else:
            allowed = allowed[None]
        out[:, :, a:e] = F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, keys], v[:, :, keys],
                                                        attn_mask=allowed[:, None], enable_gqa=rep > 1)
    return out
