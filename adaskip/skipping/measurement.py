"""The loops that run a model over requests and read back what calibration, the greedy search,
validation and perplexity need: per-request IO statistics of every sublayer (and layer), the
summed next-token NLL, and the agreement of plans with the full model. Their own module so that
calibration (which runs the search and the validation), the search and evaluation can all use
them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from .._util import progress_bar


@dataclass
class Measurement:
    requests: int
    tokens: int  # tokens of all requests
    nll: Optional[float]  # next-token NLL summed over every predicted token (None: not measured)
    predicted_tokens: int  # tokens the NLL is over: each request's length - 1
    # [requests, 2 * num_layers], double on the CPU: each request's mean IO similarity / norm ratio
    similarity: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    block_similarity: Optional[torch.Tensor]  # [requests, num_layers]: whole-layer IO similarity

    @property
    def mean_nll(self) -> float:
        """Mean next-token NLL, pooled over every predicted token of every request."""
        if self.nll is None:
            raise ValueError("adaskip: this measurement has no NLL; measure with nll=True")
        return self.nll / self.predicted_tokens


def check_requests(model, requests, what: str = "requests") -> list:
    """`requests` as token-id lists, checked on the host (adaskip.generate's check): a string, a
    flat list of ids or an id outside the vocabulary is refused here, naming `what`, instead of
    ending in a device-side assert on a GPU."""
    from ..runtime.generation import _check_prompts

    try:
        return _check_prompts(requests, model.args.vocab_size)
    except ValueError as e:
        message = str(e).removeprefix("adaskip: ").replace("prompts", what).replace("prompt ", "request ")
        raise ValueError(f"adaskip: {message if what in message else f'{what}: {message}'}") from None


@torch.inference_mode()
def measure_requests(model, requests: Sequence[Sequence[int]], *, plan=None, stats: bool = True,
                     block_stats: bool = False, nll: bool = False, progress: bool = False,
                     description: str = "measuring", taps=None) -> Measurement:
    """One cache-less forward per request (token list) with `plan` applied.

    stats / block_stats: each request's mean IO similarity and norm ratio of every sublayer /
    whole-layer IO similarity, kept on the device until one read back at the end. nll: the summed
    next-token NLL over every predicted token (then all logits are computed, otherwise only the
    last token's; the statistics do not depend on it). taps: passed to every forward (e.g. an
    adaskip.skipping.stand_ins.StandInFit; its flush() is called after each request)."""
    if not (stats or block_stats or nll or taps is not None):
        raise ValueError("adaskip: measure_requests was asked for nothing (stats, block_stats and nll are all off)")
    requests = check_requests(model, requests)
    if nll and any(len(r) < 2 for r in requests):
        raise ValueError("adaskip: the next-token NLL needs requests of at least 2 tokens each")
    if any(len(r) < 1 for r in requests):
        raise ValueError("adaskip: measure_requests got an empty request")
    device = model.lm_head.weight.device
    num_layers = model.args.num_layers
    total_nll, predicted = (0.0 if nll else None), 0
    sims, scales, blocks = [], [], []
    bar = progress_bar(len(requests), progress, description, "request")
    for ids in requests:
        x = torch.as_tensor(ids, device=device)[None]
        buffer = ops.new_stats(2 * num_layers, 1, device) if stats else None
        block = ops.new_stats(num_layers, 1, device) if block_stats else None
        if nll:
            logits = model(x, plan=plan, stats=buffer, block_stats=block, taps=taps)[0, :-1].float()
            total_nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            predicted += x.shape[1] - 1
        else:
            model(x, plan=plan, stats=buffer, block_stats=block, taps=taps,
                  logits_index=torch.tensor([len(ids) - 1], device=device))
        if taps is not None and hasattr(taps, "flush"):
            taps.flush()
        if stats:
            sim, scale, _ = ops.mean_stats(buffer)
            sims.append(sim[:, 0])
            scales.append(scale[:, 0])
        if block_stats:
            blocks.append(ops.mean_stats(block)[0][:, 0])
        bar.update(1)
    bar.close()

    def per_request(values):  # the one read back
        return torch.stack(values).double().cpu() if values else None

    return Measurement(requests=len(requests), tokens=sum(len(r) for r in requests), nll=total_nll,
                       predicted_tokens=predicted, similarity=per_request(sims), scale=per_request(scales),
                       block_similarity=per_request(blocks))


@torch.inference_mode()
def compare_requests(model, requests: Sequence[Sequence[int]], named_plans: Sequence[Tuple[object, object]], *,
                     progress: bool = False, description: str = "comparing") -> Tuple[int, dict]:
    """Sums, over every predicted token of cache-less forwards of `requests`, of each named plan's
    next-token NLL, top-1 agreement with the full model and KL(full || plan). named_plans: (name,
    SkipPlan or None for the full model) pairs; the full model's logits are computed once per
    request and stand for every None. Returns (predicted tokens, {name: {"nll", "agree", "kl"}})."""
    requests = check_requests(model, requests)
    device = model.lm_head.weight.device
    sums = {name: {"nll": 0.0, "agree": 0, "kl": 0.0} for name, _ in named_plans}
    tokens = 0
    bar = progress_bar(len(requests) * len(named_plans), progress, description, "forward")
    for seq in requests:
        ids = torch.as_tensor(list(seq), device=device)[None]
        targets = ids[0, 1:]
        full = model(ids)[0, :-1].float().log_softmax(-1)
        full_top = full.argmax(-1)
        tokens += targets.numel()
        for name, plan in named_plans:
            logp = full if plan is None else model(ids, plan=plan)[0, :-1].float().log_softmax(-1)
            acc = sums[name]
            acc["nll"] += F.nll_loss(logp, targets, reduction="sum").item()
            acc["agree"] += (logp.argmax(-1) == full_top).sum().item()
            acc["kl"] += F.kl_div(logp, full, log_target=True, reduction="sum").item()
            bar.update(1)
    bar.close()
    return tokens, sums


POSITION_WEIGHTS = ("uniform", "late")


def position_weights(length: int, kind: str, device=None) -> torch.Tensor:
    """Weights of the predicted positions 0..length-1, summing to 1: "uniform", or "late"
    (proportional to position + 1: the late tokens, whose prediction needs the long context, count
    most)."""
    if kind not in POSITION_WEIGHTS:
        raise ValueError(f"adaskip: position weighting must be one of {POSITION_WEIGHTS}, got {kind!r}")
    w = torch.ones(length, device=device) if kind == "uniform" else torch.arange(1, length + 1, device=device).float()
    return w / w.sum()


@torch.inference_mode()
def reference_logprobs(model, requests: Sequence[Sequence[int]]) -> list:
    """The full model's next-token log-probabilities of every request ([len - 1, vocab] each, on
    the model's device): what divergence() compares plans with."""
    device = model.lm_head.weight.device
    return [model(torch.as_tensor(list(r), device=device)[None])[0, :-1].float().log_softmax(-1) for r in requests]


@torch.inference_mode()
def divergence(model, requests: Sequence[Sequence[int]], references: Sequence[torch.Tensor], plan, *,
               weighting: str = "uniform", starts: Optional[Sequence] = None) -> Tuple[float, float]:
    """(KL(full || plan) per token, weighted by position within each request and averaged over
    the requests; mean next-token NLL over every predicted token) of `plan` on `requests`.
    starts: per request, the (sublayer, normed input, residual stream) its forward begins at
    (Transformer.forward(start=)): the same numbers, without running the sublayers before again."""
    device = model.lm_head.weight.device
    kl, nll, tokens = 0.0, 0.0, 0
    for i, (seq, ref) in enumerate(zip(requests, references)):
        ids = torch.as_tensor(list(seq), device=device)[None]
        start = None if starts is None else starts[i]
        logp = model(ids, plan=plan, start=start)[0, :-1].float().log_softmax(-1)
        per_token = kl_per_token(ref, logp)
        kl += (per_token * position_weights(per_token.shape[0], weighting, device)).sum().item()
        nll += F.nll_loss(logp, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    return kl / len(requests), nll / tokens


def kl_per_token(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(full || plan) at each position, from log-probabilities [positions, vocab]."""
    return (ref.exp() * (ref - logp)).sum(-1)


def answer_nll(probe, logp: torch.Tensor) -> float:
    """Mean NLL of a probe's answer tokens under answer log-probabilities (_answer_logprobs)."""
    answer = torch.as_tensor(probe.ids[probe.answer_start:], device=logp.device)
    return F.nll_loss(logp, answer).item()


def _answer_logprobs(model, probe, plan=None, start=None) -> torch.Tensor:
    """Log-probabilities [answer tokens, vocab] at the positions that predict a probe's answer
    (adaskip.skipping.probes.Probe): one cache-less forward (from `start`, as in divergence), the
    vocabulary projected at those positions only."""
    device = model.lm_head.weight.device
    ids = torch.as_tensor(probe.ids, device=device)[None]
    at = torch.as_tensor(probe.answer_positions, device=device)[None]
    return model(ids, plan=plan, logits_index=at, start=start)[0].float().log_softmax(-1)


@torch.inference_mode()
def probe_references(model, probes) -> list:
    """The full model's answer log-probabilities of every probe (what probe_divergence compares
    plans with)."""
    return [_answer_logprobs(model, p) for p in probes]


@torch.inference_mode()
def probe_divergence(model, probes, references, plan, starts: Optional[Sequence] = None) -> Tuple[float, float]:
    """(KL(full || plan) per answer token, averaged over the probes; the mean answer NLL per
    token) of `plan` on retrieval probes: the text around the fact is not scored, only whether the
    plan still predicts the fact as the full model does. starts: as divergence's."""
    kl, nll = 0.0, 0.0
    for i, (probe, ref) in enumerate(zip(probes, references)):
        logp = _answer_logprobs(model, probe, plan, None if starts is None else starts[i])
        kl += kl_per_token(ref, logp).mean().item()
        nll += answer_nll(probe, logp)
    return kl / len(probes), nll / len(probes)
