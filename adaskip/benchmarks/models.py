"""The models the end-to-end benchmark times: random weights of a named geometry (speed does
not depend on weight values, so a config stands in for a checkpoint we may not have), or real
weights from any source adaskip.load_model reads; and HF transformers' model on the very same
tensors, so that the two are compared on one set of weights without a second copy in memory."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from adaskip.runtime.config import ModelArgs
from adaskip.runtime.loading import build_model
from adaskip.runtime.model import Transformer

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Hugging Face config fields of each geometry (LlamaForCausalLM).
CONFIGS = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    # For CPU tests: every code path of the big ones (GQA, RoPE) at a size that runs in ms.
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5),
}


@dataclass
class BenchModel:
    model: Transformer
    name: str  # the config name or the source given
    weights: str  # "random" or "real"
    hf_config: Optional[dict] = None  # HF config fields to build the transformers twin from
    hf_source: Optional[str] = None  # or: an HF model directory to read the config from
    notes: list = field(default_factory=list)


def hf_config_dict(name: str, layers: Optional[int] = None) -> dict:
    """HF config fields of a named geometry, with `layers` overriding its depth."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    return cfg


def model_args(name: str, layers: Optional[int] = None) -> ModelArgs:
    return ModelArgs.from_hf_config({**hf_config_dict(name, layers), "architectures": ["LlamaForCausalLM"]})


def random_weights(args: ModelArgs, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """N(0, 0.02) weights (norm weights around 1, as trained ones are), named as in HF checkpoints.
    Drawn in float32 one tensor at a time, then cast: the same values in every dtype."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        weights[key] = (w + 1.0 if key.endswith("norm.weight") else w).to(dtype)
    return weights


def random_model(name: str, layers: Optional[int], dtype: torch.dtype, device) -> BenchModel:
    args = model_args(name, layers)
    model = build_model(args, random_weights(args, dtype, torch.device(device)), consume=True)
    return BenchModel(model, name, "random", hf_config=hf_config_dict(name, layers))


def real_model(source: str, dtype: torch.dtype, device) -> BenchModel:
    """Real weights through adaskip.load_model. The transformers twin is built only for an HF
    model directory: other sources (a .gguf) have no config transformers reads as it is."""
    from adaskip.runtime.loading import load_model

    model, _ = load_model(source, dtype=dtype, device=device)
    path = Path(source).expanduser()
    if path.is_dir():
        return BenchModel(model, source, "real", hf_source=str(path))
    return BenchModel(model, source, "real",
                      notes=[f"HF transformers side by side skipped: {source!r} is not a Hugging Face model "
                             "directory, which is what transformers loads"])


def hf_twin(bench: BenchModel, device):
    """transformers' model for the same config, its parameters being our model's tensors
    (assigned, not copied). Raises ImportError / ValueError when transformers cannot build it."""
    import transformers

    if bench.hf_config is not None:
        cfg = transformers.LlamaConfig(**bench.hf_config)
    elif bench.hf_source is not None:
        cfg = transformers.AutoConfig.from_pretrained(bench.hf_source)
    else:
        raise ValueError("no Hugging Face config for this model")
    cfg._attn_implementation = "sdpa"  # the attention our runtime uses: compare like with like
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    weights = dict(bench.model.state_dict())
    if getattr(cfg, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(weights, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        hf.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"transformers' model does not take our weights: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    rotary = getattr(hf.model, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            hf.model.rotary_emb = type(rotary)(cfg)  # its buffers were created on meta
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"transformers' model keeps tensors on the meta device: {left[:4]}")
    return hf.eval().requires_grad_(False), cfg
