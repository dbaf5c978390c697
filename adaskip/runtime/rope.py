"""Rotary position embeddings: default, linear, dynamic-NTK and llama3 frequency schedules."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops.reference import rotate
from .config import ModelArgs


def inv_frequencies(args: ModelArgs, seq_len: Optional[int] = None, device=None) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies. `seq_len` matters only for dynamic scaling,
    which raises the base once a sequence outgrows the trained context."""
    dim = args.head_dim
    base = args.rope_theta
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "dynamic" and seq_len is not None and seq_len > args.max_position_embeddings:
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / args.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        inv = _llama3(inv, scaling)
    return inv


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, blended, scaled)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [*positions.shape, head_dim] for integer positions, in `dtype`."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos, sin: [B, T, D]. The same arithmetic as the decode kernel's
    (adaskip.ops.rotary_kv_write), whose reference this is."""
    return rotate(x, cos[:, None], sin[:, None])
