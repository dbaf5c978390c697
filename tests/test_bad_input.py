"""Bad input is refused with a message that names it, before any work: profiles and plans with
values no plan can be built on, and prompts that are not a batch of in-vocabulary token ids."""
import json
import re

import numpy as np
import pytest
import torch

import adaskip
from adaskip import ImportanceProfile, SkipPlan
from behaviour_cases import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def profile_dict(model, tmp_path_factory):
    g = torch.Generator().manual_seed(9)
    requests = [torch.randint(0, 101, (20,), generator=g).tolist() for _ in range(2)]
    profile = adaskip.calibrate(model, requests, num_requests=2, prompt_len=20, progress=False, search="loss",
                                search_max_sublayers=3, search_candidates=2)
    path = tmp_path_factory.mktemp("profile") / "p.json"
    profile.save(path)
    return json.loads(path.read_text())


def _set(d, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    index = None
    if "[" in keys[-1]:
        name, index = keys[-1][:-1].split("[")
        d[name][int(index)] = value
    else:
        d[keys[-1]] = value


@pytest.mark.parametrize("field,value,message", [
    ("block_similarity[0]", float("nan"), "'block_similarity' holds nan at index 0"),
    ("similarity[3]", float("inf"), "'similarity' holds inf at index 3"),
    ("similarity_std[1]", "high", "'similarity_std' holds 'high'"),
    ("scale[2]", -1.2, "'scale' holds -1.2 at index 2; a compensation scale must be positive"),
    ("scale[0]", 0.0, "'scale' holds 0.0"),
    ("search.loss.order", [3, 3, 1], "names a sublayer twice"),
    ("search.loss.order", [3, 99, 1], "outside [0, 8)"),
    ("search.loss.scales", [1.0, 1.1], "field 'scales' must hold 3 values"),
    ("search.loss.loss", [5.0, 4.0], "field 'loss' must hold 4 values"),
    ("search.loss.scales[1]", float("nan"), "'search.loss.scales' holds nan"),
    ("search.loss.scales[2]", -0.5, "must be positive"),
])
def test_a_profile_with_impossible_values_is_refused_on_load(profile_dict, tmp_path, field, value, message):
    data = json.loads(json.dumps(profile_dict))
    _set(data, field, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(message)):
        ImportanceProfile.load(path)


def test_the_untouched_profile_loads(profile_dict, tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(profile_dict))
    profile = ImportanceProfile.load(path)
    assert adaskip.plan(profile, strategy="shortgpt", num_sublayers=2).skip_scales


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "1.0x", None, True])
def test_a_plan_refuses_scales_that_are_not_finite_and_positive(scale):
    with pytest.raises(ValueError, match="compensation scales must be finite and positive"):
        SkipPlan(4, {2: 1.0, 5: scale})


def test_a_plan_takes_numpy_and_torch_scalars():
    plan = SkipPlan(4, {2: np.float32(1.25), 5: torch.tensor(0.5)})
    assert plan.skip_scales == {2: 1.25, 5: 0.5} and all(type(v) is float for v in plan.skip_scales.values())


@pytest.mark.parametrize("prompts,message", [
    ("hello", "got a string"),
    ([5, 6, 7], "flat list of token ids"),
    (torch.tensor([5, 6, 7]), "must be \\[batch, tokens\\]"),
    ([], "no prompts were given"),
    ([[5, 6], []], "prompt 1 is empty"),
    ([[5, 6], "a b"], "prompt 1 is a string"),
    ([[5, 101]], "outside the vocabulary \\[0, 101\\): \\[101\\]"),
    ([[5, -1]], "outside the vocabulary"),
    ([[5, 2.0]], "outside the vocabulary"),
    ([[True, 3]], "outside the vocabulary"),
    (42, "must be a batch of token-id lists, got int"),
])
def test_generate_checks_prompts_on_the_host(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        adaskip.generate(model, prompts, max_new_tokens=2)


def test_generate_takes_tensors_and_numpy_ids_like_lists(model):
    ids = [[5, 17, 33, 2], [9, 8, 7, 6]]
    expected = adaskip.generate(model, ids, max_new_tokens=3, eos_token_ids=[]).tokens
    assert adaskip.generate(model, torch.tensor(ids), max_new_tokens=3, eos_token_ids=[]).tokens == expected
    as_numpy = [np.array(r, dtype=np.int64) for r in ids]
    assert adaskip.generate(model, as_numpy, max_new_tokens=3, eos_token_ids=[]).tokens == expected
    assert [len(t) for t in expected] == [3, 3]
