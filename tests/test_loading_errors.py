"""load_model refuses bad sources with errors that say what is wrong."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adaskip  # noqa: E402


def _save_tiny(path, arch="LlamaForCausalLM"):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data["architectures"] = [arch]
    (path / "config.json").write_text(json.dumps(data))


def test_unknown_source():
    with pytest.raises(FileNotFoundError, match="does not exist.*smollm2"):
        adaskip.load_model("/no/such/model")


def test_unsupported_file_kind(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"1234")
    with pytest.raises(ValueError, match="cannot load"):
        adaskip.load_model(f)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        adaskip.load_model(tmp_path)


def test_unsupported_architecture_before_reading_weights(tmp_path):
    _save_tiny(tmp_path, arch="GPTNeoXForCausalLM")
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        adaskip.load_model(tmp_path, device="cpu")


def test_corrupt_weight_file(tmp_path):
    _save_tiny(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read weight file"):
        adaskip.load_model(tmp_path, device="cpu")


def test_missing_shard_named_in_the_index(tmp_path):
    _save_tiny(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors",
                            "model.embed_tokens.weight": f.name}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        adaskip.load_model(tmp_path, device="cpu")


def test_checkpoint_that_does_not_match_the_config(tmp_path):
    _save_tiny(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing .*model.layers.2"):
        adaskip.load_model(tmp_path, device="cpu")


def test_loads_to_the_requested_dtype(tmp_path):
    _save_tiny(tmp_path)
    model, _ = adaskip.load_model(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_broken_tokenizer_is_named(tmp_path):
    _save_tiny(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{\"version\": ")
    with pytest.raises(ValueError, match=f"cannot read the tokenizer of {tmp_path}"):
        adaskip.load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("index,message", [
    ("not json", "cannot read .*model.safetensors.index.json as JSON"),
    ("[]", "must hold a JSON object"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": 3}}', "no 'weight_map'"),
])
def test_malformed_safetensors_index(tmp_path, index, message):
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=message):
        adaskip.load_model(tmp_path, device="cpu")


def test_heads_that_do_not_split_into_kv_heads(tmp_path):
    _save_tiny(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config.json: 2 attention heads do not split into 3 key/value heads"):
        adaskip.load_model(tmp_path, device="cpu")
