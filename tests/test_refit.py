"""adaskip.skipping.refit.refit_plan: each skipped sublayer's stand-in fitted again on the plan's
own activations, lowest first (tiny random model, CPU)."""
import pytest
import torch

from adaskip.runtime.skip_plan import SkipPlan
from adaskip.skipping import greedy
from adaskip.skipping.measurement import measure_requests
from adaskip.skipping.refit import refit_plan
from adaskip.skipping.stand_ins import StandInFit

from behaviour_cases import tiny_model
from helpers import random_requests


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _fit_by_hand(model, requests, s, kind, around):
    """The stand-in of sublayer s fitted with the plan `around` in place, s itself running."""
    fit = StandInFit([s], model.args.hidden_size, linear=kind == "linear")
    measured = measure_requests(model, requests, plan=around, stats=True, taps=fit)
    scale = measured.scale[:, s].mean().item()
    return scale, fit.fit(s, kind, scale=scale)


@pytest.mark.parametrize("kind", ["scalar", "channel", "linear"])
def test_each_stand_in_is_fitted_under_the_others_lowest_first(model, kind):
    requests = random_requests(3, seed=11)
    m = model.args.num_layers
    a, b = 1, 2 * m - 2  # an FFN low down, an attention high up
    # Fitted as a search would have: b first (nothing skipped yet), then a with b skipped.
    plan = SkipPlan(m, {a: 0.5, b: 2.0}, stand_ins={})
    refitted = refit_plan(model, plan, requests, kind=kind)
    # a is below b: its refit sees the model with only b skipped (b's stand-in as given, scale 2.0);
    # then b's sees a's refitted stand-in.
    scale_a, si_a = _fit_by_hand(model, requests, a, kind, SkipPlan(m, {b: 2.0}))
    around_b = SkipPlan(m, {a: scale_a}, stand_ins={} if kind == "scalar" else {a: si_a})
    scale_b, si_b = _fit_by_hand(model, requests, b, kind, around_b)
    assert refitted.skip_scales == pytest.approx({a: scale_a, b: scale_b}, rel=1e-6)
    assert scale_a != pytest.approx(0.5) and scale_b != pytest.approx(2.0)
    if kind == "scalar":
        assert refitted.stand_ins == {}
    else:
        for s, want in ((a, si_a), (b, si_b)):
            got = refitted.stand_ins[s]
            assert got.kind == kind
            for name in ("channel", "down", "down_bias", "up"):
                if getattr(want, name) is not None:
                    torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)


def test_a_single_skip_refits_to_what_the_search_fitted(model):
    """With one sublayer skipped nothing is upstream of it but the full model, as when the search
    chose it: the refit gives back the search's own scale."""
    requests = random_requests(2, seed=3)
    r = greedy.search(model, requests, max_sublayers=1, method="kl", candidates=4, stand_in="scalar",
                      weighting="uniform", progress=False)
    s = r.order[0]
    plan = SkipPlan(model.args.num_layers, {s: r.scales[0]})
    refitted = refit_plan(model, plan, requests)
    assert refitted.skip_scales[s] == pytest.approx(r.scales[0], rel=1e-6)


def test_refit_keeps_each_kind_unless_told_and_checks_its_input(model):
    requests = random_requests(2, seed=4)
    m = model.args.num_layers
    _, channel = _fit_by_hand(model, requests, 3, "channel", None)
    plan = SkipPlan(m, {1: 1.0, 3: 1.0}, stand_ins={3: channel}, beta=0.9)
    refitted = refit_plan(model, plan, requests)
    assert 1 not in refitted.stand_ins and refitted.stand_ins[3].kind == "channel"
    assert refitted.beta == 0.9 and "refitted" in refitted.explanation
    with pytest.raises(ValueError, match="unknown stand-in kind"):
        refit_plan(model, plan, requests, kind="cubic")
    with pytest.raises(ValueError, match="at least one request"):
        refit_plan(model, plan, [])
    with pytest.raises(ValueError, match="layers"):
        refit_plan(model, SkipPlan(m + 1, {1: 1.0}), requests)
