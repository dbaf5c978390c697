"""Carrying out one sublayer as its step's schedule says (adaskip.runtime.schedule decides it).

Shared by our Transformer and by the Hugging Face adapter (adaskip.hf), so that a plan's skips,
its stand-ins and online learning's gating run the same code on both. The model-specific parts
come in as callables: how to run the attention (and to only store its K/V), and the FFN's dense
path. The FFN module itself must have SwiGLU projections named as in LLaMA (gate_proj, up_proj,
down_proj), which the gated decode GEMVs read.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from .conditional import only_if
from .schedule import GATED, GATED_CONDITIONAL, GATED_GEMV, GATED_OFF, PLAN_SKIPPED, RUN_GEMV, SKIP_STORE_KV


def run_sublayer(s: int, todo, x: torch.Tensor, h: torch.Tensor, step, *, norm_weight: torch.Tensor, eps: float,
                 attend: Callable, store_kv: Callable, dense_ffn: Callable, mlp) -> torch.Tensor:
    """Sublayer s (even: attention, odd: FFN) as `todo` (a SublayerStep) says: x is its normed
    input, h the residual stream (updated in place); returns the normed input of the next
    sublayer, normed with (norm_weight, eps), the norm that follows s.

    step: what the forward shares (online, stats, seq_lens, taps). attend(x) -> the attention's
    output; store_kv(x): only fill its KV cache; dense_ffn(x) -> the FFN's output (dense path);
    mlp: the FFN module, for the gated decode GEMVs and conditional nodes."""
    action = todo.action
    if action in PLAN_SKIPPED:
        if action == SKIP_STORE_KV:
            store_kv(x)
        stand_in = todo.stand_in
        if stand_in is not None and stand_in.kind == "linear":
            out = stand_in.apply_linear(x)
            ops.fused_add_rms_norm(out, h, norm_weight, eps)
            return out
        channel = stand_in.channel_on(h.device) if stand_in is not None else None
        # x is free: only written
        ops.scale_rms_norm(x, h, norm_weight, eps, todo.scale, channel_scales=channel)
        return x
    online = step.online
    if action == GATED_OFF:  # every sequence gated off: the device-side compensation, x not read
        ops.fused_add_rms_norm(x, h, norm_weight, eps, sublayer=s, gates=online.gates, scales=online.scales)
        return x
    out = attend(x) if s % 2 == 0 else run_ffn(action, mlp, x, dense_ffn, online, s)
    if action in GATED:  # gated-off sequences: the compensation instead of the add, in the same pass
        ops.fused_add_rms_norm(out, h, norm_weight, eps, stats=online.stats, sublayer=s,
                               seq_lens=step.seq_lens, gates=online.gates, scales=online.scales)
    else:
        if step.taps is not None:
            step.taps(s, x, h, out)
        ops.fused_add_rms_norm(out, h, norm_weight, eps, stats=step.stats, sublayer=s, seq_lens=step.seq_lens)
    return out


def run_ffn(action: str, mlp, x: torch.Tensor, dense_ffn: Callable, online=None, s: int = 0) -> torch.Tensor:
    """The output of FFN sublayer s on its normed input x, by the path `action` chose (the
    schedule's; online: the OnlineGates of a gated action)."""
    if action == RUN_GEMV:
        return gated_swiglu(mlp, x, None, 0)
    if action == GATED_GEMV:
        return gated_swiglu(mlp, x, online.gates, s)
    if action == GATED_CONDITIONAL:
        return swiglu_if(mlp, x, online.running[s])
    return dense_ffn(x)


def gated_swiglu(mlp, x: torch.Tensor, gates: Optional[torch.Tensor], sublayer: int) -> torch.Tensor:
    """The SwiGLU FFN `mlp` of x [B, 1, hidden] through the gated GEMVs: when every sequence's
    gate of `sublayer` is SKIP the kernels return at once (decided on the device) and write
    nothing. The rows of gated-off sequences are undefined: the gated add+norm that follows does
    not read them. gates None: every row is computed."""
    b, _, h = x.shape
    act = torch.empty(b, mlp.gate_proj.out_features, dtype=x.dtype, device=x.device)
    ops.gated_swiglu_up(x.reshape(b, h), mlp.gate_proj.weight, mlp.up_proj.weight, gates, sublayer, act)
    out = torch.empty(b, h, dtype=x.dtype, device=x.device)
    ops.gated_linear(act, mlp.down_proj.weight, gates, sublayer, out)
    return out.view(b, 1, h)


def swiglu_if(mlp, x: torch.Tensor, predicate: torch.Tensor) -> torch.Tensor:
    """The SwiGLU FFN `mlp` inside a conditional node of the CUDA graph being captured: replays
    run it only while `predicate` (a bool on the device) is true, and skip its GEMMs otherwise
    (the output is then undefined; the gated add+norm that follows does not read it)."""
    out = torch.empty_like(x)  # allocated outside the node: read after it either way
    with only_if(predicate):
        act = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        if mlp.down_proj.bias is None:
            torch.matmul(act, mlp.down_proj.weight.t(), out=out)
        else:
            out.copy_(mlp.down_proj(act))
    return out
