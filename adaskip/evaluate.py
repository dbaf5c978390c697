"""Quality measurements on the runtime."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


@torch.inference_mode()
def perplexity(model, sequences: Iterable[Sequence[int]], plan=None) -> float:
    """exp of the mean next-token negative log-likelihood, pooled over every predicted token of
    every sequence (each sequence is one cache-less forward from its first token)."""
    device = model.lm_head.weight.device
    total_nll, total_tokens = 0.0, 0
    for seq in sequences:
        if len(seq) < 2:
            raise ValueError("adaskip: perplexity needs sequences of at least 2 tokens")
        ids = torch.as_tensor(list(seq), device=device)[None]
        logits = model(ids, plan=plan)[0, :-1].float()
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)
