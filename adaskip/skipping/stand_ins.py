"""Fitting stand-ins for skipped sublayers in closed form, on calibration activations.

A tap on the forward (Transformer.forward(taps=...)) reads, for every watched sublayer that runs,
its normed input x, the residual h before it and its output f(x); StandInFit accumulates
  channel:  sum_t h_j * (h_j + f_j) and sum_t h_j^2 per channel j    -> d_j = ratio of the two
  linear:   G = sum_t [x, 1]^T [x, 1] and C = sum_t [x, 1]^T f(x)      -> ridge W = (G + lam I)^-1 C,
            then reduced to rank r along the top eigenvectors of W^T G W (the directions of the
            fitted outputs that carry the most energy), as D, e, U with f(x) ~ U (D x + e)
and `fit` turns the sums into a StandIn. Nothing is trained by gradient. Accumulation is float32
per request on the model's device, summed in float64 on the CPU, alternately into two folds of
requests: the ridge strength of a linear stand-in is the one of RIDGE_GRID whose fit on one fold
predicts the other best (both ways), so that a map fitted on a few thousand tokens does not
learn them by heart. The final map is fitted on both folds with it.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..runtime.stand_in import KINDS, StandIn

DEFAULT_RIDGE = 1e-2  # times the mean input energy per channel; used when one fold is empty
# Candidate ridge strengths (same unit), from barely regularised to strongly shrunk toward the bias.
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
TINY = 1e-12


def default_rank(hidden: int) -> int:
    """The rank of a linear stand-in unless given: hidden / 8, so that it costs 2 * hidden^2 / 8
    multiply-adds per token (a few percent of a LLaMA FFN's 3 * hidden * ffn)."""
    return max(1, hidden // 8)


class StandInFit:
    """Sums for fitting the stand-ins of `sublayers`; pass it as a forward's `taps`."""

    def __init__(self, sublayers: Iterable[int], hidden: int, *, linear: bool = True):
        self.sublayers = {int(s) for s in sublayers}
        self.hidden = hidden
        self.linear = linear
        self.tokens = {s: 0 for s in self.sublayers}
        self._sums: dict = {}  # s -> [io, ii, G, C, ff] (device, float32, this request)
        self._folds: tuple = ({}, {})  # s -> the same in float64 on the CPU, requests alternating between folds
        self._flushed = 0  # requests flushed so far: the next one goes to fold _flushed % 2
        self.ridge: dict = {}  # s -> the ridge strength the last linear fit chose

    def __call__(self, s: int, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> None:
        if s not in self.sublayers:
            return
        hf = h.reshape(-1, self.hidden).float()
        of = out.reshape(-1, self.hidden).float()
        sums = [(hf * (hf + of)).sum(0), (hf * hf).sum(0)]
        if self.linear:
            xa = torch.cat([x.reshape(-1, self.hidden).float(), torch.ones_like(hf[:, :1])], 1)
            sums += [xa.t() @ xa, xa.t() @ of, (of * of).sum()]
        old = self._sums.get(s)
        self._sums[s] = sums if old is None else [a + b for a, b in zip(old, sums)]
        self.tokens[s] += hf.shape[0]

    def flush(self) -> None:
        """Moves this request's sums to the float64 totals (call between requests: keeps the
        float32 sums short)."""
        if not self._sums:
            return
        fold = self._folds[self._flushed % 2]
        for s, sums in self._sums.items():
            cpu = [t.double().cpu() for t in sums]
            old = fold.get(s)
            fold[s] = cpu if old is None else [a + b for a, b in zip(old, cpu)]
        self._sums.clear()
        self._flushed += 1

    def _total(self, s: int) -> list:
        """Both folds' sums of sublayer s."""
        parts = [f[s] for f in self._folds if s in f]
        return [sum(t) for t in zip(*parts)]

    def fit(self, s: int, kind: str, *, scale: float = 1.0, rank: Optional[int] = None,
            ridge: Optional[float] = None) -> StandIn:
        """The stand-in of `kind` for sublayer s from the sums so far. scale: the scalar
        compensation (the measured mean norm ratio), used by kind "scalar". ridge: of a linear
        stand-in; None chooses it from RIDGE_GRID by the held-out error across the two folds
        (DEFAULT_RIDGE when only one request was seen)."""
        if kind not in KINDS:
            raise ValueError(f"adaskip: unknown stand-in kind {kind!r}; choose from {KINDS}")
        if kind == "scalar":
            return StandIn("scalar", scale=scale)
        self.flush()
        if self.tokens.get(s, 0) == 0:
            raise ValueError(f"adaskip: no activations of sublayer {s} were seen; it must run in the fitting pass")
        total = self._total(s)
        io, ii = total[:2]
        if kind == "channel":
            # Channels that carry (almost) nothing keep scale 1.
            d = torch.where(ii > TINY, io / ii.clamp_min(TINY), torch.ones_like(io))
            return StandIn("channel", channel=d.float())
        if not self.linear:
            raise ValueError("adaskip: this fit did not collect the sums of a linear stand-in (linear=False)")
        rank = rank or default_rank(self.hidden)
        if ridge is None:
            ridge = self._choose_ridge(s, rank)
        self.ridge[s] = ridge
        return StandIn("linear", **_ridge_low_rank(total[2], total[3], rank, ridge))

    def _choose_ridge(self, s: int, rank: int) -> float:
        """The RIDGE_GRID strength whose rank-`rank` fit on each fold has the least squared error
        on the other fold (summed both ways)."""
        if not all(s in f for f in self._folds):
            return DEFAULT_RIDGE
        a, b = self._folds[0][s], self._folds[1][s]
        errors = {r: held_out_error(_ridge_low_rank(a[2], a[3], rank, r), *b[2:5])
                  + held_out_error(_ridge_low_rank(b[2], b[3], rank, r), *a[2:5]) for r in RIDGE_GRID}
        return min(RIDGE_GRID, key=lambda r: (errors[r], r))


def held_out_error(fitted: dict, G: torch.Tensor, C: torch.Tensor, ff: torch.Tensor) -> float:
    """Summed squared error of the map U (D x + e) on tokens given only by their sums
    G = sum [x,1]^T [x,1], C = sum [x,1]^T f and ff = sum |f|^2:
    sum |f - [x,1] W|^2 = ff - 2 tr(W^T C) + tr(W^T G W), with W = [D^T; e] U^T."""
    W = torch.cat([fitted["down"].double().t(), fitted["down_bias"].double()[None]], 0) @ fitted["up"].double().t()
    return (ff - 2 * (W * C).sum() + (W * (G @ W)).sum()).item()


def _ridge_low_rank(G: torch.Tensor, C: torch.Tensor, rank: int, ridge: float) -> dict:
    """f(x) ~ U (D x + e) from G = sum [x,1]^T [x,1] and C = sum [x,1]^T f: the ridge solution
    (the bias column not penalized), reduced to `rank`."""
    hidden = C.shape[1]
    if not 1 <= rank <= hidden:
        raise ValueError(f"adaskip: a linear stand-in's rank must be in [1, {hidden}], got {rank}")
    if not ridge > 0:
        raise ValueError(f"adaskip: the ridge factor must be positive, got {ridge}")
    energy = G.diagonal()[:hidden].mean().clamp_min(TINY)
    penalty = torch.full((hidden + 1,), float(ridge) * energy.item(), dtype=G.dtype)
    penalty[hidden] = 0.0
    W = torch.linalg.solve(G + torch.diag(penalty), C)  # [hidden + 1, hidden]
    # Reduced-rank regression: keep the `rank` output directions of largest fitted energy.
    _, vectors = torch.linalg.eigh(W.t() @ G @ W)
    V = vectors[:, -rank:]  # [hidden, rank]
    WV = W @ V  # [hidden + 1, rank]
    return {"down": WV[:hidden].t().float(), "down_bias": WV[hidden].float(), "up": V.float()}
