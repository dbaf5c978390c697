"""`adaskip export`: a static skip plan as a checkpoint other engines serve natively.

A skipped sublayer's compensation multiplies the residual stream by its scale c. Every RMSNorm
(the final one included) is invariant to the scale of its input, so the same model is the one
where the skipped sublayer is the identity and every *later* running sublayer's output
projection (o_proj / down_proj, and their biases) is divided by the product of the scales
skipped before it. The export is therefore weights only (exact up to RMSNorm's eps):

  decilm  `DeciLMForCausalLM` (config model_type "nemotron-nas"): per layer block_configs whose
          `no_op` attention / FFN have no weights, no norm and, in vLLM, no KV cache. The config
          class is a small module written into the folder (`auto_map`; serve with
          trust_remote_code). Our runtime reads the folder back with load_model.
  llama   a plain `LlamaForCausalLM` with fewer layers, for plans that skip whole layers only.
  adaskip the decilm layout plus the plan's fitted stand-ins, for the vLLM plugin `adaskip_vllm`
          (architecture `AdaskipForCausalLM`, `adaskip[vllm]` installed in vLLM's environment):
          a `linear` stand-in is stored as its low-rank map (`<attn|mlp>_stand_in.down.weight`
          [rank, hidden], `.down.bias` [rank], `.up.weight` [hidden, rank]) and keeps the skipped
          sublayer's input norm, which its map reads; a `channel` stand-in whose scales are all
          equal is a scalar and folded as above, any other is stored (`<attn|mlp>_stand_in.channel`,
          float32 [hidden], the scalar multiplied in) and applied to the residual stream: a
          per-channel scale changes the RMS that every later norm divides by, so no later weight
          can absorb it exactly.

Carried over: the plan's static skips, compensation and (adaskip format) stand-ins. Not carried
over: online decode learning (per-request FFN gating stays in our runtime), plans whose skips
differ between prefill and decode.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from ._version import __version__
from .runtime.config import MODEL_FAMILIES
from .runtime.skip_plan import SkipPlan

CONFIG_MODULE = "configuration_adaskip_decilm"
CONFIG_CLASS = "AdaskipDeciLMConfig"
PLAN_FILE = "adaskip_plan.json"
MAX_SHARD_BYTES = 2 * 1024 ** 3

# Written into an exported folder: the configuration class vLLM / transformers load with
# trust_remote_code. Block configs become objects with attribute access (block.attention.no_op).
_CONFIG_SOURCE = '''"""Configuration of a DeciLM (nemotron-nas) checkpoint written by adaskip export."""
from types import SimpleNamespace

from transformers import LlamaConfig


def _namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _plain(value):
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


class AdaskipDeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_namespace(b) for b in (block_configs or [])]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in self.block_configs]
        return out
'''


def _check(model, plan: SkipPlan, fmt: str) -> None:
    args = model.args
    if not isinstance(plan, SkipPlan):
        raise TypeError(f"adaskip: export needs an adaskip SkipPlan, got {type(plan).__name__}")
    fmt = export_format(fmt)
    plan.check_model(args.num_layers, args.fingerprint())
    if plan.streaming:
        raise ValueError("adaskip: streaming KV-head groups have no serving format (a per-group band is not a "
                         "weight); serve the plan with our runtime, or export one without streaming groups")
    if plan.mode != "e2e" or plan.ramp:
        raise ValueError(f"adaskip: only plans that skip the same sublayers in prefill and decode (mode e2e, no "
                         f"ramp) become weights; this one is mode {plan.mode}{' with a ramp' if plan.ramp else ''}")
    if plan.stand_ins and not fmt.stand_ins:
        kinds = sorted({v.kind for v in plan.stand_ins.values()})
        raise ValueError(f"adaskip: the {fmt.name} format carries scalar compensation only; the plan's "
                         f"{'/'.join(kinds)} stand-ins need --format adaskip (format='adaskip', served by vLLM "
                         "with the adaskip[vllm] plugin), or export the plan with stand_in='scalar'")
    family = MODEL_FAMILIES.get(args.architecture)
    if family is None or not family.llama_layers:
        raise ValueError(f"adaskip: export writes LLaMA layers; a {args.architecture} does not fit them "
                         f"(Qwen2's q/k/v bias without an o bias, Mistral's sliding window)")
    if args.qkv_bias != args.o_bias:
        raise ValueError("adaskip: export writes LLaMA layers, whose attention has bias on all of q/k/v/o or none")
    if any(w is not None for w in args.sliding_windows):
        raise ValueError("adaskip: sliding-window attention is not carried by the exported formats")
    fmt.check(model, plan)


def _skips(model, plan: SkipPlan) -> dict:
    """Every sublayer that does not run, with its compensation scale (absent ones: 1)."""
    return {**{s: 1.0 for s in model.args.absent_sublayers}, **plan.skip_scales}


def _channel(stand_in) -> torch.Tensor:
    """A channel stand-in's scales as the runtime multiplies the stream by them: float32, the scalar in."""
    return stand_in.channel.float() * stand_in.scale


def applied_channels(plan: SkipPlan) -> dict:
    """Sublayer -> the channel scales the adaskip format stores and applies (those not all equal)."""
    out = {}
    for s, v in plan.stand_ins.items():
        if v.kind == "channel":
            c = _channel(v)
            if not bool((c == c[0]).all()):
                out[s] = c
    return out


def fold_scales(model, plan: SkipPlan) -> dict:
    """Every sublayer that does not run, with the scalar folded into the later output projections:
    its compensation scale (absent ones: 1); for a channel stand-in whose scales are all equal,
    that scale; 1 for a linear stand-in (the runtime adds its map and scales nothing) and for a
    channel stand-in that is applied instead."""
    scales = _skips(model, plan)
    for s, v in plan.stand_ins.items():
        c = _channel(v) if v.kind == "channel" else None
        scales[s] = float(c[0]) if c is not None and bool((c == c[0]).all()) else 1.0
    return scales


def stand_in_prefix(s: int) -> str:
    """Where the stand-in of sublayer s lives in the adaskip format's weights."""
    return f"model.layers.{s // 2}.{'attn' if s % 2 == 0 else 'mlp'}_stand_in."


def _skipped_layers(model, plan: SkipPlan) -> set:
    skips = _skips(model, plan)
    return {i for i in range(model.args.num_layers) if 2 * i in skips and 2 * i + 1 in skips}


class ExportFormat:
    """One checkpoint layout `adaskip export` writes: what a new format declares and does."""

    name: str
    help: str  # what the CLI says of it
    serve_flags: str = ""  # what `vllm serve` needs beside the folder
    files: tuple = ()  # more files written into the folder: (name, text) pairs
    stand_ins: bool = False  # whether it carries fitted (channel / linear) stand-ins

    def check(self, model, plan: SkipPlan) -> None:
        """Refuses a plan this format cannot carry (the checks common to all formats ran)."""

    def arrange(self, model, plan: SkipPlan, weights: dict) -> dict:
        """The folded weights under this format's names."""
        return weights

    def config(self, model, plan: SkipPlan) -> dict:
        """What this format's config.json adds to the LLaMA fields every format writes."""
        raise NotImplementedError


class DeciLMFormat(ExportFormat):
    name = "decilm"
    help = "DeciLMForCausalLM with no-op sublayers (vLLM, --trust-remote-code)"
    serve_flags = " --trust-remote-code"
    files = ((f"{CONFIG_MODULE}.py", _CONFIG_SOURCE),)

    def config(self, model, plan: SkipPlan) -> dict:
        a, skips = model.args, _skips(model, plan)
        blocks = [{"attention": {"no_op": 2 * i in skips, "n_heads_in_group": a.num_heads // a.num_kv_heads},
                   "ffn": {"no_op": 2 * i + 1 in skips, "intermediate_size": a.intermediate_size}}
                  for i in range(a.num_layers)]
        return dict(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", block_configs=blocks,
                    auto_map={"AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}"})


class LlamaFormat(ExportFormat):
    name = "llama"
    help = "a LlamaForCausalLM with fewer layers (plans that skip whole layers)"

    def check(self, model, plan: SkipPlan) -> None:
        partial = sorted({s // 2 for s in _skips(model, plan)} - _skipped_layers(model, plan))
        if partial:
            raise ValueError(f"adaskip: --format llama drops whole layers; the plan skips only one sublayer of "
                             f"layers {partial} (use the decilm format)")

    def arrange(self, model, plan: SkipPlan, weights: dict) -> dict:
        """The layers that remain, renumbered from 0."""
        kept = [i for i in range(model.args.num_layers) if i not in _skipped_layers(model, plan)]
        renumber = {old: new for new, old in enumerate(kept)}
        renamed = {}
        for k, v in weights.items():
            if k.startswith("model.layers."):
                i, rest = k[len("model.layers."):].split(".", 1)
                k = f"model.layers.{renumber[int(i)]}.{rest}"
            renamed[k] = v
        return renamed

    def config(self, model, plan: SkipPlan) -> dict:
        return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                    num_hidden_layers=model.args.num_layers - len(_skipped_layers(model, plan)))


class AdaskipFormat(DeciLMFormat):
    """The decilm layout (vLLM's no-op blocks: no module and no KV cache for a skipped sublayer)
    with the plan's fitted stand-ins, served by the adaskip_vllm plugin."""

    name = "adaskip"
    help = ("DeciLM layout plus fitted channel / linear stand-ins (vLLM with the adaskip[vllm] plugin, "
            "--trust-remote-code)")
    stand_ins = True

    def config(self, model, plan: SkipPlan) -> dict:
        cfg = super().config(model, plan)
        applied = applied_channels(plan)
        for s, v in plan.stand_ins.items():
            if v.kind == "linear":
                entry = {"kind": "linear", "rank": v.rank}
            elif s in applied:
                entry = {"kind": "channel"}
            else:
                continue  # all scales equal: folded like a scalar, nothing left to apply
            cfg["block_configs"][s // 2]["attention" if s % 2 == 0 else "ffn"]["stand_in"] = entry
        cfg["architectures"] = [PLUGIN_ARCHITECTURE]
        return cfg


# The model class the adaskip_vllm plugin registers with vLLM (adaskip_vllm.ARCHITECTURE).
PLUGIN_ARCHITECTURE = "AdaskipForCausalLM"


def plugin_install_command(python: str = "python") -> str:
    """How the plugin goes into vLLM's environment (`python`: that environment's interpreter).
    --no-deps: vLLM's environment already has the plugin's only needs (torch and vLLM), and pip
    then cannot replace vLLM's pinned torch; ADASKIP_CUDA=0 with --no-build-isolation: no
    extension is built there, even where that torch is a CUDA build."""
    import shlex

    root = Path(__file__).resolve().parent.parent
    source = f"{root}[vllm]" if (root / "pyproject.toml").is_file() and (root / "adaskip_vllm").is_dir() \
        else "adaskip[vllm]"
    return f"ADASKIP_CUDA=0 {python} -m pip install --no-build-isolation --no-deps {shlex.quote(source)}"


EXPORT_FORMATS = {f.name: f for f in (DeciLMFormat(), LlamaFormat(), AdaskipFormat())}
FORMATS = tuple(EXPORT_FORMATS)


def export_format(fmt: Union[str, ExportFormat]) -> ExportFormat:
    """The format object of `fmt` (a name or one already), or the error naming the known ones."""
    if isinstance(fmt, ExportFormat):
        return fmt
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"adaskip: unknown export format {fmt!r}; choose from {FORMATS}")
    return EXPORT_FORMATS[fmt]


def folded_weights(model, plan: SkipPlan, fmt: str = "decilm") -> dict:
    """The model's weights with the plan's compensation folded in and the skipped sublayers'
    weights (and the norms in front of them) left out; in the llama format, the layers that
    remain renumbered; in the adaskip format, the stand-ins' tensors added (a linear stand-in
    keeps its sublayer's input norm). New tensors: the model is not changed."""
    skips = fold_scales(model, plan)
    stand_ins, applied = plan.stand_ins, applied_channels(plan)
    state = model.state_dict()
    dtype = model.lm_head.weight.dtype
    out, cumulative = {}, 1.0
    for s in range(2 * model.args.num_layers):
        if s in skips:
            v, prefix = stand_ins.get(s), stand_in_prefix(s)
            if v is not None and v.kind == "linear":
                # Its output is added to the stream, which is 1 / cumulative of the runtime's here.
                out[prefix + "down.weight"] = v.down.to(dtype)
                out[prefix + "down.bias"] = v.down_bias.to(dtype)
                out[prefix + "up.weight"] = (v.up / cumulative).to(dtype)
            elif s in applied:
                # float32 whatever the model's dtype: the runtime multiplies in float32, rounding once.
                out[prefix + "channel"] = applied[s]
            cumulative *= skips[s]
            continue
        prefix = f"model.layers.{s // 2}."
        proj = "self_attn.o_proj" if s % 2 == 0 else "mlp.down_proj"
        for name in ("weight", "bias"):
            key = f"{prefix}{proj}.{name}"
            if key in state:
                out[key] = state[key] / cumulative  # cumulative is 1.0 until the first skip
    drop = set()
    for s in skips:
        prefix = f"model.layers.{s // 2}."
        drop |= {k for k in state if k.startswith(prefix + ("self_attn." if s % 2 == 0 else "mlp."))}
        if s not in stand_ins or stand_ins[s].kind != "linear":  # a linear map reads the normed input
            drop.add(prefix + ("input_layernorm.weight" if s % 2 == 0 else "post_attention_layernorm.weight"))
    weights = {k: out.get(k, v) for k, v in state.items() if k not in drop}
    weights.update({k: v for k, v in out.items() if k not in state})
    if model.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    weights = export_format(fmt).arrange(model, plan, weights)
    return {k: v.detach().contiguous() for k, v in weights.items()}


def export_config(model, plan: SkipPlan, fmt: str = "decilm") -> dict:
    """config.json of the exported checkpoint."""
    a = model.args
    dtype = str(model.lm_head.weight.dtype).replace("torch.", "")
    cfg = {"vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
           "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_heads,
           "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
           "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
           "max_position_embeddings": a.max_position_embeddings, "tie_word_embeddings": a.tie_word_embeddings,
           "attention_bias": a.qkv_bias, "mlp_bias": a.mlp_bias, "bos_token_id": a.bos_token_id,
           "eos_token_id": (a.eos_token_ids[0] if len(a.eos_token_ids) == 1 else list(a.eos_token_ids)) or None,
           "torch_dtype": dtype}
    if a.rope_scaling:
        cfg["rope_scaling"] = dict(a.rope_scaling)
    cfg.update(export_format(fmt).config(model, plan))
    return cfg


def _plan_record(model, plan: SkipPlan, fmt: str, profile, source: Optional[str]) -> dict:
    record = {"adaskip_version": __version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "format": export_format(fmt).name, "source": source, "source_fingerprint": model.args.fingerprint(),
              "plan": plan.to_dict(), "skipped_sublayers": sorted(plan.skip_scales),
              "kept_attention_layers": sorted(set(range(model.args.num_layers)) - {s // 2 for s in _skips(model, plan)
                                                                               if s % 2 == 0}),
              "not_exported": []}
    if plan.stand_ins:
        applied = applied_channels(plan)
        record["stand_ins"] = {str(s): {"stand_in": v.describe(), "exported": (
            "low-rank map on the sublayer's normed input" if v.kind == "linear" else
            "applied to the residual stream" if s in applied else "folded like a scalar (all scales equal)")}
            for s, v in plan.stand_ins.items()}
    if plan.online:
        record["not_exported"].append(f"online decode learning (window {plan.window}, beta {plan.beta:.4f}): the "
                                      "per-request FFN gating runs only in adaskip's runtime")
    if profile is not None:
        record["profile"] = {"fingerprint": profile.fingerprint, "data": profile.data, "sources": profile.sources,
                             "num_requests": profile.num_requests, "tokens": profile.tokens}
    return record


def _write_weights(weights: dict, folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for k in sorted(weights):
        nbytes = weights[k].numel() * weights[k].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = weights[k].cpu()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in weights.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _default_permissions(folder: Path) -> None:
    """What a plain mkdir / open would have given (the temporary folder and some writers use
    owner-only modes), so that a server running as another user can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def check_out_dir(out_dir: Union[str, os.PathLike], force: bool = False) -> Path:
    """The export folder: refused when it is a file, or a folder with something in it (unless force)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"adaskip: the export folder {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"adaskip: the export folder {out} is not empty; pass force=True (--force) to replace it")
    return out


def export(model, plan: SkipPlan, out_dir: Union[str, os.PathLike], *, tokenizer=None, profile=None,
           format: str = "decilm", force: bool = False, source: Optional[str] = None,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes `model` (our runtime's) with `plan` folded in to `out_dir`: safetensors (sharded
    above max_shard_bytes), config.json, the configuration module (decilm), the tokenizer and
    generation config when `tokenizer` is given, and adaskip_plan.json (the plan, the profile's
    fingerprint and data, what was not exported). Everything is written into a temporary folder
    beside `out_dir` and moved into place at the end: a failure leaves nothing behind. Returns
    the folder."""
    _check(model, plan, format)
    out = check_out_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_weights(folded_weights(model, plan, format), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(export_config(model, plan, format), indent=1))
        for name, text in export_format(format).files:
            (tmp / name).write_text(text)
        a = model.args
        generation = {"bos_token_id": a.bos_token_id, "eos_token_id": list(a.eos_token_ids) or None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / PLAN_FILE).write_text(json.dumps(_plan_record(model, plan, format, profile, source), indent=1))
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
