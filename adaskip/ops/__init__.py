"""adaskip.ops: fused residual / similarity / gating ops.

With the compiled extension (`adaskip._C`), CUDA tensors run our kernels and CPU tensors run the
PyTorch reference (registered as the ops' CPU kernel), both through torch.ops.adaskip, so the
ops work under torch.compile and CUDA-graph capture. Without it, CPU tensors run the reference
directly and CUDA tensors are refused (no silent copy to the CPU).

Buffers (see also new_stats / new_gates / new_scales):
  stats  float32 [num_sublayers, batch, 3]: per (sublayer, sequence) the sum of per-token
         cosine similarity between the residual before and after the sublayer, the sum of the
         per-token norm ratios |after| / |before|, and the token count.
  gates  uint8   [num_sublayers, batch]: GATE_UNDECIDED, GATE_SKIP or GATE_RUN.
  scales float32 [num_sublayers, batch]: compensation scale applied to a skipped sublayer.
  channel_scales float32 [num_sublayers, hidden] (scale_rms_norm: [hidden]), optional: a
         per-channel compensation table; a skipped row gets residual[h] * (scale *
         channel_scales[h]), the product and the multiply in fp32, rounded once.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from . import reference as _ref
from .reference import GATE_RUN, GATE_SKIP, GATE_UNDECIDED

__all__ = [
    "GATE_UNDECIDED", "GATE_SKIP", "GATE_RUN", "backend", "extension_error",
    "fused_add_rms_norm", "scale_rms_norm", "io_similarity_stats", "skip_or_scale", "update_gates",
    "new_stats", "new_gates", "new_scales", "mean_stats", "gated_linear", "gated_swiglu_up",
    "decode_attention", "decode_attention_serves", "rotary_kv_write",
    "decode_splits", "decode_tile_keys", "gemv_pipeline_mode", "gemv_uses_pipeline",
]

_OP_NAMES = ("fused_add_rms_norm", "scale_rms_norm", "io_similarity_stats", "skip_or_scale", "update_gates", "gated_linear",
             "gated_swiglu_up", "decode_attention", "rotary_kv_write")


def _load_extension():
    try:
        from .. import _C  # noqa: F401  (importing it registers torch.ops.adaskip)
    except ImportError as e:
        try:
            from .._build_info import TORCH_VERSION as built_for
        except ImportError:
            built_for = None
        hint = ""
        if built_for and built_for != torch.__version__:
            hint = (f" It was built against torch {built_for} but torch {torch.__version__} is "
                    "running: rebuild with `pip install --no-build-isolation .`.")
        return f"{e}.{hint}"
    return None


_EXTENSION_ERROR = _load_extension()
HAS_EXTENSION = _EXTENSION_ERROR is None

if HAS_EXTENSION:
    # The reference is the CPU kernel; fake implementations let torch.compile / FakeTensor trace
    # the ops. Every op only mutates its arguments, so a fake returns nothing: it makes the op's
    # checks of shapes, dtypes, strides and devices (the kernels' checks, same messages), all
    # but those of addresses (aliasing, 16-byte alignment), which fake tensors cannot answer.
    _FAKE_CHECKS = {
        "fused_add_rms_norm": lambda *a, **k: _ref.check_fused_add_rms_norm(*a, **k, addresses=False),
        "scale_rms_norm": lambda *a, **k: _ref.check_scale_rms_norm(*a, **k, addresses=False),
        "io_similarity_stats": _ref.check_io_similarity_stats,
        "skip_or_scale": _ref.check_skip_or_scale,
        "update_gates": _ref.check_update_gates,
        "gated_linear": _ref.check_gated_linear,
        "gated_swiglu_up": _ref.check_gated_swiglu_up,
        "decode_attention": lambda *a, **k: _ref.check_decode_attention(*a, **k, addresses=False),
        "rotary_kv_write": _ref.check_rotary_kv_write,
    }
    assert set(_FAKE_CHECKS) == set(_OP_NAMES)
    _lib = torch.library.Library("adaskip", "IMPL")
    for _name in _OP_NAMES:
        _lib.impl(_name, getattr(_ref, _name), "CPU")

        def _fake(*args, _check=_FAKE_CHECKS[_name], **kwargs) -> None:
            _check(*args, **kwargs)

        torch.library.register_fake(f"adaskip::{_name}", _fake, lib=_lib)
else:
    warnings.warn(
        "adaskip: the CUDA extension adaskip._C is not available, so adaskip.ops runs the "
        f"PyTorch reference on CPU tensors only ({_EXTENSION_ERROR})",
        RuntimeWarning, stacklevel=2)


def backend() -> str:
    """'cuda' when the compiled extension is loaded (CUDA tensors run its kernels; CPU tensors
    run the reference), 'reference' when only the PyTorch reference is available."""
    return "cuda" if HAS_EXTENSION else "reference"


def extension_error() -> Optional[str]:
    """Why the extension could not be loaded, or None."""
    return _EXTENSION_ERROR


def _op(name: str, *tensors: Optional[torch.Tensor]):
    if HAS_EXTENSION:
        return getattr(torch.ops.adaskip, name)
    if any(t is not None and t.is_cuda for t in tensors):
        raise RuntimeError(
            f"adaskip.ops.{name}: got CUDA tensors but the CUDA extension adaskip._C is not "
            f"available ({_EXTENSION_ERROR}); install adaskip with a CUDA toolkit present "
            "(see README) or pass CPU tensors")
    return getattr(_ref, name)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
    stats: Optional[torch.Tensor] = None, sublayer: int = 0,
    seq_lens: Optional[torch.Tensor] = None, gates: Optional[torch.Tensor] = None,
    scales: Optional[torch.Tensor] = None, channel_scales: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- residual + x, then x <- RMSNorm(residual) * weight.

    x is the sublayer's output, residual the stream it adds to; [tokens, hidden] or
    [batch, seq, hidden], same shape and dtype (fp32/fp16/bf16), rows contiguous in hidden.
    With `stats`, adds each sequence's IO-similarity sums for `sublayer` (tokens at positions
    >= seq_lens[b] are left out; seq_lens is clamped to [0, seq]).
    With `gates` and `scales` (online learning): a sequence whose gates[sublayer] is GATE_SKIP
    gets residual *= scales[sublayer] instead of the add, and its rows of x are not read (the
    gated-off sublayer wrote nothing there). With `channel_scales` as well (float32
    [num_sublayers, hidden], contiguous; only together with gates and scales), such a sequence
    gets residual[..., h] *= scales[sublayer, b] * channel_scales[sublayer, h] instead (product
    and multiply in fp32, rounded once). Returns (x, residual).
    """
    _op("fused_add_rms_norm", x, residual, weight, stats, seq_lens, gates, scales, channel_scales)(
        x, residual, weight, float(eps), stats, int(sublayer), seq_lens, gates, scales, channel_scales)
    return x, residual


def scale_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                   scale: float, channel_scales: Optional[torch.Tensor] = None,
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- residual * scale, then x <- RMSNorm(residual) * weight. What a
    sublayer skipped by a plan costs: its compensation and the next norm in one pass. x (the
    skipped sublayer's input, same shape and dtype as residual) is only written. With
    `channel_scales` (float32 [hidden], contiguous, same device): residual[..., h] <-
    residual[..., h] * (scale * channel_scales[h]) instead, the product and the multiply in
    fp32, rounded once to the dtype. Returns (x, residual)."""
    _op("scale_rms_norm", x, residual, weight, channel_scales)(
        x, residual, weight, float(eps), float(scale), channel_scales)
    return x, residual


def io_similarity_stats(
    before: torch.Tensor, after: torch.Tensor, stats: torch.Tensor, sublayer: int, *,
    seq_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Adds the IO-similarity sums of a sublayer with input `before` and output `after` (both
    residual-stream values) to stats[sublayer]. Returns stats."""
    _op("io_similarity_stats", before, after, stats, seq_lens)(
        before, after, stats, int(sublayer), seq_lens)
    return stats


def skip_or_scale(residual: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor,
                  sublayer: int, channel_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place, per sequence b: if gates[sublayer, b] == GATE_SKIP, residual[b] *= scales[sublayer, b]
    (the compensation standing in for a skipped sublayer); otherwise unchanged. With
    `channel_scales` (float32 [num_sublayers, hidden], contiguous): residual[b, ..., h] *=
    scales[sublayer, b] * channel_scales[sublayer, h] instead (product and multiply in fp32,
    rounded once). Returns residual."""
    _op("skip_or_scale", residual, gates, scales, channel_scales)(
        residual, gates, scales, int(sublayer), channel_scales)
    return residual


def update_gates(stats: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor, window: int,
                 beta: float, running: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decides, on the device, every GATE_UNDECIDED gate whose statistics count >= window
    tokens: GATE_SKIP with scale = mean norm ratio if mean similarity >= beta, else GATE_RUN.
    Decided gates never change. running (bool [num_sublayers], optional) is then set to
    whether any sequence's gate of each sublayer is not GATE_SKIP: the device-side predicate of
    a CUDA-graph conditional node around that sublayer. Returns gates."""
    _op("update_gates", stats, gates, scales, running)(stats, gates, scales, int(window), float(beta), running)
    return gates


def gated_linear(x: torch.Tensor, weight: torch.Tensor, gates: Optional[torch.Tensor], sublayer: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Decode GEMV for 1..8 tokens (one per sequence), fp16/bf16: out = x @ weight.T, unless
    every sequence's gate of `sublayer` is GATE_SKIP: then nothing is read or written (decided
    on the device). Returns out."""
    _op("gated_linear", x, weight, gates, out)(x, weight, gates, int(sublayer), out)
    return out


def gated_swiglu_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, gates: Optional[torch.Tensor],
                    sublayer: int, out: torch.Tensor) -> torch.Tensor:
    """The first half of a SwiGLU FFN in one pass over both weights: out = silu(x @ w_gate.T) *
    (x @ w_up.T), with the same gating as gated_linear. w_gate and w_up may be the two halves of
    one fused [2 * ffn, hidden] matrix (views: fused[:ffn], fused[ffn:]). Returns out."""
    _op("gated_swiglu_up", x, w_gate, w_up, gates, out)(x, w_gate, w_up, gates, int(sublayer), out)
    return out


def new_stats(num_sublayers: int, batch: int = 1, device=None) -> torch.Tensor:
    """A zeroed statistics buffer, float32 [num_sublayers, batch, 3]."""
    return torch.zeros(num_sublayers, batch, 3, dtype=torch.float32, device=device)


def new_gates(num_sublayers: int, batch: int = 1, device=None, state: int = GATE_UNDECIDED) -> torch.Tensor:
    """A gate buffer, uint8 [num_sublayers, batch], every gate in `state`."""
    return torch.full((num_sublayers, batch), state, dtype=torch.uint8, device=device)


def new_scales(num_sublayers: int, batch: int = 1, device=None) -> torch.Tensor:
    """A compensation-scale buffer, float32 [num_sublayers, batch], all ones."""
    return torch.ones(num_sublayers, batch, dtype=torch.float32, device=device)


def mean_stats(stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cosine similarity, mean norm ratio, token count), each [num_sublayers, batch], on
    the buffer's device (no host sync). Means of sublayers with no tokens are NaN."""
    count = stats[..., 2]
    return stats[..., 0] / count, stats[..., 1] / count, count


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                     scale: Optional[float] = None, window: int = 0,
                     out: Optional[torch.Tensor] = None, num_splits: int = 0) -> torch.Tensor:
    """Attention of one query token per sequence over a static KV cache, the split-KV decode
    kernel on CUDA tensors (fp16/bf16, head_dim 64 or 128, at most 8 query heads per KV head).

    q [batch, heads, head_dim]; k_cache, v_cache [batch, kv_heads, capacity, head_dim], contiguous
    in head_dim (GQA: heads a multiple of kv_heads). kv_lens [batch] (int32/int64, on the device):
    sequence b attends to slots 0 .. kv_lens[b] - 1 (clamped to the capacity; read on the device,
    so one CUDA graph serves every step), or to the last `window` of them when window > 0. scale:
    of the scores, default head_dim ** -0.5. A sequence without keys gets zeros. Writes and
    returns `out` (default: a new tensor like q). num_splits: blocks per (sequence, KV head) the
    length is divided among, at most 256; 0 (default) chooses as many as fill the GPU once (the
    result is the same up to rounding whatever the number)."""
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    _op("decode_attention", q, k_cache, v_cache, kv_lens, out)(
        q, k_cache, v_cache, kv_lens, float(scale), int(window), out, int(num_splits))
    return out


def decode_attention_serves(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype,
                            device_type: str) -> bool:
    """Whether the decode attention kernel takes this geometry on this device (a GPU with the
    extension loaded)."""
    return (device_type == "cuda" and HAS_EXTENSION and dtype in (torch.float16, torch.bfloat16)
            and head_dim in _ref.DECODE_HEAD_DIMS and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= _ref.DECODE_MAX_GROUP)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A decode step's rotary embedding and KV-cache write in one launch (one token per sequence).

    q [batch, heads, head_dim] is rotated in place; k [batch, kv_heads, head_dim] is rotated and
    written, with v, into k_cache / v_cache [batch, kv_heads, capacity, head_dim] at slot
    positions[b] (int64, on the device; a position outside the cache is not written: the host
    bounds them). cos, sin [batch, head_dim]: the rotary table at each sequence's position, in
    q's dtype. Rounds as torch's eager x * cos + rotate_half(x) * sin does. Returns q."""
    _op("rotary_kv_write", q, k, v, cos, sin, k_cache, v_cache, positions)(
        q, k, v, cos, sin, k_cache, v_cache, positions)
    return q


# ---------------------------------------------------------------------------------------------
# The kernels' host-side launch choices (csrc/host_choices.h), callable without a GPU: the same
# compiled functions the kernels call, with the device's numbers passed in.

_PIPELINE_MODES = {-1: "auto", 0: "off", 1: "on"}
_PIPELINE_CODES = {name: code for code, name in _PIPELINE_MODES.items()}


def _host(name: str):
    if not HAS_EXTENSION:
        raise RuntimeError(f"adaskip.ops.{name}: the compiled extension adaskip._C is not available "
                           f"({_EXTENSION_ERROR}); these are the CUDA kernels' own choices")
    from .. import _C

    return getattr(_C, name)


def decode_splits(batch: int, kv_heads: int, capacity: int, resident_blocks: int, tile_keys: int) -> int:
    """Splits per (sequence, KV head) decode_attention chooses when num_splits is 0: as many as fill
    `resident_blocks` (the kernel's resident blocks per SM times the SMs) in one wave, none
    shorter than a tile of `tile_keys` keys of the cache's `capacity`, at most 256, at least 1."""
    return _host("choose_splits")(int(batch), int(kv_heads), int(capacity), int(resident_blocks), int(tile_keys))


def decode_tile_keys(head_dim: int) -> int:
    """Keys one block of the decode attention kernel reads per stage (head_dim 64 or 128)."""
    return _host("decode_tile_keys")(int(head_dim))


def gemv_pipeline_mode(value: Optional[str]) -> str:
    """'auto', 'on' or 'off': a value of ADASKIP_GEMV_PIPELINE (None: unset) as the gated GEMV
    kernels read it; ValueError for a value they refuse. reference.gemv_pipeline_mode is the
    same parser in Python, which the CPU path uses."""
    return _PIPELINE_MODES[_host("pipeline_mode")(value)]


def gemv_uses_pipeline(mode: str, blocks: int, chunks: int, chunks_per_group: int, piped_blocks_per_sm: int,
                       sms: int) -> bool:
    """Whether the gated GEMV launches its pipelined one-row kernel: forced by mode 'on' / 'off';
    under 'auto', when the row has at least two groups of `chunks_per_group` 16-byte chunks per
    lane and the grid's `blocks` fit one wave (`piped_blocks_per_sm` * `sms`)."""
    if mode not in _PIPELINE_CODES:
        raise ValueError(f"adaskip: mode must be one of {sorted(_PIPELINE_CODES)}, got {mode!r}")
    return _host("use_pipeline")(_PIPELINE_CODES[mode], int(blocks), int(chunks), int(chunks_per_group),
                                 int(piped_blocks_per_sm), int(sms))
