"""Streaming KV-head groups (adaskip.runtime.streaming): a group's query heads see only the sink and
a recent window, in prefill and decode; every other group, and every model without them, is as
before."""
import json
import math

import pytest
import torch

from adaskip.runtime.generation import generate
from adaskip.runtime.rope import apply_rotary
from adaskip.runtime.skip_plan import SkipPlan
from adaskip.runtime.streaming import StreamingGroups, band_mask
from helpers import random_requests, tiny_llama

VOCAB = 101


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, context=160, layers=2).eval()


def _forward(model, ids, plan=None):
    with torch.inference_mode():
        return model(torch.tensor([ids]), plan=plan)[0]


def test_window_covering_the_prompt_is_the_full_model(model):
    ids = random_requests(1, length=48, seed=1)[0]
    full = _forward(model, ids)
    wide = _forward(model, ids, SkipPlan(2, {}, streaming={0: [0, 1], 1: [1]}, streaming_window=48))
    torch.testing.assert_close(full, wide, atol=2e-6, rtol=2e-6)  # the same keys, attended block-wise
    narrow = _forward(model, ids, SkipPlan(2, {}, streaming={0: [0, 1], 1: [1]}, streaming_window=8))
    assert not torch.allclose(full, narrow, atol=1e-4)  # the window is seen


def _reference_attention(attn, x, cos, sin, allowed_per_head):
    """Explicit masked softmax attention in float64: allowed_per_head [H, T, T] booleans."""
    b, t, _ = x.shape
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = apply_rotary(attn.q_proj(x).view(b, t, h, d).transpose(1, 2), cos, sin).double()
    k = apply_rotary(attn.k_proj(x).view(b, t, kvh, d).transpose(1, 2), cos, sin).double()
    v = attn.v_proj(x).view(b, t, kvh, d).transpose(1, 2).double()
    k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~allowed_per_head[None], float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, -1).float())


@pytest.mark.parametrize("groups,sink,window", [((0,), 2, 5), ((1,), 0, 3), ((0, 1), 4, 7), ((1,), 3, 1)])
def test_small_window_matches_explicit_masked_softmax(model, groups, sink, window):
    attn = model.model.layers[1].self_attn
    t = 30
    x = torch.randn(1, t, model.args.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(t)[None]
    cos, sin = model.rotary(pos, t, x.dtype)
    rep = attn.num_heads // attn.num_kv_heads
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    band = band_mask(pos, t, sink, window)[0]
    allowed = torch.stack([band if hq // rep in groups else causal for hq in range(attn.num_heads)])
    want = _reference_attention(attn, x, cos, sin, allowed)
    with torch.no_grad():
        got = attn(x, cos, sin, "causal", streaming=StreamingGroups(tuple(groups), sink, window), q_start=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_band_mask():
    m = band_mask(torch.tensor([[0, 5, 9]]), 10, sink=2, window=3)[0]
    assert m[0].tolist() == [True] + [False] * 9
    assert [j for j in range(10) if m[1, j]] == [0, 1, 3, 4, 5]
    assert [j for j in range(10) if m[2, j]] == [0, 1, 7, 8, 9]


def test_decode_sees_the_same_band_as_a_cacheless_forward(model):
    """Generated tokens (prefill with the cache, then decode steps, batch of two prompts of
    different lengths) are the greedy choices of cache-less forwards under the same groups."""
    prompts = [random_requests(1, length=37, seed=5)[0], random_requests(1, length=30, seed=6)[0]]
    layers = {0: [1], 1: [0]}
    plan = SkipPlan(2, {}, streaming=layers, streaming_sink=3, streaming_window=6)
    out = generate(model, prompts, max_new_tokens=6, eos_token_ids=[], plan=plan)
    for prompt, new in zip(prompts, out.tokens):
        logits = _forward(model, prompt + new[:-1], plan)
        assert logits[len(prompt) - 1:].argmax(-1).tolist() == new
    with torch.inference_mode():
        plain = generate(model, prompts, max_new_tokens=6, eos_token_ids=[])
    assert plain.tokens != out.tokens  # the band changed something


def test_bad_groups(model):
    with pytest.raises(ValueError, match="out of range for a model with 2 KV heads"):
        _forward(model, [1, 2, 3], SkipPlan(2, {}, streaming={0: [2]}))
    with pytest.raises(ValueError, match="window >= 1"):
        StreamingGroups((0,), 4, 0)
    with pytest.raises(ValueError, match="distinct sorted"):
        StreamingGroups((1, 0), 4, 8)


def test_streaming_costs():
    from adaskip.benchmarks.models import model_args
    from adaskip.skipping.costs import _band_pairs, streaming_plan_costs, sublayer_costs

    args = model_args("smollm2")
    for n, s, w in ((50, 4, 8), (7, 2, 3), (300, 0, 256), (10, 4, 256)):
        brute = sum(sum(1 for j in range(i + 1) if j < s or i - j < w) for i in range(n))
        assert _band_pairs(n, s, w) == brute
    n = 4096
    base = sublayer_costs(args, n, "prefill")
    none = streaming_plan_costs(args, n, "prefill", [], {})
    assert none["plan_s"] == pytest.approx(base.total) and none["speedup"] == pytest.approx(1.0)
    skip = streaming_plan_costs(args, n, "prefill", [4, 5], {})
    assert skip["speedup"] == pytest.approx(base.speedup([4, 5]))
    one = streaming_plan_costs(args, n, "prefill", [], {3: 1}, sink=4, window=256)
    three = streaming_plan_costs(args, n, "prefill", [], {3: 3}, sink=4, window=256)
    assert 0 < one["saving_s"] < three["saving_s"] < base.per_sublayer[6]
    # a band as long as the prompt saves nothing; a group in a skipped layer adds nothing
    assert streaming_plan_costs(args, n, "prefill", [], {3: 3}, sink=4, window=n)["saving_s"] == pytest.approx(0)
    assert streaming_plan_costs(args, n, "prefill", [6], {3: 3})["plan_s"] == pytest.approx(
        streaming_plan_costs(args, n, "prefill", [6], {})["plan_s"])
    assert one["kv_entries_full"] - one["kv_entries_plan"] == n - 260
    dec = streaming_plan_costs(args, n, "decode", [], {3: 3})
    assert dec["speedup"] > 1


def test_group_scores_are_the_layer_output_change(model):
    """At layer 0 (whose input streaming elsewhere cannot change) the score of a group is the
    relative change of the attention's output when that group alone streams."""
    from adaskip.skipping.head_groups import score_groups
    from adaskip.skipping.probes import Probe

    ids = random_requests(1, length=90, seed=8)[0]
    probe = Probe("passkey", ids, 84, "1", 0.5)
    sink, window = 2, 10
    scores = score_groups(model, [probe], [], sink=sink, window=window, progress=False)
    captured = {}

    def tap(s, x, h, out):
        if s == 0:
            captured.setdefault("h", h.clone())
            captured.setdefault("out", []).append(out.clone())

    positions = probe.answer_positions
    with torch.inference_mode():
        model(torch.tensor([ids]), taps=tap)
        for g in range(model.args.num_kv_heads):
            model(torch.tensor([ids]), taps=tap,
                  plan=SkipPlan(2, {}, streaming={0: [g]}, streaming_sink=sink, streaming_window=window))
    full, h = captured["out"][0], captured["h"]
    for g in range(model.args.num_kv_heads):
        diff = (captured["out"][g + 1] - full)[0, positions].norm(dim=-1) / h[0, positions].norm(dim=-1)
        assert scores.retrieval_change[0, g].item() == pytest.approx(diff.mean().item(), rel=1e-4)
    ranking = scores.ranking()
    assert len(ranking) == model.args.num_layers * model.args.num_kv_heads



# --- streaming groups in a plan: the band read block-wise (prefill) or gathered (decode) ----------


def _reference_band(q, k, v, q_pos, groups, sink, window, mask=None):
    """float64 masked softmax: the query heads of `groups` see sink + window (and causality), the
    others causality; `mask` [B, 1, T, L] (padding) applies to every head."""
    b, h, t, d = q.shape
    kv, length = k.shape[1], k.shape[2]
    rep = h // kv
    keys = torch.arange(length)
    dist = q_pos[..., None] - keys  # [B, T, L]
    causal = dist >= 0
    band = causal & ((keys < sink) | (dist < window))
    out = torch.empty(b, h, t, d, dtype=torch.float64)
    for hq in range(h):
        allowed = band if hq // rep in groups else causal
        if mask is not None:
            allowed = allowed & mask[:, 0]
        scores = q[:, hq].double() @ k[:, hq // rep].double().transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, hq] = torch.softmax(scores, -1) @ v[:, hq // rep].double()
    return out


@pytest.mark.parametrize("t,length,start,sink,window,groups", [
    (300, 300, 0, 4, 40, (0,)),  # three blocks, a band far shorter than the prompt
    (70, 170, 100, 0, 1, (1,)),  # a chunk of prefill after 100 cached tokens; only the own key
    (129, 129, 0, 200, 5, (0, 2)),  # a sink longer than the prompt: the band is causality
    (257, 300, 43, 3, 128, (2,)),  # block edges not on the window
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_blocks_match_the_masked_reference(t, length, start, sink, window, groups, dtype):
    from adaskip.runtime.streaming import streaming_attention

    g = torch.Generator().manual_seed(t + length)
    q = torch.randn(2, 6, t, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 3, length, 16, generator=g).to(dtype) for _ in range(2))
    q_pos = (start + torch.arange(t)).expand(2, t)
    spec = StreamingGroups(groups, sink, window)
    mask = "causal" if start == 0 and length == t else (torch.arange(length) <= q_pos[..., None])[:, None]
    want = _reference_band(q, k, v, q_pos, groups, sink, window)
    got = streaming_attention(q, k, v, mask, q_pos, spec, q_start=start)
    masked = streaming_attention(q, k, v, mask, q_pos, spec)  # q_start unknown: the whole cache, masked
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(masked.double(), want, **tol)


@pytest.mark.parametrize("sink,window", [(4, 8), (0, 1), (6, 3), (50, 50)])
def test_band_gather_matches_the_masked_reference(sink, window):
    """A decode query per sequence, each at its own position, with padding slots masked off:
    the gathered sink + window keys give the masked full-cache answer."""
    from adaskip.runtime.streaming import streaming_attention

    g = torch.Generator().manual_seed(sink * 100 + window)
    length = 40
    q = torch.randn(3, 4, 1, 8, generator=g)
    k, v = (torch.randn(3, 2, length, 8, generator=g) for _ in range(2))
    pos = torch.tensor([0, 17, 39])
    slots = torch.arange(length)
    mask = (slots <= pos[:, None]) & ~((slots == 2) & (pos[:, None] > 2))  # slot 2 padding where it is past
    mask = mask[:, None, None]
    want = _reference_band(q, k, v, pos[:, None], (1,), sink, window, mask)
    got = streaming_attention(q, k, v, mask, pos[:, None], StreamingGroups((1,), sink, window))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    last = torch.full((3, 1), length - 1)  # no mask: every query is the last key (the runtime's None)
    got = streaming_attention(q, k, v, None, last, StreamingGroups((1,), sink, window))
    torch.testing.assert_close(got.double(), _reference_band(q, k, v, last, (1,), sink, window),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def long_model():
    return tiny_llama(VOCAB, context=400, layers=3).eval()


def test_a_plan_streams_its_groups_in_prefill_chunks_and_decode(long_model):
    """generate with a plan that streams groups (prefill in chunks of 64, then decode) makes the
    greedy choices of cache-less forwards under the same plan."""

    plan = SkipPlan(3, {5: 1.0}, streaming={0: [1], 1: [0, 1]}, streaming_sink=3, streaming_window=24)
    prompts = [random_requests(1, length=150, seed=9)[0], random_requests(1, length=131, seed=10)[0]]
    out = generate(long_model, prompts, max_new_tokens=5, eos_token_ids=[], plan=plan, prefill_chunk=64)
    with torch.inference_mode():
        for prompt, new in zip(prompts, out.tokens):
            logits = long_model(torch.tensor([prompt + new[:-1]]), plan=plan)[0]
            assert logits[len(prompt) - 1:].argmax(-1).tolist() == new
        plain = generate(long_model, prompts, max_new_tokens=5, eos_token_ids=[], plan=SkipPlan(3, {5: 1.0}))
    assert plain.tokens != out.tokens  # the band is seen


def test_schedule_carries_the_groups(long_model):
    from adaskip.runtime.schedule import schedule_step

    plan = SkipPlan(3, {4: 0.9}, streaming={1: [1, 0]}, streaming_sink=2, streaming_window=16)
    assert plan.streaming == {1: (0, 1)}
    steps = schedule_step(long_model, batch=1, tokens=7, plan=plan.skips_in("prefill")).sublayers
    assert steps[2].streaming == StreamingGroups((0, 1), 2, 16)
    assert all(step.streaming is None for s, step in enumerate(steps) if s != 2)
    assert steps[4].action == "skip"
    decode = schedule_step(long_model, batch=1, tokens=1, plan=plan.skips_in("decode")).sublayers
    assert decode[2].streaming == StreamingGroups((0, 1), 2, 16)
    assert plan.to_dict()["streaming"] == {"1": [0, 1]}
    assert not {"streaming", "streaming_sink", "streaming_window"} & set(SkipPlan(3, {4: 0.9}).to_dict())
    assert "streaming KV-head groups (sink 2, window 16): 2 in layers 1: [0, 1]" in plan.describe()


@pytest.mark.parametrize("kwargs,match", [
    (dict(streaming={0: [0]}, skip={0: 1.0}), "skip their attention"),
    (dict(streaming={3: [0]}), "layers must be integers in"),
    (dict(streaming={"1": [0]}), "layers must be integers in"),
    (dict(streaming={1: []}), "KV-head indices >= 0"),
    (dict(streaming={1: [0, 0]}), "twice"),
    (dict(streaming={1: [-1]}), "KV-head indices >= 0"),
    (dict(streaming={1: 0}), "must be a list"),
    (dict(streaming=[1]), "must be a dict"),
    (dict(streaming={1: [0]}, streaming_window=0), "streaming_window >= 1"),
    (dict(streaming={1: [0]}, streaming_sink=1.5), "streaming_sink must be an integer"),
])
def test_bad_streaming_plans(kwargs, match):

    skip = kwargs.pop("skip", {})
    with pytest.raises(ValueError, match=match):
        SkipPlan(3, skip, **kwargs)


def test_streaming_groups_beyond_the_model_are_refused(long_model, tmp_path):
    from adaskip.exporting import export

    with pytest.raises(ValueError, match="out of range for a model with 2 KV heads"):
        generate(long_model, [[1, 2, 3]], max_new_tokens=2, plan=SkipPlan(3, {}, streaming={1: [2]}))
    with pytest.raises(ValueError, match="no serving format"):
        export(long_model, SkipPlan(3, {}, streaming={1: [0]}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the ranking in the profile and plan(..., streaming_groups=n) --------------------------------


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """A tiny model with room for probes, and a profile whose calibration ranked its KV-head groups."""
    from adaskip.skipping.calibration import calibrate
    from adaskip.skipping.probes import MIN_PROBE_LEN
    from behaviour_cases import tiny_model
    from test_retrieval import _texts
    from test_retrieval_plans import _SmallVocab

    model = tiny_model("llama", max_position_embeddings=2 * MIN_PROBE_LEN)
    text = " ".join(_texts(800, seed=2))
    profile = calibrate(model, [text], tokenizer=_SmallVocab(), num_requests=2, prompt_len=MIN_PROBE_LEN,
                        progress=False, search="loss", search_max_sublayers=4, search_candidates=2,
                        streaming_probes=2, streaming_window=16)
    return model, profile


def test_calibration_ranks_every_group_and_the_profile_keeps_it(ranked, tmp_path):
    from adaskip.skipping.head_groups import GroupScores
    from adaskip.skipping.profile import ImportanceProfile

    model, profile = ranked
    g = profile.group_scores
    args = model.args
    assert (g["sink"], g["window"], g["probes"], g["texts"]) == (4, 16, 2, 2)
    assert g["forward_passes"] == 4 and g["probe_seed"] == "kv-head-groups"
    scores = profile.group_scores_of()
    assert scores.retrieval_change.shape == (args.num_layers, args.num_kv_heads)
    assert (scores.retrieval_change > 0).all() and (scores.text_change > 0).all()
    profile.save(tmp_path / "p.json")
    again = ImportanceProfile.load(tmp_path / "p.json").group_scores_of()
    torch.testing.assert_close(again.score(), scores.score())
    bad = dict(g, text_change=[[1.0]])
    with pytest.raises(ValueError, match="not one"):
        GroupScores.from_dict(bad, args.num_layers)
    with pytest.raises(ValueError, match="finite values >= 0"):
        GroupScores.from_dict(dict(g, text_mass=[[-1.0] * args.num_kv_heads] * args.num_layers))
    with pytest.raises(ValueError, match="lack"):
        GroupScores.from_dict({"sink": 4})


def test_plan_adds_the_cheapest_groups_outside_skipped_attention(ranked):
    import adaskip
    from adaskip.skipping.head_groups import choose

    model, profile = ranked
    scores = profile.group_scores_of()
    alone = adaskip.plan(profile, strategy="full", streaming_groups=3)
    assert alone.streaming == {i: tuple(g) for i, g in choose(scores.ranking(), 3).items()}
    assert (alone.streaming_sink, alone.streaming_window) == (4, 16) and alone.predicted_speedup is None
    assert "3 streaming KV-head groups" in alone.explanation
    searched = adaskip.plan(profile, strategy="greedy-loss", num_sublayers=4, streaming_groups=3,
                            context_len=512, model_args=model.args)
    skipped = searched.skipped_attention_layers
    assert sum(len(g) for g in searched.streaming.values()) == 3 and not set(searched.streaming) & skipped
    assert searched.streaming == {i: tuple(g) for i, g in
                                  choose(scores.ranking(exclude_layers=sorted(skipped)), 3).items()}
    plain = adaskip.plan(profile, strategy="greedy-loss", num_sublayers=4, context_len=512, model_args=model.args,
                         planner="cost")
    assert searched.predicted_speedup > 1.0 and searched.skip_scales == plain.skip_scales
    out = generate(model, [[5, 6, 7] * 30], max_new_tokens=3, eos_token_ids=[], plan=searched)
    assert len(out.tokens[0]) == 3
    total = model.args.num_layers * model.args.num_kv_heads
    with pytest.raises(ValueError, match=f"only {total} ranked"):
        adaskip.plan(profile, strategy="full", streaming_groups=total + 1)
    with pytest.raises(ValueError, match="ranks no KV-head groups"):
        adaskip.plan(dataclasses_replace(profile, group_scores={}), strategy="full", streaming_groups=1)
    with pytest.raises(ValueError, match="streaming_groups must be an integer >= 0"):
        adaskip.plan(profile, strategy="full", streaming_groups=-1)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_cli_streaming_groups_need_a_ranked_profile(ranked, tmp_path):
    from adaskip.cli import main

    def error(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        return str(e.value)

    assert "give --profile" in error(["run", "--prompt", "x", "--streaming-groups", "2"])
    assert "--streaming-groups must be >= 0" in error(["run", "--prompt", "x", "--streaming-groups", "-1"])
    model, profile = ranked
    path = tmp_path / "p.json"
    dataclasses_replace(profile, group_scores={}).save(path)
    assert "ranks no KV-head groups" in error(["run", "--prompt", "x", "--profile", str(path), "--strategy", "full",
                                               "--streaming-groups", "2"])
    assert "need at least 256" in error(["calibrate", "--data", "essays", "--out", str(tmp_path / "q.json"),
                                         "--prompt-len", "128", "--streaming-probes", "2"])


# --- validated group counts, chosen by a tolerance ---------------------------------------------------


def test_validation_measures_group_plans_as_the_forwards_do(ranked, tmp_path):
    """Each budget + groups row holds what compare_requests measures of that very plan, and the
    profile keeps the rows (and refuses malformed ones) across a save."""
    import adaskip
    from adaskip.skipping.calibration import validate
    from adaskip.skipping.measurement import compare_requests
    from adaskip.skipping.profile import ImportanceProfile
    from adaskip.skipping.strategies import streaming_layers

    model, profile = ranked
    requests = random_requests(2, length=300, seed=4)
    v = validate(model, profile, requests, strategies=["greedy-loss"], budgets=[2], streaming=[3, 1])["greedy-loss"]
    rows = v["streaming"]
    assert [(r["budget"], r["groups"]) for r in rows] == [(0, 1), (0, 3), (2, 1), (2, 3)]
    plans = [adaskip.plan(profile, strategy="greedy-loss", num_sublayers=r["budget"], streaming_groups=r["groups"])
             for r in rows]
    tokens, sums = compare_requests(model, requests, list(enumerate(plans)))
    for i, (r, p) in enumerate(zip(rows, plans)):
        assert r["layers"] == streaming_layers(p) and sum(len(g) for _, g in r["layers"]) == r["groups"]
        assert r["kl"] == pytest.approx(sums[i]["kl"] / tokens, rel=1e-6) and r["kl"] > 0
        assert r["top1_agreement"] == pytest.approx(sums[i]["agree"] / tokens)
        assert "retrieval_hits" not in r  # no probes given
    assert rows[1]["kl"] != rows[0]["kl"]  # more groups, another plan
    path = tmp_path / "p.json"
    profile.save(path)
    assert ImportanceProfile.load(path).validation["greedy-loss"]["streaming"] == rows
    for bad, match in (({"groups": 0}, "groups"), ({"layers": [[1, [0, 1]]]}, "groups expected"),
                       ({"kl": float("nan")}, "finite"), ({"top1_agreement": 2.0}, "top1_agreement")):
        data = json.loads(path.read_text())
        data["validation"]["greedy-loss"]["streaming"][0].update(bad)
        bad_path = tmp_path / "bad.json"
        bad_path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            ImportanceProfile.load(bad_path)
    with pytest.raises(ValueError, match="distinct"):
        validate(model, profile, requests, strategies=["greedy-loss"], budgets=[2], streaming=[1, 1])
    with pytest.raises(ValueError, match="integers >= 1"):
        validate(model, profile, requests, strategies=["greedy-loss"], budgets=[2], streaming=[0])
    with pytest.raises(ValueError, match="group ranking"):
        validate(model, dataclasses_replace(profile, group_scores={}), requests, strategies=["greedy-loss"],
                 budgets=[2], streaming=[1])


def _with_group_rows(profile, strategy, hits, rows):
    """`profile` with a hand-written validation of `strategy`: budgets 2 and 4 found `hits` probes
    of 8 (full model 8), and `rows` (budget, groups, hits) of streaming plans, as validate stores them."""
    import adaskip
    from adaskip.skipping.strategies import streaming_layers

    entry = {"budgets": [2, 4], "kl": [0.1, 0.2], "top1_agreement": [0.9, 0.8], "perplexity": [1.0, 1.0],
             "sublayers": [sorted(adaskip.plan(profile, strategy=strategy, num_sublayers=k).skip_scales)
                           for k in (2, 4)],
             "stand_in": "scalar", "requests": 1, "tokens": 10, "retrieval_hits": hits, "retrieval_full_hits": 8,
             "retrieval_probes": 8, "retrieval_length": 300, "streaming": []}
    for k, g, h in rows:
        p = adaskip.plan(profile, strategy=strategy, num_sublayers=k, streaming_groups=g)
        entry["streaming"].append({"budget": k, "groups": g, "layers": streaming_layers(p), "kl": 0.05,
                                   "top1_agreement": 0.95, "perplexity": 1.0, "retrieval_hits": h})
    return dataclasses_replace(profile, validation={strategy: entry})


def test_a_tolerance_chooses_among_sublayer_and_group_plans(ranked):
    import adaskip
    from adaskip.skipping.costs import streaming_plan_costs, sublayer_costs
    from adaskip.skipping.strategies import streaming_layers

    model, profile = ranked
    total = model.args.num_layers * model.args.num_kv_heads
    v = _with_group_rows(profile, "greedy-loss", [8, 2], [(0, total // 2, 8), (2, total // 2, 5), (4, total // 2, 8)])
    at = dict(context_len=4096, model_args=model.args)
    costs = sublayer_costs(model.args, 4096, "prefill")

    def speed(p):
        layers = {i: len(g) for i, g in p.streaming.items()}
        return streaming_plan_costs(model.args, 4096, "prefill", sorted(p.skip_scales), layers, sink=4,
                                    window=16)["speedup"]

    # Every plan keeps 8 of 8 but budget 4 alone and 2 + groups: the fastest of those is chosen.
    p = adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, **at)
    candidates = [adaskip.plan(v, strategy="greedy-loss", num_sublayers=k, streaming_groups=g, **at)
                  for k, g in ((2, 0), (0, total // 2), (4, total // 2))]
    want = max(candidates, key=speed)
    assert (p.skip_scales, p.streaming) == (want.skip_scales, want.streaming)
    assert p.predicted_speedup == pytest.approx(speed(want)) and p.predicted_speedup > costs.speedup([])
    assert p.streaming and "streaming KV-head groups" in p.explanation.splitlines()[0]
    assert "no cost model given" not in p.explanation and f"predicted {speed(want):.3f}x" in p.explanation
    h = total // 2
    assert f"qualifying plans [0, 2, 0 + {h} groups, 4 + {h} groups]" in p.explanation  # not 4 alone, nor 2 + groups
    # Without the cost model, groups cannot be priced: the sublayer plans alone are ranked, and it says so.
    q = adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0)
    assert not q.streaming and len(q.skip_scales) == 2 and "were not ranked" in q.explanation
    # A tolerance no group plan meets.
    r = adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, min_agreement=0.99, **at)
    assert not r.streaming and not r.skip_scales
    # Asking for more groups on top of a tolerance that chose some is refused by name.
    with pytest.raises(ValueError, match="already streams"):
        adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, streaming_groups=1, **at)
    # A validation whose groups the profile no longer ranks so is refused.
    stale = v.validation["greedy-loss"]["streaming"][0]
    stale["layers"] = [[0, [0]]] + stale["layers"][1:] if stale["layers"][0][0] != 0 else stale["layers"][::-1]
    with pytest.raises(ValueError, match="validate again"):
        adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, **at)
    stale["layers"] = streaming_layers(adaskip.plan(profile, strategy="greedy-loss", num_sublayers=stale["budget"],
                                                    streaming_groups=stale["groups"]))
    adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, **at)  # mended
    stale["budget"] = 3  # a budget the validation did not measure on its own
    with pytest.raises(ValueError, match="3 sublayers and .* measured another plan"):
        adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, **at)


def test_calibrate_validates_streaming_counts_next_to_budgets(ranked):
    from adaskip.skipping.calibration import calibrate
    from adaskip.skipping.probes import MIN_PROBE_LEN
    from test_retrieval import _texts
    from test_retrieval_plans import _SmallVocab

    model, _ = ranked
    text = " ".join(_texts(800, seed=2))
    common = dict(tokenizer=_SmallVocab(), num_requests=2, prompt_len=MIN_PROBE_LEN, progress=False, search="loss",
                  search_max_sublayers=2, search_candidates=2, streaming_window=16)
    profile = calibrate(model, [text], **common, streaming_probes=1, validate_budgets=[1],
                        validate_strategies=["greedy-loss"], validation_requests=2, validation_probes=2,
                        validate_streaming=[2])
    v = profile.validation["greedy-loss"]
    assert [(r["budget"], r["groups"]) for r in v["streaming"]] == [(0, 2), (1, 2)]
    assert all(0 <= r["retrieval_hits"] <= 2 for r in v["streaming"])
    total = model.args.num_layers * model.args.num_kv_heads
    for kwargs, match in ((dict(validate_streaming=[2], validate_budgets=[1]), "streaming_probes > 0"),
                          (dict(validate_streaming=[2], streaming_probes=1), "validate_budgets"),
                          (dict(validate_streaming=[total + 1], streaming_probes=1, validate_budgets=[1]),
                           f"has {total} KV-head groups"),
                          (dict(validate_streaming=["2"], streaming_probes=1, validate_budgets=[1]), "integers")):
        with pytest.raises(ValueError, match=match):
            calibrate(model, [text], **common, **kwargs)


def test_cli_validate_streaming_needs_budgets_and_a_ranking(tmp_path):
    from adaskip.cli import main

    def error(argv):
        with pytest.raises(SystemExit) as e:
            main(["calibrate", "--data", "essays", "--out", str(tmp_path / "p.json"), *argv])
        return str(e.value)

    assert "give both" in error(["--validate-streaming", "24"])
    assert "give both" in error(["--validate-streaming", "24", "--validate-budgets", "4"])
    assert "distinct numbers of groups >= 1" in error(["--validate-streaming", "0", "--validate-budgets", "4",
                                                       "--streaming-probes", "2"])
    assert not (tmp_path / "p.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_plan_on_the_gpu_with_and_without_step_graphs(dtype):
    """On the GPU (the decode kernels' rotary + KV write, then the gathered band, no host sync):
    eager and CUDA-graph decode give the same tokens as the CPU-free cache-less forwards."""
    model = tiny_llama(VOCAB, context=400, layers=3).to("cuda", dtype).eval()
    plan = SkipPlan(3, {5: 1.0}, streaming={0: [1], 1: [0, 1]}, streaming_sink=3, streaming_window=24)
    prompts = [random_requests(1, length=150, seed=9)[0], random_requests(1, length=131, seed=10)[0]]
    eager = generate(model, prompts, max_new_tokens=8, eos_token_ids=[], plan=plan, prefill_chunk=64)
    graph = generate(model, prompts, max_new_tokens=8, eos_token_ids=[], plan=plan, prefill_chunk=64,
                     cuda_graph=True, forbid_host_sync=True)
    assert graph.tokens == eager.tokens
    with torch.inference_mode():
        for prompt, new in zip(prompts, eager.tokens):
            logits = model(torch.tensor([prompt + new[:-1]], device="cuda"), plan=plan)[0]
            agree = (logits[len(prompt) - 1:].argmax(-1).cpu() == torch.tensor(new)).float().mean().item()
            assert agree >= (1.0 if dtype == torch.float32 else 0.75)


# --- adaskip eval with streaming groups and a retrieval tolerance -------------------------------------


def test_eval_rows_with_streaming_groups_priced_by_one_cost_model(ranked):
    """eval's plans: the groups alone and on a budget's plan, each priced by the eval's roofline
    (as streaming_plan_costs prices them), and a retrieval tolerance that may choose groups; the
    same plans adaskip.plan gives."""
    import adaskip
    from adaskip.evaluation.harness import EvalSettings, _key, build_plans
    from adaskip.skipping.costs import H100_SPEC, streaming_plan_costs, sublayer_costs

    model, profile = ranked
    total = model.args.num_layers * model.args.num_kv_heads
    h = total // 2
    v = _with_group_rows(profile, "greedy-loss", [8, 2], [(0, h, 8), (2, h, 5), (4, h, 8)])
    settings = EvalSettings(strategies=["greedy-loss"], budgets=[2, 4], streaming_groups=[3],
                            streaming_budgets=[4], min_retrievals=[1.0], min_agreements=[0.0, 0.99])
    costs = sublayer_costs(model.args, 4096, "prefill", spec=H100_SPEC)
    rows = build_plans(v, model.args.num_layers, settings, costs, model.args)
    by = {_key(d): (d, p) for d, p in rows}
    assert list(by) == ["full", "greedy-loss@2", "greedy-loss@4", "greedy-loss@4+3g",
                        "greedy-loss@agreement>=0,retrieval>=1", "greedy-loss@agreement>=0.99,retrieval>=1",
                        "groups@0+3g"]

    def speed(p):  # the eval's own roofline (H100 here), not the L20 default
        return streaming_plan_costs(model.args, 4096, "prefill", sorted(p.skip_scales),
                                    {i: len(g) for i, g in p.streaming.items()}, sink=4, window=16,
                                    spec=H100_SPEC)["speedup"]

    alone = by["groups@0+3g"][1]
    assert alone.streaming == adaskip.plan(profile, strategy="full", streaming_groups=3).streaming
    assert not alone.skip_scales and alone.predicted_speedup == pytest.approx(speed(alone))
    assert alone.predicted_speedup > 1.0
    on4, plain4 = by["greedy-loss@4+3g"][1], by["greedy-loss@4"][1]
    assert on4.skip_scales == plain4.skip_scales and sum(len(g) for g in on4.streaming.values()) == 3
    assert on4.predicted_speedup == pytest.approx(speed(on4))
    assert on4.predicted_speedup > plain4.predicted_speedup
    assert plain4.predicted_speedup == pytest.approx(costs.speedup(plain4.skip_scales))
    chosen = by["greedy-loss@agreement>=0,retrieval>=1"][1]
    want = adaskip.plan(v, strategy="greedy-loss", min_retrieval=1.0, min_agreement=0.0, costs=costs,
                        model_args=model.args)
    assert (chosen.skip_scales, chosen.streaming) == (want.skip_scales, want.streaming) and chosen.streaming
    strict = by["greedy-loss@agreement>=0.99,retrieval>=1"][1]
    assert not strict.skip_scales and not strict.streaming  # nothing validated meets it: the full model
    # No cost model: the groups cannot be priced, and the rows say so by having no prediction.
    unpriced = {_key(d): p for d, p in build_plans(v, model.args.num_layers, EvalSettings(
        strategies=["greedy-loss"], budgets=[4], streaming_groups=[3], streaming_budgets=[4]))}
    assert unpriced["groups@0+3g"].predicted_speedup is None and unpriced["greedy-loss@4+3g"].predicted_speedup is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(streaming_groups=[0]), "distinct integers >= 1"),
    (dict(streaming_groups=[2, 2]), "distinct integers >= 1"),
    (dict(streaming_budgets=[4]), "give the group counts too"),
    (dict(streaming_groups=[2], streaming_budgets=[6]), r"streaming budgets \[6\] are not among"),
    (dict(min_retrievals=[1.5]), "retrieval fractions must be in"),
])
def test_eval_settings_refuse_bad_streaming_and_retrieval(kwargs, match):
    from adaskip.evaluation.harness import EvalSettings

    with pytest.raises(ValueError, match=match):
        EvalSettings(budgets=[4], **kwargs)


def test_eval_refuses_more_groups_than_the_model_has(ranked):
    from adaskip.evaluation.harness import EvalSettings

    model, _ = ranked
    total = model.args.num_layers * model.args.num_kv_heads
    with pytest.raises(ValueError, match=f"has {total} KV-head groups"):
        EvalSettings(tasks=["ppl"], budgets=[2], window_len=8, streaming_groups=[total + 1]).check_model(model.args)


def test_eval_tables_and_plot_name_the_group_plans(tmp_path):
    from adaskip.evaluation.report import markdown_table, plot_retrieval, plot_retrieval_by_speedup, retrieval_table

    def row(strategy, budget, correct, speedup, **extra):
        return {"strategy": strategy, "budget": budget, "target_speedup": None, "predicted_speedup": speedup,
                "skipped_attention": budget // 2, "skipped_ffn": budget - budget // 2, "metrics": {},
                "details": {"passkey": {"by_length": {"2048": {"correct": correct, "total": 6}}, "correct": correct,
                                        "total": 6}}, **extra}

    rows = [row("full", 0, 6, 1.0), row("greedy-kl", 8, 4, 1.16),
            row("greedy-kl", 8, 3, 1.37, streaming_groups=29), row("groups", 0, 6, 1.16, streaming_groups=29),
            row("greedy-kl", 0, 5, 1.2, streaming_groups=36, min_agreement=0.8, min_retrieval=0.9)]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| strategy | budget | attn / FFN skipped | streaming groups | predicted speedup |"
    assert table[4] == "| greedy-kl | 8 + 29 groups | 4 / 4 | 29 | 1.370 |"
    assert table[6] == "| greedy-kl | agreement >= 0.8, retrieval >= 0.9 (0 sublayers + 36 groups) | 0 / 0 | 36 | 1.200 |"
    names = [line.split(" | ")[0][2:] for line in retrieval_table(rows, "passkey").splitlines()[2:]]
    assert names == ["full", "greedy-kl 8", "greedy-kl 8 + 29 groups", "29 streaming groups",
                     "greedy-kl agreement >= 0.8, retrieval >= 0.9 (0 sublayers + 36 groups)"]
    png = plot_retrieval_by_speedup(rows, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_retrieval_by_speedup(rows[:1], tmp_path / "none.png") is None  # the full model alone
    assert plot_retrieval(rows, tmp_path / "b.png") is not None  # the budget plot keeps the plain budgets


def test_cli_eval_streaming_and_retrieval_options(ranked, tmp_path):
    from adaskip.cli import main

    def error(argv):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--out", str(tmp_path / "e"), *argv])
        return str(e.value)

    model, profile = ranked
    path = tmp_path / "p.json"
    dataclasses_replace(profile, group_scores={}).save(path)
    assert "give --profile" in error(["--streaming-groups", "2"])
    assert "ranks no KV-head groups" in error(["--profile", str(path), "--strategies", "greedy-loss",
                                               "--streaming-groups", "2"])
    assert "give the group counts too" in error(["--budgets", "4", "--streaming-budgets", "4"])
    assert "retrieval fractions must be in [0, 1]" in error(["--min-retrieval", "1.5"])
    assert not (tmp_path / "e").exists()


def test_a_plan_for_longer_prompts_than_the_ranking_says_so(ranked):
    import adaskip

    model, profile = ranked
    probe_len = profile.group_scores["probe_len"]
    assert profile.group_scores_of().probe_len == probe_len > 0
    long = adaskip.plan(profile, strategy="full", streaming_groups=2, context_len=4 * probe_len, model_args=model.args)
    assert f"ranked on probes of {probe_len} tokens, and this plan is for {4 * probe_len}" in long.explanation
    near = adaskip.plan(profile, strategy="full", streaming_groups=2, context_len=probe_len, model_args=model.args)
    assert "ranked on probes of" not in near.explanation


def test_evals_of_each_length_merge_into_one_plot(tmp_path):
    from adaskip.evaluation.report import merge_rows, plot_retrieval, plot_retrieval_by_speedup, retrieval_table

    def row(strategy, budget, n, task, correct, speedup=1.0, **extra):
        return {"strategy": strategy, "budget": budget, "target_speedup": None, "predicted_speedup": speedup,
                "skipped": list(range(budget)), "metrics": {},
                "details": {task: {"by_length": {str(n): {"correct": correct, "total": 8}}, "correct": correct,
                                   "total": 8}}, **extra}

    short = [row("full", 0, 2048, "passkey", 8), row("groups", 0, 2048, "passkey", 7, 1.16, streaming_groups=29)]
    long = [row("full", 0, 4096, "passkey", 6), row("groups", 0, 4096, "passkey", 5, 1.16, streaming_groups=29),
            row("greedy-kl", 8, 4096, "passkey", 3, 1.159)]
    needles = [row("full", 0, 4096, "needle", 8)]
    merged = merge_rows([short, long, needles])
    assert [(r["strategy"], r["budget"]) for r in merged] == [("full", 0), ("groups", 0), ("greedy-kl", 8)]
    full = merged[0]["details"]
    assert full["passkey"] == {"by_length": {"2048": {"correct": 8, "total": 8}, "4096": {"correct": 6, "total": 8}},
                               "correct": 14, "total": 16}
    assert full["needle"]["correct"] == 8 and short[0]["details"]["passkey"]["correct"] == 8  # inputs untouched
    assert merged[0]["metrics"]["passkey_accuracy"] == 14 / 16
    assert retrieval_table(merged, "passkey").splitlines()[3] == "| 29 streaming groups | 7/8 (0.88) | 5/8 (0.62) | 12/16 |"
    assert plot_retrieval_by_speedup(merged, tmp_path / "s.png") is not None
    assert plot_retrieval(merged, tmp_path / "b.png") is not None
    with pytest.raises(ValueError, match="two evals hold passkey at 2048 tokens"):
        merge_rows([short, short])
    with pytest.raises(ValueError, match="two plans named 'greedy-kl 8'"):
        merge_rows([long, [row("greedy-kl", 8, 2048, "passkey", 3, 1.3)]])
