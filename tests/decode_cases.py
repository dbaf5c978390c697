"""Decoding behaviour that the request-plan / decode-driver refactor must not change, beyond
what tests/behaviour_cases.py records: speculative rounds (greedy, sampled, online drafters,
EOS), generate's step options, and adaskip.hf's generate with online learning (tiny random
models, CPU, fixed seeds).

`compute()` returns {name: value}; tests/fixtures/decode.pt holds what it returned before the
refactor and test_behaviour.py checks today's code against it. Regenerate only when a behaviour
change is intended and explained:

    ADASKIP_REGENERATE_BEHAVIOUR=1 .venv/bin/python -m pytest -q tests/test_behaviour.py
"""
from __future__ import annotations

import dataclasses

import torch

from adaskip import SamplingParams, SkipPlan, SpeculativeConfig
from adaskip.runtime.generation import generate
from adaskip.runtime.stand_in import StandIn

from behaviour_cases import CONFIGS, _tokens, one_thread, tiny_model


def _result(out) -> dict:
    return {"tokens": out.tokens, "finished": out.finished, "steps": out.decode_steps,
            "decode_tokens": out.decode_tokens, "online_skipped": out.online_skipped,
            # repr: exact, and a NaN rate (no rounds) compares equal to itself
            "speculative": {k: repr(v) if isinstance(v, float) else v for k, v in (out.speculative or {}).items()}}


def _drafters() -> dict:
    g = torch.Generator().manual_seed(5)
    linear = StandIn("linear", down=0.1 * torch.randn(3, 64, generator=g), up=0.1 * torch.randn(64, 3, generator=g))
    return {"attention-ffn": SkipPlan(4, {2: 0.9, 5: 1.1}),
            "stand-in": SkipPlan(4, {0: 1.0, 3: 1.0, 5: 1.05}, stand_ins={3: linear}),
            "online": SkipPlan(4, {2: 0.9}, beta=0.0, window=3)}


def _speculative_cases(out: dict) -> None:
    model = tiny_model("llama")
    vocab = model.args.vocab_size
    prompts = [_tokens(11, vocab, 90), _tokens(4, vocab, 91), _tokens(16, vocab, 92)]
    drafters = _drafters()
    for name, drafter in drafters.items():
        for k in (1, 3):
            config = SpeculativeConfig(drafter, draft_tokens=k, online=drafter.online)
            r = generate(model, prompts, max_new_tokens=12, eos_token_ids=[], speculative=config)
            out[f"speculative/{name}/k{k}"] = _result(r)
    config = SpeculativeConfig(drafters["attention-ffn"], draft_tokens=2)
    sampled = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=11)
    out["speculative/sampled"] = _result(generate(model, prompts, max_new_tokens=10, eos_token_ids=[],
                                                  speculative=config, sampling=sampled))
    online = SpeculativeConfig(drafters["online"], draft_tokens=2, online=True)
    out["speculative/sampled-online"] = _result(generate(model, prompts, max_new_tokens=10, eos_token_ids=[],
                                                         speculative=online, sampling=sampled))
    full = generate(model, prompts, max_new_tokens=12, eos_token_ids=[])
    eos = [full.tokens[0][4], full.tokens[2][7]]
    out["speculative/eos"] = _result(generate(model, prompts, max_new_tokens=12, eos_token_ids=eos,
                                              speculative=SpeculativeConfig(drafters["stand-in"], draft_tokens=3)))
    out["speculative/chunked"] = _result(generate(model, prompts, max_new_tokens=7, eos_token_ids=[],
                                                  prefill_chunk=5, speculative=config))
    out["speculative/one-token"] = _result(generate(model, prompts, max_new_tokens=1, eos_token_ids=[],
                                                    speculative=config))


def _generate_cases(out: dict) -> None:
    model = tiny_model("llama")
    vocab = model.args.vocab_size
    prompts = [_tokens(9, vocab, 93), _tokens(14, vocab, 94)]
    online = SkipPlan(4, {2: 0.9, 5: 1.1}, beta=0.2, window=4)
    plain = generate(model, prompts, plan=online, max_new_tokens=10, eos_token_ids=[])
    out["generate/eos-online"] = _result(generate(model, prompts, plan=online, max_new_tokens=10,
                                                  eos_token_ids=[plain.tokens[1][5]]))
    out["generate/one-token"] = _result(generate(model, prompts, plan=online, max_new_tokens=1, eos_token_ids=[]))
    ramp = SkipPlan(4, {1: 1.0, 2: 0.9, 5: 1.1, 6: 1.0}, ramp=True)
    out["generate/ramp-long"] = _result(generate(model, prompts, plan=ramp, max_new_tokens=15, eos_token_ids=[]))
    timed = generate(model, prompts, plan=online, max_new_tokens=6, eos_token_ids=[], step_timing=True)
    out["generate/step-timing"] = {**_result(timed), "timed_steps": len(timed.step_times_s)}
    window_past_end = dataclasses.replace(online, window=30)
    out["generate/window-past-end"] = _result(generate(model, prompts, plan=window_past_end, max_new_tokens=8,
                                                       eos_token_ids=[]))


def _hf_pair():
    import transformers

    ours = tiny_model("llama")
    config = transformers.LlamaConfig(**{k: v for k, v in CONFIGS["llama"].items() if k != "architectures"},
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, strict=False)
    return hf, ours


def _hf_cases(out: dict) -> None:
    import adaskip.hf

    hf, _ = _hf_pair()
    vocab = CONFIGS["llama"]["vocab_size"]
    ids = torch.tensor([_tokens(12, vocab, 96), _tokens(12, vocab, 97)])
    mask = torch.ones_like(ids)
    linear = _drafters()["stand-in"].stand_ins[3]
    for mode in ("prefill", "decode", "e2e"):
        for beta in (None, 0.0, 0.6):
            plan = SkipPlan(4, {0: 0.9, 3: 1.0, 7: 1.1}, mode=mode, beta=beta, window=3, stand_ins={3: linear})
            with adaskip.hf.apply(hf, plan) as applied:
                tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
                out[f"hf/generate/{mode}/{beta}"] = {"tokens": tokens[:, ids.shape[1]:].tolist(),
                                                     "online_skipped": applied.online_skipped(),
                                                     "decode_steps": applied.decode_steps}
    plan = SkipPlan(4, {0: 0.9, 3: 1.0, 7: 1.1}, beta=0.0, window=2)
    with adaskip.hf.apply(hf, plan) as applied:
        torch.manual_seed(3)
        tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5,
                             eos_token_id=None, pad_token_id=0)
        out["hf/generate/sampled"] = {"tokens": tokens[:, ids.shape[1]:].tolist(),
                                      "online_skipped": applied.online_skipped()}
        # Two requests in a row under one apply: the second starts its online learning afresh.
        again = hf.generate(ids[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        out["hf/generate/second-request"] = {"tokens": again[:, ids.shape[1]:].tolist(),
                                             "online_skipped": applied.online_skipped(),
                                             "decode_steps": applied.decode_steps}


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@torch.inference_mode()
def _runtime_cases(out: dict) -> None:
    _speculative_cases(out)
    _generate_cases(out)


def compute() -> dict:
    out: dict = {}
    with one_thread():
        _runtime_cases(out)
        if has_transformers():
            with torch.no_grad():
                _hf_cases(out)
    return out
