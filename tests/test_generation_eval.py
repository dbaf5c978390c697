"""The generation task: prompts of the asked length, the fidelity metrics, and rows that match
generations made directly (learning on and off, the dtype floor, extra FFNs, KV bytes)."""
import dataclasses
import random

import pytest
import torch

from adaskip import SkipPlan
from adaskip.evaluation import generation as g
from adaskip.evaluation.harness import EvalSettings, run_eval
from adaskip.runtime.config import ModelArgs
from adaskip.runtime.generation import generate
from adaskip.skipping.costs import SublayerCosts

from helpers import tiny_llama
from test_retrieval import WordTokenizer as _Words


class WordTokenizer(_Words):
    """The retrieval tests' word tokenizer; ids the tiny model makes past its words read as <id>."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[i] if i < len(self.words) else f"<{i}>" for i in ids)


def _docs(n_docs=6, words_per_doc=900, seed=2):
    rng = random.Random(seed)
    words = "river stone lamp garden winter market letter engine cloud harbor . ,".split()
    return [" ".join(rng.choice(words) for _ in range(words_per_doc)) for _ in range(n_docs)]


DOCS = _docs()


def _tiny_model(vocab_size):
    return tiny_llama(vocab_size, context=512, layers=3, scale=0.3)


# -- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, ref, expected", [
    ([1, 2, 3], [1, 2, 3], 1.0),
    ([1, 1, 2], [1, 2, 2, 2], 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),  # 2 shared: {1: 1, 2: 1}
    ([5], [6], 0.0),
    ([], [], 1.0),
    ([], [1], 0.0),
])
def test_token_f1(pred, ref, expected):
    assert g.token_f1(pred, ref) == pytest.approx(expected)


def test_common_prefix_and_rouge():
    assert g.common_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert g.common_prefix([1, 2], [1, 2, 3]) == 2
    assert g.common_prefix([], [1]) == 0
    assert g.text_rouge_l("", " ") == 1.0
    assert g.text_rouge_l("the cat", "") == 0.0
    assert g.text_rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)


def test_kv_bytes_and_decode_speedup():
    args = ModelArgs.from_hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    # 1 layer x (K and V) x 2 heads x 8 dims x 10 tokens x 2 bytes
    assert g.kv_bytes(args, {1}, 10, 2) == 2 * 2 * 8 * 10 * 2
    costs = SublayerCosts([1.0, 2.0, 1.0, 2.0], fixed=2.0, context_len=10, mode="decode", source="model")
    plan = SkipPlan(2, {0: 1.0})
    # no online skips: every step costs 8 - 1 = 7 of 8
    assert g.decode_speedup(costs, plan, [], 10, 4, 0.0) == pytest.approx(8 / 7)
    # FFN 3 gated off after a 4-token window: 4 steps at 7, 6 steps at 5
    assert g.decode_speedup(costs, plan, [3], 10, 4, 0.0) == pytest.approx(80 / (4 * 7 + 6 * 5))
    # a stand-in's added work counts in every step
    assert g.decode_speedup(costs, plan, [], 10, 4, 0.5) == pytest.approx(8 / 7.5)


# -- prompts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [80, 200, 513])
def test_prompts_fill_the_length_and_end_with_the_instruction(n):
    tok = WordTokenizer()
    prompts = g.make_prompts(tok, DOCS, [n], 3, "summarize", seed=1)
    assert len(prompts) == 3
    for p in prompts:
        assert p.length == n and 0.97 * n <= len(p.ids) <= n
        assert tok.decode(p.ids).endswith("Summarize the text above .")
        window = tok(DOCS[p.document], add_special_tokens=False)["input_ids"]
        body = p.ids[:-len(tok("Summarize the text above.")["input_ids"])]
        assert body == window[p.start:p.start + len(body)]  # a contiguous window of the document


def test_prompts_are_seeded():
    tok = WordTokenizer()
    a = g.make_prompts(tok, DOCS, [100, 150], 4, seed=0)
    b = g.make_prompts(tok, DOCS, [100, 150], 4, seed=0)
    c = g.make_prompts(tok, DOCS, [100, 150], 4, seed=1)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert [p.ids for p in a] != [p.ids for p in c]
    assert len({(p.document, p.start) for p in a}) == 8


def test_prompts_bad_input():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="instruction must be one of"):
        g.make_prompts(tok, DOCS, [100], 1, "translate")
    with pytest.raises(ValueError, match="per length must be >= 1"):
        g.make_prompts(tok, DOCS, [100], 0)
    with pytest.raises(ValueError, match="no evaluation document has"):
        g.make_prompts(tok, DOCS, [5000], 1)
    with pytest.raises(ValueError, match="leaves no room"):
        g.make_prompts(tok, DOCS, [8], 1)
    with pytest.raises(ValueError, match="needs documents"):
        g.make_prompts(tok, [], [100], 1)


# -- the task on a real (tiny) model ------------------------------------------------------------


def _setup():
    tok = WordTokenizer()
    prompts = g.make_prompts(tok, DOCS, [60, 90], 2, seed=0)
    model = _tiny_model(len(tok.words) + 8)
    return tok, prompts, model


def test_rows_match_direct_generations():
    tok, prompts, model = _setup()
    # beta -1: every candidate FFN reaches it, so each is gated off after the 3-token window.
    online = SkipPlan(3, {0: 1.0, 3: 1.0}, strategy="adaskip", beta=-1.0, window=3)
    static = SkipPlan(3, {2: 1.0}, strategy="shortgpt")
    out = g.evaluate_generation(model, tok, prompts, {"a": online, "s": static}, max_new_tokens=12,
                                floor_dtype=torch.bfloat16, progress=False)
    names = [r["name"] for r in out["rows"]]
    assert names == ["full/bfloat16", "a", "a/no-online", "s"]
    rows = {r["name"]: r for r in out["rows"]}

    eos = set(model.args.eos_token_ids)
    ref = [[t for t in ids if t not in eos] for ids in generate(model, [p.ids for p in prompts],
                                                                max_new_tokens=12).tokens]
    assert out["reference"]["generations"] == [tok.decode(r) for r in ref]
    for name, plan in (("a", online), ("a/no-online", dataclasses.replace(online, beta=None)), ("s", static)):
        res = [generate(model, [p.ids], max_new_tokens=12, plan=plan) for p in prompts]
        toks = [[t for t in r.tokens[0] if t not in eos] for r in res]
        row = rows[name]
        assert row["generations"] == [tok.decode(t) for t in toks]
        assert row["common_prefix"] == pytest.approx(sum(g.common_prefix(t, r) for t, r in zip(toks, ref)) / 4)
        assert row["token_f1"] == pytest.approx(sum(g.token_f1(t, r) for t, r in zip(toks, ref)) / 4)
        extra = [r.online_skipped[0] if r.online_skipped else [] for r in res]
        assert row["extra_ffns_gated"] == pytest.approx(sum(map(len, extra)) / 4)
        layers = plan.attention_layers
        assert row["kv_bytes"] == pytest.approx(
            sum(g.kv_bytes(model.args, layers, len(p.ids) + len(t), 4) for p, t in zip(prompts, toks)) / 4)
    # learning gated off the FFNs the plan runs (1 and 5), never one the plan skips already
    assert rows["a"]["online"] is True and rows["a"]["extra_ffns_gated"] == 2
    assert rows["a/no-online"]["online"] is False and rows["a/no-online"]["extra_ffns_gated"] == 0
    assert rows["s"]["online"] is None
    # more skipped -> more predicted speedup; the full model's copy predicts none
    assert rows["a"]["predicted_decode_speedup"] > rows["a/no-online"]["predicted_decode_speedup"] > 1.0
    assert rows["full/bfloat16"]["predicted_decode_speedup"] == 1.0
    # the floor row ran in bf16 (2-byte KV) on a copy: the model itself is still fp32
    assert rows["full/bfloat16"]["dtype"] == "bfloat16"
    assert rows["full/bfloat16"]["kv_bytes"] < out["reference"]["kv_bytes"]
    assert model.lm_head.weight.dtype == torch.float32
    # a plan skipping attention keeps less KV than the full model
    assert rows["a"]["kv_bytes"] < out["reference"]["kv_bytes"]
    table = g.generation_table(out)
    assert table.splitlines()[2].startswith("| full/bfloat16 |") and "on (3, -1.000)" in table


def test_looser_betas_are_rows_of_their_own():
    """--generation-online-betas: each online plan also runs at the given betas; a beta no FFN
    reaches gates nothing, beta -1 gates every candidate off, and the rows say which beta ran."""
    tok, prompts, model = _setup()
    online = SkipPlan(3, {0: 1.0, 3: 1.0}, strategy="adaskip", beta=0.9999, window=3)
    out = g.evaluate_generation(model, tok, prompts, {"a": online}, max_new_tokens=12, floor_dtype=None,
                                progress=False, online_betas=[-1.0])
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["a", "a/beta=-1", "a/no-online"]
    assert rows["a/beta=-1"]["beta"] == -1.0 and rows["a/beta=-1"]["extra_ffns_gated"] == 2
    eos = set(model.args.eos_token_ids)
    loose = dataclasses.replace(online, beta=-1.0)
    direct = [[t for t in generate(model, [p.ids], max_new_tokens=12, plan=loose).tokens[0] if t not in eos]
              for p in prompts]
    assert rows["a/beta=-1"]["generations"] == [tok.decode(t) for t in direct]
    assert "on (3, -1.000)" in g.generation_table(out)


def test_same_plan_as_full_scores_perfectly_and_floor_can_be_left_out():
    tok, prompts, model = _setup()
    nothing = SkipPlan(3, {}, strategy="custom")
    out = g.evaluate_generation(model, tok, prompts, {"none": nothing}, max_new_tokens=8, floor_dtype=None,
                                progress=False)
    (row,) = out["rows"]
    assert row["rouge_l"] == pytest.approx(1.0) and row["token_f1"] == 1.0 and row["identical"] == 1.0
    assert row["common_prefix"] == pytest.approx(sum(min(8, len(t.split())) for t in row["generations"]) / 4)


def test_evaluate_generation_bad_input():
    tok, prompts, model = _setup()
    with pytest.raises(ValueError, match="no generation prompts"):
        g.evaluate_generation(model, tok, [], {}, progress=False)
    with pytest.raises(ValueError, match="exceed the model's context"):
        g.evaluate_generation(model, tok, prompts, {}, max_new_tokens=500, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        g.evaluate_generation(model, tok, prompts, {}, batch_size=0, progress=False)


def test_run_eval_generation_task():
    tok, _, model = _setup()
    settings = EvalSettings(strategies=["early-exit"], budgets=[2], tasks=["generation"],
                            generation_lengths=[70], generation_prompts=2, generation_tokens=6)
    out = run_eval(model, tok, None, settings, documents=DOCS, progress=False)
    assert [r["name"] for r in out["generation"]["rows"]] == ["full/bfloat16", "early-exit@2"]
    assert len(out["generation"]["prompts"]) == 2 and "generation" in out["timings_s"]
    with pytest.raises(ValueError, match="instruction must be one of"):
        EvalSettings(tasks=["generation"], generation_instruction="poem")
    with pytest.raises(ValueError, match="exceed the model's context"):
        EvalSettings(tasks=["generation"], generation_lengths=[600]).check_model(model.args)
    with pytest.raises(ValueError, match="needs documents"):
        run_eval(model, tok, None, settings, documents=[], progress=False)


def test_betas_outside_cosine_range_are_refused():
    from adaskip.evaluation.harness import EvalSettings

    with pytest.raises(ValueError, match="online betas"):
        EvalSettings(tasks=["generation"], generation_online_betas=[0.9, 1.5])
