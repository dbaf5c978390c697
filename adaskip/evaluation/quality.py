"""Quality measurements on the runtime."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .._util import progress_bar
from ..skipping.measurement import measure_requests


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
    device = model.lm_head.weight.device
    sums = {name: {"nll": 0.0, "agree": 0, "kl": 0.0} for name in ["full", *plans]}
    tokens = 0
    bar = progress_bar(len(sequences) * (1 + len(plans)), progress, "perplexity", "forward")
    for seq in sequences:
        ids = torch.as_tensor(list(seq), device=device)[None]
        targets = ids[0, 1:]
        full = model(ids)[0, :-1].float().log_softmax(-1)
        full_top = full.argmax(-1)
        tokens += targets.numel()
        for name, plan in [("full", None), *plans.items()]:
            logp = full if plan is None else model(ids, plan=plan)[0, :-1].float().log_softmax(-1)
            acc = sums[name]
            acc["nll"] += F.nll_loss(logp, targets, reduction="sum").item()
            acc["agree"] += (logp.argmax(-1) == full_top).sum().item()
            acc["kl"] += F.kl_div(logp, full, log_target=True, reduction="sum").item()
            bar.update(1)
    bar.close()
    return {name: {"perplexity": math.exp(a["nll"] / tokens), "top1_agreement": a["agree"] / tokens,
                   "kl_per_token": a["kl"] / tokens} for name, a in sums.items()}
