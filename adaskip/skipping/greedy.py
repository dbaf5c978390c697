"""Greedy sublayer selection beyond the paper's one-shot ranking.

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
     re-measured compensation) raises the calibration next-token loss the least;
     method "blockpruner" (BlockPruner, ACL Findings 2025, a baseline): the same loss-scored step,
     but every remaining sublayer is a candidate and a removed one is an identity pass-through
     (no compensation); `candidates=k` narrows it to the k most similar, as "loss" does;
     method "kl": the `candidates` most similar ones are each scored with a stand-in fitted in
     closed form on their activations as they are under the earlier choices (`stand_in`:
     scalar, channel or linear, adaskip.skipping.stand_ins), by KL(full || plan) against the
     full model's next-token distribution, weighted toward late positions (`weighting`); the
     chosen sublayer keeps the stand-ins of every kind fitted for it.
The order is nested (the plan for k sublayers is the first k choices), so one search serves
every budget up to `max_sublayers`, and the result is stored in the ImportanceProfile. For the
same reason a search resumes where an earlier one stopped (`resume`): its choices are the first
steps of the longer search, which goes on from them as if it had made them itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .._util import progress_bar
from ..runtime.skip_plan import SkipPlan
from ..runtime.stand_in import KINDS
from .measurement import (POSITION_WEIGHTS, answer_nll, check_requests, divergence, measure_requests,
                          probe_divergence, probe_references, reference_logprobs)
from .profile import SearchResult
from .stand_ins import StandInFit, default_rank

@dataclass(frozen=True)
class SearchMethod:
    """One greedy search method: what a new method declares, beside its own scoring code."""

    name: str
    # Candidates tried per step when the caller passes candidates=None (None: every remaining
    # sublayer). Each candidate costs one pass per request; "loss" trusts the re-measured
    # similarity to shortlist a few, BlockPruner as published tries them all.
    default_candidates: Optional[int]
    # Scores its candidates (else it takes the most similar remaining sublayer, one per step).
    scores_candidates: bool = True
    # Its removed sublayers pass the stream through unchanged instead of their measured norm ratio.
    identity: bool = False
    # Scores each candidate by KL with a stand-in fitted for it (stand_in, weighting, rank and
    # retrieval probes apply); the others score the calibration loss with the norm ratio.
    fits_stand_ins: bool = False


SEARCH_METHODS = {m.name: m for m in (
    SearchMethod("similarity", 1, scores_candidates=False),
    SearchMethod("loss", 4),
    SearchMethod("blockpruner", None, identity=True),
    SearchMethod("kl", 6, fits_stand_ins=True),
)}
METHODS = tuple(SEARCH_METHODS)


def search_method(name: str) -> SearchMethod:
    """The record of search method `name`, or the error naming the known ones."""
    if name not in SEARCH_METHODS:
        raise ValueError(f"adaskip: search method must be one of {METHODS}, got {name!r}")
    return SEARCH_METHODS[name]


def _measure(model, requests, skip: dict, want_stats: bool):
    """Mean NLL over the requests' predicted tokens and (optionally) each sublayer's mean IO
    similarity and norm ratio (means per request, then over requests) with `skip` applied."""
    plan = SkipPlan(model.args.num_layers, skip) if skip else None
    m = measure_requests(model, requests, plan=plan, stats=want_stats, nll=True)
    if not want_stats:
        return m.mean_nll, None, None
    return m.mean_nll, m.similarity.mean(0), m.scale.mean(0)


@torch.inference_mode()
def search(model, requests: Sequence[Sequence[int]], *, max_sublayers: int, method: str = "loss",
           candidates: Optional[int] = None, allowed: Optional[Sequence[int]] = None,
           progress: bool = True, stand_in: str = "scalar", weighting: str = "late",
           rank: Optional[int] = None, on_step: Optional[Callable] = None,
           resume: Optional[SearchResult] = None, retrieval_weight: float = 0.0,
           probes: Optional[Sequence] = None) -> SearchResult:
    """Greedy selection of up to `max_sublayers` sublayers on calibration `requests` (token lists).

    candidates: how many of the most similar remaining sublayers the scoring methods try per
    step; None: the method's default (SEARCH_METHODS[method].default_candidates; None there:
    every remaining sublayer). "similarity" takes the most similar one and ignores it.
    Forward passes: (max_sublayers + 1) * len(requests) for "similarity"; for the loss-scored
    methods one pass per request and step for the statistics plus one per request and candidate
    tried (none at a step with a single candidate left).
    allowed: sublayers that may be chosen (default: all).
    stand_in, weighting, rank: method "kl" only: the stand-in each candidate is scored with (default
    "scalar": fitted ones did worse than it on text unlike the calibration's, see the README), the
    position weighting of the KL ("late" or "uniform"), the rank of linear stand-ins (default
    hidden / 8). "kl" costs one pass per request for the full model's distributions, then per
    step one for the statistics, one to fit the shortlist's stand-ins and one per candidate.
    retrieval_weight, probes: method "kl" only: the objective becomes KL on the text requests plus
    retrieval_weight times the KL on the answer tokens of `probes` (adaskip.skipping.probes: a fact
    hidden in calibration text, asked for at the end), so that a sublayer that retrieval needs is
    not taken for one that running text does not; the probes' prompts also join the stand-ins'
    fitting pass. 0 (the default) scores text alone. Each probe costs one more pass per candidate.
    on_step: called after each choice with the result so far (a SearchResult of the choices
    made, notes["complete"] False), so that a search that stops keeps what it completed.
    resume: such a partial result, or a finished one of fewer sublayers: the search goes on
    from its choices (the same steps an uninterrupted search makes, so the same result). It must
    come from the same method and settings on the same requests (notes["requests_sha256"]), or it
    is refused.
    """
    record = search_method(method)
    if candidates is None:
        candidates = record.default_candidates
    requests, pool = _checked_search(model, requests, max_sublayers, candidates, allowed)
    digest = requests_digest(requests)
    if resume is not None:
        _check_resume(resume, method, digest, tried_per_step(method, candidates, pool), max_sublayers, pool)
    probes = list(probes or ())
    if not record.fits_stand_ins and (retrieval_weight or probes):
        raise ValueError(f"adaskip: retrieval probes score the kl search only, not {method!r}")
    if record.fits_stand_ins:
        retrieval = _check_retrieval(model, retrieval_weight, probes)
        return _search_kl(model, requests, max_sublayers, candidates, pool, progress, stand_in, weighting, rank,
                          on_step, resume, digest, retrieval)
    return _search_loss(model, requests, record, max_sublayers, candidates, pool, progress, on_step, resume, digest)


def _checked_search(model, requests, max_sublayers: int, candidates: Optional[int], allowed) -> tuple:
    """(the search's requests, the sublayers it may choose), checked."""
    m = model.args.num_layers
    if not 1 <= max_sublayers <= 2 * m - 2:
        raise ValueError(f"adaskip: max_sublayers must be in [1, {2 * m - 2}] (all but one layer), got {max_sublayers}")
    if candidates is not None and candidates < 1:
        raise ValueError(f"adaskip: candidates must be >= 1, got {candidates}")
    requests = check_requests(model, requests, "search requests")
    if any(len(r) < 2 for r in requests):
        raise ValueError("adaskip: the search needs calibration requests of at least 2 tokens each")
    pool = set(range(2 * m)) if allowed is None else {int(s) for s in allowed}
    if any(not 0 <= s < 2 * m for s in pool):
        raise ValueError(f"adaskip: allowed sublayers must be in [0, {2 * m})")
    if len(pool) < max_sublayers:
        raise ValueError(f"adaskip: only {len(pool)} sublayers are allowed, {max_sublayers} were asked for")
    return requests, pool


def _search_loss(model, requests, record: SearchMethod, max_sublayers: int, candidates: Optional[int], pool,
                 progress: bool, on_step, resume: Optional[SearchResult], digest: str) -> SearchResult:
    """The searches scored by the calibration loss with the norm ratio (or identity) as stand-in,
    and "similarity", which takes the most similar remaining sublayer."""
    method = record.name
    everything = candidates is None or candidates >= len(pool)  # no shortlist: every remaining sublayer is tried
    identity = record.identity
    start = time.perf_counter() - (0.0 if resume is None else resume.wall_s)
    bar = progress_bar(max_sublayers, progress, f"search ({method})", "sublayer")
    order, scales, sims = [], [], []
    losses: list = [None] * (max_sublayers + 1)  # losses[k]: with the first k choices skipped
    passes = 0
    if resume is not None:
        order, scales, sims = list(resume.order), list(resume.scales), list(resume.similarity)
        losses[:len(order) + 1] = resume.loss[:len(order) + 1]
        passes = resume.forward_passes
        bar.update(len(order))
    chosen: dict = dict(zip(order, scales))
    for step in range(len(order), max_sublayers):
        losses[step], sim, scale = _measure(model, requests, chosen, want_stats=True)
        passes += len(requests)
        remaining = sorted((s for s in pool if s not in chosen and math.isfinite(sim[s].item())),
                           key=lambda s: (-sim[s].item(), s))
        shortlist = (remaining[:1] if not record.scores_candidates else remaining if everything
                     else remaining[:candidates])
        stand_in = {s: 1.0 if identity else scale[s].item() for s in shortlist}
        trial = {}
        if len(shortlist) > 1:
            for s in shortlist:
                trial[s], _, _ = _measure(model, requests, {**chosen, s: stand_in[s]}, want_stats=False)
                passes += len(requests)
        best = min(shortlist, key=lambda s: (trial.get(s, 0.0), s)) if trial else shortlist[0]
        chosen[best] = stand_in[best]
        order.append(best)
        scales.append(stand_in[best])
        sims.append(sim[best].item())
        if trial:
            losses[step + 1] = trial[best]
        bar.update(1)
        if on_step is not None:
            on_step(_partial(method, order, scales, sims, losses, tried_per_step(method, candidates, pool), requests,
                             passes, start, notes={"requests_sha256": digest}))
    if losses[-1] is None:  # no trial measured the last choice's loss (similarity; or one candidate was left)
        losses[-1], _, _ = _measure(model, requests, chosen, want_stats=False)
        passes += len(requests)
    bar.close()
    return SearchResult(method=method, order=order, scales=scales, similarity=sims, loss=losses,
                        candidates=tried_per_step(method, candidates, pool), requests=len(requests),
                        tokens=sum(len(r) for r in requests), forward_passes=passes,
                        wall_s=time.perf_counter() - start, notes=_loss_notes(method, candidates, everything, digest))


def _loss_notes(method: str, candidates: Optional[int], everything: bool, digest: str) -> dict:
    notes = {"requests_sha256": digest}
    if method == "blockpruner":
        notes["variant"] = "all" if everything else "shortlist"
        notes["candidates"] = ("every remaining sublayer tried at each step" if everything else
                               f"the {candidates} most similar remaining sublayers (re-measured) tried at each step")
    return notes


def _check_retrieval(model, weight, probes) -> dict:
    """The kl search's retrieval settings, checked: {"weight", "probes", "probes_sha256"}."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"adaskip: retrieval_weight must be a number >= 0, got {weight!r}")
    if weight > 0 and not probes:
        raise ValueError("adaskip: retrieval_weight > 0 needs retrieval probes (adaskip.skipping.probes.make_probes)")
    if probes and weight == 0:
        raise ValueError("adaskip: retrieval probes were given with retrieval_weight 0; they would cost passes and "
                         "score nothing: give a weight > 0 or no probes")
    if probes:
        check_requests(model, [p.ids for p in probes], "retrieval probes")
        if any(not 1 <= p.answer_start < len(p.ids) for p in probes):
            raise ValueError("adaskip: a retrieval probe must have a prompt and at least one answer token")
    return {"weight": float(weight), "probes": probes,
            "probes_sha256": requests_digest([p.ids for p in probes]) if probes else ""}


def _balanced(remaining: list, candidates: int) -> list:
    """The shortlist of a search with retrieval probes: the most similar remaining attention and
    FFN sublayers in turn (`remaining` is sorted by similarity). IO similarity cannot see
    retrieval and ranks attention first, so a shortlist by similarity alone would hold only the
    attention that copying needs; this one lets the objective weigh FFNs against it."""
    attention = [s for s in remaining if s % 2 == 0]
    ffn = [s for s in remaining if s % 2 == 1]
    picked = []
    while len(picked) < candidates and (attention or ffn):
        for kind in (attention, ffn):
            if kind and len(picked) < candidates:
                picked.append(kind.pop(0))
    return sorted(picked, key=remaining.index)


class _FitAndKeepStarts:
    """Taps for the kl search's fitting pass: the stand-in sums (`fit`, a StandInFit) and, per
    request, a copy of the normed input and the residual stream before each watched sublayer,
    where that candidate's trial forwards begin (the sublayers before it are the same in both)."""

    def __init__(self, fit: StandInFit):
        self.fit = fit
        self.starts: list = []  # per request: {sublayer: (normed input, residual stream)}
        self._current: dict = {}

    def __call__(self, s: int, x, h, out) -> None:
        self.fit(s, x, h, out)
        if s in self.fit.sublayers:
            self._current[s] = (x.clone(), h.clone())

    def flush(self) -> None:
        self.fit.flush()
        self.starts.append(self._current)
        self._current = {}


def requests_digest(requests: Sequence[Sequence[int]]) -> str:
    """The first 16 hex digits of the SHA-256 of the token ids a search reads (a resumed search
    must read the same)."""
    return hashlib.sha256(json.dumps([list(map(int, r)) for r in requests]).encode()).hexdigest()[:16]


def _check_resume(resume, method: str, digest: str, tried: int, max_sublayers: int, pool) -> None:
    """Refuses to go on from a search that is not this one's beginning."""
    if not isinstance(resume, SearchResult):
        raise ValueError(f"adaskip: resume takes a SearchResult (profile.search_result(method)), got "
                         f"{type(resume).__name__}")
    if resume.method != method:
        raise ValueError(f"adaskip: cannot resume a {method!r} search from a {resume.method!r} one")
    recorded = resume.notes.get("requests_sha256")
    if recorded is None:
        raise ValueError("adaskip: the search to resume records no hash of its requests (an older adaskip made it), "
                         "so it cannot be checked to have read the same ones; run the search anew")
    if recorded != digest:
        raise ValueError(f"adaskip: the search to resume read other requests (sha256 {recorded}, these: {digest}); "
                         "resume with the same data, num_requests, prompt_len and search_requests")
    if resume.candidates != tried:
        raise ValueError(f"adaskip: the search to resume tried {resume.candidates} candidates per step, this one "
                         f"would try {tried}; resume with the same candidates")
    if len(resume.order) > max_sublayers:
        raise ValueError(f"adaskip: the search to resume already chose {len(resume.order)} sublayers, more than "
                         f"max_sublayers = {max_sublayers}")
    k = len(resume.order)
    if len(resume.scales) != k or len(resume.similarity) != k or len(resume.loss) < k + 1:
        raise ValueError(f"adaskip: the search to resume is inconsistent: {k} choices but {len(resume.scales)} scales, "
                         f"{len(resume.similarity)} similarities and {len(resume.loss)} losses")
    outside = [s for s in resume.order if s not in pool]
    if outside:
        raise ValueError(f"adaskip: the search to resume chose sublayers {outside} that are not allowed here")


def tried_per_step(method: str, candidates: Optional[int], pool) -> int:
    """The most candidates a search tries at one step."""
    return 1 if not search_method(method).scores_candidates else len(pool) if candidates is None else candidates


def _partial(method, order, scales, sims, losses, tried, requests, passes, start, **extra) -> SearchResult:
    """The result of a search's first choices (losses[k] may still be unmeasured: None)."""
    k = len(order)
    return SearchResult(method=method, order=list(order), scales=list(scales), similarity=list(sims),
                        loss=list(losses[:k + 1]), candidates=tried, requests=len(requests),
                        tokens=sum(len(r) for r in requests), forward_passes=passes,
                        wall_s=time.perf_counter() - start, notes={"complete": False, **extra.pop("notes", {})},
                        **extra)


def _search_kl(model, requests, max_sublayers, candidates, pool, progress, stand_in, weighting, rank,
               on_step=None, resume=None, digest=None, retrieval=None) -> SearchResult:
    rank = _kl_rank(model, stand_in, weighting, rank)
    search = _KlSearch(model, requests, pool, candidates, stand_in, weighting, rank,
                       retrieval or {"weight": 0.0, "probes": [], "probes_sha256": ""}, digest)
    if resume is not None:
        search.check_resume(resume)
    search.begin(max_sublayers, resume)
    bar = progress_bar(max_sublayers, progress, f"search (kl, {stand_in} stand-ins)", "sublayer")
    search.start_choices(max_sublayers, resume)
    if resume is not None:
        bar.update(len(search.order))
    for step in range(len(search.order), max_sublayers):
        search.choose(step)
        bar.update(1)
        if on_step is not None:
            on_step(search.partial(step))
    bar.close()
    return search.result()


def _kl_rank(model, stand_in: str, weighting: str, rank: Optional[int]) -> int:
    """The rank of the kl search's linear stand-ins, after checking its stand-in kind and weighting."""
    if stand_in not in KINDS:
        raise ValueError(f"adaskip: unknown stand-in kind {stand_in!r}; choose from {KINDS}")
    if weighting not in POSITION_WEIGHTS:
        raise ValueError(f"adaskip: position weighting must be one of {POSITION_WEIGHTS}, got {weighting!r}")
    hidden = model.args.hidden_size
    rank = default_rank(hidden) if rank is None else int(rank)
    if not 1 <= rank <= hidden:
        raise ValueError(f"adaskip: a linear stand-in's rank must be in [1, {hidden}], got {rank}")
    return rank


class _KlSearch:
    """The kl search under way: its settings, the full model's reference distributions, the
    choices so far (sublayer, scale, similarity, fitted stand-ins), the objective and loss after
    each, and the passes it has cost."""

    def __init__(self, model, requests, pool, candidates, stand_in: str, weighting: str, rank: int,
                 retrieval: dict, digest):
        self.model, self.requests, self.pool, self.candidates = model, requests, pool, candidates
        self.stand_in, self.weighting, self.rank, self.digest = stand_in, weighting, rank, digest
        self.weight, self.probes = retrieval["weight"], retrieval["probes"]
        self.m = model.args.num_layers
        self.settings = {"stand_in": stand_in, "weighting": weighting, "rank": rank,
                         "retrieval_weight": retrieval["weight"], "probes_sha256": retrieval["probes_sha256"]}
        self.chosen: dict = {}  # sublayer -> its compensation scale
        self.stand_ins: dict = {}  # sublayer -> the StandIn it is scored and planned with
        self.order, self.scales, self.sims, self.fits = [], [], [], []
        self.references, self.probe_refs = None, None

    @property
    def tried(self) -> int:
        return len(self.pool) if self.candidates is None else self.candidates

    def check_resume(self, resume: SearchResult) -> None:
        """Refuses to go on from a kl search with other settings or without its stand-ins."""
        # (a search made before retrieval probes existed scored text alone: weight 0, no probes)
        before = {"retrieval_weight": 0.0, "probes_sha256": ""}
        differ = {k: (resume.notes.get(k, before.get(k)), v) for k, v in self.settings.items()
                  if resume.notes.get(k, before.get(k)) != v}
        if differ:
            raise ValueError(f"adaskip: the kl search to resume ran with other settings (it vs this one: {differ})")
        if len(resume.objective) < len(resume.order) + 1:
            raise ValueError(f"adaskip: the kl search to resume has {len(resume.objective)} objective values for "
                             f"{len(resume.order)} choices")
        if len(resume.fits) != len(resume.order) or any(self.stand_in not in f for f in resume.fits):
            raise ValueError("adaskip: the kl search to resume lacks the stand-ins of its choices (keep the profile's "
                             ".stand-ins.safetensors file beside its JSON)")

    def begin(self, max_sublayers: int, resume: Optional[SearchResult]) -> None:
        """The clock and pass counters (a resumed search's go on), and the full model's references."""
        requests, probes = self.requests, self.probes
        self.start = time.perf_counter() - (0.0 if resume is None else resume.wall_s)
        self.passes = 0 if resume is None else resume.forward_passes
        # Passes counted as whole ones, and the work they did in whole-forward equivalents (a trial that
        # begins at sublayer s runs (2M - s) / 2M of a forward).
        self.work = float(self.passes if resume is None else resume.notes.get("pass_equivalents", self.passes))
        if resume is None or len(resume.order) < max_sublayers:  # (the full model's, for the steps to come)
            self.references = reference_logprobs(self.model, requests)
            self.probe_refs = probe_references(self.model, probes)
            self.passes += len(requests) + len(probes)
            if resume is None:  # (a resumed search's work is that of the search it continues)
                self.work += len(requests) + len(probes)

    def start_choices(self, max_sublayers: int, resume: Optional[SearchResult]) -> None:
        """No choice yet, or the resumed search's."""
        probes = self.probes
        self.losses: list = [None] * (max_sublayers + 1)
        self.objective: list = [0.0] + [None] * max_sublayers
        # per choice, what objective mixes
        self.parts = {"text_kl": [0.0], "retrieval_kl": [0.0], "retrieval_nll": [None]}
        if probes and resume is None:  # the full model's own answer NLL, from its reference log-probabilities
            self.parts["retrieval_nll"][0] = sum(answer_nll(p, ref) for p, ref in zip(probes, self.probe_refs)) \
                / len(probes)
        if resume is None:
            return
        k = len(resume.order)
        self.parts = {name: list(resume.notes.get(name, [None] * (k + 1)))[:k + 1] for name in self.parts}
        self.order, self.scales, self.sims, self.fits = (list(resume.order), list(resume.scales),
                                                         list(resume.similarity), list(resume.fits))
        self.chosen = dict(zip(self.order, self.scales))
        self.stand_ins = {s: f[self.stand_in] for s, f in zip(self.order, self.fits)}
        self.losses[:k + 1] = resume.loss[:k + 1]
        self.objective[:k + 1] = resume.objective[:k + 1]

    def choose(self, step: int) -> None:
        """One step: re-measure under the choices so far, shortlist, fit the shortlist's
        stand-ins, score each candidate, keep the best."""
        requests, probes = self.requests, self.probes
        current = SkipPlan(self.m, self.chosen, stand_ins=self.stand_ins) if self.chosen else None
        measured = measure_requests(self.model, requests, plan=current, stats=True, nll=self.losses[step] is None)
        self.passes += len(requests)
        if self.losses[step] is None:
            self.losses[step] = measured.mean_nll
        sim, scale = measured.similarity.mean(0), measured.scale.mean(0)
        shortlist = self.shortlist(sim)
        # Fitted on the probes' prompts as well: more tokens than the text requests alone, of
        # the lengths the plan is for.
        fit = _FitAndKeepStarts(StandInFit(shortlist, self.model.args.hidden_size, linear=True))
        measure_requests(self.model, list(requests) + [p.ids for p in probes], plan=current, stats=False, taps=fit)
        self.passes += len(requests) + len(probes)
        self.work += len(requests) + len(probes) + len(requests)  # and the statistics pass
        fitted = {s: {kind: fit.fit.fit(s, kind, scale=scale[s].item(), rank=self.rank) for kind in KINDS}
                  for s in shortlist}
        trial = {s: self.trial(s, scale[s].item(), fitted[s][self.stand_in], fit.starts) for s in shortlist}
        best = min(shortlist, key=lambda s: (trial[s][0], s))
        for key, value in zip(self.parts, trial[best][2:]):
            self.parts[key].append(value)
        self.chosen[best] = scale[best].item()
        self.stand_ins[best] = fitted[best][self.stand_in]
        self.order.append(best)
        self.scales.append(self.chosen[best])
        self.sims.append(sim[best].item())
        self.fits.append(fitted[best])
        self.objective[step + 1], self.losses[step + 1] = trial[best][:2]

    def shortlist(self, sim: torch.Tensor) -> list:
        remaining = sorted((s for s in self.pool if s not in self.chosen and math.isfinite(sim[s].item())),
                           key=lambda s: (-sim[s].item(), s))
        return (remaining if self.candidates is None else
                _balanced(remaining, self.candidates) if self.probes else remaining[:self.candidates])

    def trial(self, s: int, scale: float, stand_in, starts_per_request: list) -> tuple:
        """Candidate s skipped with its fitted stand-in: (objective, loss, text KL, probe KL, probe NLL)."""
        requests, probes = self.requests, self.probes
        plan = SkipPlan(self.m, {**self.chosen, s: scale}, stand_ins={**self.stand_ins, s: stand_in})
        # Each trial begins at its candidate: the sublayers before it are those of the fitting pass.
        starts = [(s, *kept[s]) for kept in starts_per_request]
        text_kl, nll = divergence(self.model, requests, self.references, plan, weighting=self.weighting,
                                  starts=starts[:len(requests)])
        self.work += (len(requests) + len(probes)) * (2 * self.m - s) / (2 * self.m)
        probe_kl, probe_nll = (probe_divergence(self.model, probes, self.probe_refs, plan,
                                                starts=starts[len(requests):])
                               if probes else (0.0, None))
        self.passes += len(requests) + len(probes)
        return text_kl + self.weight * probe_kl, nll, text_kl, probe_kl, probe_nll

    def partial(self, step: int) -> SearchResult:
        return _partial("kl", self.order, self.scales, self.sims, self.losses, self.tried, self.requests, self.passes,
                        self.start, notes={**self.settings, "requests_sha256": self.digest, **self.parts,
                                           "pass_equivalents": self.work},
                        objective=self.objective[:step + 2], fits=list(self.fits))

    def result(self) -> SearchResult:
        requests = self.requests
        return SearchResult(method="kl", order=self.order, scales=self.scales, similarity=self.sims,
                            loss=self.losses, candidates=self.tried, requests=len(requests),
                            tokens=sum(len(r) for r in requests), forward_passes=self.passes,
                            wall_s=time.perf_counter() - self.start, notes=self.notes(), objective=self.objective,
                            fits=self.fits)

    def notes(self) -> dict:
        args, probes, candidates = self.model.args, self.probes, self.candidates
        hidden = args.hidden_size
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        text = f"KL(full || plan) per token, {self.weighting} position weighting"
        mixed = (f"{text}, plus {self.weight:g} x KL per answer token on {len(probes)} retrieval probes"
                 if probes else text)
        return {"objective": mixed, **self.settings, "requests_sha256": self.digest, **self.parts,
                "retrieval_probes": len(probes), "probe_tokens": sum(len(p.ids) for p in probes),
                "pass_equivalents": self.work,
                # What the planners weigh a linear stand-in's cost against (multiply-adds per token)
                "attention_multiply_adds": hidden * (q_dim + 2 * kv_dim) + q_dim * hidden,
                "ffn_multiply_adds": 3 * hidden * args.intermediate_size,
                "candidates": ("every remaining sublayer tried at each step" if candidates is None else
                               f"the {candidates} most similar remaining sublayers (re-measured), attention and FFN "
                               "in equal numbers, tried at each step" if probes else
                               f"the {candidates} most similar remaining sublayers (re-measured) tried at each step")}
