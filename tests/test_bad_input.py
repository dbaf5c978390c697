"""Bad input is refused with a message that names it, before any work: profiles and plans with
values no plan can be built on, prompts that are not a batch of in-vocabulary token ids, and
every command line whose arguments can be checked without a model (refused in one line before
one loads, leaving every file as it was). Finished calibration steps survive a later failure.
All on the tiny random model; the command line runs in-process."""
import json
import re

import numpy as np
import pytest
import torch

import adaskip
from adaskip import ImportanceProfile, SkipPlan
from adaskip.cli import main
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
    ("search.loss.scales[0]", 1e9, "'search.loss.scales' holds 1000000000.0 at index 0; a compensation scale must be "
     "positive and at most 10000"),
    ("scale[1]", 3e5, "'scale' holds 300000.0 at index 1"),
    ("similarity[0]", 1.7, "'similarity' holds 1.7 at index 0; expected a number in [-1.001, 1.001]"),
    ("block_similarity[2]", -3.0, "'block_similarity' holds -3.0 at index 2"),
    ("similarity_std[0]", -0.1, "'similarity_std' holds -0.1 at index 0; expected a number >= 0"),
    ("search.loss.similarity[0]", float("nan"), "'search.loss.similarity' holds nan"),
    ("search.loss.loss[0]", float("-inf"), "'search.loss.loss' holds -inf"),
    ("search.loss.order", [1, 2], "field 'scales' must hold 2 values"),
    ("search.loss.order", [1, 2, True], "outside [0, 8)"),
    ("search.loss.order", "0,1,2", "no 'order' list"),
    ("search.loss", [0, 1], "'loss' search is malformed"),
    ("search.loss.objective", [0.0, 0.1], "field 'objective' must hold 4 values"),
    ("search.loss.objective", [0.0, 0.1, float("nan"), 0.2], "'search.loss.objective' holds nan"),
    ("similarity", 0.9, "'similarity' has float, expected a list of 8"),
    ("scale", [1.0] * 6, "'scale' has 6 values, expected a list of 8"),
    ("block_similarity", [0.5] * 8, "'block_similarity' has 8 values, expected a list of 4"),
    ("num_layers", "4", "'num_layers' must be an integer >= 1, got '4'"),
    ("num_layers", 0, "'num_layers' must be an integer >= 1"),
    ("tokens", -5, "'tokens' must be an integer >= 0, got -5"),
    ("fingerprint", [1], "'fingerprint' must be a JSON object, got list"),
    ("search", [], "'search' must be a JSON object"),
    ("validation", {"adaskip": {"budgets": [2], "kl": [float("nan")], "top1_agreement": [0.9], "sublayers": [[0, 1]]}},
     "'validation.adaskip.kl' holds nan"),
    ("validation", {"adaskip": {"budgets": [2], "kl": [0.1], "top1_agreement": [1.2], "sublayers": [[0, 1]]}},
     "'validation.adaskip.top1_agreement' holds 1.2 at index 0; expected a number in [0, 1]"),
    ("validation", {"adaskip": {"budgets": [2, 4], "kl": [0.1], "top1_agreement": [0.9], "sublayers": [[0, 1]]}},
     "validation of 'adaskip' is malformed"),
    ("validation", {"adaskip": {"budgets": [2], "kl": [0.1], "top1_agreement": [0.9], "sublayers": [[3]]}},
     "lists [3] as the plan of budget 2; expected 2 distinct sublayers in [0, 8)"),
    ("validation", {"adaskip": {"budgets": [2], "kl": [0.1], "top1_agreement": [0.9], "sublayers": [[3, 3]]}},
     "expected 2 distinct sublayers"),
    ("surprise", 1, "malformed"),
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


# ---------------------------------------------------------------------------------------------
# The command line: every bad argument is refused in one line, before any model loads, and
# leaves every file as it was.


# The tiny model's config, for model folders with a broken one.
CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=101, hidden_size=64, intermediate_size=96,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


class _CharTokenizer:
    """Enough of a tokenizer for calibration on text: one id per character, below the tiny
    model's vocabulary."""
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 100 + 1 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(96 + i % 26) for i in ids)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was refused")


@pytest.fixture(scope="module")
def files(profile_dict, tmp_path_factory):
    """A folder of inputs, good and bad, that the command lines below name."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "profile.json").write_text(json.dumps(profile_dict))
    bad = json.loads(json.dumps(profile_dict))
    bad["block_similarity"][0] = float("nan")
    (root / "nan-profile.json").write_text(json.dumps(bad))
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "binary.json").write_bytes(bytes(range(128, 256)))
    (root / "notjson.json").write_text("{'similarity': [")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (root / "empty.txt").write_text("   \n")
    (root / "folder").mkdir()
    # Inputs that are not text (adaskip.data.text_problem), each under a name that passes for text.
    (root / "some.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    (root / "latin1.txt").write_bytes("Café au lait, crème brûlée, naïve façade. ".encode("latin-1") * 20)
    (root / "utf16.txt").write_text("The quick brown fox. " * 20, encoding="utf-16")
    (root / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    (root / "weights.safetensors").write_bytes(len(b'{"a":{}}').to_bytes(8, "little") + b'{"a":{}}')
    (root / "gguf-named.txt").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    (root / "controls.txt").write_text("".join(chr(i % 8 + 1) for i in range(4000)))
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text("Fine text. " * 40)
    (root / "mixed" / "b.txt").write_bytes(bytes(range(256)) * 40)
    (root / "mixed-lb" / "data").mkdir(parents=True)
    (root / "mixed-lb" / "data" / "trec.jsonl").write_bytes(b"\x00\x01" * 500)
    (root / "full").mkdir()
    (root / "full" / "x").write_text("x")
    (root / "notok").mkdir()  # a model folder without tokenizer files
    (root / "notok" / "config.json").write_text(json.dumps(CONFIG))
    for name, text in (("cfg-notjson", "{hidden_size: 64"), ("cfg-list", "[]"),
                       ("cfg-nokey", json.dumps({k: v for k, v in CONFIG.items() if k != "hidden_size"})),
                       ("cfg-type", json.dumps({**CONFIG, "num_hidden_layers": "four"})),
                       ("cfg-zero", json.dumps({**CONFIG, "num_attention_heads": 0}))):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
        (root / name / "tokenizer.json").write_text("{}")
    return root



def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _refused(argv, files, tmp_path, capsys):
    """Runs the CLI in-process on `argv` ({f}: the inputs folder, {t}: an empty scratch folder)
    and returns (exit code, the message), asserting that no file changed or appeared."""
    argv = [a.format(f=files, t=tmp_path) for a in argv]
    before, scratch = _snapshot(files), _snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert _snapshot(files) == before and _snapshot(tmp_path) == scratch, "a refused command wrote a file"
    return (1 if isinstance(code, str) else code), message


CLI_CASES = [
    # calibrate: methods, strategies, budgets, ranges, paths, device
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--search", "bogus"], "--search: unknown 'bogus'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--search", "loss,kll"], "unknown 'kll'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validate-budgets", "2",
      "--validate-strategies", "adaskip,fast"], "--validate-strategies: unknown 'fast'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validate-budgets", "2,-1"],
     "--validate-budgets must be distinct numbers of sublayers >= 0"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validate-budgets", "2,2"], "distinct"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validate-budgets", "3",
      "--validate-strategies", "shortgpt"], "need even budgets"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validate-budgets", "two"], "'two'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validate-budgets", "2",
      "--validate-strategies", "greedy-kl"], "needs the kl search; add --search kl"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--validation-requests", "3"],
     "need --validate-budgets"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--prompt-len", "0"], "--prompt-len must be >= 2"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--num-requests", "0"], "--num-requests must be"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--search", "loss", "--search-max", "0"],
     "--search-max must be >= 1"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--search-candidates", "0"],
     "--search-candidates must be >= 1"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--search-requests", "-1"], "--search-requests"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{f}/folder"], "--out {f}/folder is a folder"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{f}/text.txt/p.json"], "cannot create the folder"),
    (["calibrate", "--data", "{f}/nothing.txt", "--out", "{t}/p.json"], "'{f}/nothing.txt' is not a file"),
    (["calibrate", "--data", "{f}/folder", "--out", "{t}/p.json"], "no calibration data texts found"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--device", "bogus"],
     "--device: unknown device 'bogus'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--device", "mps"], "--device: device 'mps'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--device", "cuda:99"], "--device"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--model", "{f}/no-model"],
     "--model '{f}/no-model' does not exist"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--model", "{f}/notok"], "has no tokenizer"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--search-stand-in", "cubic"],
     "invalid choice: 'cubic'"),
    # inputs that are not text, refused by name before any model loads
    (["calibrate", "--data", "{f}/some.bin", "--out", "{t}/p.json"],
     "--data {f}/some.bin: binary content"),
    (["calibrate", "--data", "{f}/text.txt", "{f}/latin1.txt", "--out", "{t}/p.json"],
     "--data {f}/latin1.txt: not UTF-8 text (byte 0xe9 at offset 3"),
    (["calibrate", "--data", "{f}/utf16.txt", "--out", "{t}/p.json"], "--data {f}/utf16.txt: UTF-16 text; convert"),
    (["calibrate", "--data", "{f}/model.gguf", "--out", "{t}/p.json"],
     "--data {f}/model.gguf: a GGUF model file, not text"),
    (["calibrate", "--data", "{f}/weights.safetensors", "--out", "{t}/p.json"],
     "--data {f}/weights.safetensors: a safetensors weights file, not text"),
    (["calibrate", "--data", "{f}/gguf-named.txt", "--out", "{t}/p.json"], "{f}/gguf-named.txt: a GGUF model file"),
    (["calibrate", "--data", "{f}/controls.txt", "--out", "{t}/p.json"], "{f}/controls.txt: binary content (4000 "
     "control characters"),
    (["calibrate", "--data", "{f}/mixed", "--out", "{t}/p.json"], "--data {f}/mixed/b.txt: binary content"),
    (["eval", "--calibration-data", "{f}/some.bin", "--out", "{t}/e"], "--calibration-data {f}/some.bin: binary"),
    (["eval", "--profile", "{f}/profile.json", "--strategies", "shortgpt", "--documents", "{f}/latin1.txt",
      "--out", "{t}/e"], "--documents {f}/latin1.txt: not UTF-8 text"),
    (["eval", "--profile", "{f}/profile.json", "--strategies", "shortgpt", "--documents", "{f}/model.gguf",
      "--out", "{t}/e"], "--documents {f}/model.gguf: a GGUF model file"),
    (["eval", "--profile", "{f}/profile.json", "--strategies", "shortgpt", "--tasks", "longbench",
      "--longbench-dir", "{f}/mixed-lb", "--out", "{t}/e"], "--longbench-dir {f}/mixed-lb/data/trec.jsonl: binary"),
    (["run", "--prompt-file", "{f}/some.bin", "--strategy", "full"], "--prompt-file {f}/some.bin: binary content"),
    (["run", "--prompt-file", "{f}/latin1.txt", "--strategy", "full"], "--prompt-file {f}/latin1.txt: not UTF-8"),
    (["run", "--prompt-file", "{f}/weights.safetensors", "--strategy", "full"],
     "--prompt-file {f}/weights.safetensors: a safetensors weights file, not text"),
    # run: the prompt, the plan, the profile
    (["run", "--prompt", "hi", "--prompt-file", "{f}/text.txt"], "not allowed with argument"),
    (["run", "--strategy", "full"], "one of the arguments --prompt --prompt-file is required"),
    (["run", "--prompt-file", "{f}/nothing.txt", "--strategy", "full"], "--prompt-file {f}/nothing.txt does not exist"),
    (["run", "--prompt-file", "{f}/folder", "--strategy", "full"], "--prompt-file {f}/folder is a folder"),
    (["run", "--prompt-file", "{f}/empty.txt", "--strategy", "full"], "--prompt-file {f}/empty.txt is empty"),
    (["run", "--prompt", "  ", "--strategy", "full"], "--prompt is empty"),
    (["run", "--prompt", "hi", "--strategy", "full", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["run", "--prompt", "hi", "--strategy", "full", "--window", "-1"], "--window must be >= 0"),
    (["run", "--prompt", "hi", "--strategy", "early-exit", "--num-sublayers", "-2"], "--num-sublayers must be >= 0"),
    (["run", "--prompt", "hi", "--strategy", "early-exit", "--num-sublayers", "3"], "needs an even --num-sublayers"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--alpha", "0.5"], "--alpha must be >= 1.0"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--alpha", "40"], "alpha must be in [1, 4]"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--num-sublayers", "99"], "num_sublayers must be in"),
    (["run", "--prompt", "hi", "--alpha", "1.2", "--num-sublayers", "2"], "not allowed with argument --alpha"),
    (["run", "--prompt", "hi"], "--strategy adaskip needs an importance profile"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--strategy", "greedy-kl", "--num-sublayers", "2"],
     "no 'kl' search"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--num-sublayers", "4", "--strategy", "greedy-loss"],
     "covers budgets up to 3 sublayers"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--min-agreement", "1.5"],
     "--min-agreement must be in [0, 1]"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--max-kl", "-1"], "--max-kl must be >= 0"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--min-agreement", "0.9", "--alpha", "1.2"],
     "not both"),
    (["run", "--prompt", "hi", "--min-agreement", "0.9"], "give --profile"),
    (["run", "--prompt", "hi", "--profile", "{f}/profile.json", "--min-agreement", "0.9"],
     "no validation of 'adaskip'"),
    (["run", "--prompt", "hi", "--profile", "{f}/nothing.json"], "--profile {f}/nothing.json does not exist"),
    (["run", "--prompt", "hi", "--profile", "{f}/folder"], "--profile {f}/folder is a folder"),
    (["run", "--prompt", "hi", "--profile", "{f}/notjson.json"], "cannot read profile {f}/notjson.json"),
    (["run", "--prompt", "hi", "--profile", "{f}/binary.json"], "cannot read profile {f}/binary.json: 'utf-8'"),
    (["run", "--prompt", "hi", "--profile", "{f}/list.json"], "{f}/list.json is not an adaskip importance profile"),
    (["run", "--prompt", "hi", "--profile", "{f}/nan-profile.json", "--strategy", "shortgpt"],
     "'block_similarity' holds nan at index 0"),
    (["run", "--prompt", "hi", "--strategy", "full", "--lossless", "--draft-tokens", "0"], "--draft-tokens must be"),
    (["run", "--prompt", "hi", "--strategy", "full", "--online-draft"], "add --lossless"),
    (["run", "--prompt", "hi", "--strategy", "full", "--context-len", "0"], "--context-len must be >= 1"),
    (["run", "--prompt", "hi", "--strategy", "full", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["run", "--prompt", "hi", "--strategy", "full", "--model", "{f}/notok"], "has no tokenizer"),
    (["run", "--prompt", "hi", "--strategy", "fastest"], "invalid choice: 'fastest'"),
    # demo
    (["demo", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["demo", "--max-kl", "0.1", "--alpha", "1.1"], "not both"),
    # export
    (["export", "--profile", "{f}/profile.json", "--out", "{f}/text.txt"], "the export folder {f}/text.txt is a file"),
    (["export", "--profile", "{f}/profile.json", "--out", "{f}/full"], "is not empty"),
    (["export", "--strategy", "full", "--out", "{t}/x"], "the full model needs no export"),
    (["export", "--profile", "{f}/profile.json", "--num-sublayers", "2", "--out", "{f}/text.txt/x"],
     "--out {f}/text.txt/x: cannot create"),
    (["export", "--profile", "{f}/nan-profile.json", "--out", "{t}/x"], "'block_similarity' holds nan"),
    (["export", "--profile", "{f}/profile.json", "--num-sublayers", "99", "--out", "{t}/x"],
     "num_sublayers must be in"),
    (["export", "--profile", "{f}/profile.json", "--out", "{t}/x", "--device", "bogus"], "--device"),
    # eval
    (["eval", "--strategies", "adaskip,bogus", "--out", "{t}/e"], "--strategies: unknown 'bogus'"),
    (["eval", "--tasks", "ppl,quiz", "--out", "{t}/e"], "unknown eval tasks ['quiz']"),
    (["eval", "--budgets", "4,-2", "--out", "{t}/e"], "budgets are numbers of sublayers >= 0"),
    (["eval", "--budgets", "4,x", "--out", "{t}/e"], "'4,x'"),
    (["eval", "--windows", "0", "--out", "{t}/e"], "--windows must be >= 1"),
    (["eval", "--window-len", "1", "--out", "{t}/e"], "--window-len must be >= 2"),
    (["eval", "--num-requests", "0", "--out", "{t}/e"], "--num-requests must be >= 1"),
    (["eval", "--prompt-len", "0", "--out", "{t}/e"], "--prompt-len must be >= 2"),
    (["eval", "--tasks", "passkey", "--retrieval-depths", "0.5,1.5", "--out", "{t}/e"], "--retrieval-depths"),
    (["eval", "--tasks", "needle", "--retrieval-lengths", "0", "--out", "{t}/e"], "--retrieval-lengths"),
    (["eval", "--tasks", "passkey", "--retrieval-samples", "0", "--out", "{t}/e"], "--retrieval-samples must be"),
    (["eval", "--tasks", "longbench", "--out", "{t}/e"], "--longbench-dir"),
    (["eval", "--tasks", "longbench", "--longbench-dir", "{f}/nothing", "--out", "{t}/e"],
     "--longbench-dir {f}/nothing is not a folder"),
    (["eval", "--tasks", "generation", "--generation-tokens", "0", "--out", "{t}/e"], "must be >= 1"),
    (["eval", "--min-agreement", "2", "--out", "{t}/e"], "minimum agreements must be in [0, 1]"),
    (["eval", "--speedups", "0.5", "--out", "{t}/e"], "target speedups must be >= 1"),
    (["eval", "--stand-ins", "cubic", "--strategies", "greedy-kl", "--out", "{t}/e"], "unknown stand-in kinds"),
    (["eval", "--stand-ins", "channel", "--out", "{t}/e"], "add it to the strategies"),
    (["eval", "--calibration-data", "{f}/text.txt", "--out", "{f}/text.txt"], "--out {f}/text.txt is a file"),
    (["eval", "--profile", "{f}/profile.json", "--strategies", "greedy-kl", "--out", "{t}/e"],
     "the profile has no ['kl'] search"),
    (["eval", "--profile", "{f}/nan-profile.json", "--out", "{t}/e"], "'block_similarity' holds nan"),
    (["eval", "--calibration-data", "{f}/nothing", "--out", "{t}/e"], "calibration data '{f}/nothing'"),
    (["eval", "--profile", "{f}/profile.json", "--strategies", "shortgpt", "--documents", "{f}/nothing",
      "--out", "{t}/e"], "documents '{f}/nothing'"),
    (["eval", "--device", "cuda:99", "--out", "{t}/e"], "--device"),
    (["eval", "--speculative-cuda-graph", "--tasks", "generation", "--out", "{t}/e"],
     "is for the speculative task; add it to --tasks"),
    (["eval", "--speculative-cuda-graph", "--tasks", "speculative", "--device", "cpu", "--out", "{t}/e"],
     "it needs --device cuda"),
    (["eval", "--model", "{f}/notok", "--out", "{t}/e"], "has no tokenizer"),
    # report
    (["report", "--readme", "{f}/nothing.md", "--check"], "--readme {f}/nothing.md does not exist"),
    (["report", "--readme", "{f}/text.txt", "--results", "{f}/nothing", "--check"], "--results {f}/nothing is not"),
    # bench: where the result goes and the device, before any measurement
    (["bench", "kernels", "--quick", "--out", "{t}"], "--out {t} is a folder"),
    (["bench", "kernels", "--quick", "--out-dir", "{f}/text.txt"], "--out-dir {f}/text.txt is a file"),
    (["bench", "e2e", "--device", "bogus", "--out", "{t}/e2e.json"], "unknown device 'bogus'"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) + f" #{i}"
                                                          for i, (a, _) in enumerate(CLI_CASES)])
def test_the_cli_refuses_bad_arguments_before_loading_anything(argv, message, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("adaskip.runtime.loading.load_model", _no_model)
    code, text = _refused(argv, files, tmp_path, capsys)
    lines = text.strip().splitlines()
    # One line: ours (exit 1), or argparse's error line after its usage (exit 2).
    assert code in (1, 2) and (code == 2 or len(lines) == 1) and "Traceback" not in text
    assert message.format(f=files, t=tmp_path) in lines[-1]


@pytest.mark.parametrize("folder,message", [
    ("cfg-notjson", "cannot read {f}/cfg-notjson/config.json as JSON (a model config)"),
    ("cfg-list", "{f}/cfg-list/config.json must hold a JSON object (a model config), got list"),
    ("cfg-nokey", "{f}/cfg-nokey/config.json misses the key 'hidden_size'"),
    ("cfg-type", "{f}/cfg-type/config.json: num_hidden_layers must be a positive integer, got 'four'"),
    ("cfg-zero", "{f}/cfg-zero/config.json: num_attention_heads must be a positive integer, got 0"),
])
def test_a_malformed_model_config_is_one_line_naming_the_file(folder, message, files, tmp_path, capsys):
    code, text = _refused(["run", "--strategy", "full", "--prompt", "hi", "--model", f"{{f}}/{folder}"], files,
                          tmp_path, capsys)
    assert code == 1 and "\n" not in text.strip() and message.format(f=files) in text


def test_debug_shows_the_error_itself(files, tmp_path, monkeypatch):
    argv = ["run", "--strategy", "full", "--prompt", "hi", "--model", f"{files}/cfg-nokey"]
    with pytest.raises(ValueError, match="misses the key 'hidden_size'"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="misses the key"):
        main([*argv, "--debug"])
    monkeypatch.setenv("ADASKIP_DEBUG", "1")
    with pytest.raises(ValueError, match="misses the key"):
        main(argv)


@pytest.mark.parametrize("command", [["calibrate"], ["eval"], ["bench", "e2e"], ["bench", "kernels"]])
def test_every_subcommand_takes_debug(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--debug", "--help"])
    assert e.value.code == 0 and "--debug" in capsys.readouterr().out


def test_a_programming_error_keeps_its_traceback(monkeypatch, files):
    def broken(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr("adaskip.runtime.loading.load_model", broken)
    with pytest.raises(KeyError):
        main(["run", "--strategy", "full", "--prompt", "hi"])


@pytest.fixture
def tiny_loaded(model, monkeypatch):
    """load_model gives the tiny model and a character tokenizer (the command runs past loading)."""
    monkeypatch.setattr("adaskip.runtime.loading.load_model", lambda *a, **k: (model, _CharTokenizer()))


def test_calibrate_keeps_what_it_finished_when_a_later_step_fails(model, tiny_loaded, files, tmp_path, monkeypatch,
                                                                  capsys):
    """The search's result is on disk (a partial profile beside --out) before validation starts;
    an interrupt during validation leaves it there and --out unwritten (one line, naming what
    was kept)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adaskip.skipping.calibration.validate", interrupted)
    out = tmp_path / "new" / "p.json"
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--data", f"{files}/text.txt", "--num-requests", "2", "--prompt-len", "24",
              "--out", str(out), "--search", "loss", "--search-max", "2", "--search-candidates", "2",
              "--search-requests", "1",
              "--validate-budgets", "2", "--validation-requests", "1"])
    assert "interrupted" in str(e.value.code)
    partial = out.parent / "p.partial.json"
    assert f"{partial} keeps the steps finished before this one (up to loss search)" in capsys.readouterr().err
    kept = ImportanceProfile.load(partial)
    assert kept.search["loss"]["order"] and len(kept.search["loss"]["order"]) == 2 and not kept.validation
    assert [p.name for p in out.parent.iterdir()] == ["p.partial.json"]  # no temporary file, no --out
    # the partial records the run that wrote it, as every result file does (the argv as run)
    assert kept.provenance["command"].endswith("calibrate " + " ".join(
        ["--data", f"{files}/text.txt", "--num-requests", "2", "--prompt-len", "24", "--out", str(out)]) + " "
        "--search loss --search-max 2 --search-candidates 2 --search-requests 1 --validate-budgets 2 "
        "--validation-requests 1")
    assert kept.provenance["git_commit"] and "git_dirty" in kept.provenance and "resumed_from" not in kept.provenance

    # --resume: the measurement and the finished search are kept (neither runs again), the
    # validation runs, --out is written and the partial profile goes.
    monkeypatch.undo()
    args = ["calibrate", "--data", f"{files}/text.txt", "--num-requests", "2", "--prompt-len", "24",
            "--out", str(out), "--search", "loss", "--search-max", "2", "--search-candidates", "2",
            "--search-requests", "1", "--validate-budgets", "2", "--validation-requests", "1"]
    monkeypatch.setattr("adaskip.runtime.loading.load_model", lambda *a, **k: (model, _CharTokenizer()))
    with pytest.raises(SystemExit, match="read other requests"):
        main(args[:4] + ["3"] + args[5:] + ["--resume"])  # --num-requests 3: other requests
    monkeypatch.setattr("adaskip.skipping.calibration.measure_requests", interrupted)
    monkeypatch.setattr("adaskip.skipping.greedy._measure", interrupted)  # the search is finished: none runs
    main(args + ["--resume"])
    done = ImportanceProfile.load(out)
    timeless = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
    assert timeless(done.search["loss"]) == timeless(kept.search["loss"]) and done.similarity == kept.similarity
    assert done.validation["adaskip"]["budgets"] == [2]
    # the resumed run's own command, and the interrupted run's provenance kept under it
    assert done.provenance["command"].endswith("--resume") and done.provenance["resumed_from"] == kept.provenance
    assert [p.name for p in out.parent.iterdir()] == ["p.json"]
    with pytest.raises(SystemExit, match=r"--resume: there is no .*p.partial.json to resume"):
        main(args + ["--resume"])


def test_a_finished_calibration_leaves_only_its_profile(tiny_loaded, files, tmp_path, capsys):
    out = tmp_path / "p.json"
    main(["calibrate", "--data", f"{files}/text.txt", "--num-requests", "2", "--prompt-len", "24", "--out", str(out),
          "--search", "similarity", "--search-max", "2", "--search-requests", "1"])
    assert "saved" in capsys.readouterr().out and [p.name for p in tmp_path.iterdir()] == ["p.json"]
    assert len(ImportanceProfile.load(out).search["similarity"]["order"]) == 2


def test_an_interrupted_search_keeps_its_first_choices(model, tmp_path, monkeypatch):
    """After each choice the profile holds the search so far; saved, it loads and plans up to it."""
    from adaskip.skipping import greedy

    real, calls = greedy._measure, []

    def measure_then_stop(*args, **kwargs):  # the 2nd step's statistics pass is never reached
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(greedy, "_measure", measure_then_stop)
    path = tmp_path / "p.json"
    steps = []

    def checkpoint(profile, step, done):
        profile.save(path)
        steps.append((step, done))

    requests = [torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(3)).tolist()]
    with pytest.raises(KeyboardInterrupt):
        adaskip.calibrate(model, requests, num_requests=1, prompt_len=20, progress=False, search="loss",
                          search_max_sublayers=3, search_candidates=2, checkpoint=checkpoint)
    assert steps == [("calibration", True), ("loss search", False)]
    kept = ImportanceProfile.load(path)
    partial = kept.search_result("loss")
    assert len(partial.order) == 1 and partial.notes["complete"] is False and len(partial.loss) == 2
    assert adaskip.plan(kept, strategy="greedy-loss", num_sublayers=1).skip_scales
    with pytest.raises(ValueError, match="covers budgets up to 1 sublayers"):
        adaskip.plan(kept, strategy="greedy-loss", num_sublayers=2)
    # Resumed, it gives what a calibration that was never interrupted gives.
    monkeypatch.undo()
    settings = dict(num_requests=1, prompt_len=20, progress=False, search="loss", search_max_sublayers=3,
                    search_candidates=2)
    resumed = adaskip.calibrate(model, requests, resume=kept, **settings)
    whole = adaskip.calibrate(model, requests, **settings)
    assert resumed.search["loss"]["order"] == whole.search["loss"]["order"]
    for key in ("scales", "similarity", "loss"):
        assert resumed.search["loss"][key] == whole.search["loss"][key]
    assert resumed.similarity == whole.similarity and resumed.requests_sha256 == whole.requests_sha256
    # A finished search is kept as it is (nothing runs), unless it was made with other settings.
    with pytest.raises(ValueError, match="tried 2 candidates per step, this one would try 3"):
        adaskip.calibrate(model, requests, resume=whole, **{**settings, "search_candidates": 3})
    monkeypatch.setattr(greedy, "_measure", measure_then_stop)  # (raises at once now)
    again = adaskip.calibrate(model, requests, resume=whole, **settings)
    assert again.search["loss"]["order"] == whole.search["loss"]["order"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="read other requests"):
        adaskip.calibrate(model, [list(reversed(requests[0]))], resume=kept, **settings)
    with pytest.raises(ValueError, match="records no hash of its requests"):
        old = ImportanceProfile(**{**{f: getattr(kept, f) for f in ("num_layers", "similarity", "scale",
                                                                     "similarity_std", "scale_std",
                                                                     "block_similarity", "fingerprint",
                                                                     "num_requests", "tokens", "prompt_len")}})
        adaskip.calibrate(model, requests, resume=old, **settings)


# ---------------------------------------------------------------------------------------------
# The Python API: the same refusals, as ValueError naming the argument, before any work.

@pytest.mark.parametrize("kwargs,message", [
    (dict(device="bogus"), "unknown device 'bogus'; expected 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="mps"), "device 'mps' is not supported"),
    (dict(device="cuda:99"), "'cuda:99'"),
    (dict(device=3.5), "unknown device 3.5"),
    (dict(dtype=torch.int8), "unsupported dtype torch.int8"),
    (dict(dtype=torch.float64), "unsupported dtype torch.float64"),
    (dict(dtype="bf16"), "unsupported dtype 'bf16'"),
])
def test_load_model_refuses_devices_and_dtypes_before_reading(kwargs, message, monkeypatch):
    monkeypatch.setattr("adaskip.runtime.gguf.find_smollm2_gguf", _no_model)  # nothing may be read
    with pytest.raises(ValueError, match=re.escape(message)):
        adaskip.load_model("smollm2", **kwargs)


@pytest.mark.parametrize("data,message", [
    ([[5, 6, 7, 101]], "calibration data: request 0 holds token ids outside the vocabulary [0, 101): [101]"),
    ([[5, 6, 7], [1, -2, 3]], "request 1 holds token ids outside the vocabulary"),
    ([5, 6, 7, 8], "calibration data is a flat list of token ids"),
    ([[5, 6, 7], [1.5, 2, 3]], "outside the vocabulary"),
    ([], "no calibration data were given"),
    ([[5, 6], "some text"], "not a mix"),
    (42, "calibration data must be texts, files or token-id lists, got int"),
])
def test_calibrate_checks_token_ids_on_the_host(model, data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        adaskip.calibrate(model, data, num_requests=1, prompt_len=8, progress=False)


def test_search_and_validate_check_their_requests(model, profile_dict, tmp_path):
    from adaskip.skipping.calibration import validate
    from adaskip.skipping.greedy import search

    with pytest.raises(ValueError, match="search requests must be a batch of token-id lists; got a string"):
        search(model, "some text", max_sublayers=2)
    with pytest.raises(ValueError, match=re.escape("request 0 holds token ids outside the vocabulary [0, 101)")):
        search(model, [[1, 2, 500]], max_sublayers=2)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict))
    with pytest.raises(ValueError, match="validation requests is a flat list of token ids"):
        validate(model, ImportanceProfile.load(path), [1, 2, 3, 4], budgets=[2])


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="fastest", num_sublayers=2), "unknown strategy 'fastest'"),
    (dict(planner="magic", num_sublayers=2), "unknown planner 'magic'"),
    (dict(mode="train", num_sublayers=2), "mode must be one of"),
    (dict(num_sublayers=-1), "num_sublayers must be in [0, 6]"),
    (dict(num_sublayers=7), "num_sublayers must be in [0, 6]"),
    (dict(alpha=0.5), "alpha must be in [1, 4]"),
    (dict(alpha=2.0, num_sublayers=2), "exactly one budget"),
    (dict(min_agreement=1.5), "min_agreement must be in [0, 1]"),
    (dict(max_kl=-0.1), "max_kl must be >= 0"),
    (dict(min_agreement=0.9), "no validation of 'adaskip'"),
    (dict(strategy="greedy-kl", num_sublayers=2), "no 'kl' search"),
    (dict(strategy="shortgpt", num_sublayers=3), "needs an even number of sublayers"),
    (dict(stand_in="cubic", num_sublayers=2), "unknown stand-in kind 'cubic'"),
    (dict(stand_in="linear", num_sublayers=2), "use strategy 'greedy-kl'"),
])
def test_plan_refuses_bad_arguments(profile_dict, tmp_path, kwargs, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict))
    with pytest.raises(ValueError, match=re.escape(message)):
        adaskip.plan(ImportanceProfile.load(path), **kwargs)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from adaskip._util import write_json

    path = write_json(tmp_path / "r.json", {"ok": 1})
    path.chmod(0o640)
    with pytest.raises(TypeError):
        write_json(path, {"not json": object()})
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"ok": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(IsADirectoryError, match=f"is a folder; expected a file name: '{tmp_path}'"):
        write_json(tmp_path, {"ok": 4})
    write_json(path, {"ok": 3})
    assert json.loads(path.read_text()) == {"ok": 3} and path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("input_ids,message", [
    ([[1, 2, 3]], "must be a \\[batch, tokens\\] tensor of token ids, got list"),
    (torch.tensor([1, 2, 3]), "must be \\[batch, tokens\\], got shape \\(3,\\)"),
    (torch.tensor([[1.0, 2.0]]), "must hold integer token ids, got torch.float32"),
    (torch.tensor([[True, False]]), "must hold integer token ids, got torch.bool"),
    (torch.tensor([[1, 101]]), "outside the vocabulary \\[0, 101\\): \\[101\\]"),
    (torch.tensor([[-1, 5], [7, 200]]), "outside the vocabulary \\[0, 101\\): \\[-1, 200\\]"),
])
def test_input_ids_for_the_model_are_checked_on_the_host(input_ids, message):
    from adaskip.runtime.ids import check_input_ids

    with pytest.raises(ValueError, match=message):
        check_input_ids(input_ids, 101)
    check_input_ids(torch.tensor([[0, 100]]), 101)  # the edges of the vocabulary pass


# eval on the test's own text rather than the essays (a package the test need not have)
EVAL_TEXT = ["eval", "--calibration-data", "{f}/text.txt", "--documents", "{f}/text.txt"]


@pytest.mark.parametrize("argv,message", [
    ([*EVAL_TEXT, "--budgets", "2,99", "--window-len", "64", "--out", "{t}"],
     "budgets of 99 sublayers exceed what a model of 4 layers can skip (6"),
    ([*EVAL_TEXT, "--budgets", "2", "--window-len", "500", "--out", "{t}"],
     "ppl windows of 500 tokens exceed the model's context of 128"),
    ([*EVAL_TEXT, "--budgets", "2", "--tasks", "generation", "--generation-lengths", "120", "--out", "{t}"],
     "context of 128"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--prompt-len", "64", "--validate-budgets", "2,99"],
     "validation budgets must be distinct numbers of sublayers in [0, 6]"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--prompt-len", "500"],
     "prompt_len 500 exceeds the model's context of 128"),
    (["calibrate", "--data", "{f}/text.txt", "--out", "{t}/p.json", "--num-requests", "50", "--prompt-len", "64"],
     "gives only"),
    (["run", "--strategy", "full", "--prompt", "hi", "--max-new-tokens", "500"], "exceeds the model's context of 128"),
])
def test_what_needs_the_model_is_refused_right_after_it_loads(argv, message, tiny_loaded, files, tmp_path, capsys):
    """Checks against the model's geometry come before any calibration or generation."""
    code, text = _refused(argv, files, tmp_path, capsys)
    assert code == 1 and "\n" not in text.strip() and message in text


@pytest.mark.parametrize("call,message", [
    (lambda m: SkipPlan(0, {}), "num_layers must be an integer >= 1, got 0"),
    (lambda m: SkipPlan(4, [2, 3]), "skip_scales must be a dict"),
    (lambda m: SkipPlan(4, {"2": 1.0}), "sublayers must be integer indices, got ['2']"),
    (lambda m: SkipPlan(4, {2.0: 1.0}), "sublayers must be integer indices"),
    (lambda m: SkipPlan(4, {9: 1.0}), "sublayers [9] are out of range for a model with 4 layers"),
    (lambda m: SkipPlan(4, {2: 1.0}, stand_ins=[1]), "stand_ins must be a dict"),
    (lambda m: adaskip.generate(m, [[1, 2]], max_new_tokens="5"), "max_new_tokens must be an integer >= 1, got '5'"),
    (lambda m: adaskip.generate(m, [[1, 2]], max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (lambda m: adaskip.generate(m, [[1, 2]], max_new_tokens=2, plan={2: 1.0}), "plan must be an adaskip SkipPlan"),
    (lambda m: adaskip.generate(m, [[1, 2]], max_new_tokens=2, plan=SkipPlan(6, {2: 1.0})), "6 layers"),
    (lambda m: adaskip.generate(m, [[1] * 127], max_new_tokens=5), "exceeds the model's context of 128"),
    (lambda m: adaskip.plan(None, num_layers=4, strategy="early-exit", num_sublayers="2"),
     "num_sublayers must be an integer, got '2'"),
    (lambda m: adaskip.plan(None, num_layers=4, strategy="early-exit", alpha=float("nan")), "got nan"),
    (lambda m: adaskip.plan(None, strategy="early-exit", num_sublayers=2), "pass a profile or num_layers"),
    (lambda m: adaskip.calibrate(m, [[1, 2, 3]], num_requests=1, prompt_len="8"), "prompt_len must be an integer"),
    (lambda m: adaskip.calibrate(m, [[1, 2, 3]], num_requests=1.5, prompt_len=8), "num_requests must be an integer"),
    (lambda m: adaskip.calibrate(m, [[1, 2, 3]], num_requests=1, prompt_len=8, search="bogus"),
     "unknown search methods ['bogus']"),
    (lambda m: adaskip.calibrate(m, [[1, 2, 3]], num_requests=1, prompt_len=8, validate_budgets=[2],
                                 validate_strategies=["fast"]), "cannot validate strategies ['fast']"),
    (lambda m: adaskip.calibrate(m, ["some text"], num_requests=1, prompt_len=8), "needs the model's tokenizer"),
    (lambda m: ImportanceProfile.load(None), "cannot read profile None"),
    (lambda m: adaskip.load_model(None), "model source 'None' does not exist"),
])
def test_public_functions_refuse_bad_arguments(model, call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        call(model)


def test_eval_keeps_its_calibration_when_a_later_step_fails(tiny_loaded, files, tmp_path):
    """Calibration read the only document, so nothing is left to evaluate: refused after it, with
    its profile on disk (and no partial one)."""
    out = tmp_path / "e"
    with pytest.raises(SystemExit, match="every evaluation document was read by calibration"):
        main([arg.format(f=files) for arg in EVAL_TEXT] + ["--strategies", "adaskip", "--budgets", "2",
             "--window-len", "64", "--num-requests", "2", "--prompt-len", "24", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["profile.json"]
    assert ImportanceProfile.load(out / "profile.json").num_requests == 2


def test_the_model_refuses_token_ids_outside_its_vocabulary(model):
    """Straight to the model: an out-of-vocabulary id is a clear error on the host (on a GPU it
    would be a device-side assert in the embedding that ends the process)."""
    vocab = model.args.vocab_size
    with pytest.raises(ValueError, match=f"outside the vocabulary \\[0, {vocab}\\): \\[{vocab}\\]"):
        model(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="must be \\[batch, tokens\\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
