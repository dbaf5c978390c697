"""Plans chosen by a quality tolerance: validation stored in the profile, the fastest qualifying
budget, its errors, and the command-line flags (tiny random model, CPU)."""
import json
from types import SimpleNamespace

import pytest

from adaskip import plan  # the public name: adaskip.plan
from adaskip.cli import main
from adaskip.cli.planning import build_plan
from adaskip.evaluation.quality import compare_with_full
from adaskip.skipping import calibration
from adaskip.skipping.calibration import calibrate, validate
from adaskip.skipping.costs import SublayerCosts, paper_speedup, sublayer_costs
from adaskip.skipping.profile import ImportanceProfile

from behaviour_cases import tiny_model
from helpers import random_requests

BUDGETS = [1, 2, 3, 4, 6]
STRATS = ["adaskip", "greedy-similarity"]


_requests = random_requests


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def data():
    return _requests(6)


@pytest.fixture(scope="module")
def profile(model, data):
    return calibrate(model, data, num_requests=3, prompt_len=64, progress=False, search="similarity",
                     search_max_sublayers=6, validate_budgets=BUDGETS, validate_strategies=STRATS,
                     validation_requests=3)


def test_validation_equals_compare_with_full_on_the_held_out_requests(model, data, profile):
    for s in STRATS:
        v = profile.validation[s]
        plans = {k: plan(profile, strategy=s, num_sublayers=k) for k in BUDGETS}
        ref = compare_with_full(model, data[3:6], plans)  # token lists: the ones after calibration's 3
        assert v["budgets"] == BUDGETS and v["requests"] == 3 and v["tokens"] == 3 * 39
        assert v["kl"] == [ref[k]["kl_per_token"] for k in BUDGETS]
        assert v["top1_agreement"] == [ref[k]["top1_agreement"] for k in BUDGETS]
        assert v["perplexity"] == [ref[k]["perplexity"] for k in BUDGETS]
        assert v["sublayers"] == [sorted(plans[k].skip_scales) for k in BUDGETS]
    assert max(profile.validation["adaskip"]["kl"]) > 0  # the plans do differ from the full model


def _brute_force(v, m, min_agreement=None, max_kl=None, costs=None):
    best = (1.0, 0)  # (speedup, -k) of budget 0, the full model
    for k, kl, ag, sub in zip(v["budgets"], v["kl"], v["top1_agreement"], v["sublayers"]):
        if (min_agreement is None or ag >= min_agreement) and (max_kl is None or kl <= max_kl):
            speed = costs.speedup(sub) if costs is not None else paper_speedup(m, k)
            best = max(best, (round(speed, 12), -k))
    return -best[1]


def test_the_pick_is_the_fastest_qualifying_budget_and_tightens(profile):
    for s in STRATS:
        v = profile.validation[s]
        picks = []
        for ag in sorted(set(v["top1_agreement"])) + [1.0]:  # looser to tighter
            p = plan(profile, strategy=s, min_agreement=ag)
            assert len(p.skip_scales) == _brute_force(v, 4, min_agreement=ag)
            picks.append(len(p.skip_scales))
        assert picks == sorted(picks, reverse=True) and picks[0] == 6 and len(set(picks)) > 1
        for kl in [0.0, *v["kl"]]:
            for ag in (None, 0.3):
                p = plan(profile, strategy=s, max_kl=kl, min_agreement=ag)
                assert len(p.skip_scales) == _brute_force(v, 4, min_agreement=ag, max_kl=kl)
    p = plan(profile, min_agreement=0.0)
    k = len(p.skip_scales)
    i = BUDGETS.index(k)
    assert f"{k} sublayers" in p.explanation and f"{profile.validation['adaskip']['kl'][i]:.4g}" in p.explanation
    assert p.predicted_speedup == paper_speedup(4, k)


def test_nothing_qualifies_gives_the_full_model(profile):
    p = plan(profile, max_kl=0.0, min_agreement=1.0)
    assert p.skip_scales == {} and p.predicted_speedup == 1.0 and "no validated budget" in p.explanation


def _with_validation(profile, budgets):
    """A copy whose adaskip validation covers `budgets` with made-up numbers (every one qualifies)."""
    copy = ImportanceProfile(**{**vars(profile), "validation": {}})
    copy.validation["adaskip"] = {"budgets": budgets, "kl": [0.01] * len(budgets),
                                  "top1_agreement": [0.99] * len(budgets),
                                  "sublayers": [sorted(profile.ranking()[:k]) for k in budgets],
                                  "requests": 1, "tokens": 1}
    return copy


def test_the_cost_model_changes_the_pick_when_the_extra_sublayer_is_free(model, profile):
    ranking = profile.ranking()
    k = next(i for i in range(1, 6) if ranking[i] % 2 == 1)  # the (k+1)-th choice is an FFN
    p2 = _with_validation(profile, [k, k + 1])
    assert len(plan(p2, min_agreement=0.9).skip_scales) == k + 1  # equal costs: more sublayers, faster
    # Attention-bound (a very long context): FFNs cost next to nothing, so skipping one more buys no time.
    attention_bound = SublayerCosts(per_sublayer=[1.0, 0.0] * 4, fixed=0.5, context_len=10 ** 6, mode="prefill",
                                    source="measured")
    p = plan(p2, min_agreement=0.9, costs=attention_bound)
    assert len(p.skip_scales) == k and p.predicted_speedup == attention_bound.speedup(p.skip_scales)
    assert "cost model" in p.explanation
    # The roofline model at a given context: the speedup reported is its own.
    p = plan(profile, min_agreement=0.0, context_len=4096, model_args=model.args)
    assert p.predicted_speedup == sublayer_costs(model.args, 4096, "prefill").speedup(p.skip_scales)


def test_errors(model, data, profile):
    with pytest.raises(ValueError, match="no validation of 'greedy-loss'"):
        plan(profile, strategy="greedy-loss", min_agreement=0.5)
    with pytest.raises(ValueError, match="not both"):
        plan(profile, min_agreement=0.5, num_sublayers=2)
    with pytest.raises(ValueError, match="not both"):
        plan(profile, max_kl=0.5, alpha=1.2)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"min_agreement must be in \[0, 1\]"):
            plan(profile, min_agreement=bad)
    with pytest.raises(ValueError, match="max_kl must be >= 0"):
        plan(profile, max_kl=-1.0)
    with pytest.raises(ValueError, match="paper planner"):
        plan(profile, max_kl=1.0, planner="cost")
    with pytest.raises(ValueError, match="needs a profile"):
        plan(None, num_layers=4, max_kl=1.0)
    with pytest.raises(ValueError, match="even budgets"):
        validate(model, profile, data[3:], strategies=["early-exit"], budgets=[1, 2])
    with pytest.raises(ValueError, match="distinct numbers"):
        validate(model, profile, data[3:], budgets=[2, 7])
    with pytest.raises(ValueError, match="no 'loss' search"):
        validate(model, profile, data[3:], strategies=["greedy-loss"], budgets=[2])
    with pytest.raises(ValueError, match=r"needs the \['loss'\] search"):
        calibrate(model, data, num_requests=3, prompt_len=64, progress=False, validate_budgets=[2],
                  validate_strategies=["greedy-loss"])
    with pytest.raises(ValueError, match="only 3 validation requests"):
        calibrate(model, data, num_requests=3, prompt_len=64, progress=False, validate_budgets=[2],
                  validation_requests=4)
    stale = _with_validation(profile, [2])
    stale.validation["adaskip"]["sublayers"] = [[0, 1]]
    with pytest.raises(ValueError, match="validate again"):
        plan(stale, min_agreement=0.5)


def test_save_load_round_trip_and_old_profiles(profile, tmp_path):
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = ImportanceProfile.load(path)
    assert loaded.validation == profile.validation
    assert plan(loaded, max_kl=0.3).to_dict() == plan(profile, max_kl=0.3).to_dict()
    data = json.loads(path.read_text())
    del data["validation"]  # a profile from before validation existed
    path.write_text(json.dumps(data))
    assert ImportanceProfile.load(path).validation == {}
    data["validation"] = {"adaskip": {"budgets": [1, 2], "kl": [0.1], "top1_agreement": [0.9, 0.8],
                                      "sublayers": [[1], [1, 2]]}}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="validation of 'adaskip' is malformed"):
        ImportanceProfile.load(path)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 101 for c in text]}


def test_texts_validate_on_windows_after_calibration_and_never_on_a_calibration_window(model, monkeypatch):
    seen = {}
    real = calibration.validate

    def spy(model, profile, requests, **kw):
        seen["requests"] = [list(r) for r in requests]
        return real(model, profile, requests, **kw)

    monkeypatch.setattr(calibration, "validate", spy)
    a, b = "abcdefghij" * 4, "klmnopqrst" * 4  # 40 characters: two windows of 20 each
    p = calibrate(model, [a, a, b], tokenizer=_CharTokenizer(), num_requests=2, prompt_len=20, progress=False,
                  validate_budgets=[2], validation_requests=2)
    calib = [[ord(c) % 101 for c in a[i:i + 20]] for i in (0, 20)]
    # The second copy of `a` gives only windows calibration already read: validation takes b's.
    assert seen["requests"] == [[ord(c) % 101 for c in b[i:i + 20]] for i in (0, 20)]
    assert not any(r in calib for r in seen["requests"])
    assert p.num_requests == 2 and p.validation["adaskip"]["requests"] == 2
    assert len(p.sources) == 2  # a and b: evaluation holds out what validation read as well


def _main_error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_cli_flags(model, profile, tmp_path):
    assert "not both" in _main_error(["run", "--min-agreement", "0.5", "--num-sublayers", "4", "--prompt", "x"])
    assert "give --profile" in _main_error(["run", "--max-kl", "0.5", "--prompt", "x"])
    assert "not both" in _main_error(["demo", "--max-kl", "0.5", "--alpha", "1.2"])
    assert "add --search loss" in _main_error(["calibrate", "--data", "essays", "--out", str(tmp_path / "p.json"),
                                               "--validate-budgets", "2", "--validate-strategies", "greedy-loss"])
    assert "need --validate-budgets" in _main_error(["calibrate", "--data", "essays", "--out", "p.json",
                                                     "--validation-requests", "3"])
    path = tmp_path / "p.json"
    profile.save(path)
    args = SimpleNamespace(profile=str(path), strategy="adaskip", planner="paper", context_len=None, mode="e2e",
                           window=20, alpha=None, num_sublayers=None, min_agreement=0.0, max_kl=None,
                           stand_in=None)
    assert build_plan(args, model).to_dict() == plan(profile, min_agreement=0.0, model_args=model.args).to_dict()
    args.max_kl, args.min_agreement = 0.0, None
    assert build_plan(args, model).skip_scales == {}
    args.max_kl, args.num_sublayers = None, 2  # no tolerance: the budget as before
    assert len(build_plan(args, model).skip_scales) == 2
