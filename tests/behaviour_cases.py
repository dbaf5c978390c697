"""Behaviour that a refactor must not change: logits, IO-similarity statistics, profiles, greedy
searches, plans and generated tokens of tiny random models (CPU, fixed seeds).

`compute()` runs every case and returns {name: value}; tests/fixtures/behaviour.pt holds what it
returned before the runtime was restructured, and test_behaviour.py checks that today's code
gives the same values: every discrete one (tokens, choices, counts, names) exactly, floats to
1e-5 (the CPU's fp32 kernels round differently on different CPUs). Regenerate (only when a
behaviour change is intended and explained):

    ADASKIP_REGENERATE_BEHAVIOUR=1 .venv/bin/python -m pytest -q tests/test_behaviour.py
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager

import torch

from adaskip import SamplingParams, ops
from adaskip.skipping.calibration import calibrate
from adaskip.runtime.config import ModelArgs
from adaskip.runtime.generation import generate
from adaskip.runtime.loading import build_model
from adaskip.skipping.strategies import plan
from adaskip.skipping.greedy import search

MODES = ("prefill", "decode", "e2e")
# The strategies the fixtures were recorded with (strategies added later get tests of their own).
STRATEGIES = ("full", "adaskip", "greedy-similarity", "greedy-loss", "early-exit", "skipdecode", "unified",
              "shortgpt")

CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], vocab_size=101, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0),
    "mistral": dict(architectures=["MistralForCausalLM"], vocab_size=97, hidden_size=48, intermediate_size=80,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                    rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=8),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], vocab_size=89, hidden_size=32, intermediate_size=72,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
}


def tiny_model(name: str, dtype=torch.float32, **config):
    """A model of CONFIGS[name] (`config` overriding its fields) with seeded random weights
    (torch's CPU generator only)."""
    args = ModelArgs.from_hf_config({**CONFIGS[name], **config})
    with torch.device("meta"):
        from adaskip.runtime.model import Transformer
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(1234)
    weights = {}
    for key in sorted(shapes):
        if key == "lm_head.weight" and args.tie_word_embeddings:
            continue
        w = torch.randn(shapes[key], generator=g)
        # Norm weights around 1, the rest small: a stream that sublayers turn, but not wildly.
        weights[key] = (1.0 + 0.1 * w if key.endswith("norm.weight") else 0.15 * w).to(dtype)
    return build_model(args, weights)


def _tokens(n: int, vocab: int, seed: int) -> list:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _plan_dict(p) -> str:
    return json.dumps(p.to_dict(), sort_keys=True)


def _generate_case(model, prompts, p, **kw) -> dict:
    out = generate(model, prompts, plan=p, eos_token_ids=[], **kw)
    return {"tokens": out.tokens, "online_skipped": out.online_skipped, "steps": out.decode_steps}


def _llama_cases(out: dict) -> None:
    model = tiny_model("llama")
    vocab = model.args.vocab_size
    requests = [_tokens(40, vocab, 10 + i) for i in range(4)]
    profile = calibrate(model, requests, num_requests=4, prompt_len=40, progress=False)
    for field in ("similarity", "scale", "similarity_std", "scale_std", "block_similarity",
                  "per_request_similarity"):
        out[f"llama/profile/{field}"] = torch.tensor(getattr(profile, field), dtype=torch.float64)
    for method, kw in (("loss", dict(candidates=3)), ("similarity", {})):
        result = search(model, requests[:2], max_sublayers=5, method=method, progress=False, **kw)
        profile.search[method] = result.to_dict()
        for field in ("order", "scales", "similarity", "loss", "forward_passes"):
            out[f"llama/search/{method}/{field}"] = getattr(result, field)

    plans = {}
    for strategy in STRATEGIES:
        for budget in ((None,) if strategy == "full" else (2, 4)):
            for mode in MODES:
                kw = {} if budget is None else {"num_sublayers": budget}
                p = plan(profile, strategy=strategy, mode=mode, window=3, **kw)
                plans[(strategy, budget, mode)] = p
                out[f"llama/plan/{strategy}/{budget}/{mode}"] = _plan_dict(p)
    for alpha in (1.1, 1.3):
        p = plan(profile, strategy="adaskip", planner="cost", alpha=alpha, context_len=1024, model_args=model.args)
        out[f"llama/plan/adaskip-cost/{alpha}"] = _plan_dict(p)
        out[f"llama/plan/adaskip-alpha/{alpha}"] = _plan_dict(plan(profile, alpha=alpha))

    # Cache-less forwards: logits, sublayer and block statistics, per plan.
    ids = torch.tensor([_tokens(23, vocab, 50), _tokens(23, vocab, 51)])
    seq_lens = torch.tensor([23, 15], dtype=torch.int32)
    for strategy in STRATEGIES:
        p = plans[(strategy, None if strategy == "full" else 4, "e2e")]
        stats = ops.new_stats(8, 2, ids.device)
        block = ops.new_stats(4, 2, ids.device)
        logits = model(ids, plan=p, stats=stats, block_stats=block, seq_lens=seq_lens)
        out[f"llama/forward/{strategy}/logits"] = logits
        out[f"llama/forward/{strategy}/stats"] = stats
        out[f"llama/forward/{strategy}/block_stats"] = block
    last = torch.tensor([22, 14])
    out["llama/forward/logits_index"] = model(ids, plan=plans[("adaskip", 4, "e2e")], logits_index=last)

    # Generation: a batch of mixed lengths, every strategy and mode, online learning on and off.
    prompts = [_tokens(11, vocab, 60), _tokens(5, vocab, 61), _tokens(17, vocab, 62)]
    for (strategy, budget, mode), p in plans.items():
        if budget == 2:
            continue
        out[f"llama/generate/{strategy}/{mode}"] = _generate_case(model, prompts, p, max_new_tokens=9)
        if p.online:
            off = dataclasses.replace(p, beta=None)
            out[f"llama/generate/{strategy}/{mode}/online-off"] = _generate_case(model, prompts, off, max_new_tokens=9)
    base = plans[("adaskip", 4, "e2e")]
    for beta in (-1.0, 0.0, 0.5, 0.9):
        p = dataclasses.replace(base, beta=beta)
        out[f"llama/generate/online-beta/{beta}"] = _generate_case(model, prompts, p, max_new_tokens=10)
    stats = ops.new_stats(8, 3, ids.device)
    r = generate(model, prompts, plan=plans[("greedy-loss", 4, "prefill")], stats=stats, max_new_tokens=4,
                 eos_token_ids=[])
    out["llama/generate/stats-buffer"] = stats
    out["llama/generate/stats-buffer/tokens"] = r.tokens
    out["llama/generate/chunked"] = _generate_case(model, prompts, base, max_new_tokens=6, prefill_chunk=4)
    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    out["llama/generate/sampled"] = _generate_case(model, prompts, base, max_new_tokens=8, sampling=sampled)
    out["llama/generate/eos"] = generate(model, prompts, plan=base, max_new_tokens=9,
                                         eos_token_ids=out["llama/generate/adaskip/e2e"]["tokens"][0][3:4]).tokens

    bf16 = tiny_model("llama", torch.bfloat16)
    bplan = plans[("adaskip", 4, "e2e")]
    out["llama-bf16/forward/logits"] = bf16(ids, plan=bplan)
    out["llama-bf16/generate"] = _generate_case(bf16, prompts, dataclasses.replace(bplan, beta=0.5), max_new_tokens=8)


def _other_cases(out: dict, name: str) -> None:
    model = tiny_model(name)
    vocab = model.args.vocab_size
    requests = [_tokens(30, vocab, 70 + i) for i in range(2)]
    profile = calibrate(model, requests, num_requests=2, prompt_len=30, progress=False)
    out[f"{name}/profile/similarity"] = torch.tensor(profile.similarity, dtype=torch.float64)
    p = plan(profile, num_sublayers=3, window=2)
    out[f"{name}/plan"] = _plan_dict(p)
    ids = torch.tensor([_tokens(19, vocab, 80)])
    out[f"{name}/forward/full"] = model(ids)
    out[f"{name}/forward/plan"] = model(ids, plan=p)
    prompts = [_tokens(13, vocab, 81), _tokens(20, vocab, 82)]
    out[f"{name}/generate/full"] = _generate_case(model, prompts, None, max_new_tokens=6)
    out[f"{name}/generate/plan"] = _generate_case(model, prompts, dataclasses.replace(p, beta=0.5), max_new_tokens=6)


@contextmanager
def one_thread():
    """torch on one CPU thread inside the block: the same reductions whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def compute() -> dict:
    out: dict = {}
    with one_thread():
        _llama_cases(out)
        for name in ("mistral", "qwen2"):
            _other_cases(out, name)
    return out
