"""Plans that keep what a long prompt says: retrieval probes built from calibration text, the kl
search scored on them as well as on text, stand-ins whose ridge is chosen on held-out tokens,
retrieval in the validation and plan(min_retrieval=) (tiny random model and a word tokenizer,
CPU)."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

import adaskip
from adaskip.cli import main
from adaskip.cli.planning import build_plan
from adaskip.runtime.generation import generate
from adaskip.runtime.skip_plan import SkipPlan
from adaskip.skipping import greedy
from adaskip.skipping import calibration
from adaskip.skipping.calibration import calibrate, retrieval_hits, validate
from adaskip.skipping.costs import paper_speedup
from adaskip.skipping.measurement import divergence, probe_divergence, probe_references, reference_logprobs
from adaskip.skipping.probes import MIN_PROBE_LEN, PROBE_KINDS, Probe, answer_found, make_probe, make_probes
from adaskip.skipping.profile import ImportanceProfile
from adaskip.skipping.stand_ins import DEFAULT_RIDGE, RIDGE_GRID, StandInFit, held_out_error

from behaviour_cases import tiny_model
from helpers import random_requests
from test_retrieval import WordTokenizer, _texts


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def long_model():
    """The tiny model with room for probes of MIN_PROBE_LEN tokens."""
    return tiny_model("llama", max_position_embeddings=2 * MIN_PROBE_LEN)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="module")
def windows(tokenizer):
    ids = tokenizer(" ".join(_texts()))["input_ids"]
    return [ids[i:i + 600] for i in range(0, 6000, 600)]


# -- probes ---------------------------------------------------------------------------------------

def test_probes_have_the_asked_length_kinds_answer_and_depth(tokenizer, windows):
    probes = make_probes(tokenizer, windows, 6, length=500, seed="t")
    assert [p.kind for p in probes] == ["passkey", "word"] * 3
    for p in probes:
        assert 0.8 * 500 <= len(p.ids) <= 500
        assert p.ids[p.answer_start:] == tokenizer(" " + p.answer)["input_ids"]
        assert p.prompt == p.ids[:p.answer_start] and p.answer_positions == list(range(p.answer_start - 1,
                                                                                        len(p.ids) - 1))
        text = tokenizer.decode(p.prompt)
        assert text.count(p.answer) >= 2  # stated in the haystack, not yet in the answer
        # Where the fact sits: its first statement at about `depth` of the haystack's words.
        words = text.split()
        first = words.index(p.answer) / len(words)
        assert abs(first - p.depth) < 0.1
        # Never the eval's wording (adaskip.evaluation.retrieval): its plans are judged on tasks they never saw.
        assert "pass key" not in text and "Captain Ada" not in text and "spice" not in text
    assert [p.ids for p in make_probes(tokenizer, windows, 6, length=500, seed="t")] == [p.ids for p in probes]
    other = make_probes(tokenizer, windows, 6, length=500, seed="other")
    assert [p.answer for p in other] != [p.answer for p in probes]
    assert {p.kind for p in make_probes(tokenizer, windows, 3, length=500, seed="t", kinds=["word"])} == {"word"}


def test_probe_errors(tokenizer, windows):
    with pytest.raises(ValueError, match="question alone"):
        make_probes(tokenizer, windows, 1, length=20, seed="t")
    with pytest.raises(ValueError, match="calibration text"):
        make_probes(tokenizer, [], 1, length=500, seed="t")
    with pytest.raises(ValueError, match=">= 1"):
        make_probes(tokenizer, windows, 0, length=500, seed="t")
    with pytest.raises(ValueError, match="kinds"):
        make_probes(tokenizer, windows, 1, length=500, seed="t", kinds=["needle"])
    with pytest.raises(ValueError, match="kind"):
        make_probe(tokenizer, windows[0], 500, "needle", random.Random(0))
    with pytest.raises(ValueError, match="sentence end"):
        make_probe(tokenizer, tokenizer("no sentence ends here at all")["input_ids"] * 40, 100, "word",
                   random.Random(0))


def test_answer_found():
    key = Probe("passkey", [1, 2], 1, "48213", 0.5)
    assert answer_found(key, " 48213.") and not answer_found(key, "148213") and not answer_found(key, "4821")
    word = Probe("word", [1, 2], 1, "violin", 0.5)
    assert answer_found(word, "The secret word is Violin!") and not answer_found(word, "violins")


# -- the search's retrieval objective -------------------------------------------------------------

def _random_probes(n, length=48, answer=3, seed=3, vocab=101):
    """Probes on the tiny model's vocabulary: random prompts whose 'answer' is the last tokens."""
    g = torch.Generator().manual_seed(seed)
    return [Probe("passkey", torch.randint(0, vocab, (length,), generator=g).tolist(), length - answer, "x", 0.5)
            for _ in range(n)]


def test_logits_at_several_positions_per_sequence(model):
    ids = torch.tensor(random_requests(2, length=20, seed=4))
    at = torch.tensor([[3, 7, 19], [0, 5, 6]])
    full = model(ids)
    got = model(ids, logits_index=at)
    assert got.shape == (2, 3, full.shape[-1])
    assert torch.allclose(got, full[torch.arange(2)[:, None], at], atol=1e-5, rtol=1e-5)


def test_probe_divergence_is_the_kl_on_answer_tokens_only(model):
    probes = _random_probes(2)
    refs = probe_references(model, probes)
    m = model.args.num_layers
    p = SkipPlan(m, {1: 1.0, 4: 1.0})
    kl, nll = probe_divergence(model, probes, refs, p)
    want_kl, want_nll = 0.0, 0.0
    for probe in probes:
        ids = torch.tensor([probe.ids])
        full = model(ids)[0].log_softmax(-1)[probe.answer_positions]
        skip = model(ids, plan=p)[0].log_softmax(-1)[probe.answer_positions]
        want_kl += (full.exp() * (full - skip)).sum(-1).mean().item() / 2
        want_nll += -skip[range(3), probe.ids[probe.answer_start:]].mean().item() / 2
    assert kl == pytest.approx(want_kl, rel=1e-4) and nll == pytest.approx(want_nll, rel=1e-4)
    assert kl > 0 and probe_divergence(model, probes, refs, None)[0] == pytest.approx(0.0, abs=1e-6)


def test_the_objective_mixes_text_and_retrieval_and_each_choice_is_the_best(model):
    requests, probes = random_requests(2, seed=5), _random_probes(3)
    m = model.args.num_layers
    weight = 5.0
    r = greedy.search(model, requests, max_sublayers=2, method="kl", candidates=2 * m, stand_in="channel",
                      weighting="uniform", progress=False, probes=probes, retrieval_weight=weight)
    n = r.notes
    assert n["retrieval_weight"] == weight and n["retrieval_probes"] == 3 and "retrieval probes" in n["objective"]
    for k in (1, 2):
        assert r.objective[k] == pytest.approx(n["text_kl"][k] + weight * n["retrieval_kl"][k], rel=1e-9)
    # Brute force of the first choice: every sublayer, its channel stand-in fitted on text and probes.
    refs, probe_refs = reference_logprobs(model, requests), probe_references(model, probes)
    scores = {}
    for s in range(2 * m):
        fit = StandInFit([s], model.args.hidden_size, linear=False)
        for q in list(requests) + [p.ids for p in probes]:
            model(torch.tensor([q]), taps=fit)
            fit.flush()
        plan = SkipPlan(m, {s: 1.0}, stand_ins={s: fit.fit(s, "channel")})
        scores[s] = (divergence(model, requests, refs, plan, weighting="uniform")[0]
                     + weight * probe_divergence(model, probes, probe_refs, plan)[0])
    assert r.order[0] == min(scores, key=scores.get)
    assert r.objective[1] == pytest.approx(scores[r.order[0]], rel=1e-5)
    # The full model's own answer NLL is the first entry; references once, then per step:
    # statistics (text), fitting (text + probes), each candidate (text + probes).
    assert n["retrieval_nll"][0] > 0
    assert r.forward_passes == 5 + 2 * (2 + 5) + 5 * (2 * m + 2 * m - 1)


def test_retrieval_settings_are_checked(model):
    requests, probes = random_requests(2, seed=5), _random_probes(2)
    kw = dict(max_sublayers=1, progress=False)
    with pytest.raises(ValueError, match="needs retrieval probes"):
        greedy.search(model, requests, method="kl", retrieval_weight=1.0, **kw)
    with pytest.raises(ValueError, match="weight 0"):
        greedy.search(model, requests, method="kl", probes=probes, **kw)
    with pytest.raises(ValueError, match=">= 0"):
        greedy.search(model, requests, method="kl", probes=probes, retrieval_weight=-1.0, **kw)
    with pytest.raises(ValueError, match="kl search only"):
        greedy.search(model, requests, method="loss", probes=probes, retrieval_weight=1.0, **kw)
    with pytest.raises(ValueError, match="at least one answer token"):
        greedy.search(model, requests, method="kl", probes=[Probe("word", [1, 2], 2, "x", 0.5)],
                      retrieval_weight=1.0, **kw)
    # A resumed search must have used the same weight and probes.
    first = greedy.search(model, requests, method="kl", probes=probes, retrieval_weight=1.0, candidates=2, **kw)
    with pytest.raises(ValueError, match="other settings"):
        greedy.search(model, requests, method="kl", probes=probes, retrieval_weight=2.0, candidates=2,
                      max_sublayers=2, resume=first, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        greedy.search(model, requests, method="kl", probes=_random_probes(2, seed=9), retrieval_weight=1.0,
                      candidates=2, max_sublayers=2, resume=first, progress=False)
    resumed = greedy.search(model, requests, method="kl", probes=probes, retrieval_weight=1.0, candidates=2,
                            max_sublayers=2, resume=first, progress=False)
    whole = greedy.search(model, requests, method="kl", probes=probes, retrieval_weight=1.0, candidates=2,
                          max_sublayers=2, progress=False)
    assert resumed.order == whole.order and resumed.objective == pytest.approx(whole.objective)
    assert resumed.notes["retrieval_kl"] == pytest.approx(whole.notes["retrieval_kl"])


def test_calibrate_builds_probes_only_where_they_fit(model, long_model):
    data = random_requests(3, length=MIN_PROBE_LEN)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(long_model, data, num_requests=2, prompt_len=MIN_PROBE_LEN, progress=False, search="kl",
                  search_max_sublayers=1, search_retrieval_weight=1.0)
    with pytest.raises(ValueError, match=f"at least {MIN_PROBE_LEN}"):
        calibrate(model, random_requests(3), num_requests=2, prompt_len=40, progress=False, search="kl",
                  search_max_sublayers=1, search_retrieval_weight=1.0)
    # Token lists and no tokenizer: text alone, recorded as such.
    profile = calibrate(model, random_requests(3), num_requests=2, prompt_len=40, progress=False, search="kl",
                        search_max_sublayers=1, search_candidates=2)
    assert profile.search["kl"]["notes"]["retrieval_weight"] == 0.0


def test_calibrate_with_text_scores_probes_of_the_prompt_length(long_model):
    tok = _SmallVocab()
    text = " ".join(_texts(800, seed=2))
    profile = calibrate(long_model, [text], tokenizer=tok, num_requests=2, prompt_len=MIN_PROBE_LEN, progress=False,
                        search="kl", search_max_sublayers=1, search_candidates=2, search_probes=2,
                        validate_budgets=[1], validate_strategies=["greedy-kl"], validation_requests=2,
                        validation_probes=3)
    notes = profile.search["kl"]["notes"]
    assert notes["retrieval_weight"] == calibration.DEFAULT_RETRIEVAL_WEIGHT == 4.0 and notes["retrieval_probes"] == 2
    assert MIN_PROBE_LEN * 2 * 0.8 <= notes["probe_tokens"] <= MIN_PROBE_LEN * 2
    v = profile.validation["greedy-kl"]
    assert v["retrieval_probes"] == 3 and 0.8 * MIN_PROBE_LEN <= v["retrieval_length"] <= MIN_PROBE_LEN
    assert len(v["retrieval_hits"]) == 1 and 0 <= v["retrieval_full_hits"] <= 3
    # Longer validation probes join the held-out windows end to end.
    longer = calibrate(long_model, [text], tokenizer=tok, num_requests=2, prompt_len=MIN_PROBE_LEN, progress=False,
                       search="kl", search_max_sublayers=1, search_candidates=2, search_retrieval_weight=0.0,
                       validate_budgets=[1], validate_strategies=["greedy-kl"], validation_requests=3,
                       validation_probes=2, validation_len=2 * MIN_PROBE_LEN - 10)
    assert longer.validation["greedy-kl"]["retrieval_length"] > 1.6 * MIN_PROBE_LEN
    with pytest.raises(ValueError, match="more validation requests"):
        calibrate(long_model, [text], tokenizer=tok, num_requests=2, prompt_len=MIN_PROBE_LEN, progress=False,
                  validate_budgets=[1], validation_requests=1, validation_probes=2,
                  validation_len=2 * MIN_PROBE_LEN - 10)
    with pytest.raises(ValueError, match="validation_probes=0"):
        calibrate(long_model, [text], tokenizer=tok, num_requests=2, prompt_len=MIN_PROBE_LEN, progress=False,
                  validate_budgets=[1], validation_requests=1, validation_probes=2, validation_len=100)


class _SmallVocab(WordTokenizer):
    """The word tokenizer folded onto the tiny model's 101 ids (decoding reads the first word of
    each id): enough for a calibration run over text."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [i % 101 for i in super().__call__(text)["input_ids"]]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[i] if i < len(self.words) else "?" for i in ids)


# -- ridge by held-out error ------------------------------------------------------------------------

def _linear_data(n, noise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 12, generator=g) / 4
    return x, x @ w + noise * torch.randn(n, 12, generator=g)


def test_held_out_error_equals_the_squared_error_it_stands_for():
    x, f = _linear_data(50, 0.3, 1)
    fit = StandInFit([0], 12)
    fit(0, x[None], torch.zeros(1, 50, 12), f[None])
    fit.flush()
    stand_in = fit.fit(0, "linear", rank=5, ridge=0.1)
    fitted = {"down": stand_in.down, "down_bias": stand_in.down_bias, "up": stand_in.up}
    x2, f2 = _linear_data(30, 0.3, 2)
    xa = torch.cat([x2, torch.ones(30, 1)], 1).double()
    G, C, ff = xa.t() @ xa, xa.t() @ f2.double(), (f2.double() ** 2).sum()
    predicted = (x2 @ stand_in.down.t() + stand_in.down_bias) @ stand_in.up.t()
    assert held_out_error(fitted, G, C, ff) == pytest.approx(((f2 - predicted) ** 2).sum().item(), rel=1e-4)


def test_the_ridge_is_chosen_on_the_other_fold():
    def chosen(n, noise):
        fit = StandInFit([0], 12)
        x, f = _linear_data(n, noise, 3)
        for xs, fs in zip(x.chunk(4), f.chunk(4)):  # four requests, alternating folds
            fit(0, xs[None], torch.zeros_like(xs)[None], fs[None])
            fit.flush()
        fit.fit(0, "linear", rank=12)
        return fit.ridge[0]

    few_noisy, many_clean = chosen(16, 3.0), chosen(4000, 0.01)
    assert few_noisy in RIDGE_GRID and many_clean in RIDGE_GRID
    assert few_noisy > many_clean  # the noisy few tokens need shrinking, the clean many do not
    one = StandInFit([0], 12)
    x, f = _linear_data(40, 0.1, 4)
    one(0, x[None], torch.zeros_like(x)[None], f[None])
    one.fit(0, "linear")
    assert one.ridge[0] == DEFAULT_RIDGE  # one request: nothing held out


# -- validation and min_retrieval -----------------------------------------------------------------

class _IdsText:
    """Decodes ids as their numbers: a probe's answer is then a string of ids."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


def _greedy_probes(model, n, seed=7):
    """Probes whose answer is the full model's own first greedy token (so it finds them)."""
    probes = []
    for p in _random_probes(n, seed=seed, answer=1):
        first = generate(model, [p.prompt], max_new_tokens=1).tokens[0][0]
        probes.append(Probe("word", p.prompt + [first], p.answer_start, f"t{first}", 0.5))
    return probes


def test_validation_counts_the_probes_each_plan_answers(model, tmp_path):
    data = random_requests(6)
    profile = calibrate(model, data, num_requests=3, prompt_len=64, progress=False, search="similarity",
                        search_max_sublayers=6)
    probes = _greedy_probes(model, 4)
    v = validate(model, profile, data[3:], strategies=["adaskip"], budgets=[2, 6], probes=probes,
                 tokenizer=_IdsText())["adaskip"]
    assert v["retrieval_full_hits"] == 4 and v["retrieval_probes"] == 4
    for k, hits in zip([2, 6], v["retrieval_hits"]):
        p = adaskip.plan(profile, strategy="adaskip", num_sublayers=k)
        answers = [_IdsText().decode(generate(model, [q.prompt], max_new_tokens=5, plan=p).tokens[0]) for q in probes]
        assert hits == sum(answer_found(q, a) for q, a in zip(probes, answers))
    assert retrieval_hits(model, _IdsText(), probes, {"full": None}) == {"full": 4}
    with pytest.raises(ValueError, match="tokenizer"):
        validate(model, profile, data[3:], strategies=["adaskip"], budgets=[2], probes=probes)
    # Stored, loaded, and refused when malformed.
    profile.validation["adaskip"] = v
    path = tmp_path / "p.json"
    profile.save(path)
    assert ImportanceProfile.load(path).validation["adaskip"]["retrieval_hits"] == v["retrieval_hits"]
    profile.validation["adaskip"] = {**v, "retrieval_hits": [9, 0]}
    profile.save(path)
    with pytest.raises(ValueError, match="retrieval hits"):
        ImportanceProfile.load(path)


def _with_retrieval(model, hits, full=8):
    data = random_requests(6)
    profile = calibrate(model, data, num_requests=3, prompt_len=64, progress=False)
    budgets = [1, 2, 4, 6]
    profile.validation["adaskip"] = {"budgets": budgets, "kl": [0.01] * 4, "top1_agreement": [0.9, 0.8, 0.7, 0.6],
                                     "perplexity": [1.0] * 4,
                                     "sublayers": [sorted(profile.ranking()[:k]) for k in budgets],
                                     "requests": 1, "tokens": 1, "retrieval_hits": hits, "retrieval_full_hits": full,
                                     "retrieval_probes": 8, "retrieval_length": 64}
    return profile


def test_min_retrieval_picks_the_fastest_plan_keeping_that_share_of_the_full_models_hits(model):
    profile = _with_retrieval(model, [8, 7, 8, 3])
    m = profile.num_layers
    for share, want in ((1.0, 4), (0.9, 4), (0.85, 4), (0.3, 6), (0.0, 6)):
        p = adaskip.plan(profile, min_retrieval=share)
        assert len(p.skip_scales) == want and p.predicted_speedup == paper_speedup(m, want)
    assert "retrieval probes found 8 of 8 (full model 8)" in adaskip.plan(profile, min_retrieval=1.0).explanation
    # With agreement as well: both must hold.
    assert len(adaskip.plan(profile, min_retrieval=0.9, min_agreement=0.75).skip_scales) == 1
    assert len(adaskip.plan(profile, min_retrieval=0.9, min_agreement=0.95).skip_scales) == 0
    none = _with_retrieval(model, [1, 0, 0, 0])
    assert adaskip.plan(none, min_retrieval=0.5).skip_scales == {}


def test_min_retrieval_errors(model):
    profile = _with_retrieval(model, [8, 7, 8, 3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adaskip.plan(profile, min_retrieval=1.5)
    with pytest.raises(ValueError, match="not both"):
        adaskip.plan(profile, min_retrieval=0.9, num_sublayers=2)
    del profile.validation["adaskip"]["retrieval_hits"]
    with pytest.raises(ValueError, match="measured no retrieval"):
        adaskip.plan(profile, min_retrieval=0.9)


def _main_error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_cli_min_retrieval_and_repeats(model, tmp_path):
    profile = _with_retrieval(model, [8, 7, 8, 3])
    path = tmp_path / "p.json"
    profile.save(path)
    args = SimpleNamespace(profile=str(path), strategy="adaskip", planner="paper", context_len=None, mode="e2e",
                           window=20, alpha=None, num_sublayers=None, min_agreement=None, max_kl=None,
                           stand_in=None, min_retrieval=0.85)
    assert build_plan(args, model).to_dict() == adaskip.plan(profile, min_retrieval=0.85,
                                                               model_args=model.args).to_dict()
    assert "--min-retrieval must be in [0, 1]" in _main_error(["run", "--profile", str(path), "--min-retrieval",
                                                                "2", "--prompt", "x"])
    assert "not both" in _main_error(["run", "--min-retrieval", "0.9", "--num-sublayers", "4", "--prompt", "x"])
    assert "give --profile" in _main_error(["demo", "--min-retrieval", "0.9"])
    assert "--repeats must be >= 1" in _main_error(["demo", "--repeats", "0"])
    assert "--lossless" in _main_error(["run", "--prompt", "x", "--lossless", "--repeats", "3"])
    assert "--search-probes >= 1" in _main_error(["calibrate", "--data", "essays", "--out", str(tmp_path / "q.json"),
                                                  "--search-retrieval-weight", "1", "--search-probes", "0"])
    assert "--validation-len must be >= 64" in _main_error(["calibrate", "--data", "essays", "--out",
                                                            str(tmp_path / "q.json"), "--validation-len", "8"])


# -- trials that begin at their candidate ----------------------------------------------------------

def test_a_forward_from_a_start_sublayer_is_the_whole_forward_bit_for_bit(model):
    from adaskip.runtime.stand_in import StandIn

    m = model.args.num_layers
    ids = torch.tensor(random_requests(1, length=30, seed=8))
    g = torch.Generator().manual_seed(0)
    linear = StandIn("linear", down=torch.randn(4, 64, generator=g) / 8, down_bias=torch.zeros(4),
                     up=torch.randn(64, 4, generator=g) / 8)
    earlier = {1: 1.1, 2: 0.9}
    kept = {}

    def keep(s, x, h, out):
        kept[s] = (x.clone(), h.clone())

    model(ids, plan=SkipPlan(m, earlier, stand_ins={1: linear}), taps=keep)
    for s in (3, 4, 7):
        plan = SkipPlan(m, {**earlier, s: 1.05}, stand_ins={1: linear})
        whole = model(ids, plan=plan)
        x, h = kept[s]
        resumed = model(ids, plan=plan, start=(s, x, h))
        assert torch.equal(resumed, whole)
        assert torch.equal(x, kept[s][0]) and torch.equal(h, kept[s][1])  # copied, not written
    with pytest.raises(ValueError, match="sublayer must be in"):
        model(ids, start=(2 * m, *kept[3]))
    with pytest.raises(ValueError, match="shape"):
        model(ids, start=(3, kept[3][0][:, :5], kept[3][1]))
    with pytest.raises(ValueError, match="no statistics"):
        model(ids, start=(3, *kept[3]), stats=torch.zeros(2 * m, 1, 3))


def test_the_shortlist_with_probes_holds_attention_and_ffn(model):
    requests, probes = random_requests(2, seed=5), _random_probes(2)
    r = greedy.search(model, requests, max_sublayers=2, method="kl", candidates=4, progress=False, probes=probes,
                      retrieval_weight=1.0)
    assert "attention and FFN in equal numbers" in r.notes["candidates"]
    assert greedy._balanced([0, 2, 4, 1, 6, 3], 4) == [0, 2, 1, 3]
    assert greedy._balanced([0, 2, 4], 2) == [0, 2]
    # Work in whole-forward equivalents: below the passes counted whole, since trials begin at their candidate.
    assert 0 < r.notes["pass_equivalents"] < r.forward_passes
