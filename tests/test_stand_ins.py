"""Stand-ins for skipped sublayers: closed-form fits, the runtime applying them, the kl search
that scores candidates with them, their storage in profiles, planning and eval rows (tiny
random model, CPU)."""
import json
from types import SimpleNamespace

import pytest
import torch

import adaskip
from adaskip.cli import main
from adaskip.cli.planning import build_plan
from adaskip.evaluation.harness import EvalSettings, build_plans
from adaskip.runtime.skip_plan import SkipPlan
from adaskip.runtime.stand_in import StandIn
from adaskip.skipping import greedy
from adaskip.skipping.calibration import calibrate
from adaskip.skipping.measurement import divergence, position_weights, reference_logprobs
from adaskip.skipping.profile import STAND_IN_SUFFIX, ImportanceProfile
from adaskip.skipping.stand_ins import StandInFit
from adaskip.skipping.strategies import paper_speedup, plan_speedup

from behaviour_cases import tiny_model
from helpers import random_requests

H = 24


_requests = random_requests


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def profile(model):
    return calibrate(model, _requests(6), num_requests=3, prompt_len=64, progress=False, search=["kl", "loss"],
                     search_max_sublayers=4, search_candidates=3, validate_budgets=[1, 2, 4],
                     validate_strategies=["greedy-kl"], validation_requests=3, search_stand_in="linear")


# -- fitting --------------------------------------------------------------------------------------

def _feed(fit, s, x, h, out, chunks=3):
    for xs, hs, os_ in zip(x.chunk(chunks), h.chunk(chunks), out.chunk(chunks)):
        fit(s, xs[None], hs[None], os_[None])
        fit.flush()


def test_channel_fit_recovers_a_per_channel_scale():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, H, generator=g)
    d = torch.rand(H, generator=g) + 0.5
    fit = StandInFit([5], H, linear=False)
    _feed(fit, 5, torch.randn(300, H, generator=g), h, h * (d - 1))  # the sublayer maps h to h * d
    got = fit.fit(5, "channel")
    assert got.kind == "channel" and torch.allclose(got.channel, d, atol=1e-5)
    with pytest.raises(ValueError, match="linear"):
        fit.fit(5, "linear")  # linear=False collected no sums for it


def test_linear_fit_recovers_a_low_rank_affine_map():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, H, generator=g)
    A, B, e = torch.randn(H, 3, generator=g), torch.randn(3, H, generator=g), torch.randn(3, generator=g)
    out = (x @ B.t() + e) @ A.t()  # rank 3 plus a bias inside the low-rank space
    fit = StandInFit([2], H)
    _feed(fit, 2, x, torch.randn(500, H, generator=g), out)
    exact = fit.fit(2, "linear", rank=3, ridge=1e-9)
    assert exact.rank == 3 and exact.down.shape == (3, H) and exact.up.shape == (H, 3)
    assert torch.allclose(exact.apply_linear(x), out, atol=1e-3, rtol=1e-3)
    # A rank below the map's loses what it cannot hold; the fit is least squares, so not worse than nothing.
    low = fit.fit(2, "linear", rank=1, ridge=1e-9)
    err = (low.apply_linear(x) - out).pow(2).sum()
    assert 0 < err < out.pow(2).sum()
    with pytest.raises(ValueError, match="rank"):
        fit.fit(2, "linear", rank=H + 1)
    with pytest.raises(ValueError, match="no activations"):
        fit.fit(7, "channel")  # not watched


def test_stand_in_refuses_bad_tensors():
    with pytest.raises(ValueError, match="finite"):
        StandIn("channel", channel=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="up"):
        StandIn("linear", down=torch.zeros(2, H), up=torch.zeros(H, 3))
    with pytest.raises(ValueError, match="kind"):
        StandIn("cubic")
    with pytest.raises(ValueError, match="does not skip"):
        SkipPlan(4, {1: 1.0}, stand_ins={3: StandIn("channel", channel=torch.ones(H))})


def test_a_scalar_stand_in_is_the_plans_scale_or_refused():
    # The same scale (up to float32 rounding): the plan keeps it once, in skip_scales.
    same = SkipPlan(4, {1: 0.9}, stand_ins={1: StandIn("scalar", scale=float(torch.tensor(0.9)))})
    assert same.stand_ins == {} and same.skip_scales == {1: 0.9} and same.stand_in == "scalar"
    # Two different scales for one sublayer: which one was meant is not guessed.
    with pytest.raises(ValueError, match=r"scalar stand-ins whose scale is not the plan's .*\{1: \(0\.5, 0\.9\)\}"):
        SkipPlan(4, {1: 0.9}, stand_ins={1: StandIn("scalar", scale=0.5)})


@pytest.mark.parametrize("key", ["1", 1.0, 1.5, True])
def test_stand_ins_are_keyed_by_integer_sublayers(key):
    # A key that is not an int was read as int(key): '1' or 1.5 became sublayer 1 without a word.
    with pytest.raises(ValueError, match="integer sublayer"):
        SkipPlan(4, {1: 0.9}, stand_ins={key: StandIn("scalar", scale=0.9)})


def test_a_stand_in_refuses_the_tensors_of_another_kind():
    # A scalar stand-in given fitted tensors would be its scale alone: the tensors were dropped.
    with pytest.raises(ValueError, match="a scalar stand-in takes only a scale; got channel"):
        StandIn("scalar", scale=0.9, channel=torch.ones(H))
    with pytest.raises(ValueError, match="a channel stand-in takes channel; got down, up"):
        StandIn("channel", channel=torch.ones(H), down=torch.zeros(2, H), up=torch.zeros(H, 2))
    with pytest.raises(ValueError, match="a linear stand-in takes down / down_bias / up; got channel"):
        StandIn("linear", down=torch.zeros(2, H), up=torch.zeros(H, 2), channel=torch.ones(H))


# -- the runtime ----------------------------------------------------------------------------------

def test_channel_of_one_value_equals_the_scalar(model):
    ids = torch.tensor([_requests(1, 17)[0]])
    n = model.args.hidden_size
    scalar = model(ids, plan=SkipPlan(model.args.num_layers, {2: 0.8, 5: 1.1}))
    channel = SkipPlan(model.args.num_layers, {2: 1.0, 5: 1.1},
                       stand_ins={2: StandIn("channel", channel=torch.full((n,), 0.8))})
    torch.testing.assert_close(model(ids, plan=channel), scalar, rtol=1e-5, atol=1e-5)
    # The stand-in replaces the scalar: a channel of ones is the identity whatever skip_scales says.
    ones = SkipPlan(model.args.num_layers, {2: 0.8, 5: 1.1},
                    stand_ins={2: StandIn("channel", channel=torch.ones(n))})
    torch.testing.assert_close(model(ids, plan=ones), model(ids, plan=SkipPlan(model.args.num_layers, {2: 1.0, 5: 1.1})),
                               rtol=1e-5, atol=1e-5)
    other = SkipPlan(model.args.num_layers, {2: 1.0, 5: 1.1},
                     stand_ins={2: StandIn("channel", channel=torch.linspace(0.5, 1.5, n))})
    assert not torch.allclose(model(ids, plan=other), scalar, atol=1e-3)


@pytest.mark.parametrize("sublayer", [2, 3])
def test_linear_stand_in_equals_the_sublayer_replaced_by_its_map(model, sublayer, monkeypatch):
    """The plan's linear stand-in must act exactly as if the sublayer itself computed U (D x + e)."""
    g = torch.Generator().manual_seed(sublayer)
    n = model.args.hidden_size
    stand_in = StandIn("linear", down=0.2 * torch.randn(4, n, generator=g), down_bias=torch.randn(4, generator=g),
                       up=0.2 * torch.randn(n, 4, generator=g))
    ids = torch.tensor([_requests(1, 19, seed=3)[0]])
    got = model(ids, plan=SkipPlan(model.args.num_layers, {sublayer: 1.0}, stand_ins={sublayer: stand_in}))
    layer = model.model.layers[sublayer // 2]
    if sublayer % 2 == 0:
        monkeypatch.setattr(layer.self_attn, "forward", lambda x, *a, **k: stand_in.apply_linear(x))
    else:
        monkeypatch.setattr(layer.mlp, "dense", lambda x: stand_in.apply_linear(x))
    torch.testing.assert_close(got, model(ids), rtol=1e-5, atol=1e-5)


def test_taps_see_each_running_sublayer_once_with_its_input(model):
    seen = []
    ids = torch.tensor([_requests(1, 11)[0]])
    model(ids, plan=SkipPlan(model.args.num_layers, {1: 1.0}),
          taps=lambda s, x, h, out: seen.append((s, x.shape, h.shape, out.shape)))
    assert [s for s, *_ in seen] == [s for s in range(2 * model.args.num_layers) if s != 1]
    assert all(shape == (1, 11, model.args.hidden_size) for _, *shapes in seen for shape in shapes)


def test_generate_with_stand_ins_matches_the_cache_less_forward(model):
    """Prefill and cached decode run the same stand-ins as the plain forward."""
    n = model.args.hidden_size
    g = torch.Generator().manual_seed(9)
    p = SkipPlan(model.args.num_layers, {2: 1.0, 3: 0.9, 5: 1.0},
                 stand_ins={2: StandIn("linear", down=0.1 * torch.randn(3, n, generator=g),
                                       up=0.1 * torch.randn(n, 3, generator=g)),
                            5: StandIn("channel", channel=torch.rand(n, generator=g) + 0.5)}, mode="e2e")
    prompt = _requests(1, 9, seed=4)[0]
    out = adaskip.generate(model, [prompt], max_new_tokens=5, plan=p)
    ids = list(prompt)
    for _ in range(5):  # greedy, re-running the whole sequence each time
        ids.append(int(model(torch.tensor([ids]), plan=p)[0, -1].argmax()))
    assert out.tokens[0] == ids[len(prompt):]


# -- the kl search --------------------------------------------------------------------------------

def test_kl_search_records_its_objective_and_stand_ins(model, profile):
    r = profile.search_result("kl")
    assert r.method == "kl" and r.stand_in == "linear" and len(r.order) == 4 and len(r.fits) == 4
    assert r.objective[0] == 0.0 and all(v > 0 for v in r.objective[1:])
    assert set(r.fits[0]) == {"scalar", "channel", "linear"}
    # 1 pass per request for the references, then per step: statistics, fitting and 3 candidates
    assert r.forward_passes == 2 * (1 + 4 * (1 + 1 + 3))
    requests = _requests(6)[:2]
    refs = reference_logprobs(model, requests)
    for k in (1, 4):  # the stored objective is that of the plan the profile gives
        p = adaskip.plan(profile, strategy="greedy-kl", num_sublayers=k)
        assert p.stand_in == "linear" and sorted(p.stand_ins) == sorted(r.order[:k])
        kl, _ = divergence(model, requests, refs, p, weighting="late")
        assert kl == pytest.approx(r.objective[k], rel=1e-5)


def test_kl_search_first_choice_is_the_best_candidate(model):
    requests = _requests(2, seed=5)
    m = model.args.num_layers
    r = greedy.search(model, requests, max_sublayers=1, method="kl", candidates=2 * m, stand_in="channel",
                      weighting="uniform", progress=False)
    refs = reference_logprobs(model, requests)
    scores = {}
    for s in range(2 * m):  # every sublayer, each with its own fitted channel stand-in
        fit = StandInFit([s], model.args.hidden_size, linear=False)
        for q in requests:
            model(torch.tensor([q]), taps=fit)
            fit.flush()
        p = SkipPlan(m, {s: 1.0}, stand_ins={s: fit.fit(s, "channel")})
        scores[s] = divergence(model, requests, refs, p, weighting="uniform")[0]
    assert r.order[0] == min(scores, key=scores.get)
    assert r.objective[1] == pytest.approx(scores[r.order[0]], rel=1e-5)


def test_position_weights():
    assert torch.allclose(position_weights(4, "uniform"), torch.full((4,), 0.25))
    assert torch.allclose(position_weights(4, "late"), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match="weighting"):
        position_weights(4, "early")


def test_kl_search_refuses_bad_settings(model):
    with pytest.raises(ValueError, match="stand-in"):
        greedy.search(model, _requests(1), max_sublayers=1, method="kl", stand_in="cubic", progress=False)
    with pytest.raises(ValueError, match="weighting"):
        calibrate(model, _requests(3), num_requests=2, prompt_len=64, progress=False, search="kl",
                  search_weighting="early")


# -- profiles, plans, costs, eval ------------------------------------------------------------------

def test_profile_round_trip_keeps_the_stand_ins(model, profile, tmp_path):
    path = tmp_path / "p.json"
    profile.save(path)
    sidecar = tmp_path / ("p" + STAND_IN_SUFFIX)
    assert sidecar.exists() and json.loads(path.read_text())["stand_in_file"]["name"] == sidecar.name
    loaded = ImportanceProfile.load(path)
    ids = torch.tensor([_requests(1, 21, seed=8)[0]])
    for kind in ("scalar", "channel", "linear"):
        a = adaskip.plan(profile, strategy="greedy-kl", num_sublayers=4, stand_in=kind)
        b = adaskip.plan(loaded, strategy="greedy-kl", num_sublayers=4, stand_in=kind)
        assert b.stand_in == kind
        torch.testing.assert_close(model(ids, plan=b), model(ids, plan=a), rtol=0, atol=0)
    blob = bytearray(sidecar.read_bytes())
    blob[-1] ^= 1
    sidecar.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        ImportanceProfile.load(path)
    sidecar.unlink()
    with pytest.raises(ValueError, match=sidecar.name):
        ImportanceProfile.load(path)


def test_plans_refuse_stand_ins_nobody_fitted(profile):
    with pytest.raises(ValueError, match="greedy-kl"):
        adaskip.plan(profile, strategy="adaskip", num_sublayers=2, stand_in="channel")
    with pytest.raises(ValueError, match="kind"):
        adaskip.plan(profile, strategy="greedy-kl", num_sublayers=2, stand_in="cubic")
    assert adaskip.plan(profile, strategy="greedy-loss", num_sublayers=2).stand_in == "scalar"


def test_linear_stand_ins_count_in_the_predicted_speedup(model, profile):
    linear = adaskip.plan(profile, strategy="greedy-kl", num_sublayers=4, stand_in="linear")
    channel = adaskip.plan(profile, strategy="greedy-kl", num_sublayers=4, stand_in="channel")
    m = profile.num_layers
    assert channel.predicted_speedup == pytest.approx(paper_speedup(m, 4))
    notes = profile.search_result("kl").notes
    layer = notes["attention_multiply_adds"] + notes["ffn_multiply_adds"]
    extra = sum(v.multiply_adds_per_token() for v in linear.stand_ins.values()) / layer
    assert extra > 0 and linear.predicted_speedup == pytest.approx(m / (m - 2 + extra))
    costs = adaskip.skipping.costs.sublayer_costs(model.args, 256, "prefill")
    assert plan_speedup(linear, profile, costs) < plan_speedup(channel, profile, costs) == pytest.approx(
        costs.speedup(channel.skip_scales))


def test_tolerance_plans_use_the_validated_stand_in(profile):
    v = profile.validation["greedy-kl"]
    assert v["stand_in"] == "linear"
    p = adaskip.plan(profile, strategy="greedy-kl", min_agreement=0.0)
    # The validated kind is linear: "scalar" is right only for a plan that skips nothing.
    assert p.stand_in == ("linear" if p.skip_scales else "scalar")
    assert all(v.kind == "linear" for v in p.stand_ins.values()) and sorted(p.stand_ins) == sorted(p.skip_scales)
    with pytest.raises(ValueError, match="validated"):
        adaskip.plan(profile, strategy="greedy-kl", min_agreement=0.0, stand_in="channel")


def test_eval_rows_per_stand_in_and_tolerance(profile):
    settings = EvalSettings(strategies=["greedy-kl", "greedy-loss"], budgets=[2, 4],
                            stand_ins=["scalar", "channel", "linear"], min_agreements=[0.5])
    rows = build_plans(profile, profile.num_layers, settings)
    names = [(d["strategy"], d["budget"], d.get("min_agreement")) for d, _ in rows]
    assert ("greedy-kl/channel", 4, None) in names and ("greedy-kl/scalar", 2, None) in names
    assert ("greedy-loss", 4, None) in names
    assert [(n, a) for n, _, a in names if a is not None] == [("greedy-kl", 0.5)]
    assert any("greedy-loss: no validation" in n for n in settings.notes)
    by = {(d["strategy"], d["budget"]): p for d, p in rows if d.get("min_agreement") is None}
    assert by[("greedy-kl/channel", 4)].stand_in == "channel"
    assert sorted(by[("greedy-kl/channel", 4)].skip_scales) == sorted(by[("greedy-kl/linear", 4)].skip_scales)
    with pytest.raises(ValueError, match="greedy-kl"):
        EvalSettings(strategies=["adaskip"], stand_ins=["channel"])


def test_cli_stand_in_flags(model, profile, tmp_path):
    path = tmp_path / "p.json"
    profile.save(path)
    args = SimpleNamespace(profile=str(path), strategy="greedy-kl", planner="paper", context_len=None, mode="e2e",
                           window=20, alpha=None, num_sublayers=3, min_agreement=None, max_kl=None, stand_in="channel")
    got = build_plan(args, model)
    assert got.stand_in == "channel" and sorted(got.skip_scales) == sorted(profile.search_result("kl").order[:3])
    args.stand_in = None  # the kind the search scored with
    assert build_plan(args, model).stand_in == "linear"
    for argv, message in ((["eval", "--strategies", "greedy-kl", "--stand-ins", "cubic"], "unknown stand-in"),
                          (["eval", "--strategies", "adaskip", "--stand-ins", "channel"], "greedy-kl"),
                          (["eval", "--min-agreement", "1.5"], "agreements")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert message in str(e.value.code)


def test_online_learning_runs_beside_stand_ins(model):
    n, m = model.args.hidden_size, model.args.num_layers
    g = torch.Generator().manual_seed(11)
    stand_ins = {2: StandIn("linear", down=0.1 * torch.randn(3, n, generator=g), up=0.1 * torch.randn(n, 3, generator=g)),
                 3: StandIn("channel", channel=torch.rand(n, generator=g) + 0.5)}
    prompt = _requests(1, 12, seed=6)[0]
    online = SkipPlan(m, {2: 1.0, 3: 1.0}, stand_ins=stand_ins, beta=-1.0, window=3)
    static = SkipPlan(m, {2: 1.0, 3: 1.0}, stand_ins=stand_ins)
    a = adaskip.generate(model, [prompt], max_new_tokens=8, plan=online, eos_token_ids=[])
    b = adaskip.generate(model, [prompt], max_new_tokens=8, plan=static, eos_token_ids=[])
    # Every FFN the plan does not skip is gated off once the window is measured; before, the same tokens.
    assert a.online_skipped == [[s for s in range(1, 2 * m, 2) if s != 3]]
    assert a.tokens[0][:3] == b.tokens[0][:3]
