"""Offline importance learning: IO similarity of every sublayer over calibration requests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from .._version import __version__
from . import greedy
from .measurement import measure_requests
from .profile import ImportanceProfile, model_fingerprint


def calibration_requests(texts: Iterable[str], tokenizer, *, num_requests: int, prompt_len: int,
                         min_len: Optional[int] = None, with_sources: bool = False) -> list:
    """Token lists of up to prompt_len tokens: consecutive windows of each text in order (a
    long text gives several requests), skipping windows shorter than min_len (default half of
    prompt_len), until num_requests are collected. with_sources: return (requests, the index of
    the text each request came from) instead."""
    min_len = prompt_len // 2 if min_len is None else min_len
    requests, sources = [], []
    for index, text in enumerate(texts):
        if len(requests) == num_requests:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), prompt_len):
            window = ids[start:start + prompt_len]
            if len(window) >= max(min_len, 2):
                requests.append(window)
                sources.append(index)
            if len(requests) == num_requests:
                break
    return (requests, sources) if with_sources else requests


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
              search_candidates: Optional[int] = None, search_requests: int = 2) -> ImportanceProfile:
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
    adaskip.skipping.greedy.search), stored in the profile's `search`."""
    if num_requests < 1:
        raise ValueError(f"adaskip: num_requests must be >= 1, got {num_requests}")
    if prompt_len < 2:
        raise ValueError(f"adaskip: prompt_len must be >= 2, got {prompt_len}")
    if prompt_len > model.args.max_position_embeddings:
        raise ValueError(f"adaskip: prompt_len {prompt_len} exceeds the model's context of "
                         f"{model.args.max_position_embeddings} tokens")
    methods = (search,) if isinstance(search, str) else tuple(search)
    unknown = [m for m in methods if m not in greedy.METHODS]
    if unknown:
        raise ValueError(f"adaskip: unknown search methods {unknown}; choose from {greedy.METHODS}")
    if methods and min(search_requests, search_max_sublayers,
                       1 if search_candidates is None else search_candidates) < 1:
        raise ValueError(f"adaskip: the search needs search_requests, search_max_sublayers and search_candidates "
                         f">= 1, got {search_requests}, {search_max_sublayers} and {search_candidates}")
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data)  # one text or file
    is_text = [isinstance(d, (str, os.PathLike)) for d in data]
    if any(is_text) and not all(is_text):
        raise ValueError("adaskip: calibration data must be all texts and files, or all token-id lists, not a mix")
    sources = []
    if data and all(is_text):
        if tokenizer is None:
            raise ValueError("adaskip: calibration on texts needs the model's tokenizer")
        requests, used = calibration_requests((_read(d) for d in data), tokenizer, num_requests=num_requests,
                                              prompt_len=prompt_len, with_sources=True)
        sources = sorted({source_id(data[i]) for i in used})
    else:
        requests = [list(r)[:prompt_len] for r in data][:num_requests]
    if len(requests) < num_requests:
        raise ValueError(f"adaskip: the calibration data gives only {len(requests)} requests of "
                         f">= {prompt_len // 2} tokens; {num_requests} were asked for")

    measured = measure_requests(model, requests, stats=True, block_stats=True, progress=progress,
                                description="calibrating")
    sim, scale, blocks = measured.similarity, measured.scale, measured.block_similarity
    std = (lambda t: t.std(0, unbiased=False)) if len(requests) > 1 else (lambda t: torch.zeros(t.shape[1]))
    args = model.args
    profile = ImportanceProfile(
        num_layers=args.num_layers,
        similarity=sim.mean(0).tolist(), scale=scale.mean(0).tolist(),
        similarity_std=std(sim).tolist(), scale_std=std(scale).tolist(),
        block_similarity=blocks.mean(0).tolist(), fingerprint=model_fingerprint(model),
        num_requests=len(requests), tokens=sum(len(r) for r in requests), prompt_len=prompt_len,
        data=description, adaskip_version=__version__, per_request_similarity=sim.tolist(), sources=sources)
    for method in methods:
        result = greedy.search(model, requests[:search_requests], method=method, candidates=search_candidates,
                               max_sublayers=min(search_max_sublayers, 2 * args.num_layers - 2), progress=progress)
        profile.search[method] = result.to_dict()
    return profile
