"""Our runtime against Hugging Face transformers on tiny random-weight configs (fp32, CPU)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaskip.runtime.config import ModelArgs, UnsupportedArchitecture  # noqa: E402
from adaskip.runtime.loading import build_model, load_model  # noqa: E402
from helpers import randomize_norms_and_biases  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def _llama(**kw):
    return transformers.LlamaConfig(**{**BASE, **kw})


CASES = {
    "llama": lambda: _llama(),
    "llama-mha-tied": lambda: _llama(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3.1-rope": lambda: _llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-rope": lambda: _llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # 20 tokens > 16 positions: the dynamic-NTK base grows with the sequence.
    "llama-dynamic-rope": lambda: _llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "llama-bias": lambda: _llama(attention_bias=True, mlp_bias=True),
    "mistral-sliding": lambda: transformers.MistralConfig(**BASE, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**BASE),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _pair(name):
    torch.manual_seed(0)
    cfg = CASES[name]()
    hf = randomize_norms_and_biases(getattr(transformers, HF_CLASSES[cfg.model_type])(cfg).eval())
    d = cfg.to_dict()
    d["architectures"] = [HF_CLASSES[cfg.model_type]]
    ours = build_model(ModelArgs.from_hf_config(d), {k: v.clone() for k, v in hf.state_dict().items()})
    return hf, ours


@pytest.mark.parametrize("name", list(CASES))
def test_full_forward_matches_transformers(name):
    hf, ours = _pair(name)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "llama3.1-rope", "mistral-sliding", "qwen2"])
def test_chunked_prefill_and_decode_match_transformers(name):
    hf, ours = _pair(name)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
        ours.setup_caches(2, 24)
        # Positions as per-sequence tensors (explicit masks) and as shared ints (SDPA's masking).
        for pos in (lambda p: torch.full((2,), p), lambda p: p):
            got = [ours(ids[:, 0:6], pos(0), kv_len=6), ours(ids[:, 6:10], pos(6), kv_len=10)]
            for t in range(10, 16):
                got.append(ours(ids[:, t:t + 1], pos(t), kv_len=t + 1))
            torch.testing.assert_close(torch.cat(got, 1), expected, rtol=1e-4, atol=1e-4)


def test_internlm_is_llama_with_attention_bias():
    torch.manual_seed(0)
    cfg = _llama(attention_bias=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    d = {**cfg.to_dict(), "architectures": ["InternLMForCausalLM"], "bias": True}
    d.pop("attention_bias")
    args = ModelArgs.from_hf_config(d)
    assert args.qkv_bias and args.o_bias
    ours = build_model(args, dict(hf.state_dict()))
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_hf_directory_round_trip(tmp_path):
    hf, _ = _pair("qwen2")
    hf.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, device="cpu")
    assert tokenizer is None  # no tokenizer files: weights-only directories still load
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert next(model.parameters()).dtype == torch.float32


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture, match="supported: LlamaForCausalLM"):
        ModelArgs.from_hf_config({**BASE, "architectures": ["GPT2LMHeadModel"]})
