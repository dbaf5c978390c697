"""Self-speculative decoding: a skip plan drafts, the full model verifies; greedy output is the
full model's own."""
import dataclasses

import pytest
import torch

import adaskip
from adaskip import SkipPlan, SpeculativeConfig
from helpers import tiny_llama

VOCAB = 101


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, context=160, layers=4, scale=0.3, seed=3)


def _prompts(n, seed, lengths=(5, 23)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(lengths[0], lengths[1], (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


DRAFTERS = {
    "attention-and-ffn": SkipPlan(4, {2: 0.9, 5: 1.1}),
    "half-the-sublayers": SkipPlan(4, {0: 1.0, 2: 0.9, 3: 1.0, 5: 1.1}),
    "nothing-skipped": SkipPlan(4, {}),
}


@pytest.mark.parametrize("drafter", list(DRAFTERS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tokens_are_the_full_models(model, drafter, k):
    """Many prompts, a batch of mixed lengths, every draft length: the same tokens as generate
    without a plan."""
    for seed in range(3):
        prompts = _prompts(5, seed)
        expected = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[])
        got = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[],
                               speculative=SpeculativeConfig(DRAFTERS[drafter], draft_tokens=k))
        assert got.tokens == expected.tokens
        s = got.speculative
        assert s["drafted"] > 0 and 0 <= s["accepted"] <= s["drafted"]
        assert 1 <= s["tokens_per_round"] <= k + 1
        kept = s["kept_counts"]
        assert len(kept) == k + 1 and sum(j * n for j, n in enumerate(kept)) == s["accepted"]
        assert sum(kept) * k == s["drafted"]
        if drafter == "nothing-skipped":  # the drafter is the full model: every draft is kept
            assert s["accepted"] == s["drafted"]


@pytest.mark.parametrize("k", [1, 4])
def test_rounds_as_graphs_run_them_are_exact_too(model, monkeypatch, k):
    """What a captured round computes (attention over the whole cache under masks built from the
    device positions), run eagerly on CPU: still the full model's tokens, EOS included."""
    from adaskip.runtime import speculative as spec_module

    real = spec_module._kv_lens
    monkeypatch.setattr(spec_module, "_kv_lens", lambda m, filled, r, k_, captured: real(m, filled, r, k_, True))
    prompts = _prompts(5, 4)
    plain = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[])
    eos = plain.tokens[2][7]
    for ids in ([], [eos]):
        expected = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=ids)
        got = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=ids,
                               speculative=SpeculativeConfig(DRAFTERS["attention-and-ffn"], draft_tokens=k))
        assert got.tokens == expected.tokens and got.finished == expected.finished


def test_eager_rounds_read_only_the_cache_the_sequences_filled(model, monkeypatch):
    """The bound on the slots an eager round reads follows the positions the device reached (read
    back without waiting; on CPU at once), not k + 1 per round: with most drafts rejected it stays
    close to the longest sequence."""
    from adaskip.runtime import speculative as spec_module

    seen = []
    real = spec_module._kv_lens
    monkeypatch.setattr(spec_module, "_kv_lens",
                        lambda m, filled, r, k_, captured: seen.append(real(m, filled, r, k_, captured)) or seen[-1])
    prompts = _prompts(3, 12)
    drafter = SkipPlan(4, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})  # most drafts rejected
    k = 4
    got = adaskip.generate(model, prompts, max_new_tokens=16, eos_token_ids=[],
                           speculative=SpeculativeConfig(drafter, draft_tokens=k))
    assert got.tokens == adaskip.generate(model, prompts, max_new_tokens=16, eos_token_ids=[]).tokens
    longest = max(len(p) for p in prompts)
    rounds = len(seen)
    assert seen[0] == [longest + j + 1 for j in range(k + 1)]
    # after the last round the longest sequence holds at most longest + 15 tokens
    assert max(seen[-1]) <= longest + 15 + k + 1 < longest + (rounds - 1) * (k + 1) + k + 1


def test_a_lossy_drafter_is_rejected_sometimes_and_still_exact(model):
    prompts = _prompts(4, 11)
    drafter = SkipPlan(4, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})  # most of the model skipped
    got = adaskip.generate(model, prompts, max_new_tokens=16, eos_token_ids=[],
                           speculative=SpeculativeConfig(drafter, draft_tokens=4))
    assert got.speculative["acceptance_rate"] < 1.0
    assert got.tokens == adaskip.generate(model, prompts, max_new_tokens=16, eos_token_ids=[]).tokens
    # Time per output token counts tokens, not rounds (a round adds up to draft_tokens + 1).
    assert got.decode_tokens == 15 and got.decode_steps == got.speculative["rounds"] <= 15
    assert got.time_per_output_token_s == got.decode_s / 15
    exact = adaskip.generate(model, prompts, max_new_tokens=16, eos_token_ids=[],
                             speculative=SpeculativeConfig(SkipPlan(4, {}), draft_tokens=4))
    assert exact.speculative["rounds"] == 3 and exact.decode_tokens == 15  # every draft kept: 5 a round
    assert exact.time_per_output_token_s == exact.decode_s / 15


def test_eos_stops_a_sequence_as_generate_does(model):
    prompts = _prompts(4, 5)
    plain = adaskip.generate(model, prompts, max_new_tokens=24, eos_token_ids=[])
    eos = plain.tokens[0][6]  # a token the first sequence emits: it must stop right there
    expected = adaskip.generate(model, prompts, max_new_tokens=24, eos_token_ids=[eos])
    got = adaskip.generate(model, prompts, max_new_tokens=24, eos_token_ids=[eos],
                           speculative=SpeculativeConfig(DRAFTERS["attention-and-ffn"], draft_tokens=5))
    assert got.tokens == expected.tokens and got.finished == expected.finished
    assert got.tokens[0][-1] == eos and len(got.tokens[0]) <= 7


def test_one_new_token_and_sequences_that_end_at_once(model):
    prompts = _prompts(3, 2)
    spec = SpeculativeConfig(DRAFTERS["attention-and-ffn"], draft_tokens=3)
    one = adaskip.generate(model, prompts, max_new_tokens=1, eos_token_ids=[], speculative=spec)
    assert one.tokens == adaskip.generate(model, prompts, max_new_tokens=1, eos_token_ids=[]).tokens
    assert one.speculative["rounds"] == 0 and one.decode_tokens == 0
    first = [t[0] for t in one.tokens]  # every sequence's first token is an end of sequence
    got = adaskip.generate(model, prompts, max_new_tokens=12, eos_token_ids=first, speculative=spec)
    assert got.tokens == [[t] for t in first] and all(got.finished) and got.speculative["rounds"] == 0


def test_rounds_after_the_end_change_nothing(model):
    """On a GPU the host learns that every sequence has ended a round or two late: rounds run
    after that must leave the tokens, positions and counters as they are."""
    from adaskip.runtime import speculative as spec_module
    from adaskip.runtime.decode import decode_states
    from adaskip.runtime.sampling import SamplingParams
    from adaskip.runtime.schedule import schedule_step

    prompts = _prompts(3, 9)
    cfg = SpeculativeConfig(DRAFTERS["attention-and-ffn"], draft_tokens=3)
    out = adaskip.generate(model, prompts, max_new_tokens=10, eos_token_ids=[], speculative=cfg)
    # The state of this call: batch 3, no EOS ids, 3 drafted tokens (kept by batch, EOS count, k).
    state = next(s for key, s in decode_states(model).items()
                 if key[5:] == ("speculative", 3) and key[1:3] == (3, 0))
    assert state.finished.all()
    before = [t.clone() for t in (state.out_tokens, state.emitted, state.pos, state.token, state.kept_counts,
                                  state.rounds)]
    draft = schedule_step(model, batch=3, tokens=1, plan=cfg.plan.phase("decode"))
    verify = schedule_step(model, batch=3, tokens=4)
    for _ in range(2):
        with torch.inference_mode():
            spec_module._round(model, state, 3, draft, verify, SamplingParams(), None, [model.cache_len] * 4)
    after = (state.out_tokens, state.emitted, state.pos, state.token, state.kept_counts, state.rounds)
    width = 10  # what the caller reads: the first `emitted` tokens of each row
    assert torch.equal(after[0][:, :width], before[0][:, :width])
    for b, a in zip(before[1:], after[1:]):
        assert torch.equal(a, b)
    assert [row[:n] for row, n in zip(after[0].tolist(), after[1].tolist())] == out.tokens


def test_online_drafting_gates_the_drafts_ffns_and_changes_no_token(model):
    """SpeculativeConfig(online=True): the drafter's online learning gates FFNs off per sequence
    from its own draft steps; the full model verifies, so the tokens stay the full model's."""
    prompts = _prompts(4, 17)
    expected = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[]).tokens
    every = SkipPlan(4, {2: 0.9}, beta=-1.0, window=3)  # beta -1: every candidate FFN gated off after 3 drafts
    static = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[],
                              speculative=SpeculativeConfig(every, draft_tokens=2))
    online = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[],
                              speculative=SpeculativeConfig(every, draft_tokens=2, online=True))
    assert static.tokens == online.tokens == expected
    assert static.online_skipped is None and online.online_skipped == [[1, 3, 5, 7]] * 4
    assert online.speculative["accepted"] != static.speculative["accepted"]  # the drafts did change
    never = dataclasses.replace(every, beta=1.0)  # no FFN reaches it: nothing gated, the static drafter's rounds
    same = adaskip.generate(model, prompts, max_new_tokens=20, eos_token_ids=[],
                            speculative=SpeculativeConfig(never, draft_tokens=2, online=True))
    assert same.tokens == expected and same.online_skipped == [[]] * 4
    assert same.speculative == static.speculative


@pytest.mark.parametrize("bad, match", [
    (dict(plan={2: 1.0}), "SkipPlan"), (dict(draft_tokens=0), "draft_tokens"), (dict(draft_tokens=2.5), "draft_tokens"),
    (dict(plan=SkipPlan(4, {1: 1.0, 3: 1.0}, ramp=True)), "ramp"),
    (dict(online=True), "online learning")])
def test_bad_configs_are_refused(bad, match):
    kw = {"plan": DRAFTERS["attention-and-ffn"], "draft_tokens": 2, **bad}
    with pytest.raises((TypeError, ValueError), match=match):
        SpeculativeConfig(**kw)


def test_refused_combinations(model):
    spec = SpeculativeConfig(DRAFTERS["attention-and-ffn"], draft_tokens=2)
    prompts = _prompts(2, 0)
    with pytest.raises(ValueError, match="not plan="):
        adaskip.generate(model, prompts, plan=DRAFTERS["attention-and-ffn"], speculative=spec)
    with pytest.raises(ValueError, match="step_timing"):
        adaskip.generate(model, prompts, step_timing=True, speculative=spec)
    with pytest.raises(ValueError, match="layers"):
        adaskip.generate(model, prompts, speculative=SpeculativeConfig(SkipPlan(6, {1: 1.0})))
    with pytest.raises(ValueError, match="context"):
        adaskip.generate(model, [[5] * 150], max_new_tokens=8, speculative=SpeculativeConfig(SkipPlan(4, {}), 4))


# -- sampling ------------------------------------------------------------------------------------


def _second_token_marginal(model, prompt, sampling, plan=None):
    """The exact distribution of the second sampled token: sum over the first token t of
    p(t | prompt) p(. | prompt, t), after temperature / top-k (one forward per t)."""
    from adaskip.runtime.sampling import probabilities

    with torch.no_grad():
        first = probabilities(model(torch.tensor([prompt]), plan=plan)[0, -1], sampling)
        both = torch.tensor([prompt + [t] for t in range(VOCAB)])
        second = probabilities(model(both, plan=plan)[:, -1], sampling)
    return first @ second


@pytest.mark.parametrize("sampling", [adaskip.SamplingParams(temperature=1.0, seed=7),
                                      adaskip.SamplingParams(temperature=0.7, top_k=20, seed=8)])
def test_sampled_tokens_are_distributed_as_the_full_models(model, sampling):
    """Rejection sampling: the second token of 6000 sampled continuations follows the full
    model's exact marginal (total variation within sampling noise), while a drafter that samples
    on its own is measurably off."""
    prompt = _prompts(1, 3)[0]
    drafter = SkipPlan(4, {0: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    n = 6000
    out = adaskip.generate(model, [prompt] * n, max_new_tokens=2, eos_token_ids=[], sampling=sampling,
                           speculative=SpeculativeConfig(drafter, draft_tokens=3))
    counts = torch.bincount(torch.tensor([t[1] for t in out.tokens]), minlength=VOCAB).double() / n
    exact = _second_token_marginal(model, prompt, sampling).double()
    drafted = _second_token_marginal(model, prompt, sampling, plan=drafter).double()
    tv = 0.5 * (counts - exact).abs().sum().item()
    off = 0.5 * (drafted - exact).abs().sum().item()
    # Sampling noise of the TV for n draws: about 0.5 * sum sqrt(2 p (1 - p) / (pi n)).
    noise = 0.5 * (2 * exact * (1 - exact) / (torch.pi * n)).sqrt().sum().item()
    assert tv < 2 * noise + 0.005, (tv, noise)
    assert off > 4 * noise, (off, noise)  # the test could tell a sampler that trusts the draft
    assert 0 < out.speculative["acceptance_rate"] < 1


# -- the eval task ------------------------------------------------------------------------------


def test_predicted_speedup_arithmetic():
    from adaskip.evaluation.speculative import predicted_speedup

    # 3 tokens a round from 4 drafts at 2x each (2 full steps) and a verify (1 step): 3 / 3 = 1.
    assert predicted_speedup(3.0, 4, 2.0) == pytest.approx(1.0)
    assert predicted_speedup(5.0, 4, 4.0) == pytest.approx(2.5)
    assert predicted_speedup(1.0, 2, 1.0) == pytest.approx(1 / 3)  # nothing accepted, no cheaper drafts


def test_evaluate_speculative_rows_match_direct_runs(model):
    from adaskip.evaluation.generation import GenerationPrompt
    from adaskip.evaluation.speculative import evaluate_speculative, speculative_table

    prompts = [GenerationPrompt(ids=p, length=len(p), document=0, start=0) for p in _prompts(3, 21)]
    plans = {"a": DRAFTERS["attention-and-ffn"], "same": DRAFTERS["nothing-skipped"], "full": None}
    out = evaluate_speculative(model, prompts, plans, draft_tokens=[1, 3], max_new_tokens=10, progress=False)
    assert [(r["name"], r["draft_tokens"]) for r in out["rows"]] == [("a", 1), ("a", 3), ("same", 1), ("same", 3)]
    for r in out["rows"]:
        assert r["identical"] == 1.0
        direct = [adaskip.generate(model, [p.ids], max_new_tokens=10, eos_token_ids=[],
                                   speculative=SpeculativeConfig(plans[r["name"]], r["draft_tokens"])).speculative
                  for p in prompts]
        assert r["accepted"] == sum(d["accepted"] for d in direct) and r["drafted"] == sum(d["drafted"] for d in direct)
        assert r["measured_decode_speedup"] > 0 and r["predicted_speedup"] > 0
    same = [r for r in out["rows"] if r["name"] == "same"]
    assert all(r["acceptance_rate"] == 1.0 and r["draft_decode_speedup"] == pytest.approx(1.0) for r in same)
    assert "| a | 3 |" in speculative_table(out) and not out["cuda_graph"]
    with pytest.raises(ValueError, match="draft lengths"):
        evaluate_speculative(model, prompts, plans, draft_tokens=[0], progress=False)
    with pytest.raises(ValueError, match="cuda_graph needs the model on a GPU"):
        evaluate_speculative(model, prompts, plans, progress=False, cuda_graph=True)


def test_evaluate_speculative_online_rows(model):
    """online=True: plans with online learning also draft with it; the row counts the FFNs the
    drafter gated off and charges the draft step less for them."""
    from adaskip.evaluation.generation import GenerationPrompt
    from adaskip.evaluation.speculative import evaluate_speculative

    prompts = [GenerationPrompt(ids=p, length=len(p), document=0, start=0) for p in _prompts(2, 22)]
    plans = {"o": SkipPlan(4, {2: 0.9}, beta=-1.0, window=3), "s": DRAFTERS["attention-and-ffn"]}
    out = evaluate_speculative(model, prompts, plans, draft_tokens=[2], max_new_tokens=12, progress=False, online=True)
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["o", "s", "o/online"]  # the static plan has no online learning: no online row
    assert rows["o/online"]["online"] and not rows["o"]["online"]
    assert rows["o/online"]["extra_ffns_gated"] == 4 and rows["o"]["extra_ffns_gated"] == 0
    assert rows["o/online"]["draft_decode_speedup"] > rows["o"]["draft_decode_speedup"]
    assert rows["o/online"]["identical"] == 1.0
    direct = [adaskip.generate(model, [p.ids], max_new_tokens=12, eos_token_ids=[],
                               speculative=SpeculativeConfig(plans["o"], 2, online=True)).speculative for p in prompts]
    assert rows["o/online"]["accepted"] == sum(d["accepted"] for d in direct)
    from adaskip.evaluation.speculative import speculative_table

    assert "| o/online | 2 | 4.0 |" in speculative_table(out) and "| o | 2 | – |" in speculative_table(out)


def test_run_eval_speculative_task(model):
    from adaskip.evaluation.harness import EvalSettings, run_eval
    from test_generation_eval import DOCS, WordTokenizer

    tok = WordTokenizer()
    settings = EvalSettings(strategies=["early-exit"], budgets=[2], tasks=["speculative"], generation_lengths=[60],
                            generation_prompts=2, generation_tokens=6, speculative_draft_tokens=[2])
    out = run_eval(model, tok, None, settings, documents=DOCS, progress=False)
    assert [r["name"] for r in out["speculative"]["rows"]] == ["early-exit@2"]
    assert out["speculative"]["rows"][0]["identical"] == 1.0 and "speculative" in out["timings_s"]
    with pytest.raises(ValueError, match="draft lengths"):
        EvalSettings(tasks=["speculative"], speculative_draft_tokens=[0])
    with pytest.raises(ValueError, match="exceed the model's context"):
        EvalSettings(tasks=["speculative"], generation_lengths=[150]).check_model(model.args)


# -- choosing the drafter -----------------------------------------------------------------------


def test_tokens_per_round_from_kept_counts():
    from adaskip.skipping.drafting import tokens_per_round

    counts = [2, 1, 3]  # measured at k = 2: 2 rounds kept nothing, 1 kept one draft, 3 kept both
    assert tokens_per_round(counts, 2) == pytest.approx(1 + 7 / 6)
    assert tokens_per_round(counts, 1) == pytest.approx(1 + 4 / 6)  # a round that kept 1 or 2 of 2 keeps 1 of 1
    with pytest.raises(ValueError, match="say nothing about 3"):
        tokens_per_round(counts, 3)


@pytest.fixture(scope="module")
def profile(model):
    return adaskip.calibrate(model, _prompts(4, 21, lengths=(30, 40)), num_requests=4, prompt_len=40,
                             progress=False)


def test_plan_drafter_picks_the_fastest_measured_drafter(model, profile):
    prompts = _prompts(3, 13)
    choice = adaskip.plan_drafter(model, profile, prompts, budgets=[2, 4], draft_tokens=[1, 3], max_new_tokens=12)
    rows = [r for r in choice.rows if "unavailable" not in r]
    assert [(r["budget"], r["draft_tokens"]) for r in rows] == [(2, 1), (2, 3), (4, 1), (4, 3)]
    best = max(rows, key=lambda r: r["predicted_speedup"])
    assert choice.predicted_speedup == best["predicted_speedup"] and choice.pays == (best["predicted_speedup"] > 1)
    assert choice.config.draft_tokens == best["draft_tokens"]
    expected = adaskip.plan(profile, num_sublayers=best["budget"], online=False)
    assert choice.config.plan.skip_scales == expected.skip_scales and not choice.config.plan.online
    # At the longest k the acceptance is what the speculative runs themselves count.
    for budget in (2, 4):
        drafter = adaskip.plan(profile, num_sublayers=budget, online=False)
        runs = [adaskip.generate(model, [p], max_new_tokens=12, eos_token_ids=[],
                                 speculative=SpeculativeConfig(drafter, draft_tokens=3)).speculative for p in prompts]
        row = next(r for r in rows if r["budget"] == budget and r["draft_tokens"] == 3)
        assert row["acceptance_rate"] == pytest.approx(sum(r["accepted"] for r in runs) / sum(r["drafted"] for r in runs))
        # more skipped sublayers: a cheaper draft step
    assert rows[2]["draft_speedup"] > rows[0]["draft_speedup"] > 1.0
    # The default budgets are shares of the sublayers, up to half of them.
    default = adaskip.plan_drafter(model, profile, prompts[:1], draft_tokens=[2], max_new_tokens=6)
    assert sorted({r["budget"] for r in default.rows}) == [1, 2, 3, 4]


def test_plan_drafter_refuses_what_it_cannot_measure(model, profile):
    prompts = _prompts(2, 14)
    for kw, match in ((dict(budgets=[0]), "budgets"), (dict(budgets=[8]), "budgets"), (dict(draft_tokens=[0]), "draft"),
                      (dict(max_new_tokens=1), "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            adaskip.plan_drafter(model, profile, prompts, **kw)
    with pytest.raises(ValueError, match="prompts"):
        adaskip.plan_drafter(model, profile, [])
    with pytest.raises(ValueError, match="flat list of token ids"):
        adaskip.plan_drafter(model, profile, [5, 6, 7])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        adaskip.plan_drafter(model, profile, [[5, 6, VOCAB]])
    with pytest.raises(ValueError, match="context"):
        adaskip.plan_drafter(model, profile, [[5] * 150], max_new_tokens=8)
    with pytest.raises(ValueError, match="no drafter could be measured"):  # this profile has no greedy search
        adaskip.plan_drafter(model, profile, prompts, strategy="greedy-loss", budgets=[2])
