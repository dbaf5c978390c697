"""Greedy sublayer selection beyond the paper's one-shot ranking (issue 7).

AdaSkip ranks every sublayer once, by the IO similarity measured with the full model, and skips
the top of that list. Two things go wrong as the budget grows: the similarities shift once
earlier sublayers are gone (the ranking is of the full model, not of the model being built), and
a high similarity does not say how much the *output* suffers (per-token similarity under-rates
attention, whose job is moving information between tokens).

`search` builds the skip set one sublayer at a time on calibration data:
  1. run the model with the skips chosen so far, re-measuring every remaining sublayer's IO
     similarity and norm ratio (the compensation scale) under those skips;
  2. method "similarity": take the remaining sublayer of highest re-measured similarity;
     method "loss": take the `candidates` most similar ones and keep the one whose skip (with its
     re-measured compensation) raises the calibration next-token loss the least.
The order is nested (the plan for k sublayers is the first k choices), so one search serves
every budget up to `max_sublayers`, and the result is stored in the ImportanceProfile.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .calibrate import progress_bar
from .plan import SkipPlan

METHODS = ("similarity", "loss")


@dataclass
class SearchResult:
    method: str
    order: list  # sublayers in the order they were chosen
    scales: list  # the compensation scale of each, measured with the earlier choices applied
    similarity: list  # its IO similarity, measured the same way
    loss: list  # mean next-token NLL on the search data after each choice (loss[0]: full model)
    candidates: int
    requests: int
    tokens: int
    forward_passes: int
    wall_s: float
    notes: dict = field(default_factory=dict)

    def skip_scales(self, k: int) -> dict:
        if not 0 <= k <= len(self.order):
            raise ValueError(f"adaskip: the stored search covers budgets up to {len(self.order)} sublayers, "
                             f"{k} were asked for; run the search with a larger max_sublayers")
        return {s: c for s, c in zip(self.order[:k], self.scales[:k])}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(**d)


def _measure(model, requests, skip: dict, want_stats: bool):
    """Mean NLL over the requests' predicted tokens and (optionally) each sublayer's mean IO
    similarity and norm ratio (means per request, then over requests) with `skip` applied."""
    device = model.lm_head.weight.device
    n_sub = 2 * model.args.num_layers
    plan = SkipPlan(model.args.num_layers, skip) if skip else None
    nll, tokens = 0.0, 0
    sims, scales = [], []
    for ids in requests:
        x = torch.as_tensor(ids, device=device)[None]
        stats = ops.new_stats(n_sub, 1, device) if want_stats else None
        logits = model(x, plan=plan, stats=stats)[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        tokens += x.shape[1] - 1
        if want_stats:
            sim, scale, _ = ops.mean_stats(stats)
            sims.append(sim[:, 0])
            scales.append(scale[:, 0])
    if not want_stats:
        return nll / tokens, None, None
    return nll / tokens, torch.stack(sims).double().mean(0).cpu(), torch.stack(scales).double().mean(0).cpu()


@torch.inference_mode()
def search(model, requests: Sequence[Sequence[int]], *, max_sublayers: int, method: str = "loss",
           candidates: int = 4, allowed: Optional[Sequence[int]] = None, progress: bool = True) -> SearchResult:
    """Greedy selection of up to `max_sublayers` sublayers on calibration `requests` (token lists).

    Forward passes: (max_sublayers + 1) * len(requests) for "similarity", plus
    max_sublayers * candidates * len(requests) for "loss".
    allowed: sublayers that may be chosen (default: all).
    """
    if method not in METHODS:
        raise ValueError(f"adaskip: search method must be one of {METHODS}, got {method!r}")
    m = model.args.num_layers
    if not 1 <= max_sublayers <= 2 * m - 2:
        raise ValueError(f"adaskip: max_sublayers must be in [1, {2 * m - 2}] (all but one layer), got {max_sublayers}")
    if candidates < 1:
        raise ValueError(f"adaskip: candidates must be >= 1, got {candidates}")
    if not requests or any(len(r) < 2 for r in requests):
        raise ValueError("adaskip: the search needs calibration requests of at least 2 tokens each")
    pool = set(range(2 * m)) if allowed is None else {int(s) for s in allowed}
    if any(not 0 <= s < 2 * m for s in pool):
        raise ValueError(f"adaskip: allowed sublayers must be in [0, {2 * m})")
    if len(pool) < max_sublayers:
        raise ValueError(f"adaskip: only {len(pool)} sublayers are allowed, {max_sublayers} were asked for")

    start = time.perf_counter()
    bar = progress_bar(max_sublayers, progress, f"search ({method})", "sublayer")
    chosen: dict = {}
    order, scales, sims = [], [], []
    losses: list = [None] * (max_sublayers + 1)  # losses[k]: with the first k choices skipped
    passes = 0
    for step in range(max_sublayers):
        losses[step], sim, scale = _measure(model, requests, chosen, want_stats=True)
        passes += len(requests)
        remaining = sorted((s for s in pool if s not in chosen and math.isfinite(sim[s].item())),
                           key=lambda s: (-sim[s].item(), s))
        shortlist = remaining[:1] if method == "similarity" else remaining[:candidates]
        trial = {}
        if len(shortlist) > 1:
            for s in shortlist:
                trial[s], _, _ = _measure(model, requests, {**chosen, s: scale[s].item()}, want_stats=False)
                passes += len(requests)
        best = min(shortlist, key=lambda s: (trial.get(s, 0.0), s)) if trial else shortlist[0]
        chosen[best] = scale[best].item()
        order.append(best)
        scales.append(scale[best].item())
        sims.append(sim[best].item())
        if trial:
            losses[step + 1] = trial[best]
        bar.update(1)
    if losses[-1] is None:  # the similarity method has not measured the last choice's loss
        losses[-1], _, _ = _measure(model, requests, chosen, want_stats=False)
        passes += len(requests)
    bar.close()
    return SearchResult(method=method, order=order, scales=scales, similarity=sims, loss=losses,
                        candidates=1 if method == "similarity" else candidates, requests=len(requests),
                        tokens=sum(len(r) for r in requests), forward_passes=passes,
                        wall_s=time.perf_counter() - start)
