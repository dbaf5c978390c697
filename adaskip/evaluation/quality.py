"""Quality measurements on the runtime."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from ..skipping.measurement import compare_requests, measure_requests


def perplexity(model, sequences: Iterable[Sequence[int]], plan=None) -> float:
    """exp of the mean next-token negative log-likelihood, pooled over every predicted token of
    every sequence (each sequence is one cache-less forward from its first token)."""
    sequences = [list(seq) for seq in sequences]
    if not sequences or any(len(seq) < 2 for seq in sequences):
        raise ValueError("adaskip: perplexity needs at least one sequence, each of at least 2 tokens")
    return math.exp(measure_requests(model, sequences, plan=plan, stats=False, nll=True).mean_nll)


@torch.inference_mode()
def compare_with_full(model, sequences: Sequence[Sequence[int]], plans: dict, *, progress: bool = False) -> dict:
    """For each named plan: perplexity, top-1 agreement with the full model's next-token choice
    and mean KL(full || plan) per token, over cache-less forwards of `sequences`. The full
    model's logits are computed once per sequence. Returns {name: {...}} with "full" included."""
    tokens, sums = compare_requests(model, sequences, [("full", None), *plans.items()], progress=progress,
                                    description="perplexity")
    return {name: {"perplexity": math.exp(a["nll"] / tokens), "top1_agreement": a["agree"] / tokens,
                   "kl_per_token": a["kl"] / tokens} for name, a in sums.items()}
