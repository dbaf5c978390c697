"""Model arguments of the one LLaMA-family runtime, read from Hugging Face config dicts."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional


class UnsupportedArchitecture(ValueError):
    pass


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear"|"dynamic"|"llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per layer: None (full attention) or the sliding-window size in tokens.
    sliding_windows: list = field(default_factory=list)
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    # Sublayers with no weights that pass the residual stream through (DeciLM's no-op blocks).
    absent_sublayers: tuple = ()

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    def fingerprint(self) -> str:
        """A short hash of the arguments that define the computation."""
        d = asdict(self)
        if not d["absent_sublayers"]:  # the hash of every model without absent sublayers stays as it was
            del d["absent_sublayers"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def absent_attention_layers(self) -> set:
        return {s // 2 for s in self.absent_sublayers if s % 2 == 0}

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in MODEL_FAMILIES:
            raise UnsupportedArchitecture(
                f"unsupported architecture {arch!r}; supported: {', '.join(MODEL_FAMILIES)}")
        family = MODEL_FAMILIES[arch]
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitecture(f"unsupported activation {act!r} (the runtime implements SwiGLU with silu)")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        n_layers = cfg["num_hidden_layers"]
        absent = ()
        if family.read_blocks is not None:
            cfg, absent = family.read_blocks(cfg, heads, n_layers)
        biases = family.biases
        if biases is None:
            biases = (bool(cfg.get(family.bias_key, family.bias_default)),) * 2

        # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rope if rope else cfg.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "dynamic", "llama3"):
                raise UnsupportedArchitecture(f"unsupported rope scaling {kind!r}; supported: linear, dynamic, llama3")
            scaling["rope_type"] = kind
            if kind == "default":
                scaling = None

        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=biases[0],
            o_bias=biases[1],
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_windows=family.sliding_windows(cfg, n_layers),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            absent_sublayers=absent,
        )


def _decilm_blocks(cfg: dict, heads: int, n_layers: int) -> tuple:
    """A nemotron-nas config as a LLaMA config plus its absent (no-op) sublayers. The runtime
    runs one geometry for every layer: the KV-head grouping and FFN width of the layers that are
    present must agree."""
    blocks = cfg.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != n_layers:
        raise UnsupportedArchitecture(f"a DeciLM config needs block_configs, one per layer ({n_layers})")
    groups, widths, absent = set(), set(), []
    for i, block in enumerate(blocks):
        attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
        if attention.get("replace_with_linear") or ffn.get("replace_with_linear"):
            raise UnsupportedArchitecture(f"DeciLM layer {i}: linear replacement blocks are not supported")
        if attention.get("no_op"):
            absent.append(2 * i)
        else:
            groups.add(int(attention.get("n_heads_in_group", 1)))
        if ffn.get("no_op"):
            absent.append(2 * i + 1)
        else:
            if "ffn_mult" in ffn:
                raise UnsupportedArchitecture(f"DeciLM layer {i}: ffn_mult is not supported; give intermediate_size")
            widths.add(int(ffn.get("intermediate_size", cfg.get("intermediate_size", 0))))
    if len(groups) > 1 or len(widths) > 1:
        raise UnsupportedArchitecture(f"DeciLM layers of different geometry (heads per KV group {sorted(groups)}, "
                                      f"FFN widths {sorted(widths)}) are not supported")
    cfg = dict(cfg)
    cfg["num_key_value_heads"] = heads // (groups.pop() if groups else 1)
    cfg["intermediate_size"] = widths.pop() if widths else int(cfg.get("intermediate_size", 0))
    return cfg, tuple(absent)


def _arch_from_model_type(model_type: Optional[str]) -> Optional[str]:
    by_type = {f.model_type: f.architecture for f in MODEL_FAMILIES.values() if f.model_type}
    return by_type.get(model_type or "", model_type)


def _no_sliding_windows(cfg: dict, n_layers: int) -> list:
    return [None] * n_layers


def _mistral_sliding_windows(cfg: dict, n_layers: int) -> list:
    window = cfg.get("sliding_window")
    return [int(window)] * n_layers if window else [None] * n_layers


def _qwen2_sliding_windows(cfg: dict, n_layers: int) -> list:
    window = cfg.get("sliding_window")
    if not (window and cfg.get("use_sliding_window")):
        return [None] * n_layers
    types = cfg.get("layer_types")
    if types:
        return [int(window) if t == "sliding_attention" else None for t in types]
    first_full = cfg.get("max_window_layers", n_layers)
    return [int(window) if i >= first_full else None for i in range(n_layers)]


@dataclass(frozen=True)
class ModelFamily:
    """One model family the runtime runs: what its config, its GGUF files, adaskip.hf and export
    need to know of it. A new family is a record here (and its own reading code, if any)."""

    architecture: str  # the Hugging Face class name (config "architectures")
    model_type: Optional[str]  # config "model_type", for configs that name no architecture
    # (bias on q/k/v, bias on o) fixed by the family; None: both read from config[bias_key].
    biases: Optional[tuple] = None
    bias_key: str = "attention_bias"
    bias_default: bool = False
    sliding_windows: Callable = _no_sliding_windows  # (config, layers) -> per layer window or None
    # (config, heads, layers) -> (config as LLaMA's, absent sublayers), for per-layer block configs
    read_blocks: Optional[Callable] = None
    # GGUF: general.architecture, the blocks with a bias, whether llama.cpp permuted the Q/K
    # rows, and the config entries the file implies.
    gguf_name: Optional[str] = None
    gguf_biased_blocks: frozenset = frozenset()
    gguf_permuted_qk: bool = False
    gguf_config: tuple = ()
    hf_adapter: bool = False  # adaskip.hf runs the transformers class
    llama_layers: bool = False  # its layers are LLaMA's: export can write them


MODEL_FAMILIES = {f.architecture: f for f in (
    # LLaMA 2/3/3.1, Vicuna, SmolLM2
    ModelFamily("LlamaForCausalLM", "llama", gguf_name="llama", gguf_permuted_qk=True,
                gguf_config=(("attention_bias", False), ("mlp_bias", False)), hf_adapter=True, llama_layers=True),
    ModelFamily("MistralForCausalLM", "mistral", biases=(False, False), sliding_windows=_mistral_sliding_windows,
                hf_adapter=True),
    # Qwen2 GGUF files: bias on q/k/v (implied by the architecture), full attention in every layer
    ModelFamily("Qwen2ForCausalLM", "qwen2", biases=(True, False), sliding_windows=_qwen2_sliding_windows,
                gguf_name="qwen2", gguf_biased_blocks=frozenset({"attn_q", "attn_k", "attn_v"}),
                gguf_config=(("use_sliding_window", False), ("sliding_window", None)), hf_adapter=True),
    # InternLM v1: bias on q/k/v/o from `bias`
    ModelFamily("InternLMForCausalLM", "internlm", bias_key="bias", bias_default=True, llama_layers=True),
    # nemotron-nas (what `adaskip export` writes for vLLM): LLaMA layers, some attention or FFN
    # sublayers absent (no weights, identity). Named by its architecture only.
    ModelFamily("DeciLMForCausalLM", None, read_blocks=_decilm_blocks, llama_layers=True),
)}
GGUF_FAMILIES = {f.gguf_name: f for f in MODEL_FAMILIES.values() if f.gguf_name}
