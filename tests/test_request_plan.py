"""A request's plan is resolved once (adaskip.runtime.request_plan) and its steps run on one
decode driver (adaskip.runtime.driver): what is checked and built per request, not per step, and
that a new kind of step is data (tiny random model, CPU)."""
import pytest
import torch

import adaskip
from adaskip import SkipPlan, SpeculativeConfig
from adaskip.runtime import request_plan, schedule
from adaskip.runtime.driver import padded_ids
from adaskip.runtime.generation import ensure_caches, run_prefill
from adaskip.runtime.request_plan import PREFILL, Phase, PrefillChunk, resolve_generation

from behaviour_cases import tiny_model
from helpers import random_requests


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _count(monkeypatch, owner, name) -> list:
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_generate_checks_the_plan_once_and_makes_no_plan_per_token(model, monkeypatch):
    plan = SkipPlan(4, {2: 0.9, 5: 1.1}, beta=0.5, window=3)
    hidden_checks = _count(monkeypatch, SkipPlan, "check_hidden")
    new_plans = _count(monkeypatch, SkipPlan, "__post_init__")
    adaskip.generate(model, random_requests(2, 13), plan=plan, max_new_tokens=9, prefill_chunk=4, eos_token_ids=[])
    # Before: once in generate and again in every one of the 4 prefill chunks; a SkipPlan per phase
    # and per decode token.
    assert len(hidden_checks) == 1 and len(new_plans) == 0


@pytest.mark.parametrize("ramp", [False, True])
def test_each_distinct_step_is_scheduled_once(model, monkeypatch, ramp):
    plan = SkipPlan(4, {1: 1.0, 2: 0.9, 5: 1.1, 6: 1.0}, ramp=ramp)
    resolved = _count(monkeypatch, request_plan, "schedule_step")
    adaskip.generate(model, random_requests(2, 10), plan=plan, max_new_tokens=12, prefill_chunk=4, eos_token_ids=[])
    # Prefill: chunks of 4 and of 2 tokens; decode: one schedule per ramp stage (4 layers) or one.
    assert len(resolved) == 2 + (4 if ramp else 1)


def test_speculative_rounds_are_scheduled_once(model, monkeypatch):
    resolved = _count(monkeypatch, request_plan, "schedule_step")
    config = SpeculativeConfig(SkipPlan(4, {2: 0.9, 5: 1.1}), draft_tokens=3)
    out = adaskip.generate(model, random_requests(3, 9), max_new_tokens=10, eos_token_ids=[], speculative=config)
    assert out.speculative["rounds_launched"] > 1 and len(resolved) == 1 + 2  # prefill; draft and verify


def test_a_new_phase_is_a_record_not_a_branch(model):
    """The last prompt tokens running differently from the rest of the prompt: a Phase of its own
    on the request's last prefill chunk; run_prefill runs it as it runs any chunk."""
    plan = SkipPlan(4, {2: 0.9, 3: 1.0, 5: 1.1}, mode="prefill")  # every layer keeps its cache
    prompts = random_requests(2, 12, seed=4)
    request = resolve_generation(model, [12, 12], plan, max_new_tokens=2, prefill_chunk=8)
    tail = Phase("prefill-tail")  # the full model for the last 4 prompt tokens
    request.prefill = (request.prefill[0], PrefillChunk(8, 12, tail))
    ensure_caches(model, 2, request.needed, request.kv_layers)
    ids, lens = padded_ids(prompts, model.lm_head.weight.device)
    with torch.inference_mode():
        got = run_prefill(model, request, ids, lens)
        model.setup_caches(2, 14)
        model(ids[:, :8], 0, kv_len=8, plan=plan.phase("prefill"))
        expected = model(ids[:, 8:], 8, kv_len=12, logits_index=torch.tensor([3, 3]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert request.prefill[0].phase.name == PREFILL and request.prefill[0].phase.skips.skip_scales == plan.skip_scales


def test_the_context_is_checked_in_one_place(model, monkeypatch):
    checks = _count(monkeypatch, request_plan, "check_context_fit")
    with pytest.raises(ValueError, match="a prompt of 120 tokens plus 20 new tokens exceeds the model's context"):
        adaskip.generate(model, [[1] * 120], max_new_tokens=20)
    config = SpeculativeConfig(SkipPlan(4, {2: 0.9}), draft_tokens=4)
    with pytest.raises(ValueError, match="plus 8 new tokens and 5 positions of drafting exceeds the model's context"):
        adaskip.generate(model, [[1] * 120], max_new_tokens=8, speculative=config)
    assert len(checks) == 2


def test_an_ffn_path_is_chosen_in_one_place(model, monkeypatch):
    """FeedForward.forward (a call outside a step, e.g. timing it) takes the schedule's path."""
    chosen = _count(monkeypatch, schedule, "ungated_ffn_action")
    import adaskip.runtime.model as model_module
    monkeypatch.setattr(model_module, "ungated_ffn_action", schedule.ungated_ffn_action)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, model.args.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), mlp.dense(x), rtol=0, atol=0)
    assert len(chosen) == 1


def test_generate_and_speculative_rounds_stop_alike_once_every_sequence_ended(model):
    """The driver posts the end flag after each step: on CPU (the flag lands at once) the loop
    stops right after the step in which the last sequence ended, for tokens and rounds alike."""
    prompts = random_requests(2, 11, seed=9)
    full = adaskip.generate(model, prompts, max_new_tokens=12, eos_token_ids=[])
    eos = [full.tokens[0][2], full.tokens[1][3]]
    ends = [min(i for i, t in enumerate(row) if t in eos) for row in full.tokens]
    out = adaskip.generate(model, prompts, max_new_tokens=12, eos_token_ids=eos)
    assert out.finished == [True, True] and out.decode_steps == max(ends)
    config = SpeculativeConfig(SkipPlan(4, {2: 0.9}), draft_tokens=2)
    spec = adaskip.generate(model, prompts, max_new_tokens=12, eos_token_ids=eos, speculative=config)
    assert spec.tokens == out.tokens and spec.speculative["rounds_launched"] == spec.decode_steps
