"""The stand-ins' arithmetic, in torch alone (the unit tests of the main suite check it against
adaskip's runtime without vLLM; adaskip_vllm.model wraps it in vLLM's layers).

A skipped sublayer s maps the residual stream h to h + f(norm_s(h)); its exported stand-in does:
  channel  h <- h * d          d: float32 [hidden], the fitted scales times the stand-in's scalar.
                               The product is formed in float32 and rounded once to h's dtype,
                               as adaskip's scale_rms_norm kernel (and its reference) do.
  linear   h <- h + U (D x + e) with x = norm_s(h), the sublayer's own input norm: adaskip's
                               StandIn.apply_linear, two thin matmuls in the model's dtype.
"""
from __future__ import annotations

import torch

KINDS = ("channel", "linear")


def apply_channel(stream: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """The residual stream `stream` [..., hidden] scaled per channel by `channel` (float32)."""
    return (stream.float() * channel).to(stream.dtype)


def stand_in_of(block_part, where: str):
    """(kind, rank) of the stand-in an exported block config gives a sublayer (`block_part`: its
    attention or ffn entry), or None. `where` names it in errors."""
    entry = getattr(block_part, "stand_in", None)
    if entry is None:
        return None
    kind = getattr(entry, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"adaskip_vllm: {where} has a stand-in of unknown kind {kind!r}; expected one of {KINDS} "
                         "(written by another adaskip version?)")
    if not getattr(block_part, "no_op", False):
        raise ValueError(f"adaskip_vllm: {where} runs (no_op false) and has a {kind} stand-in too; a stand-in "
                         "replaces a skipped sublayer")
    rank = getattr(entry, "rank", None)
    if kind == "linear" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"adaskip_vllm: {where}'s linear stand-in needs a positive integer rank, got {rank!r}")
    return kind, rank
