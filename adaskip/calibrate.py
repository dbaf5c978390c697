"""Offline importance learning: IO similarity of every sublayer over calibration requests."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from . import ops
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


@torch.inference_mode()
def calibrate(model, data: Sequence[Union[str, Sequence[int]]], *, tokenizer=None, num_requests: int = 20,
              prompt_len: int = 4096, progress: bool = True, description: str = "") -> ImportanceProfile:
    """Runs the full model once over each calibration request (prefill only, no cache) and
    collects per-sublayer IO similarity and norm ratio with the fused ops: statistics stay on the
    device during the whole run and are read once at the end."""
    if num_requests < 1:
        raise ValueError(f"adaskip: num_requests must be >= 1, got {num_requests}")
    if prompt_len < 2:
        raise ValueError(f"adaskip: prompt_len must be >= 2, got {prompt_len}")
    if prompt_len > model.args.max_position_embeddings:
        raise ValueError(f"adaskip: prompt_len {prompt_len} exceeds the model's context of "
                         f"{model.args.max_position_embeddings} tokens")
    if data and isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("adaskip: calibration on texts needs the model's tokenizer")
        requests = calibration_requests(data, tokenizer, num_requests=num_requests, prompt_len=prompt_len)
    else:
        requests = [list(r)[:prompt_len] for r in data][:num_requests]
    if len(requests) < num_requests:
        raise ValueError(f"adaskip: the calibration data gives only {len(requests)} requests of "
                         f">= {prompt_len // 2} tokens; {num_requests} were asked for")

    args = model.args
    device = model.lm_head.weight.device
    n_sub = 2 * args.num_layers
    per_request_sim, per_request_scale, per_request_block = [], [], []
    bar = progress_bar(len(requests), progress)
    for ids in requests:
        stats = ops.new_stats(n_sub, 1, device)
        block = ops.new_stats(args.num_layers, 1, device)
        x = torch.as_tensor(ids, device=device)[None]
        model(x, stats=stats, block_stats=block, logits_index=torch.tensor([len(ids) - 1], device=device))
        mean_sim, mean_scale, _ = ops.mean_stats(stats)
        per_request_sim.append(mean_sim[:, 0])
        per_request_scale.append(mean_scale[:, 0])
        per_request_block.append(ops.mean_stats(block)[0][:, 0])
        bar.update(1)
    bar.close()
    sim = torch.stack(per_request_sim).double().cpu()  # the one read back
    scale = torch.stack(per_request_scale).double().cpu()
    blocks = torch.stack(per_request_block).double().cpu()
    std = (lambda t: t.std(0, unbiased=False)) if len(requests) > 1 else (lambda t: torch.zeros(t.shape[1]))
    from . import __version__
    return ImportanceProfile(
        num_layers=args.num_layers,
        similarity=sim.mean(0).tolist(), scale=scale.mean(0).tolist(),
        similarity_std=std(sim).tolist(), scale_std=std(scale).tolist(),
        block_similarity=blocks.mean(0).tolist(), fingerprint=model_fingerprint(model),
        num_requests=len(requests), tokens=sum(len(r) for r in requests), prompt_len=prompt_len,
        data=description, adaskip_version=__version__, per_request_similarity=sim.tolist())


def progress_bar(total: int, enabled: bool, desc: str = "calibrating", unit: str = "request"):
    """A tqdm bar, or a silent stand-in when disabled or tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if enabled:
        return tqdm(total=total, desc=desc, unit=unit)

    class _Quiet:
        def update(self, n):
            pass

        def close(self):
            pass
    return _Quiet()
