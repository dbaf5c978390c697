"""The packaged Qwen2.5-Coder-0.5B-Instruct (qwen2 GGUF, reassembled in memory): our loader and
runtime against transformers on the same bytes (fp32, CPU). Slow: transformers takes minutes to
read the file on a small CPU, so everything is loaded once and there is one test."""
import gc
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import adaskip  # noqa: E402
from adaskip.runtime.gguf import find_qwen25_coder_parts, qwen25_coder_gguf  # noqa: E402

try:
    find_qwen25_coder_parts()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

NUM_TOKENS = 288


@pytest.fixture(scope="module")
def hf():
    with qwen25_coder_gguf() as path:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def ours():
    model, tokenizer = adaskip.load_model("qwen2.5-coder", device="cpu", dtype=torch.float32)
    yield model, tokenizer
    del model, tokenizer
    gc.collect()


def test_argparse_logits_match_transformers(ours, hf):
    model, tokenizer = ours
    a = model.args
    assert a.architecture == "Qwen2ForCausalLM" and a.qkv_bias and not a.o_bias
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (24, 896, 14, 2, 64)
    assert (a.intermediate_size, a.vocab_size, a.max_position_embeddings) == (4864, 151936, 32768)
    assert a.rope_theta == 1e6 and not a.tie_word_embeddings and a.sliding_windows == [None] * 24
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert tokenizer.chat_template and tokenizer.eos_token_id == 151645  # <|im_end|>

    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer(text)["input_ids"][:NUM_TOKENS]])
    assert ids.shape == (1, NUM_TOKENS)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= 0.99, agreement
    # Matching transformers is not enough if both read the file wrongly: the next token of code is
    # easy to guess for a code model (about 5.6 perplexity on argparse.py's first 1024 tokens).
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:]).item()
    assert nll < 2.5, nll
