"""Greedy sublayer search, its strategies, equal-time planning and the eval report, on a
tiny random LLaMA (fp32, CPU)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from adaskip import ops  # noqa: E402
from adaskip.skipping.calibration import calibrate  # noqa: E402
from adaskip.runtime.config import ModelArgs  # noqa: E402
from adaskip.skipping.costs import SublayerCosts  # noqa: E402
from adaskip.runtime.loading import build_model  # noqa: E402
from adaskip.runtime.skip_plan import SkipPlan  # noqa: E402
from adaskip.skipping import greedy  # noqa: E402
from adaskip.skipping.strategies import STRATEGIES, plan, plan_at_speedup, searches_needed  # noqa: E402
from adaskip.skipping.profile import ImportanceProfile  # noqa: E402
from adaskip.evaluation.report import (markdown_table, plot_profile_heatmap, plot_quality, plot_retrieval,  # noqa: E402
                                       retrieval_points)
from adaskip.skipping.greedy import search  # noqa: E402

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CFG)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return build_model(ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}),
                       dict(hf.state_dict()))


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 101, (40,), generator=g).tolist() for _ in range(3)]


@pytest.fixture(scope="module")
def searches(model, requests):
    return {m: search(model, requests, max_sublayers=5, method=m, candidates=3, progress=False)
            for m in ("similarity", "loss")}


@pytest.fixture(scope="module")
def blockpruner(model, requests):
    return search(model, requests, max_sublayers=5, method="blockpruner", progress=False)


@pytest.fixture(scope="module")
def profile(model, requests, searches, blockpruner):
    p = calibrate(model, requests, num_requests=3, prompt_len=40, progress=False)
    p.search = {m: r.to_dict() for m, r in searches.items()}
    p.search["blockpruner"] = blockpruner.to_dict()
    return p


@torch.inference_mode()
def _measured(model, requests, skip):
    """Independent of the search: mean NLL, similarity and norm ratio with `skip` applied."""
    plan_ = SkipPlan(6, skip) if skip else None
    nll, n, sims, scales = 0.0, 0, [], []
    for r in requests:
        x = torch.tensor([r])
        stats = ops.new_stats(12, 1, "cpu")
        logits = model(x, plan=plan_, stats=stats)[0, :-1]
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(r) - 1
        sim, scale, _ = ops.mean_stats(stats)
        sims.append(sim[:, 0].double())
        scales.append(scale[:, 0].double())
    return nll / n, torch.stack(sims).mean(0), torch.stack(scales).mean(0)


def test_similarity_search_re_measures_with_earlier_choices_applied(model, requests, searches):
    r = searches["similarity"]
    assert len(r.order) == len(set(r.order)) == 5 and r.candidates == 1
    assert r.forward_passes == (5 + 1) * 3 and r.requests == 3 and r.tokens == 120
    chosen = {}
    for k, s in enumerate(r.order):
        loss, sim, scale = _measured(model, requests, chosen)
        remaining = [i for i in range(12) if i not in chosen]
        assert s == max(remaining, key=lambda i: (sim[i].item(), -i))
        assert math.isclose(r.similarity[k], sim[s].item(), rel_tol=1e-6)
        assert math.isclose(r.scales[k], scale[s].item(), rel_tol=1e-6)
        assert math.isclose(r.loss[k], loss, rel_tol=1e-6)
        chosen[s] = r.scales[k]
    assert math.isclose(r.loss[5], _measured(model, requests, chosen)[0], rel_tol=1e-6)


def test_loss_search_keeps_the_shortlisted_candidate_that_hurts_least(model, requests, searches):
    r = searches["loss"]
    assert r.forward_passes == 5 * (1 + 3) * 3
    chosen = {}
    for k, s in enumerate(r.order):
        _, sim, scale = _measured(model, requests, chosen)
        remaining = sorted((i for i in range(12) if i not in chosen), key=lambda i: (-sim[i].item(), i))[:3]
        assert s in remaining
        trial = {c: _measured(model, requests, {**chosen, c: scale[c].item()})[0] for c in remaining}
        assert trial[s] == pytest.approx(min(trial.values()), rel=1e-9)
        assert math.isclose(r.loss[k + 1], trial[s], rel_tol=1e-6)
        chosen[s] = scale[s].item()
    # On its own search data the loss search is never worse than re-measured similarity alone.
    assert r.loss[-1] <= searches["similarity"].loss[-1] + 1e-9


def test_blockpruner_removes_the_sublayer_whose_removal_raises_the_loss_least(model, requests, blockpruner):
    r = blockpruner
    assert r.method == "blockpruner" and r.scales == [1.0] * 5 and r.candidates == 12
    assert r.notes["variant"] == "all"
    # Per step: one statistics pass, then every remaining sublayer tried; per request.
    assert r.forward_passes == sum(1 + 12 - k for k in range(5)) * 3
    chosen, outside = {}, []
    for k, s in enumerate(r.order):
        loss, sim, _ = _measured(model, requests, chosen)
        assert math.isclose(r.loss[k], loss, rel_tol=1e-6)
        assert math.isclose(r.similarity[k], sim[s].item(), rel_tol=1e-6)
        # Brute force over every remaining sublayer, removed as identity, the earlier ones removed too.
        trial = {c: _measured(model, requests, {**chosen, c: 1.0})[0] for c in range(12) if c not in chosen}
        assert s == min(trial, key=lambda c: (trial[c], c))
        assert math.isclose(r.loss[k + 1], trial[s], rel_tol=1e-6)
        chosen[s] = 1.0
        outside.append(s not in sorted(trial, key=lambda c: (-sim[c].item(), c))[:4])
    assert any(outside)  # on this model some choice lies beyond a similarity shortlist of 4


def test_blockpruner_shortlist_tries_only_the_most_similar(model, requests, monkeypatch):
    tried = []
    measure = greedy._measure

    def spy(model_, requests_, skip, want_stats):
        if not want_stats:
            tried.append(dict(skip))
        return measure(model_, requests_, skip, want_stats)

    monkeypatch.setattr(greedy, "_measure", spy)
    r = search(model, requests, max_sublayers=3, method="blockpruner", candidates=3, progress=False)
    monkeypatch.undo()
    assert r.candidates == 3 and r.notes["variant"] == "shortlist" and "3 most similar" in r.notes["candidates"]
    assert r.forward_passes == 3 * (1 + 3) * 3 and r.scales == [1.0] * 3
    chosen = {}
    for k, s in enumerate(r.order):
        _, sim, _ = _measured(model, requests, chosen)
        top = sorted((i for i in range(12) if i not in chosen), key=lambda i: (-sim[i].item(), i))[:3]
        step = tried[3 * k:3 * k + 3]
        assert [set(t) - set(chosen) for t in step] == [{c} for c in top]
        assert all(t == {**chosen, c: 1.0} for t, c in zip(step, top))  # identity, earlier choices removed
        trial = {c: _measured(model, requests, {**chosen, c: 1.0})[0] for c in top}
        assert s == min(trial, key=lambda c: (trial[c], c))
        chosen[s] = 1.0
    assert len(tried) == 9


def test_blockpruner_plans_identity_without_online_learning(model, requests, profile, blockpruner):
    for mode in ("prefill", "decode", "e2e"):
        p = plan(profile, strategy="blockpruner", num_sublayers=3, mode=mode)
        assert p.skip_scales == {s: 1.0 for s in blockpruner.order[:3]}
        assert p.beta is None and not p.online and p.strategy == "blockpruner"
    assert "identity pass-through" in p.explanation and "every remaining sublayer" in p.explanation
    assert plan(profile, strategy="blockpruner", num_sublayers=0).skip_scales == {}
    with pytest.raises(ValueError, match="up to 5 sublayers"):
        plan(profile, strategy="blockpruner", num_sublayers=6)
    bare = calibrate(model, [[1, 2, 3, 4]], num_requests=1, prompt_len=4, progress=False)
    with pytest.raises(ValueError, match="no 'blockpruner' search.*--search blockpruner"):
        plan(bare, strategy="blockpruner", num_sublayers=2)
    costs = SublayerCosts([2.0, 1.0] * 6, 4.0, 1024, "prefill", "test")
    p = plan_at_speedup(profile, "blockpruner", 22 / 19, costs)  # odd budgets allowed: one attention may do
    k = len(p.skip_scales)
    assert list(p.skip_scales) == blockpruner.order[:k] and p.beta is None
    assert costs.speedup(blockpruner.order[:k - 1]) < 22 / 19 <= costs.speedup(blockpruner.order[:k]) + 1e-9


def test_calibrate_stores_the_blockpruner_search(model, requests, blockpruner):
    p = calibrate(model, requests, num_requests=3, prompt_len=40, progress=False, search="blockpruner",
                  search_max_sublayers=5, search_requests=3)
    stored = {k: v for k, v in p.search["blockpruner"].items() if k != "wall_s"}
    assert stored == {k: v for k, v in blockpruner.to_dict().items() if k != "wall_s"}
    # Left to the methods, the candidates differ: a shortlist of 4 for loss, every sublayer for blockpruner.
    both = calibrate(model, requests, num_requests=3, prompt_len=40, progress=False,
                     search=("loss", "blockpruner"), search_max_sublayers=1, search_requests=1)
    assert both.search["loss"]["candidates"] == 4 and both.search["blockpruner"]["candidates"] == 12
    # Every strategy that reads a search names one that calibrate can run.
    assert searches_needed(STRATEGIES) == ["blockpruner", "kl", "loss", "similarity"]
    assert searches_needed(["adaskip", "blockpruner", "greedy-loss", "shortgpt"]) == ["blockpruner", "loss"]


def test_search_rejects_bad_arguments(model, requests):
    with pytest.raises(ValueError, match="method"):
        search(model, requests, max_sublayers=2, method="random", progress=False)
    with pytest.raises(ValueError, match=r"max_sublayers must be in \[1, 10\]"):
        search(model, requests, max_sublayers=11, progress=False)
    with pytest.raises(ValueError, match="only 2 sublayers are allowed"):
        search(model, requests, max_sublayers=3, allowed=[1, 3], progress=False)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        search(model, requests, max_sublayers=2, method="blockpruner", candidates=0, progress=False)
    r = search(model, requests[:1], max_sublayers=2, method="similarity", allowed=[1, 3, 5], progress=False)
    assert set(r.order) <= {1, 3, 5}


def test_greedy_strategies_plan_from_the_stored_search(tmp_path, model, profile, searches):
    for method, r in searches.items():
        p = plan(profile, strategy=f"greedy-{method}", num_sublayers=3, mode="e2e")
        assert p.skip_scales == {s: c for s, c in zip(r.order[:3], r.scales[:3])}
        assert p.beta == min(r.similarity[:3]) and p.strategy == f"greedy-{method}"
        with pytest.raises(ValueError, match="up to 5 sublayers"):
            plan(profile, strategy=f"greedy-{method}", num_sublayers=6)
    path = tmp_path / "p.json"
    profile.save(path)
    assert ImportanceProfile.load(path).search == profile.search
    bare = calibrate(model, [[1, 2, 3, 4]], num_requests=1, prompt_len=4, progress=False)
    with pytest.raises(ValueError, match="--search loss"):
        plan(bare, strategy="greedy-loss", num_sublayers=2)
    broken = dict(profile.__dict__, search={"loss": {"order": [1, 99], "scales": [1.0, 1.0]}})
    with pytest.raises(ValueError, match=r"'loss' search orders sublayers outside \[0, 12\)"):
        ImportanceProfile(**broken)


def test_online_learning_runs_with_a_greedy_plan(model, profile):
    from adaskip import generate

    p = plan(profile, strategy="greedy-loss", num_sublayers=2, mode="e2e", window=2)
    out = generate(model, [[3, 4, 5, 6, 7]], max_new_tokens=6, plan=p)
    assert len(out.tokens[0]) == 6 and p.online


def test_plan_at_speedup_picks_the_fewest_sublayers_reaching_the_target(profile):
    # Attention costs 2, FFN 1, fixed part 4: total 22.
    costs = SublayerCosts([2.0, 1.0] * 6, 4.0, 1024, "prefill", "test")
    target = 22 / (22 - 4)  # e.g. two attentions
    for strategy in ("greedy-similarity", "shortgpt", "early-exit", "adaskip"):
        p = plan_at_speedup(profile, strategy, target, costs)
        assert costs.speedup(p.skip_scales) >= target - 1e-9
        assert p.predicted_speedup == pytest.approx(costs.speedup(p.skip_scales))
        if strategy == "greedy-similarity":
            order = profile.search["similarity"]["order"]
            k = len(p.skip_scales)
            assert costs.speedup(order[:k - 1]) < target <= costs.speedup(order[:k]) + 1e-9
        if strategy in ("shortgpt", "early-exit"):
            assert len(p.skip_scales) == 4  # whole layers: 2 x (2 + 1) >= 4 > 3
    with pytest.raises(ValueError, match="cannot reach"):
        plan_at_speedup(profile, "greedy-loss", 22 / 4.5, costs)
    with pytest.raises(ValueError, match="costs are for 2 layers"):
        plan_at_speedup(profile, "shortgpt", 1.1, SublayerCosts([1.0] * 4, 1.0, 1024, "prefill", "test"))
    with pytest.raises(ValueError, match=">= 1"):
        plan_at_speedup(profile, "shortgpt", 0.5, costs)


def test_report_table_and_plots(tmp_path, profile):
    rows = [
        {"strategy": "shortgpt", "budget": 4, "target_speedup": None, "predicted_speedup": 1.2,
         "skipped_attention": 2, "skipped_ffn": 2, "metrics": {"perplexity": 40.0, "top1_agreement": 0.6}},
        {"strategy": "full", "budget": 0, "target_speedup": None, "predicted_speedup": 1.0,
         "skipped_attention": 0, "skipped_ffn": 0, "metrics": {"perplexity": 20.0, "top1_agreement": 1.0}},
        {"strategy": "shortgpt", "budget": 8, "target_speedup": None, "predicted_speedup": 1.4,
         "skipped_attention": 4, "skipped_ffn": 4, "metrics": {"perplexity": 80.0, "top1_agreement": 0.5}},
        {"strategy": "greedy-loss", "budget": 5, "target_speedup": 1.3, "predicted_speedup": 1.31,
         "skipped_attention": 3, "skipped_ffn": 2, "metrics": {"perplexity": 30.0}},
    ]
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| strategy | budget |") and "perplexity" in table[0] and "top1_agreement" in table[0]
    assert table[2].startswith("| full |") and "20.00" in table[2]
    assert "x1.3 (5 sublayers)" in table[5] and table[5].endswith("| 30.00 | – |")
    png = plot_quality(rows, tmp_path / "q.png")
    assert png.stat().st_size > 10_000
    heat = plot_profile_heatmap(profile, tmp_path / "h.png")
    assert heat.stat().st_size > 5_000


def test_retrieval_points_and_plot_per_length(tmp_path):
    def row(strategy, budget, by_length, speedup=None):
        cells = {n: {"correct": c, "total": t} for n, (c, t) in by_length.items()}
        return {"strategy": strategy, "budget": budget, "target_speedup": speedup, "metrics": {},
                "details": {"passkey": {"by_length": cells}}}

    rows = [row("greedy-kl", 16, {"2048": (3, 6), "4096": (1, 6)}),
            row("full", 0, {"2048": (6, 6), "4096": (5, 6)}),
            row("greedy-kl", 8, {"2048": (6, 6), "4096": (4, 6)}),
            row("greedy-kl", 9, {"2048": (0, 6)}, speedup=1.2)]  # an equal-time row: not a budget point
    points = retrieval_points(rows, "passkey")
    assert points["full"] == {2048: [(0, 1.0)], 4096: [(0, 5 / 6)]}
    assert points["greedy-kl"] == {2048: [(8, 1.0), (16, 0.5)], 4096: [(8, 4 / 6), (16, 1 / 6)]}
    assert retrieval_points(rows, "needle") == {}
    png = plot_retrieval(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_retrieval(rows, tmp_path / "none.png", kinds=("needle",)) is None


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["similarity", "loss", "blockpruner", "kl"])
def test_a_resumed_search_makes_the_choices_an_uninterrupted_one_makes(tmp_path, model, requests, profile, method):
    """Stopped after two choices, kept in a saved profile (stand-ins and all), and resumed: the
    same choices, scales, similarities, losses (and KL) as the search that never stopped. A
    finished search of fewer sublayers extends the same way."""
    kw = dict(method=method, candidates=3, progress=False)
    whole = search(model, requests, max_sublayers=5, **kw)
    kept = []

    def stop_after_two(partial):
        kept.append(partial)
        if len(partial.order) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        search(model, requests, max_sublayers=5, on_step=stop_after_two, **kw)
    p = copy.deepcopy(profile)
    p.add_search(kept[-1])
    p.save(tmp_path / "partial.json")
    partial = ImportanceProfile.load(tmp_path / "partial.json").search_result(method)
    assert partial.notes["complete"] is False and len(partial.order) == 2
    shorter = search(model, requests, max_sublayers=3, **kw)
    for start in (partial, shorter):
        calls = []
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            resumed = search(model, requests, max_sublayers=5, resume=start, **kw)
        finally:
            hook.remove()
        if start is partial:  # only the steps after the stop ran (and kl's full-model references again)
            again = len(requests) if method == "kl" else 0
            assert len(calls) == whole.forward_passes - partial.forward_passes + again
        assert resumed.order == whole.order and resumed.scales == whole.scales
        assert resumed.similarity == whole.similarity and resumed.loss == whole.loss
        assert resumed.objective == whole.objective and resumed.notes == whole.notes
        if method == "kl":  # the stand-ins of the resumed choices are the ones fitted before the stop
            assert all(torch.equal(a["linear"].up, b["linear"].up) for a, b in zip(resumed.fits, whole.fits))
        elif start is partial:  # (a finished search may have measured its last loss once more)
            assert resumed.forward_passes == whole.forward_passes


def test_a_search_resumes_only_its_own_beginning(model, requests):
    kw = dict(max_sublayers=4, candidates=3, progress=False)
    loss = search(model, requests, method="loss", max_sublayers=2, candidates=3, progress=False)
    kl = search(model, requests, method="kl", max_sublayers=2, candidates=3, progress=False)
    others = [list(reversed(r)) for r in requests]
    cases = [
        (dict(method="similarity", resume=loss), "cannot resume a 'similarity' search from a 'loss' one"),
        (dict(method="loss", resume=loss, requests=others), "read other requests"),
        (dict(method="loss", resume=loss, candidates=2), "tried 3 candidates per step, this one would try 2"),
        (dict(method="loss", resume=loss, max_sublayers=1), "already chose 2 sublayers"),
        (dict(method="loss", resume=loss, allowed=[s for s in range(12) if s != loss.order[0]]), "not allowed"),
        (dict(method="kl", resume=kl, weighting="uniform"), "other settings"),
        (dict(method="kl", resume=kl, stand_in="channel"), "other settings"),
        (dict(method="loss", resume=loss.to_dict()), "takes a SearchResult"),
        (dict(method="loss", resume=greedy.SearchResult(**{**loss.to_dict(), "notes": {}})), "records no hash"),
        (dict(method="kl", resume=greedy.SearchResult.from_dict(kl.to_dict())), "lacks the stand-ins"),
    ]
    for extra, needle in cases:
        args = {**kw, **extra}
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            search(model, args.pop("requests", requests), **args)
