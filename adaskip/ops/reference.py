"""Pure-PyTorch references of the adaskip ops.

They define what the CUDA kernels compute (same rounding points, same statistics layout) and
serve as the CPU implementation. Statistics layout, shared with csrc/:
  stats  float32 [num_sublayers, batch, 3]: (sum of per-token cosine(a, b),
         sum of per-token |b| / |a|, token count), a = residual before the sublayer, b = after.
  gates  uint8   [num_sublayers, batch]: GATE_UNDECIDED / GATE_SKIP / GATE_RUN.
  scales float32 [num_sublayers, batch]: compensation scale of a skipped sublayer.
  channel_scales float32 [num_sublayers, hidden] (or [hidden] for scale_rms_norm): optional
         per-channel compensation; a skipped row gets residual[h] * (scale * channel_scales[h]),
         the product and the multiply in fp32, rounded once to the storage dtype.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

GATE_UNDECIDED = 0  # sublayer runs; its decision is still open
GATE_SKIP = 1  # sublayer skipped: residual *= compensation scale
GATE_RUN = 2  # sublayer runs; decided (or never a candidate)

NORM_FLOOR = 1e-12  # norms below this count as zero (kNormFloor in csrc/common.cuh)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Argument checks (the CUDA side makes the same ones in csrc/checks.h)

def _fail(msg: str) -> None:
    raise ValueError(f"adaskip: {msg}")


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        _fail(f"'{name}' is on {t.device} but the other inputs are on {device}")


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[tokens, hidden] or [batch, seq, hidden] -> a [batch, seq, hidden] view."""
    if t.dim() not in (2, 3):
        _fail(f"'{name}' must be [tokens, hidden] or [batch, seq, hidden], got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        _fail(f"'{name}' has an empty hidden dimension")
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        _fail(f"'{name}' must be contiguous in its last (hidden) dimension, got strides {t.stride()}")
    return t.unsqueeze(0) if t.dim() == 2 else t


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        _fail(f"'{name}' must be float32, float16 or bfloat16, got {t.dtype}")


def check_stats(stats: torch.Tensor, batch: int, sublayer: int, device: torch.device) -> None:
    check_same_device("stats", stats, device)
    if stats.dtype != torch.float32:
        _fail(f"'stats' must be float32, got {stats.dtype}")
    if stats.dim() != 3 or stats.shape[2] != 3:
        _fail(f"'stats' must be [num_sublayers, batch, 3], got shape {tuple(stats.shape)}")
    if not stats.is_contiguous():
        _fail("'stats' must be contiguous")
    if stats.shape[1] != batch:
        _fail(f"'stats' holds {stats.shape[1]} sequences but the input has batch {batch}")
    if not 0 <= sublayer < stats.shape[0]:
        _fail(f"'sublayer' {sublayer} is out of range for 'stats' with {stats.shape[0]} sublayers")


def check_gates_scales(gates: torch.Tensor, scales: torch.Tensor, device: torch.device) -> None:
    check_same_device("gates", gates, device)
    check_same_device("scales", scales, device)
    if gates.dtype != torch.uint8:
        _fail(f"'gates' must be uint8, got {gates.dtype}")
    if scales.dtype != torch.float32:
        _fail(f"'scales' must be float32, got {scales.dtype}")
    if gates.dim() != 2:
        _fail(f"'gates' must be [num_sublayers, batch], got shape {tuple(gates.shape)}")
    if scales.shape != gates.shape:
        _fail(f"'scales' has shape {tuple(scales.shape)} but 'gates' has shape {tuple(gates.shape)}")
    if not gates.is_contiguous():
        _fail("'gates' must be contiguous")
    if not scales.is_contiguous():
        _fail("'scales' must be contiguous")


def check_channel_scales(channel_scales: torch.Tensor, num_sublayers: Optional[int], hidden: int,
                         device: torch.device) -> None:
    """float32, contiguous, on `device`; [hidden] when num_sublayers is None, else
    [num_sublayers, hidden] (check_channel_scales in csrc/checks.h)."""
    check_same_device("channel_scales", channel_scales, device)
    if channel_scales.dtype != torch.float32:
        _fail(f"'channel_scales' must be float32, got {channel_scales.dtype}")
    shape = tuple(channel_scales.shape)
    if num_sublayers is None:
        if shape != (hidden,):
            _fail(f"'channel_scales' must be [hidden] = [{hidden}], got shape {shape}")
    elif shape != (num_sublayers, hidden):
        _fail(f"'channel_scales' must be [num_sublayers, hidden] = [{num_sublayers}, {hidden}], "
              f"got shape {shape}")
    if not channel_scales.is_contiguous():
        _fail("'channel_scales' must be contiguous")


def _compensate(r3: torch.Tensor, scale, channel: Optional[torch.Tensor]) -> torch.Tensor:
    """r3 [B, S, H] times scale ([B] or a float), and times channel [H] if given: the factor formed
    in fp32, the multiply in fp32, rounded once to r3's dtype (what the kernels do)."""
    if isinstance(scale, torch.Tensor):
        scale = scale[:, None, None]
    factor = scale if channel is None else scale * channel
    return (r3.float() * factor).to(r3.dtype)


def check_seq_lens(seq_lens: Optional[torch.Tensor], batch: int, device: torch.device) -> None:
    if seq_lens is None:
        return
    check_same_device("seq_lens", seq_lens, device)
    if seq_lens.dtype not in (torch.int32, torch.int64):
        _fail(f"'seq_lens' must be int32 or int64, got {seq_lens.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != batch:
        _fail(f"'seq_lens' must be [batch] = [{batch}], got shape {tuple(seq_lens.shape)}")


def _check_pair(first, first_name, second, second_name):
    device = first.device
    check_same_device(second_name, second, device)
    check_float_dtype(first, first_name)
    if second.dtype != first.dtype:
        _fail(f"'{second_name}' has dtype {second.dtype} but '{first_name}' has {first.dtype}")
    f3, s3 = as_rows(first, first_name), as_rows(second, second_name)
    if first.shape != second.shape:
        _fail(f"'{first_name}' has shape {tuple(first.shape)} but '{second_name}' has shape {tuple(second.shape)}")
    return f3, s3


# ---------------------------------------------------------------------------------------------
# The ops

def _accumulate_stats(stats, sublayer, a, b, seq_lens) -> None:
    """Adds per-sequence sums of cos(a, b) and |b|/|a| over valid tokens. a, b: [B, S, H]."""
    af, bf = a.float(), b.float()
    na = af.pow(2).sum(-1).sqrt()
    nb = bf.pow(2).sum(-1).sqrt()
    cos = (af * bf).sum(-1) / (na.clamp_min(NORM_FLOOR) * nb.clamp_min(NORM_FLOOR))
    ratio = nb / na.clamp_min(NORM_FLOOR)
    batch, seq = a.shape[0], a.shape[1]
    if seq_lens is None:
        lens = torch.full((batch,), seq, device=a.device)
    else:
        lens = seq_lens.to(torch.int64).clamp(0, seq)
    valid = torch.arange(seq, device=a.device)[None, :] < lens[:, None]
    slot = stats[sublayer]
    slot[:, 0] += torch.where(valid, cos, 0.0).sum(1)
    slot[:, 1] += torch.where(valid, ratio, 0.0).sum(1)
    slot[:, 2] += lens.to(torch.float32)


def rms_norm(b: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm's rounding order: normalize in fp32, round, then multiply by the weight."""
    bf = b.float()
    normed = (bf * torch.rsqrt(bf.pow(2).mean(-1, keepdim=True) + eps)).to(b.dtype)
    return weight * normed


def _check_norm_args(x, residual, weight, eps, addresses: bool = True):
    """The checks shared by the add+norm ops; returns [B, S, H] views of x and residual
    (addresses: also that x and residual are different memory, which tensors without storage,
    as in tracing, cannot answer)."""
    x3, a3 = _check_pair(x, "x", residual, "residual")
    check_same_device("weight", weight, x.device)
    if weight.dtype != x.dtype:
        _fail(f"'weight' has dtype {weight.dtype} but 'x' has {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        _fail(f"'weight' must be [hidden] = [{x.shape[-1]}], got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        _fail("'weight' must be contiguous")
    if not eps > 0:
        _fail(f"'eps' must be positive, got {eps}")
    if addresses and x.numel() > 0 and x.data_ptr() == residual.data_ptr():
        _fail("'x' and 'residual' must be different tensors")
    return x3, a3


def _check_gates_for(gates, scales, sublayer, batch, device, name: str) -> None:
    check_gates_scales(gates, scales, device)
    if gates.shape[1] != batch:
        _fail(f"'gates' holds {gates.shape[1]} sequences but '{name}' has batch {batch}")
    if not 0 <= sublayer < gates.shape[0]:
        _fail(f"'sublayer' {sublayer} is out of range for 'gates' with {gates.shape[0]} sublayers")


def check_fused_add_rms_norm(x, residual, weight, eps, stats=None, sublayer=0, seq_lens=None, gates=None,
                             scales=None, channel_scales=None, addresses: bool = True):
    """Every check of fused_add_rms_norm (csrc/checks.h); returns [B, S, H] views of x, residual."""
    x3, a3 = _check_norm_args(x, residual, weight, eps, addresses)
    device = x.device
    if stats is not None:
        check_stats(stats, a3.shape[0], sublayer, device)
    check_seq_lens(seq_lens, a3.shape[0], device)
    if (gates is None) != (scales is None):
        _fail("pass 'gates' and 'scales' together")
    if gates is not None:
        _check_gates_for(gates, scales, sublayer, a3.shape[0], device, "residual")
        if channel_scales is not None:
            check_channel_scales(channel_scales, gates.shape[0], a3.shape[-1], device)
    elif channel_scales is not None:
        _fail("'channel_scales' is only allowed together with 'gates' and 'scales'")
    return x3, a3


def fused_add_rms_norm(x, residual, weight, eps, stats=None, sublayer=0, seq_lens=None, gates=None,
                       scales=None, channel_scales=None) -> None:
    x3, a3 = check_fused_add_rms_norm(x, residual, weight, eps, stats, sublayer, seq_lens, gates, scales,
                                      channel_scales)
    b3 = a3 + x3  # rounded to the storage dtype, like the kernel
    if gates is not None:
        # Gated off: the sublayer did not run (x holds nothing); the compensation stands in.
        channel = None if channel_scales is None else channel_scales[sublayer]
        skip = (gates[sublayer] == GATE_SKIP)[:, None, None]
        b3 = torch.where(skip, _compensate(a3, scales[sublayer], channel), b3)
    if stats is not None:
        _accumulate_stats(stats, sublayer, a3, b3, seq_lens)
    x3.copy_(rms_norm(b3, weight, eps))
    a3.copy_(b3)


def check_scale_rms_norm(x, residual, weight, eps, scale, channel_scales=None, addresses: bool = True):
    """Every check of scale_rms_norm; returns the [B, S, H] view of residual."""
    _, a3 = _check_norm_args(x, residual, weight, eps, addresses)
    if not math.isfinite(scale):
        _fail(f"'scale' must be finite, got {scale}")
    if channel_scales is not None:
        check_channel_scales(channel_scales, None, a3.shape[-1], x.device)
    return a3


def scale_rms_norm(x, residual, weight, eps, scale, channel_scales=None) -> None:
    a3 = check_scale_rms_norm(x, residual, weight, eps, scale, channel_scales)
    if channel_scales is not None:
        # scale * channel_scales in fp32 (scale rounded to fp32 first, as the kernel takes it).
        a3.copy_(_compensate(a3, scale, channel_scales))
    else:
        # x held the skipped sublayer's input: it is only written. The multiply rounds like
        # torch's in-place multiply of the stream by a float.
        a3.mul_(scale)
    as_rows(x, "x").copy_(rms_norm(a3, weight, eps))


def check_io_similarity_stats(before, after, stats, sublayer, seq_lens=None):
    """Every check of io_similarity_stats; returns [B, S, H] views of before and after."""
    a3, b3 = _check_pair(before, "before", after, "after")
    check_stats(stats, a3.shape[0], sublayer, before.device)
    check_seq_lens(seq_lens, a3.shape[0], before.device)
    return a3, b3


def io_similarity_stats(before, after, stats, sublayer, seq_lens=None) -> None:
    a3, b3 = check_io_similarity_stats(before, after, stats, sublayer, seq_lens)
    _accumulate_stats(stats, sublayer, a3, b3, seq_lens)


def check_skip_or_scale(residual, gates, scales, sublayer, channel_scales=None):
    """Every check of skip_or_scale; returns the [B, S, H] view of residual."""
    check_float_dtype(residual, "residual")
    r3 = as_rows(residual, "residual")
    _check_gates_for(gates, scales, sublayer, r3.shape[0], residual.device, "residual")
    if channel_scales is not None:
        check_channel_scales(channel_scales, gates.shape[0], r3.shape[-1], residual.device)
    return r3


def skip_or_scale(residual, gates, scales, sublayer, channel_scales=None) -> None:
    r3 = check_skip_or_scale(residual, gates, scales, sublayer, channel_scales)
    channel = None if channel_scales is None else channel_scales[sublayer]
    skip = gates[sublayer] == GATE_SKIP
    scaled = _compensate(r3, torch.where(skip, scales[sublayer], 1.0), channel)
    r3.copy_(torch.where(skip[:, None, None], scaled, r3))


def check_update_gates(stats, gates, scales, window, beta, running=None) -> None:
    """Every check of update_gates."""
    check_gates_scales(gates, scales, gates.device)
    if running is not None:
        check_same_device("running", running, gates.device)
        if running.dtype != torch.bool:
            _fail(f"'running' must be bool, got {running.dtype}")
        if tuple(running.shape) != (gates.shape[0],) or not running.is_contiguous():
            _fail(f"'running' must be [num_sublayers] = [{gates.shape[0]}] and contiguous, got shape "
                  f"{tuple(running.shape)}")
    check_stats(stats, gates.shape[1], 0, gates.device)
    if stats.shape[0] != gates.shape[0]:
        _fail(f"'stats' has {stats.shape[0]} sublayers but 'gates' has {gates.shape[0]}")
    if window < 1:
        _fail(f"'window' must be at least 1 token, got {window}")
    if not (math.isfinite(beta) and -1.0 <= beta <= 1.0):
        _fail(f"'beta' is a cosine-similarity threshold in [-1, 1], got {beta}")


def update_gates(stats, gates, scales, window, beta, running=None) -> None:
    check_update_gates(stats, gates, scales, window, beta, running)
    count = stats[..., 2]
    ready = (gates == GATE_UNDECIDED) & (count >= float(window))
    safe = count.clamp_min(1.0)
    mean_cos = stats[..., 0] / safe
    skip = ready & (mean_cos >= torch.tensor(beta, dtype=torch.float32))
    scales.copy_(torch.where(skip, stats[..., 1] / safe, scales))
    gates.copy_(torch.where(skip, GATE_SKIP, torch.where(ready, GATE_RUN, gates)).to(torch.uint8))
    if running is not None:
        running.copy_((gates != GATE_SKIP).any(dim=1))


# ---------------------------------------------------------------------------------------------
# Gated decode GEMVs: the whole call is skipped when every token's sequence is gated off.

def _check_gemv(x, weights, gates, sublayer, out) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(f"'x' must be float16 or bfloat16 (the gated decode GEMV), got {x.dtype}")
    if x.dim() != 2:
        _fail(f"'x' must be [tokens, in_features], got shape {tuple(x.shape)}")
    tokens, k = x.shape
    if not 1 <= tokens <= 8:
        _fail(f"the gated GEMV takes 1 to 8 tokens, got {tokens}")
    if x.stride(1) != 1:
        _fail("'x' must be contiguous in its last dimension")
    rows = None
    for name, w in weights:
        check_same_device(name, w, x.device)
        if w.dtype != x.dtype:
            _fail(f"'{name}' has dtype {w.dtype} but 'x' has {x.dtype}")
        if w.dim() != 2 or w.shape[1] != k:
            _fail(f"'{name}' must be [out_features, {k}], got shape {tuple(w.shape)}")
        if not w.is_contiguous():
            _fail(f"'{name}' must be contiguous")
        if rows is not None and w.shape[0] != rows:
            _fail(f"'{name}' has {w.shape[0]} rows but the other weight has {rows}")
        rows = w.shape[0]
    check_same_device("out", out, x.device)
    if out.dtype != x.dtype or tuple(out.shape) != (tokens, rows):
        _fail(f"'out' must be {x.dtype} [{tokens}, {rows}], got {out.dtype} {tuple(out.shape)}")
    if out.stride(1) != 1:
        _fail("'out' must be contiguous in its last dimension")
    if gates is None:
        return
    check_same_device("gates", gates, x.device)
    if gates.dtype != torch.uint8 or gates.dim() != 2 or not gates.is_contiguous():
        _fail("'gates' must be contiguous uint8 [num_sublayers, batch]")
    if gates.shape[1] != tokens:
        _fail(f"'gates' holds {gates.shape[1]} sequences but 'x' has {tokens} tokens (one per sequence)")
    if not 0 <= sublayer < gates.shape[0]:
        _fail(f"'sublayer' {sublayer} is out of range for 'gates' with {gates.shape[0]} sublayers")


GEMV_PIPELINE_ENV = "ADASKIP_GEMV_PIPELINE"
_C_SPACE = " \t\n\v\f\r"  # what C's isspace takes: the kernels' parser strips these alone


def gemv_pipeline_mode(value: Optional[str]) -> str:
    """'auto', 'on' or 'off': what a value of ADASKIP_GEMV_PIPELINE (None: unset) asks of the
    gated GEMV. Case and surrounding whitespace are ignored; unset, empty and 'auto' are auto,
    '1' is on and '0' off. Anything else raises ValueError naming the variable and the value: a
    typo read as auto would let a benchmark that meant to force a kernel measure the other one.
    Mirrors parse_pipeline_mode in csrc/host_choices.h (same values, same message)."""
    if value is None:
        return "auto"
    v = value.strip(_C_SPACE)
    v = v.lower() if v.isascii() else v
    if v in ("", "auto"):
        return "auto"
    if v in ("on", "1"):
        return "on"
    if v in ("off", "0"):
        return "off"
    raise ValueError(f"adaskip: {GEMV_PIPELINE_ENV} must be on, off or auto (or 1 / 0; case and surrounding "
                     f"whitespace are ignored), got '{value}'")


def check_gated_linear(x, weight, gates, sublayer, out) -> None:
    """Every check of gated_linear, ADASKIP_GEMV_PIPELINE's value included (the kernel reads it
    on every launch, so a bad value is refused here too, whatever the device)."""
    _check_gemv(x, [("weight", weight)], gates, sublayer, out)
    gemv_pipeline_mode(os.environ.get(GEMV_PIPELINE_ENV))


def check_gated_swiglu_up(x, w_gate, w_up, gates, sublayer, out) -> None:
    """Every check of gated_swiglu_up, ADASKIP_GEMV_PIPELINE's value included."""
    _check_gemv(x, [("w_gate", w_gate), ("w_up", w_up)], gates, sublayer, out)
    gemv_pipeline_mode(os.environ.get(GEMV_PIPELINE_ENV))


def _all_gated_off(gates, sublayer) -> bool:
    return gates is not None and bool((gates[sublayer] == GATE_SKIP).all())


def gated_linear(x, weight, gates=None, sublayer=0, out=None) -> None:
    check_gated_linear(x, weight, gates, sublayer, out)
    if _all_gated_off(gates, sublayer):
        return
    out.copy_((x.float() @ weight.float().t()).to(x.dtype))


def gated_swiglu_up(x, w_gate, w_up, gates=None, sublayer=0, out=None) -> None:
    check_gated_swiglu_up(x, w_gate, w_up, gates, sublayer, out)
    if _all_gated_off(gates, sublayer):
        return
    g = (x.float() @ w_gate.float().t()).to(x.dtype)
    u = (x.float() @ w_up.float().t()).to(x.dtype)
    out.copy_(torch.nn.functional.silu(g) * u)


# ---------------------------------------------------------------------------------------------
# Decode attention: one query token per sequence over the filled part of a static KV cache.

DECODE_HEAD_DIMS = (64, 128)
DECODE_MAX_GROUP = 8  # query heads per KV head


def check_kv_cache(c, name: str, q, kv_heads: int, kv_heads_of: str) -> None:
    """One KV cache [batch, kv_heads, capacity, head_dim] for the one-token queries q [batch,
    heads, head_dim] (csrc/checks.h, same messages); kv_heads < 0: any number."""
    check_same_device(name, c, q.device)
    if c.dtype != q.dtype:
        _fail(f"'{name}' has dtype {c.dtype} but 'q' has {q.dtype}")
    if c.dim() != 4:
        _fail(f"'{name}' must be [batch, kv_heads, capacity, head_dim], got shape {tuple(c.shape)}")
    if c.shape[0] != q.shape[0]:
        _fail(f"'{name}' holds {c.shape[0]} sequences but 'q' has {q.shape[0]}")
    if kv_heads >= 0 and c.shape[1] != kv_heads:
        _fail(f"'{name}' has {c.shape[1]} KV heads but '{kv_heads_of}' has {kv_heads}")
    if c.shape[3] != q.shape[2]:
        _fail(f"'{name}' has head_dim {c.shape[3]} but 'q' has {q.shape[2]}")
    if c.stride(3) != 1:
        _fail(f"'{name}' must be contiguous in head_dim, got strides {c.stride()}")


def check_kv_caches(k_cache, v_cache, q, kv_heads: int, kv_heads_of: str) -> None:
    """The key and value caches of decode_attention and rotary_kv_write (csrc/checks.h): as
    many KV heads as `kv_heads_of` has (kv_heads < 0: as k_cache has), the same capacity."""
    check_kv_cache(k_cache, "k_cache", q, kv_heads, kv_heads_of)
    if kv_heads < 0:
        kv_heads, kv_heads_of = k_cache.shape[1], "k_cache"
    check_kv_cache(v_cache, "v_cache", q, kv_heads, kv_heads_of)
    if v_cache.shape[2] != k_cache.shape[2]:
        _fail(f"'v_cache' holds {v_cache.shape[2]} slots but 'k_cache' holds {k_cache.shape[2]}")


DECODE_MAX_SPLITS = 256


def check_decode_attention(q, k_cache, v_cache, kv_lens, scale, window, out, num_splits: int = 0,
                           addresses: bool = True) -> None:
    """The checks of csrc/decode_attention.cu, same messages (addresses: also the 16-byte
    alignment checks, which tensors without storage, as in tracing, cannot answer)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        _fail(f"'q' must be float16 or bfloat16 (the decode attention kernel), got {q.dtype}")
    if q.dim() != 3:
        _fail(f"'q' must be [batch, heads, head_dim] (one token per sequence), got shape {tuple(q.shape)}")
    batch, heads, dim = q.shape
    if dim not in DECODE_HEAD_DIMS:
        _fail(f"the decode attention kernel takes head_dim 64 or 128, got {dim}")
    if q.stride(2) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or (addresses and q.data_ptr() % 16):
        _fail(f"'q' must be contiguous in head_dim and 16-byte aligned, got strides {q.stride()}")
    check_kv_caches(k_cache, v_cache, q, -1, "k_cache")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(s % 8 for s in c.stride()[:3]) or (addresses and c.data_ptr() % 16):
            _fail(f"'{name}' must be 16-byte aligned with strides that are multiples of 8, got strides {c.stride()}")
    kv_heads = k_cache.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        _fail(f"'q' has {heads} heads, not a multiple of the cache's {kv_heads} KV heads")
    if heads // kv_heads > DECODE_MAX_GROUP:
        _fail(f"the decode attention kernel takes at most {DECODE_MAX_GROUP} query heads per KV head, "
              f"got {heads // kv_heads}")
    check_same_device("kv_lens", kv_lens, q.device)
    if kv_lens.dtype not in (torch.int32, torch.int64):
        _fail(f"'kv_lens' must be int32 or int64, got {kv_lens.dtype}")
    if kv_lens.dim() != 1 or kv_lens.shape[0] != batch:
        _fail(f"'kv_lens' must be [batch] = [{batch}], got shape {tuple(kv_lens.shape)}")
    if not kv_lens.is_contiguous():
        _fail("'kv_lens' must be contiguous")
    if window < 0:
        _fail(f"'window' must be >= 0 (0: no sliding window), got {window}")
    if not (math.isfinite(scale) and scale > 0):
        _fail(f"'scale' must be a positive finite number, got {scale}")
    check_same_device("out", out, q.device)
    if out.dtype != q.dtype or out.shape != q.shape:
        _fail(f"'out' must be {q.dtype} {list(q.shape)}, got {out.dtype} {list(out.shape)}")
    if out.stride(2) != 1:
        _fail("'out' must be contiguous in head_dim")
    if not 0 <= num_splits <= DECODE_MAX_SPLITS:
        _fail(f"'num_splits' must be in [0, {DECODE_MAX_SPLITS}] (0: as many as fill the GPU once), got {num_splits}")


def decode_attention(q, k_cache, v_cache, kv_lens, scale, window, out, num_splits=0) -> None:
    check_decode_attention(q, k_cache, v_cache, kv_lens, scale, window, out, num_splits=num_splits)
    batch, heads, dim = q.shape
    capacity = k_cache.shape[2]
    group = heads // k_cache.shape[1]
    end = kv_lens.to(torch.long).clamp(0, capacity)[:, None]
    slots = torch.arange(capacity, device=q.device)[None]
    allowed = slots < end
    if window > 0:
        allowed &= slots >= end - window
    k = k_cache.float().repeat_interleave(group, dim=1)
    v = v_cache.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhkd->bhk", q.float(), k) * scale
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a sequence without keys: zeros
    out.copy_(torch.einsum("bhk,bhkd->bhd", p, v).to(out.dtype))


# ---------------------------------------------------------------------------------------------
# The decode step's rotary embedding and KV-cache write in one op.

def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in x's dtype, each product and the sum rounded (torch's
    eager rounding); cos, sin broadcast against x."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def check_rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, positions) -> None:
    """The checks of csrc/rotary_kv.cu, same messages."""
    check_float_dtype(q, "q")
    if q.dim() != 3:
        _fail(f"'q' must be [batch, heads, head_dim] (one token per sequence), got shape {tuple(q.shape)}")
    if q.stride(2) != 1:
        _fail(f"'q' must be contiguous in head_dim, got strides {q.stride()}")
    batch, _, dim = q.shape
    if dim % 2 or dim == 0 or dim > 1024:
        _fail(f"head_dim must be even and at most 1024, got {dim}")
    for name, t in (("k", k), ("v", v)):
        check_same_device(name, t, q.device)
        if t.dtype != q.dtype:
            _fail(f"'{name}' has dtype {t.dtype} but 'q' has {q.dtype}")
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != dim:
            _fail(f"'{name}' must be [batch, heads, head_dim] with the batch and head_dim of 'q', got shape "
                  f"{tuple(t.shape)}")
        if name == "v" and t.shape[1] != k.shape[1]:
            _fail(f"'v' has {t.shape[1]} heads but 'k' has {k.shape[1]}")
        if t.stride(2) != 1:
            _fail(f"'{name}' must be contiguous in head_dim, got strides {t.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_same_device(name, t, q.device)
        if t.dtype != q.dtype:
            _fail(f"'{name}' has dtype {t.dtype} but 'q' has {q.dtype}")
        if t.dim() != 2 or tuple(t.shape) != (batch, dim):
            _fail(f"'{name}' must be [batch, head_dim] = [{batch}, {dim}], got shape {tuple(t.shape)}")
        if t.stride(1) != 1:
            _fail(f"'{name}' must be contiguous in head_dim")
    check_kv_caches(k_cache, v_cache, q, k.shape[1], "k")
    check_same_device("positions", positions, q.device)
    if positions.dtype != torch.int64 or positions.dim() != 1 or positions.shape[0] != batch:
        _fail(f"'positions' must be int64 [batch] = [{batch}], got {positions.dtype} {list(positions.shape)}")
    if not positions.is_contiguous():
        _fail("'positions' must be contiguous")


def rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, positions) -> None:
    check_rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, positions)
    c, s = cos[:, None], sin[:, None]
    q.copy_(rotate(q, c, s))
    keys = rotate(k, c, s)
    inside = (positions >= 0) & (positions < k_cache.shape[2])  # a position outside the cache: not written
    rows = torch.arange(q.shape[0], device=q.device)[inside]
    slots = positions[inside]
    k_cache[rows, :, slots] = keys[inside]
    v_cache[rows, :, slots] = v[inside]
