"""Streaming KV-head groups (an experiment, not part of any plan): a finer unit than a sublayer.

DuoAttention keeps the full context for a few "retrieval" heads and gives every other head only a
few attention sinks plus a recent window. Here the unit is a KV-head group of one layer (a KV head
and the query heads that share it under GQA): the group's query heads attend to the first `sink`
positions and to the last `window` positions up to and including their own, in prefill and in
decode; the other groups of the layer keep full causal attention.

This module only changes *what* the chosen groups see, through an explicit mask on the runtime's
own attention (the full K/V cache is still kept and masked), so the quality it measures is the
real model's. It brings no speed: a kernel that computes the band only and keeps a cache of
sink + window entries for those groups does not exist here; adaskip.skipping.head_groups prices
what one would save. The default path is untouched: an attention without `streaming` set runs as
before, and the CUDA decode kernel is bypassed (SDPA under the mask) only where it is set.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

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
    keys = torch.arange(kv_len, device=q_pos.device)
    dist = q_pos[..., None] - keys
    return (dist >= 0) & ((keys < sink) | (dist < window))


def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, q_pos: torch.Tensor,
                        spec: StreamingGroups) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, KV, kv_len, D] (GQA: query head h reads KV head
    h // (H / KV)) where the query heads of spec.groups see only sink + window and the others
    attend under `mask` (a boolean [B, 1, T, kv_len] mask, or "causal" / None as SDPA takes it).
    q_pos [B, T]: the queries' positions (= their key slots). Returns [B, H, T, D]."""
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

    def attend(groups, attn_mask, causal):
        hq = heads(groups)
        out = F.scaled_dot_product_attention(q[:, hq], k[:, groups], v[:, groups], attn_mask=attn_mask,
                                             is_causal=causal, enable_gqa=rep > 1)
        y[:, hq] = out

    if full:
        causal = isinstance(mask, str)
        attend(full, None if causal else mask, causal)
    if int(q_pos.max()) < spec.window:  # every visible key is in the window: the band is the causal mask
        attend(stream, None if isinstance(mask, str) else mask, isinstance(mask, str))
        return y
    band = band_mask(q_pos, k.shape[2], spec.sink, spec.window)
    if isinstance(mask, torch.Tensor):
        band = band & mask[:, 0]  # padding or a sliding window of the layer still applies
    attend(stream, band[:, None], False)
    return y


def set_streaming(model, layers: Mapping[int, Sequence[int]], *, sink: int, window: int) -> None:
    """Makes the KV-head groups `layers` {layer: [KV-head indices]} streaming (every other group,
    and every layer not named, back to full attention)."""
    num_kv = model.args.num_kv_heads
    for i in layers:
        if not 0 <= i < model.args.num_layers:
            raise ValueError(f"adaskip: layer {i} out of range for {model.args.num_layers} layers")
    for i, layer in enumerate(model.model.layers):
        groups = tuple(sorted(set(int(g) for g in layers.get(i, ()))))
        if groups and any(not 0 <= g < num_kv for g in groups):
            raise ValueError(f"adaskip: KV-head groups {groups} of layer {i} out of range for {num_kv} KV heads")
        if groups and not hasattr(layer.self_attn, "q_proj"):
            raise ValueError(f"adaskip: layer {i} has no attention to make streaming")
        layer.self_attn.streaming = StreamingGroups(groups, sink, window) if groups else None


def clear_streaming(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.streaming = None


@contextmanager
def streaming_groups(model, layers: Optional[Mapping[int, Sequence[int]]], *, sink: int = 4, window: int = 256):
    """`set_streaming` for the duration of a `with` block (None or {}: the full model); every
    attention is back to full afterwards."""
    set_streaming(model, layers or {}, sink=sink, window=window)
    try:
        yield model
    finally:
        clear_streaming(model)
