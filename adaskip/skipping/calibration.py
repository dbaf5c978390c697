"""Offline importance learning: IO similarity of every sublayer over calibration requests."""
from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .._version import __version__
from . import greedy
from ..runtime.stand_in import KINDS
from .._util import progress_bar
from .measurement import POSITION_WEIGHTS, check_requests, compare_requests, measure_requests
from .probes import MIN_PROBE_LEN, answer_found, make_probes

# The kl search's weight of the probes' KL when none is given. On SmolLM2 at 8 sublayers weight 1 still
# took the early attention that retrieval needs (needle 5 of 12 against the full model's 12); weight 4
# kept every cell within 2 of the full model (bench/results/eval-smollm2-retrieval-kl-w4-cpu-2026-12-06/).
DEFAULT_RETRIEVAL_WEIGHT = 4.0
from .profile import ImportanceProfile, model_fingerprint
from .strategies import SKIPPING_STRATEGIES, plan, searches_needed, strategy_of, streaming_layers


def calibration_requests(texts: Iterable[str], tokenizer, *, num_requests: int, prompt_len: int,
                         min_len: Optional[int] = None, with_sources: bool = False) -> list:
    """Token lists of up to prompt_len tokens: consecutive windows of each text in order (a
    long text gives several requests), skipping windows shorter than min_len (default half of
    prompt_len), until num_requests are collected. with_sources: return (requests, the index of
    the text each request came from) instead."""
    requests, sources = [], []
    if num_requests > 0:  # a generator: texts after the last one needed are not tokenized
        for window, index in _windows(texts, tokenizer, prompt_len, min_len):
            requests.append(window)
            sources.append(index)
            if len(requests) == num_requests:
                break
    return (requests, sources) if with_sources else requests


def _windows(texts: Iterable[str], tokenizer, prompt_len: int, min_len: Optional[int] = None):
    """(window, text index) for every window calibration_requests would take, in its order."""
    min_len = prompt_len // 2 if min_len is None else min_len
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), prompt_len):
            window = ids[start:start + prompt_len]
            if len(window) >= max(min_len, 2):
                yield window, index


def source_id(item) -> str:
    """How a profile names a text calibration read (ImportanceProfile.sources): a file's name, or
    for a text given as a string a content id, "sha256:" and the first 16 hex digits of the
    SHA-256 of its UTF-8 bytes (the same text gives the same id wherever it comes from)."""
    if isinstance(item, os.PathLike):
        return Path(item).name
    if isinstance(item, str):
        return "sha256:" + hashlib.sha256(item.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    raise ValueError(f"adaskip: only texts (str) and files (pathlib.Path) have a source id, got {type(item).__name__}")


def _read(item) -> str:
    return Path(item).read_text(encoding="utf-8", errors="replace") if isinstance(item, os.PathLike) else item


@torch.inference_mode()
def calibrate(model, data: Sequence[Union[str, os.PathLike, Sequence[int]]], *, tokenizer=None,
              num_requests: int = 20, prompt_len: int = 4096, progress: bool = True, description: str = "",
              search: Union[str, Sequence[str]] = (), search_max_sublayers: int = 16,
              search_candidates: Optional[int] = None, search_requests: int = 2,
              validate_budgets: Sequence[int] = (), validate_strategies: Sequence[str] = ("adaskip",),
              validation_requests: int = 4, search_stand_in: str = "scalar",
              search_weighting: str = "late", checkpoint: Optional[Callable] = None,
              resume: Optional[ImportanceProfile] = None, search_retrieval_weight: Optional[float] = None,
              search_probes: int = 4, validation_probes: Optional[int] = None,
              validation_len: Optional[int] = None, streaming_probes: int = 0, streaming_sink: int = 4,
              streaming_window: int = 256, validate_streaming: Sequence[int] = ()) -> ImportanceProfile:
    """Runs the full model once over each calibration request (prefill only, no cache) and
    collects per-sublayer IO similarity and norm ratio with the fused ops: statistics stay on the
    device during the whole run and are read once at the end.

    data: texts (str), files (pathlib.Path, read as UTF-8 text), or token-id lists. Texts and
    files are cut into requests by calibration_requests (with `tokenizer`) and the profile's
    `sources` names those that gave a request (source_id: file names, content ids of texts), so
    that evaluation can hold them out (adaskip.evaluation.harness.held_out); token lists are
    taken as requests (truncated to prompt_len) and recorded in no source.
    search: greedy search methods ("similarity", "loss", "blockpruner") to run as well, on the
    first `search_requests` requests, up to `search_max_sublayers` sublayers (at most all but one
    layer), each trying `search_candidates` per step (None: each method's default, see
    adaskip.skipping.greedy.search), stored in the profile's `search`; the "kl" search scores its
    candidates with `search_stand_in` stand-ins and `search_weighting` of positions, plus
    `search_retrieval_weight` times its KL on the answers of `search_probes` retrieval probes
    (adaskip.skipping.probes: a fact hidden at a random depth of a calibration window, asked for at
    the end; built from the calibration requests after the search's, prompt_len tokens long).
    None: DEFAULT_RETRIEVAL_WEIGHT where probes can be built (texts with their tokenizer,
    prompt_len >= MIN_PROBE_LEN), else 0 (text alone; the search records its weight).
    validate_budgets: also run `validate` for `validate_strategies` at these budgets on
    `validation_requests` requests that calibration and the searches did not read: for texts and
    files the windows after those calibration took (a window identical to a calibration request
    is passed over; their texts join `sources`), for token lists the next lists of `data`; with a
    tokenizer, also the greedy answers of `validation_probes` retrieval probes built on those
    held-out windows (other facts and seeds than the search's; 0: none; None: 8 where they can be
    built, as for the search's), `validation_len` tokens
    long (default prompt_len; longer ones are cut from the held-out windows joined end to end, so
    validate at the length the plan will serve).
    streaming_probes: rank KV-head groups (profile.group_scores, for plan(streaming_groups=)) on this many
    probes (0: none); validate_streaming: validate so many groups, alone and on each budget, for tolerances.
    checkpoint: called as checkpoint(profile, step, done) whenever the profile gains a result
    (step: "calibration", "<method> search", "validation"; done False after each choice of a
    search, whose partial result the profile then holds): a caller that saves it there loses
    nothing finished to a later failure or an interrupt.
    resume: such a saved profile of an interrupted calibration with the same model and requests:
    its statistics are kept, its searches go on from their last choice (one of at least
    `search_max_sublayers` choices keeps them; searches not asked for are dropped; one made with other
    settings is refused), validation and group ranking run again: an uninterrupted calibration's result."""
    _check_sizes(model, num_requests=num_requests, prompt_len=prompt_len, search_max_sublayers=search_max_sublayers,
                 search_requests=search_requests, validation_requests=validation_requests,
                 search_candidates=search_candidates)
    methods = _search_methods(search, search_requests, search_max_sublayers, search_candidates)
    validation_len, validation_probes = _validation_probing(model, tokenizer, prompt_len, validation_len,
                                                            validation_probes, search_probes)
    _check_streaming(model, tokenizer, streaming_probes, validation_len, streaming_sink, streaming_window,
                     validate_streaming, validate_budgets)  # before any pass
    fitting = [m for m in methods if greedy.SEARCH_METHODS[m].fits_stand_ins]  # the searches that read these
    search_retrieval_weight = _search_scoring(fitting, tokenizer, prompt_len, search_probes, search_retrieval_weight,
                                              search_stand_in, search_weighting)
    budgets, validation_requests = _validation_budgets(model, validate_budgets, validate_strategies,
                                                       validation_requests, methods)
    requests, held, sources = _calibration_data(model, data, tokenizer, num_requests, prompt_len, validation_requests)
    save = checkpoint or (lambda profile, step, done: None)
    digest = greedy.requests_digest(requests)
    if resume is not None:
        profile = _resumed(resume, model, digest, prompt_len, methods)
    else:
        profile = _measured_profile(model, requests, prompt_len, description, sources, digest, progress)
        save(profile, "calibration", True)
    _run_searches(model, profile, requests, tokenizer, methods, fitting, search_requests, prompt_len, search_probes,
                  dict(stand_in=search_stand_in, weighting=search_weighting, retrieval_weight=search_retrieval_weight),
                  search_candidates, min(search_max_sublayers, 2 * model.args.num_layers - 2), progress, save, checkpoint)
    _score_groups(model, profile, requests, tokenizer, streaming_probes, validation_len, streaming_sink,
                  streaming_window, progress, save)
    if budgets:
        _validate_held(model, profile, held, tokenizer, validate_strategies, budgets, validation_len,
                       validation_probes, progress, validate_streaming)
        save(profile, "validation", True)
    return profile


def _run_searches(model, profile, requests, tokenizer, methods, fitting, search_requests: int, prompt_len: int,
                  search_probes: int, scoring: dict, candidates, max_sublayers: int, progress: bool, save,
                  checkpoint) -> None:
    """Each greedy search asked for, in turn, on the first `search_requests` requests; those that
    fit stand-ins (`fitting`) score with `scoring` (stand-in kind, position weighting, retrieval
    weight) and, with a retrieval weight, `search_probes` probes hidden in the calibration
    windows after the search's own (all of them when there are none)."""
    weight = scoring["retrieval_weight"]
    probes = (make_probes(tokenizer, requests[search_requests:] or requests, search_probes, length=prompt_len,
                          seed="search") if fitting and weight > 0 else [])
    scoring = dict(scoring, probes=probes, retrieval_weight=weight if probes else 0.0)
    for method in methods:
        _run_search(model, profile, requests[:search_requests], method, candidates, max_sublayers, progress, save,
                    checkpoint, scoring if method in fitting else {})


GROUP_SCORE_TEXTS = 4  # calibration requests the group ranking also reads (late positions of each)


def _check_streaming(model, tokenizer, probes, length: int, sink, window, validated: Sequence[int],
                     budgets: Sequence[int]) -> None:
    """The group ranking's settings, and the streaming-group counts to validate, checked before any pass."""
    _streaming_counts(validated, model.args.num_layers * model.args.num_kv_heads)
    if validated and not (probes and budgets):
        raise ValueError("adaskip: validate_streaming validates group plans next to validate_budgets, with the groups "
                         "calibration ranks: give validate_budgets and streaming_probes > 0 as well")
    for name, value, low in (("streaming_probes", probes, 0), ("streaming_sink", sink, 0),
                             ("streaming_window", window, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"adaskip: {name} must be an integer >= {low}, got {value!r}")
    if probes and tokenizer is None:
        raise ValueError("adaskip: ranking KV-head groups builds retrieval probes with the model's tokenizer; pass "
                         "tokenizer= or streaming_probes=0")
    if probes and length < MIN_PROBE_LEN:
        raise ValueError(f"adaskip: the group ranking's probes are validation_len tokens long and need at least "
                         f"{MIN_PROBE_LEN}, got {length}")


def _score_groups(model, profile, requests, tokenizer, count: int, length: int, sink: int, window: int,
                  progress: bool, save) -> None:
    """profile.group_scores (then saved): every KV-head group ranked for streaming with a band of
    sink + window keys (head_groups.score_groups) on `count` probes (haystacks cut from the
    calibration requests joined; facts and seed their own) and the first GROUP_SCORE_TEXTS
    requests, one full-model pass each; none when `count` is 0."""
    if not count:
        return
    import time

    from .head_groups import default_probe_seed, probe_haystacks, score_groups

    probes = make_probes(tokenizer, probe_haystacks(requests, length), count, length=length,
                         seed=default_probe_seed())
    start = time.perf_counter()
    scores = score_groups(model, probes, requests[:GROUP_SCORE_TEXTS], sink=sink, window=window, progress=progress)
    profile.group_scores = {**scores.to_dict(), "probe_len": length, "probe_seed": default_probe_seed(),
                            "forward_passes": len(probes) + min(len(requests), GROUP_SCORE_TEXTS),
                            "wall_s": time.perf_counter() - start}
    save(profile, "group scores", True)


def _check_sizes(model, **sizes) -> None:
    """The request counts and lengths calibrate takes are integers in range."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ValueError(f"adaskip: {name} must be an integer, got {value!r}")
    if sizes["num_requests"] < 1:
        raise ValueError(f"adaskip: num_requests must be >= 1, got {sizes['num_requests']}")
    prompt_len = sizes["prompt_len"]
    if prompt_len < 2:
        raise ValueError(f"adaskip: prompt_len must be >= 2, got {prompt_len}")
    if prompt_len > model.args.max_position_embeddings:
        raise ValueError(f"adaskip: prompt_len {prompt_len} exceeds the model's context of "
                         f"{model.args.max_position_embeddings} tokens")


def _search_methods(search, search_requests: int, search_max_sublayers: int, search_candidates) -> tuple:
    """The greedy search methods asked for, known and with room to choose."""
    methods = (search,) if isinstance(search, str) else tuple(search)
    unknown = [m for m in methods if m not in greedy.SEARCH_METHODS]
    if unknown:
        raise ValueError(f"adaskip: unknown search methods {unknown}; choose from {greedy.METHODS}")
    if methods and min(search_requests, search_max_sublayers,
                       1 if search_candidates is None else search_candidates) < 1:
        raise ValueError(f"adaskip: the search needs search_requests, search_max_sublayers and search_candidates "
                         f">= 1, got {search_requests}, {search_max_sublayers} and {search_candidates}")
    return methods


def _validation_probing(model, tokenizer, prompt_len: int, validation_len, validation_probes,
                        search_probes) -> tuple:
    """(validation_len, validation_probes) with their defaults, checked (search_probes too)."""
    validation_len = prompt_len if validation_len is None else validation_len
    if isinstance(validation_len, bool) or not isinstance(validation_len, numbers.Integral) \
            or not 2 <= validation_len <= model.args.max_position_embeddings:
        raise ValueError(f"adaskip: validation_len must be an integer in [2, {model.args.max_position_embeddings}] "
                         f"(the model's context), got {validation_len!r}")
    if validation_probes is None:
        validation_probes = 8 if tokenizer is not None and validation_len >= MIN_PROBE_LEN else 0
    elif validation_probes and validation_len < MIN_PROBE_LEN:
        raise ValueError(f"adaskip: retrieval probes need at least {MIN_PROBE_LEN} tokens, validation_len is "
                         f"{validation_len}; give validation_probes=0 or a longer validation_len")
    for name, value in (("search_probes", search_probes), ("validation_probes", validation_probes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"adaskip: {name} must be an integer >= 0, got {value!r}")
    return validation_len, validation_probes


def _search_scoring(fitting: list, tokenizer, prompt_len: int, search_probes: int, retrieval_weight,
                    stand_in: str, weighting: str) -> float:
    """The retrieval weight of the searches that score with fitted stand-ins (`fitting`), with
    its default, after checking what those searches read."""
    if retrieval_weight is None:
        retrieval_weight = DEFAULT_RETRIEVAL_WEIGHT if tokenizer is not None and search_probes > 0 \
            and prompt_len >= MIN_PROBE_LEN \
            else 0.0
    if fitting and retrieval_weight > 0:
        if prompt_len < MIN_PROBE_LEN:
            raise ValueError(f"adaskip: the kl search's retrieval probes are prompt_len tokens long and need at least "
                             f"{MIN_PROBE_LEN}; give a longer prompt_len or search_retrieval_weight=0")
        if tokenizer is None:
            raise ValueError("adaskip: the kl search's retrieval probes are built with the model's tokenizer; pass "
                             "tokenizer= or search_retrieval_weight=0")
        if search_probes < 1:
            raise ValueError("adaskip: search_retrieval_weight > 0 needs search_probes >= 1")
    if fitting:
        if stand_in not in KINDS:
            raise ValueError(f"adaskip: unknown stand-in kind {stand_in!r} for the kl search; choose from {KINDS}")
        if weighting not in POSITION_WEIGHTS:
            raise ValueError(f"adaskip: position weighting must be one of {POSITION_WEIGHTS}, got {weighting!r}")
    return retrieval_weight


def _validation_budgets(model, validate_budgets, validate_strategies, validation_requests: int,
                        methods: tuple) -> tuple:
    """(budgets, validation requests): none of either when no budget is asked for."""
    budgets = [int(b) for b in validate_budgets]
    if not budgets:
        return budgets, 0
    if validation_requests < 1:
        raise ValueError(f"adaskip: validation needs validation_requests >= 1, got {validation_requests}")
    _check_validation(model.args.num_layers, validate_strategies, budgets)
    needed = sorted(set(searches_needed(validate_strategies)) - set(methods))
    if needed:
        raise ValueError(f"adaskip: validating {list(validate_strategies)} needs the {needed} search in the "
                         f"profile; add it to search=")
    return budgets, validation_requests


def _calibration_data(model, data, tokenizer, num_requests: int, prompt_len: int, validation_requests: int) -> tuple:
    """(calibration requests, held-out validation requests, the sources of texts read) of `data`."""
    try:
        data = [data] if isinstance(data, (str, os.PathLike)) else list(data)  # one text or file
    except TypeError:
        raise ValueError(f"adaskip: calibration data must be texts, files or token-id lists, got "
                         f"{type(data).__name__}") from None
    is_text = [isinstance(d, (str, os.PathLike)) for d in data]
    if any(is_text) and not all(is_text):
        raise ValueError("adaskip: calibration data must be all texts and files, or all token-id lists, not a mix")
    sources = []
    if data and all(is_text):
        requests, held, sources = _text_requests(data, tokenizer, num_requests, prompt_len, validation_requests)
    else:
        data = check_requests(model, data, "calibration data")  # before any kernel sees an id
        requests = [list(r)[:prompt_len] for r in data][:num_requests]
        held = [list(r)[:prompt_len] for r in data][num_requests:num_requests + validation_requests]
    if len(requests) < num_requests:
        raise ValueError(f"adaskip: the calibration data gives only {len(requests)} requests of "
                         f">= {prompt_len // 2} tokens; {num_requests} were asked for")
    if len(held) < validation_requests:
        raise ValueError(f"adaskip: the calibration data gives only {len(held)} validation requests after the "
                         f"{num_requests} calibration requests; {validation_requests} were asked for")
    return requests, held, sources


def _text_requests(data: list, tokenizer, num_requests: int, prompt_len: int, validation_requests: int) -> tuple:
    """Texts and files cut into windows: (calibration requests, the held-out windows after them,
    the sources of the texts either read)."""
    if tokenizer is None:
        raise ValueError("adaskip: calibration on texts needs the model's tokenizer")
    requests, used = calibration_requests((_read(d) for d in data), tokenizer, num_requests=num_requests,
                                          prompt_len=prompt_len, with_sources=True)
    held = []
    if validation_requests and len(requests) == num_requests:
        seen = {tuple(r) for r in requests}
        # The same windows as calibration's, in the same order: the first num_requests are
        # calibration's, so validation starts after them.
        windows = _windows((_read(d) for d in data), tokenizer, prompt_len)
        for n, (window, index) in enumerate(windows):
            if n >= num_requests and tuple(window) not in seen:
                held.append(window)
                used.append(index)
                if len(held) == validation_requests:
                    break
    return requests, held, sorted({source_id(data[i]) for i in used})


def _measured_profile(model, requests: list, prompt_len: int, description: str, sources: list, digest: str,
                      progress: bool) -> ImportanceProfile:
    """The profile of the full model's statistics over the calibration requests."""
    measured = measure_requests(model, requests, stats=True, block_stats=True, progress=progress,
                                description="calibrating")
    sim, scale, blocks = measured.similarity, measured.scale, measured.block_similarity
    std = (lambda t: t.std(0, unbiased=False)) if len(requests) > 1 else (lambda t: torch.zeros(t.shape[1]))
    return ImportanceProfile(
        num_layers=model.args.num_layers,
        similarity=sim.mean(0).tolist(), scale=scale.mean(0).tolist(),
        similarity_std=std(sim).tolist(), scale_std=std(scale).tolist(),
        block_similarity=blocks.mean(0).tolist(), fingerprint=model_fingerprint(model),
        num_requests=len(requests), tokens=sum(len(r) for r in requests), prompt_len=prompt_len,
        data=description, adaskip_version=__version__, per_request_similarity=sim.tolist(), sources=sources,
        requests_sha256=digest)


def _run_search(model, profile: ImportanceProfile, requests: list, method: str, candidates, max_sublayers: int,
                progress: bool, save: Callable, checkpoint, extra: dict) -> None:
    """The `method` search on `requests`, added to the profile (and saved) as it goes."""
    # A resumed search goes on from its choices (the search checks that they are its own
    # beginning, with these settings); one that had made as many or more just keeps them.
    earlier = profile.search_result(method) if method in profile.search else None
    limit = max_sublayers if earlier is None else max(max_sublayers, len(earlier.order))

    def partial(result):  # what the search has chosen so far, kept should it stop
        profile.add_search(result)
        save(profile, f"{method} search", False)

    result = greedy.search(model, requests, method=method, candidates=candidates, max_sublayers=limit,
                           progress=progress, on_step=partial if checkpoint else None, resume=earlier, **extra)
    profile.add_search(result)
    save(profile, f"{method} search", True)


def _validate_held(model, profile: ImportanceProfile, held: list, tokenizer, strategies, budgets: list,
                   validation_len: int, validation_probes: int, progress: bool, streaming: Sequence[int] = ()) -> None:
    """validate() on the held-out windows, with retrieval probes hidden in them where asked."""
    held_probes = (make_probes(tokenizer, _haystacks(held, validation_len), validation_probes,
                               length=validation_len, seed="validation")
                   if tokenizer is not None and validation_probes else ())
    validate(model, profile, held, strategies=strategies, budgets=budgets, progress=progress,
             probes=held_probes, tokenizer=tokenizer, streaming=streaming)


def _haystacks(windows: Sequence[Sequence[int]], length: int) -> list:
    """The held-out windows joined end to end (they are consecutive text) and cut into pieces of
    `length` tokens: the haystacks of validation probes longer than a window."""
    if all(len(w) >= length for w in windows):
        return [list(w) for w in windows]
    stream = [t for w in windows for t in w]
    pieces = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
    if not pieces:
        raise ValueError(f"adaskip: the {len(windows)} validation windows hold {len(stream)} tokens, too few for a "
                         f"{length}-token retrieval probe; ask for more validation requests")
    return pieces


def _resumed(resume: ImportanceProfile, model, digest: str, prompt_len: int, methods) -> ImportanceProfile:
    """A copy of the interrupted calibration's profile to go on from: its statistics and the
    searches of `methods`, no validation (it runs again after the searches) and no group ranking
    (ranked again when asked for, with this call's settings)."""
    if not isinstance(resume, ImportanceProfile):
        raise ValueError(f"adaskip: resume takes the ImportanceProfile of an interrupted calibration, got "
                         f"{type(resume).__name__}")
    resume.check_model(model)
    if not resume.requests_sha256:
        raise ValueError("adaskip: the profile to resume records no hash of its requests (an older adaskip made it), "
                         "so it cannot be checked to have read the same ones; calibrate anew")
    if resume.requests_sha256 != digest or resume.prompt_len != prompt_len:
        raise ValueError(f"adaskip: the profile to resume read other requests (sha256 {resume.requests_sha256}, "
                         f"prompt_len {resume.prompt_len}; these: {digest}, {prompt_len}); resume with the same data, "
                         "num_requests and prompt_len")
    profile = copy.deepcopy(resume)
    profile.validation, profile.group_scores = {}, {}
    for method in list(profile.search):
        if method not in methods:
            profile.search.pop(method)
            profile.fits.pop(method, None)
    return profile


def _check_validation(num_layers: int, strategies: Sequence[str], budgets: Sequence[int]) -> None:
    if isinstance(strategies, str) or not strategies:
        raise ValueError(f"adaskip: validation needs a list of strategies, got {strategies!r}")
    bad = [s for s in strategies if s not in SKIPPING_STRATEGIES]
    if bad:
        raise ValueError(f"adaskip: cannot validate strategies {bad}; choose from {list(SKIPPING_STRATEGIES)}")
    if not budgets or any(not 0 <= b <= 2 * num_layers - 2 for b in budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"adaskip: validation budgets must be distinct numbers of sublayers in "
                         f"[0, {2 * num_layers - 2}], got {list(budgets)}")
    whole = [s for s in strategies if not strategy_of(s).sublayers]
    if whole and any(b % 2 for b in budgets):
        raise ValueError(f"adaskip: whole-layer strategies {whole} need even budgets (n layers = 2n sublayers), "
                         f"got {list(budgets)}")


@torch.inference_mode()
def validate(model, profile: ImportanceProfile, requests: Sequence[Sequence[int]], *,
             strategies: Sequence[str] = ("adaskip",), budgets: Sequence[int], progress: bool = False,
             probes: Sequence = (), tokenizer=None, streaming: Sequence[int] = ()) -> dict:
    """Quality of each strategy's plan at each budget (skipped sublayers) on validation `requests`
    (token lists that calibration and the searches did not read), stored in `profile.validation`
    and returned: per strategy {"budgets", "kl" (mean KL(full || plan) per predicted token),
    "top1_agreement" (with the full model's next token), "perplexity", "sublayers" (what each plan
    skips), "requests", "tokens" (predicted tokens)}, over cache-less forwards, as
    adaskip.evaluation.quality.compare_with_full measures them. adaskip.plan(profile,
    min_agreement= / max_kl=) picks among these plans.
    probes: held-out retrieval probes (adaskip.skipping.probes; their answers decoded with
    `tokenizer`): each plan's greedy answers are scored too, beside the full model's, as
    "retrieval_hits" per budget and "retrieval_full_hits" (plan(min_retrieval=) reads them).
    streaming: also validate each of these numbers of streaming KV-head groups (the cheapest the
    profile's group scores rank, plan(..., streaming_groups=)) on top of budget 0 (groups alone) and
    of every budget, stored as the strategy's "streaming" rows ({"budget", "groups", "layers", and
    the measures above}): a tolerance then chooses among sublayer and group plans alike."""
    profile.check_model(model)
    budgets = sorted(int(b) for b in budgets)
    _check_validation(profile.num_layers, strategies, budgets)
    requests = check_requests(model, requests, "validation requests")
    if any(len(r) < 2 for r in requests):
        raise ValueError("adaskip: validation needs at least one request, each of at least 2 tokens")
    # Every plan is built before any forward, so a missing search or an odd whole-layer budget fails at once.
    if probes and tokenizer is None:
        raise ValueError("adaskip: validating on retrieval probes needs the tokenizer to read the answers")
    plans = {(s, k): plan(profile, strategy=s, num_sublayers=k) for s in strategies for k in budgets}
    grouped = _streaming_plans(profile, strategies, budgets, streaming)
    tokens, sums = compare_requests(model, requests, [*plans.items(), *grouped.items()], progress=progress,
                                    description="validating")
    hits = retrieval_hits(model, tokenizer, probes, {"full": None, **plans, **grouped}, progress) if probes else {}
    for s in strategies:
        keys = [(s, k) for k in budgets]
        profile.validation[s] = {
            "budgets": budgets, "kl": [sums[key]["kl"] / tokens for key in keys],
            "top1_agreement": [sums[key]["agree"] / tokens for key in keys],
            "perplexity": [math.exp(sums[key]["nll"] / tokens) for key in keys],
            "sublayers": [sorted(plans[key].skip_scales) for key in keys],
            "stand_in": _validated_stand_in(profile, s),
            "requests": len(requests), "tokens": tokens}
        if probes:
            profile.validation[s].update({
                "retrieval_hits": [hits[key] for key in keys], "retrieval_full_hits": hits["full"],
                "retrieval_probes": len(probes), "retrieval_length": max(len(p.ids) for p in probes)})
        rows = [_streaming_row(key, p, sums[key], tokens, hits.get(key)) for key, p in grouped.items() if key[0] == s]
        if rows:
            profile.validation[s]["streaming"] = rows
    return {s: profile.validation[s] for s in strategies}


def _streaming_plans(profile: ImportanceProfile, strategies, budgets: list, streaming: Sequence[int]) -> dict:
    """{(strategy, budget, groups): plan} for each count of streaming groups on budget 0 and on
    every budget (checked: distinct counts >= 1 that the profile's group ranking can give)."""
    counts = _streaming_counts(streaming)
    if counts and not profile.group_scores:
        raise ValueError("adaskip: validating streaming groups needs the profile's group ranking (calibrate with "
                         "streaming_probes > 0)")
    return {(s, k, g): plan(profile, strategy=s, num_sublayers=k, streaming_groups=g)
            for s in strategies for k in sorted({0, *budgets}) for g in counts}


def _streaming_counts(streaming, total: Optional[int] = None) -> list:
    """Numbers of streaming groups to validate, checked: distinct integers in [1, total]."""
    if isinstance(streaming, (str, bytes)) or any(isinstance(g, bool) or not isinstance(g, numbers.Integral)
                                                  or g < 1 for g in streaming):
        raise ValueError(f"adaskip: streaming group counts must be integers >= 1, got {streaming!r}")
    counts = sorted(int(g) for g in streaming)
    if len(set(counts)) != len(counts):
        raise ValueError(f"adaskip: streaming group counts must be distinct, got {list(streaming)}")
    if total is not None and counts and counts[-1] > total:
        raise ValueError(f"adaskip: {counts[-1]} streaming groups asked for; the model has {total} KV-head groups")
    return counts


def _streaming_row(key: tuple, p, sums: dict, tokens: int, hits: Optional[int]) -> dict:
    """What a validation stores of one budget + streaming-groups plan."""
    row = {"budget": key[1], "groups": key[2], "layers": streaming_layers(p), "kl": sums["kl"] / tokens,
           "top1_agreement": sums["agree"] / tokens, "perplexity": math.exp(sums["nll"] / tokens)}
    if hits is not None:
        row["retrieval_hits"] = hits
    return row


def _validated_stand_in(profile: ImportanceProfile, strategy: str) -> str:
    """The stand-in kind the plans of `strategy` are validated with: the one its search scored
    with where that search fits stand-ins, else the scalar."""
    record = strategy_of(strategy)
    return profile.search_result(record.search).stand_in if record.fitted_stand_ins else "scalar"


@torch.inference_mode()
def retrieval_hits(model, tokenizer, probes: Sequence, named_plans: dict, progress: bool = False) -> dict:
    """How many probes each plan (None: the full model) answers: greedy tokens after each probe's
    prompt, a few more than its answer has, decoded and searched for the fact (probes.answer_found)."""
    from ..runtime.generation import generate

    found = {}
    bar = progress_bar(len(probes) * len(named_plans), progress, "validating retrieval", "answer")
    for name, p in named_plans.items():
        found[name] = 0
        for probe in probes:
            answer_len = len(probe.ids) - probe.answer_start
            out = generate(model, [probe.prompt], max_new_tokens=answer_len + 4, plan=p)
            found[name] += answer_found(probe, tokenizer.decode(out.tokens[0], skip_special_tokens=True))
            bar.update(1)
    bar.close()
    return found
