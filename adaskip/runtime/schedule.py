"""What every sublayer does in one forward step: the one place where a sublayer's fate is decided.

A StepSchedule is resolved before a forward (a prefill chunk, a decode step, a cache-less
forward) from the plan's skips in the step's phase, the online-learning state and the shape of
the step; a request resolves each distinct one once (adaskip.runtime.request_plan). `Transformer.forward` only carries it out, and a captured CUDA-graph step is keyed by it:
two steps with equal schedules run the same kernels with the same host arguments, so a graph
captured for one replays correctly for the other, and any host value that changes what forward
does is a field here.

Actions of a sublayer:
  run                runs (attention: SDPA or flash-attn, or with the plan's streaming KV-head
                     groups reading only their sink + window; FFN: dense matmuls)
  run-gemv           FFN of one token per sequence through the decode GEMVs (faster than the
                     dense path there), ungated
  skip               skipped by the plan, its stand-in instead: a scalar or per-channel scale of
                     the residual and the next norm in one fused launch; a linear stand-in's
                     low-rank map of the input, then the add+norm
  skip-store-kv      attention skipped by the plan, but its K/V are computed and cached (decode
                     will attend to them), then as `skip`
  gated-gemv         gated per sequence on the device (online learning): the GEMVs read the gate
                     and return at once for gated-off sequences
  gated-conditional  gated per sequence: captured inside a CUDA-graph conditional node that
                     replays only while some sequence still runs it
  gated-discard      gated per sequence: runs for every sequence, the add+norm discards the rows
                     of gated-off sequences and applies their compensation instead
  gated-off          gated off for every sequence: the device-side compensation and the next
                     norm, one fused launch
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from .stand_in import StandIn
from .streaming import StreamingGroups

RUN, RUN_GEMV, SKIP, SKIP_STORE_KV = "run", "run-gemv", "skip", "skip-store-kv"
GATED_GEMV, GATED_CONDITIONAL, GATED_DISCARD, GATED_OFF = "gated-gemv", "gated-conditional", "gated-discard", "gated-off"
ACTIONS = (RUN, RUN_GEMV, SKIP, SKIP_STORE_KV, GATED_GEMV, GATED_CONDITIONAL, GATED_DISCARD, GATED_OFF)
GATED = (GATED_GEMV, GATED_CONDITIONAL, GATED_DISCARD)  # run, with per-sequence gates on the device
PLAN_SKIPPED = (SKIP, SKIP_STORE_KV)

_GEMV_DTYPES = (torch.float16, torch.bfloat16)
GEMV_MAX_SEQUENCES = 2  # from 3 sequences on, cuBLAS beats the GEMVs (timings: bench/results/README.md)


def gemv_serves(batch: int, tokens: int, dtype: torch.dtype, device_type: str, ffn_bias: bool) -> bool:
    """Whether the decode GEMVs can run an FFN over this input: one token per sequence, at most
    GEMV_MAX_SEQUENCES sequences, fp16/bf16, no biases; on a GPU only with the extension."""
    return (tokens == 1 and batch <= GEMV_MAX_SEQUENCES and not ffn_bias and dtype in _GEMV_DTYPES
            and (ops.HAS_EXTENSION or device_type != "cuda"))


def ffn_prefers_gemv(batch: int, tokens: int, dtype: torch.dtype, device_type: str, ffn_bias: bool,
                     grad: bool) -> bool:
    """Whether an ungated FFN takes the GEMVs rather than the dense matmuls: on a GPU, without
    autograd (the GEMVs have no backward), where they serve the input."""
    return device_type == "cuda" and not grad and gemv_serves(batch, tokens, dtype, device_type, ffn_bias)


def ungated_ffn_action(batch: int, tokens: int, dtype: torch.dtype, device_type: str, ffn_bias: bool,
                       grad: bool) -> str:
    """RUN_GEMV or RUN: the path of an FFN that runs ungated over this input. The one place it is
    chosen: schedule_step asks it for every such FFN of a step, FeedForward.forward for a call
    outside a step (e.g. timing one sublayer)."""
    return RUN_GEMV if ffn_prefers_gemv(batch, tokens, dtype, device_type, ffn_bias, grad) else RUN


@dataclass
class DecodePaths:
    """How a model runs the parts of a decode step (one token per sequence) that have a decode
    kernel; each is used only where it serves the step (GPU, dtype, shapes, no autograd).
    attention: "kernel" (the split-KV decode attention kernel) or "sdpa" (over the whole cache
    under a mask of the positions); projections (q/k/v/o) and lm_head: "gemv" (the decode GEMVs)
    or "cublas". Either way a GPU decode step rotates q and k and writes the cache in one kernel."""

    # SDPA by default: its flash-decoding kernels on the masked cache are as fast as our split-KV
    # kernel or faster (bench/results/README.md).
    attention: str = "sdpa"
    projections: str = "gemv"
    lm_head: str = "gemv"

    def __post_init__(self):
        for name, value, choices in (("attention", self.attention, ("kernel", "sdpa")),
                                     ("projections", self.projections, ("gemv", "cublas")),
                                     ("lm_head", self.lm_head, ("gemv", "cublas"))):
            if value not in choices:
                raise ValueError(f"adaskip: decode path {name} must be one of {choices}, got {value!r}")


NO_DECODE_KERNELS = DecodePaths("sdpa", "cublas", "cublas")


@dataclass(frozen=True)
class SublayerStep:
    action: str
    scale: float = 1.0  # the compensation of a plan-skipped sublayer
    # Its fitted stand-in when not a scalar (compared by identity: the step replays its tensors)
    stand_in: Optional[StandIn] = None
    # An attention that runs with some KV-head groups streaming (adaskip.runtime.streaming)
    streaming: Optional[StreamingGroups] = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"adaskip: unknown sublayer action {self.action!r}; one of {ACTIONS}")


@dataclass(frozen=True)
class StepSchedule:
    """Per sublayer (2i: attention of layer i, 2i + 1: its FFN) what one forward step does,
    and the host facts of the step that decide its kernels. Hashable: it is (part of) the key
    of a captured decode step."""

    sublayers: tuple  # of SublayerStep, one per sublayer
    batch: int
    tokens: int  # tokens per sequence in this step
    dtype: torch.dtype
    attention_backend: str = "sdpa"
    # Decode paths (one token per sequence, from the cache): "kernel" (the split-KV decode
    # attention kernel, lengths read on the device) or "sdpa"; the attention projections and the
    # lm_head through the decode GEMVs (else cuBLAS).
    decode_attention: str = "sdpa"
    # The decode step's rotary embedding and KV write in one kernel (GPU, one token per sequence).
    decode_rotary: bool = False
    gemv_projections: bool = False
    gemv_lm_head: bool = False
    stats: bool = False  # IO-similarity statistics of the sublayers that run ungated
    block_stats: bool = False  # the same for whole layers (ShortGPT's ranking)
    # Closes a decode step of online learning: decide the gates whose window is complete.
    online_update: Optional[tuple] = None  # (window, beta)

    def sublayers_with(self, *actions: str) -> list:
        return [s for s, step in enumerate(self.sublayers) if step.action in actions]

    @property
    def uses_online(self) -> bool:
        """Whether the step reads the online-learning buffers (gates, scales, statistics)."""
        return self.online_update is not None or any(step.action in GATED + (GATED_OFF,) for step in self.sublayers)

    def describe(self) -> str:
        """One line per action: which sublayers take it."""
        lines = [f"{self.batch} x {self.tokens} tokens, {str(self.dtype).replace('torch.', '')}"]
        for action in ACTIONS:
            chosen = self.sublayers_with(action)
            if chosen:
                lines.append(f"  {action}: {chosen}")
        return "\n".join(lines)


def schedule_step(model, *, batch: int, tokens: int, plan=None, online=None, capturing: bool = False,
                  stats: bool = False, block_stats: bool = False, online_update: Optional[tuple] = None,
                  grad: Optional[bool] = None) -> StepSchedule:
    """Resolves what every sublayer of `model` does in a step of `batch` x `tokens` tokens.

    plan: the skips of this step: a PhaseSkips (a request plan's phase, SkipPlan.skips_in) or a
      SkipPlan, whose every skip then holds; a skipped sublayer is not run and its compensation scale stands in; an attention listed in
      `plan.kv_only_attention` still stores its K/V.
    online: adaskip.runtime.online.OnlineGates: FFNs in `online.learning` run gated per sequence
      (by the GEMVs where they serve the input, else in a CUDA-graph conditional node when
      `online.conditional` and a graph is being captured, else run and discarded); those in
      `online.skipped` are off for every sequence.
    grad: whether autograd records (default: torch.is_grad_enabled()).
    """
    num_layers = model.args.num_layers
    weight = model.lm_head.weight
    dtype, device_type = weight.dtype, weight.device.type
    ffn_bias = model.args.mlp_bias
    grad = torch.is_grad_enabled() if grad is None else grad
    absent = set(model.args.absent_sublayers)  # no weights: always skipped, the stream passed through
    skips = {**{s: 1.0 for s in absent}, **(plan.skip_scales if plan is not None else {})}
    stand_ins = getattr(plan, "stand_ins", None) or {}
    streaming = getattr(plan, "streaming_groups", None) or {}  # layer -> StreamingGroups
    kv_only = getattr(plan, "kv_only_attention", ()) or ()
    gemv = gemv_serves(batch, tokens, dtype, device_type, ffn_bias)
    args = model.args
    paths = getattr(model, "decode_paths", NO_DECODE_KERNELS)  # a model whose attention is not ours
    fast = tokens == 1 and device_type == "cuda" and not grad  # the decode kernels: no backward
    rotary = fast and ops.HAS_EXTENSION and args.head_dim % 2 == 0
    kernel = rotary and paths.attention == "kernel" and ops.decode_attention_serves(
        args.head_dim, args.num_heads, args.num_kv_heads, dtype, device_type)
    # One sequence only: at two, the narrow k / v projections run slower on the GEMV than on cuBLAS.
    gemv_proj = fast and batch == 1 and paths.projections == "gemv" and gemv_serves(
        batch, tokens, dtype, device_type, args.qkv_bias or args.o_bias)
    gemv_head = fast and paths.lm_head == "gemv" and gemv_serves(batch, tokens, dtype, device_type, False)
    steps = []
    for s in range(2 * num_layers):
        attention = s % 2 == 0
        if s in skips:
            action = SKIP_STORE_KV if attention and s // 2 in kv_only and s not in absent else SKIP
            stand_in = stand_ins.get(s)  # a fitted stand-in replaces the scalar compensation
            steps.append(SublayerStep(action, 1.0 if stand_in is not None else float(skips[s]), stand_in))
            continue
        if online is not None and s in online.skipped:
            action = GATED_OFF
        elif online is not None and s in online.learning:
            if gemv and not attention:
                action = GATED_GEMV
            elif online.conditional and capturing and not attention:
                action = GATED_CONDITIONAL
            else:
                action = GATED_DISCARD
        elif not attention:
            action = ungated_ffn_action(batch, tokens, dtype, device_type, ffn_bias, grad)
        else:
            steps.append(SublayerStep(RUN, streaming=streaming.get(s // 2)))
            continue
        steps.append(SublayerStep(action))
    return StepSchedule(tuple(steps), batch=batch, tokens=tokens, dtype=dtype,
                        attention_backend=model.attention_backend, decode_attention="kernel" if kernel else "sdpa",
                        decode_rotary=rotary,
                        gemv_projections=gemv_proj, gemv_lm_head=gemv_head, stats=stats,
                        block_stats=block_stats, online_update=online_update)
