"""Choices are tables: a strategy, a search method, a model family and an export format are each
one record, and the planner, the calibration checks, the CLI and the defaults read them."""
import argparse
import dataclasses
import types

import pytest
import torch

from adaskip import exporting
from adaskip.cli import parser
from adaskip.runtime import config
from adaskip.skipping import greedy, strategies
from adaskip.runtime.skip_plan import SkipPlan
from adaskip.runtime.stand_in import StandIn
from adaskip.skipping.strategies import Strategy, plan


def _choices(command: str, flag: str) -> list:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    return list(action.choices) if action.choices is not None else action.default


def test_the_cli_reads_its_choices_from_the_tables():
    assert _choices("run", "--strategy") == list(strategies.STRATEGIES)
    assert _choices("export", "--strategy") == list(strategies.STRATEGIES)
    assert _choices("export", "--format") == list(exporting.FORMATS) == ["decilm", "llama", "adaskip"]
    assert _choices("eval", "--strategies") == ",".join(strategies.PAPER_COMPARISON)
    assert strategies.PAPER_COMPARISON == ("adaskip", "early-exit", "skipdecode", "unified", "shortgpt")
    assert "full" not in strategies.SKIPPING_STRATEGIES


def test_a_new_strategy_is_one_record(monkeypatch):
    first = Strategy("first-layers", strategies._whole_layers(lambda m, n, profile: list(range(n))),
                     needs_profile=False)
    monkeypatch.setitem(strategies.STRATEGY_TABLE, first.name, first)
    p = plan(num_layers=4, strategy="first-layers", num_sublayers=4)
    assert p.skip_scales == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0} and p.strategy == "first-layers"
    with pytest.raises(ValueError, match="whole-layer strategy 'first-layers' needs an even number"):
        plan(num_layers=4, strategy="first-layers", num_sublayers=3)
    with pytest.raises(ValueError, match="unknown strategy 'last-layers'"):
        plan(num_layers=4, strategy="last-layers", num_sublayers=2)


def test_a_strategy_record_says_what_its_plans_need():
    kl = strategies.strategy_of("greedy-kl")
    assert kl.search == "kl" and kl.fitted_stand_ins and kl.online and kl.sublayers
    pruner = strategies.strategy_of("blockpruner")
    assert not pruner.online and not pruner.fitted_stand_ins and greedy.search_method(pruner.search).identity
    assert not strategies.strategy_of("early-exit").needs_profile
    assert not strategies.strategy_of("full").skips
    assert strategies.searches_needed(["greedy-kl", "adaskip", "no-such"]) == ["kl"]
    with pytest.raises(ValueError, match="search method must be one of"):
        greedy.search_method("random")


def test_a_new_model_family_is_one_record(monkeypatch):
    family = config.ModelFamily("TinyLlamaLikeForCausalLM", "tinyllamalike", biases=(True, True))
    monkeypatch.setitem(config.MODEL_FAMILIES, family.architecture, family)
    cfg = {"model_type": "tinyllamalike", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 128, "vocab_size": 100}
    args = config.ModelArgs.from_hf_config(cfg)
    assert args.architecture == "TinyLlamaLikeForCausalLM" and args.qkv_bias and args.o_bias
    with pytest.raises(config.UnsupportedArchitecture, match="supported: LlamaForCausalLM, .*TinyLlamaLike"):
        config.ModelArgs.from_hf_config({**cfg, "model_type": "gpt2"})


def test_an_export_format_is_one_object(monkeypatch):
    class Renamed(exporting.LlamaFormat):
        name = "renamed"

    monkeypatch.setitem(exporting.EXPORT_FORMATS, "renamed", Renamed())
    assert exporting.export_format("renamed").serve_flags == ""
    assert exporting.export_format("decilm").serve_flags == " --trust-remote-code"
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        exporting.export_format("gguf")


def _help(command: str, flag: str) -> str:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if flag in a.option_strings).help


def test_search_candidates_help_names_each_table_default(monkeypatch):
    scoring = [m for m in greedy.SEARCH_METHODS.values() if m.scores_candidates]
    assert [m.name for m in scoring] == ["loss", "blockpruner", "kl"]
    for command in ("calibrate", "eval"):
        text = _help(command, "--search-candidates")
        for m in scoring:
            default = "every remaining sublayer" if m.default_candidates is None else str(m.default_candidates)
            assert f"{default} for {m.name}" in text
        assert "similarity" not in text  # it takes the most similar sublayer and tries no candidates
    # The help follows the table, not a copy of it.
    monkeypatch.setitem(greedy.SEARCH_METHODS, "kl", dataclasses.replace(greedy.SEARCH_METHODS["kl"],
                                                                          default_candidates=9))
    assert "9 for kl" in _help("calibrate", "--search-candidates")


def test_stand_in_cost_reads_the_fitting_search_through_its_record(monkeypatch):
    """A linear stand-in's cost is weighed against the layer sizes that the search which fits
    stand-ins recorded, found through the search records, not by the name "kl"."""
    g = torch.Generator().manual_seed(0)
    linear = StandIn("linear", down=torch.randn(2, 8, generator=g), down_bias=torch.zeros(2),
                     up=torch.randn(8, 2, generator=g))
    p = SkipPlan(4, {3: 1.0}, stand_ins={3: linear})
    notes = {"attention_multiply_adds": 256, "ffn_multiply_adds": 768}

    class Profile:  # what stand_in_cost reads of an ImportanceProfile
        search = {"kl-wide": object()}

        def search_result(self, name):
            return types.SimpleNamespace(notes=notes)

    wide = greedy.SearchMethod("kl-wide", 12, fits_stand_ins=True)
    monkeypatch.setitem(greedy.SEARCH_METHODS, wide.name, wide)
    assert strategies.stand_in_cost(p, Profile()) == pytest.approx(linear.multiply_adds_per_token() / 1024)
    monkeypatch.setitem(greedy.SEARCH_METHODS, wide.name, dataclasses.replace(wide, fits_stand_ins=False))
    with pytest.raises(ValueError, match="layer sizes"):
        strategies.stand_in_cost(p, Profile())
