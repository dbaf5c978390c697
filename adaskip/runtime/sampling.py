"""Token choice: greedy, or sampled with temperature, top-k and top-p."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"adaskip: temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"adaskip: top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"adaskip: top_p must be in (0, 1], got {self.top_p}")


# Chunks the greedy choice splits a large vocabulary into (the largest power of two up to this
# that divides it); below TWO_PASS_VOCAB one pass is as fast.
ARGMAX_CHUNKS = 64
TWO_PASS_VOCAB = 16384


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., vocab] -> the index of the largest logit [...], the first one on ties: the same
    as logits.argmax(-1). A large vocabulary goes in two passes, each chunk's first maximum, then
    the first chunk holding the largest: torch's argmax reduces one long row in few blocks, which
    made it a visible share of a decode step on a GPU."""
    vocab = logits.shape[-1]
    chunks = ARGMAX_CHUNKS
    while chunks > 1 and vocab % chunks:
        chunks //= 2
    if vocab < TWO_PASS_VOCAB or chunks < 8:
        return logits.argmax(-1)
    size = vocab // chunks
    best, index = logits.reshape(*logits.shape[:-1], chunks, size).max(-1)  # first maximum of each chunk
    chunk = best.argmax(-1, keepdim=True)  # the first chunk holding the maximum
    return index.gather(-1, chunk).squeeze(-1) + chunk.squeeze(-1) * size


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]."""
    if params.temperature == 0:
        return greedy_tokens(logits)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sample() draws from (temperature > 0): float32 [..., vocab]."""
    if params.temperature == 0:
        raise ValueError("adaskip: greedy decoding has no sampling distribution")
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1]).float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1).reshape(shape)
