"""One runtime for the LLaMA family (LLaMA 2/3/3.1, Vicuna, Mistral, Qwen2, InternLM v1).

Every decoder layer is two sublayers, attention (sublayer 2i) and FFN (sublayer 2i + 1). The
residual stream goes through adaskip.ops.fused_add_rms_norm after each sublayer, which also
collects the sublayer's IO-similarity statistics when a stats buffer is passed. Parameter names
follow Hugging Face's, so HF state dicts load as they are.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.reference import rms_norm
from .config import ModelArgs
from .ids import check_input_ids
from .rope import apply_rotary, cos_sin, inv_frequencies
from .request_plan import FORWARD, check_context_fit, kv_layers, resolve_forward
from .schedule import DecodePaths, StepSchedule, gemv_serves, ungated_ffn_action
from .streaming import streaming_attention
from .sublayer import gated_swiglu, run_ffn, run_sublayer, swiglu_if

try:  # optional backend: flash-attn is source-only on the registry, so it is rarely installed
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

ATTENTION_BACKENDS = ("sdpa", "flash_attn")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def project(linear: nn.Linear, x: torch.Tensor, gemv: bool) -> torch.Tensor:
    """linear(x), through the decode GEMV when `gemv` (the schedule's choice: one token for each
    of at most 2 sequences, no bias)."""
    if not gemv:
        return linear(x)
    out = torch.empty(*x.shape[:-1], linear.out_features, dtype=x.dtype, device=x.device)
    ops.gated_linear(x.reshape(-1, x.shape[-1]), linear.weight, None, 0, out.view(-1, linear.out_features))
    return out


class KVCache(nn.Module):
    """Static keys and values of one attention layer: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Writes k, v [B, kv_heads, T, D] at positions [B, T]; returns the first kv_len slots."""
        b = k.shape[0]
        rows = torch.arange(b, device=k.device)[:, None].expand_as(positions)
        self.k[rows, :, positions] = k.transpose(1, 2)
        self.v[rows, :, positions] = v.transpose(1, 2)
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, d
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=args.o_bias)
        self.window = args.sliding_windows[layer] if args.sliding_windows else None
        self.kv_cache: Optional[KVCache] = None
        self.backend = "sdpa"
        # q, k and v's weights as one [q + 2 kv rows, hidden] tensor whose row blocks the three
        # parameters are views of (fuse_qkv); a plain attribute, not a parameter, so that the
        # state dict keeps Hugging Face's names and nothing is stored twice.
        self.qkv_weight: Optional[torch.Tensor] = None
        self.fuse_qkv()

    def fuse_qkv(self) -> None:
        """Puts q, k and v's weights into one tensor and makes the three parameters views of it,
        so that a decode step reads them with one GEMV: a GEMV over the 1024 rows of a GQA k or v
        projection has too few rows in flight to reach the copy bandwidth, one over all three
        does. The old tensors are released; values, names and the state dict are unchanged."""
        linears = (self.q_proj, self.k_proj, self.v_proj)
        weights = [lin.weight for lin in linears]
        self.qkv_weight = None
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return  # not one matrix; the projections run apart
        # Normal tensors even under inference_mode (as for the KV caches): the parameters must
        # stay usable outside it.
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.cat([w.detach() for w in weights])
        for lin, part in zip(linears, fused.split([w.shape[0] for w in weights])):
            lin.weight = nn.Parameter(part, requires_grad=lin.weight.requires_grad)
        self.qkv_weight = fused

    def fused_qkv(self) -> Optional[torch.Tensor]:
        """The fused q / k / v weight while the three parameters are still its views (None once
        any of them was replaced, e.g. by load_state_dict(assign=True): a stale copy is never
        read, and is dropped here)."""
        fused = self.qkv_weight
        if fused is None:
            return None
        # Host arithmetic only (it runs every eager decode step): where each view must start.
        row_bytes, start, rows = fused.stride(0) * fused.element_size(), fused.data_ptr(), 0
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            w = lin.weight
            if (w.device != fused.device or w.dtype != fused.dtype or w.data_ptr() != start + rows * row_bytes
                    or w.stride() != fused.stride()):
                self.qkv_weight = None
                return None
            rows += w.shape[0]
        return fused if rows == fused.shape[0] else None

    def __setstate__(self, state):
        # A copied or unpickled attention holds its own tensor for each parameter: fuse again.
        super().__setstate__(state)
        if self.__dict__.get("qkv_weight") is not None:
            self.fuse_qkv()

    def _apply(self, fn, recurse=True):
        # Moving or casting the module makes a new tensor of each parameter: fuse them again
        # rather than keep the old fused copy on the old device. A function that works in place
        # (share_memory_) leaves them views of the fused weight, which then stays as it is.
        fused, self.qkv_weight = self.qkv_weight, None
        out = super()._apply(fn, recurse)
        if fused is not None:
            self.qkv_weight = fused
            if self.fused_qkv() is None:
                self.fuse_qkv()
        return out

    def _keys_values(self, x, cos, sin, positions, kv_len, gemv=False):
        b, t, _ = x.shape
        k = project(self.k_proj, x, gemv).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, x, gemv).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if positions is not None:
            if self.kv_cache is None:
                raise RuntimeError("adaskip: this attention layer runs but has no KV cache; set up the "
                                   "caches with the plan you run (Transformer.setup_caches)")
            k, v = self.kv_cache.update(positions, k, v, kv_len)
        return k, v

    def store_kv(self, x, cos, sin, positions, kv_len) -> None:
        """Only fills the KV cache (for a layer whose attention a plan skips in prefill but runs
        in decode)."""
        if positions is not None:
            self._keys_values(x, cos, sin, positions, kv_len)

    def forward(self, x, cos, sin, mask, positions=None, kv_len=None, decode=None, gemv=False, streaming=None,
                q_start=None):
        """mask: a boolean [B, 1, T, kv_len] mask, or "causal" / None for SDPA's own masking.
        decode: (positions [B], lengths [B] or None) of a decode step on the GPU (one token per
        sequence, cached): rotary + cache write in one kernel, then the decode attention kernel
        over each sequence's length read on the device (lengths given) or SDPA under `mask`.
        gemv: the projections through the decode GEMVs.
        streaming: the StreamingGroups a plan gives this layer in this step (its schedule's), which
        then read only their band (adaskip.runtime.streaming); q_start: the first query's position
        when every sequence shares it (a host int), which lets a prefill read the band only."""
        if decode is not None:
            return self._decode(x, cos, sin, mask, kv_len, decode, gemv, streaming)
        b, t, _ = x.shape
        q = apply_rotary(project(self.q_proj, x, gemv).view(b, t, self.num_heads, self.head_dim).transpose(1, 2),
                         cos, sin)
        k, v = self._keys_values(x, cos, sin, positions, kv_len, gemv)
        if streaming is not None:
            q_pos = positions if positions is not None else torch.arange(t, device=x.device).expand(b, t)
            y = streaming_attention(q, k, v, mask, q_pos, streaming, q_start)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        causal = isinstance(mask, str)
        if self.backend == "flash_attn" and (causal or mask is None):
            # flash-attn takes [B, T, heads, D] and grouped KV heads as they are; explicit masks
            # (padding, per-sequence positions, sliding windows) stay on SDPA.
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return self.o_proj(y.reshape(b, t, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def _decode(self, x, cos, sin, mask, kv_len, decode, gemv, spec):
        if self.kv_cache is None:
            raise RuntimeError("adaskip: this attention layer runs but has no KV cache; set up the "
                               "caches with the plan you run (Transformer.setup_caches)")
        b = x.shape[0]
        q, k, v = self._decode_qkv(x, gemv)
        keys, values = self.kv_cache.k[:b], self.kv_cache.v[:b]
        positions, lengths = decode
        ops.rotary_kv_write(q, k, v, cos[:, 0], sin[:, 0], keys, values, positions)
        keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        if spec is not None:  # the band gathered and attended by SDPA, not the decode kernel
            if lengths is not None:  # the kernel's masking (lengths, sliding window) as a mask
                slots = torch.arange(kv_len, device=x.device)
                allowed = slots < lengths[:, None]
                if self.window:
                    allowed &= (positions[:, None] - slots) < self.window
                mask = allowed[:, None, None]
            y = streaming_attention(q[:, :, None], keys, values, mask, positions[:, None], spec)
        elif lengths is not None:
            y = ops.decode_attention(q, keys, values, lengths, window=self.window or 0)
        else:  # one query: a "causal" mask is no mask
            y = F.scaled_dot_product_attention(q[:, :, None], keys, values,
                                               attn_mask=None if isinstance(mask, str) else mask,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
        return project(self.o_proj, y.reshape(b, 1, -1), gemv)

    def _decode_qkv(self, x, gemv):
        """q [B, heads, D], k and v [B, kv_heads, D] of one decode token per sequence: with the
        GEMVs, in one pass over the fused weight when there is one (the same numbers: each row is
        one warp's dot product either way)."""
        b, nq, nk = x.shape[0], self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        fused = self.fused_qkv() if gemv else None
        if fused is None:
            return (project(self.q_proj, x, gemv).view(b, self.num_heads, self.head_dim),
                    project(self.k_proj, x, gemv).view(b, self.num_kv_heads, self.head_dim),
                    project(self.v_proj, x, gemv).view(b, self.num_kv_heads, self.head_dim))
        qkv = torch.empty(b, fused.shape[0], dtype=x.dtype, device=x.device)
        ops.gated_linear(x.reshape(b, -1), fused, None, 0, qkv)
        q, k, v = qkv.split([nq, nk, nk], dim=1)
        return (q.view(b, self.num_heads, self.head_dim), k.view(b, self.num_kv_heads, self.head_dim),
                v.view(b, self.num_kv_heads, self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, h, bias=args.mlp_bias)

    def forward(self, x):
        """The FFN as a step of the runtime runs it ungated (its path chosen where a step's is:
        schedule.ungated_ffn_action): on the decode GEMVs where they are faster."""
        b, t, _ = x.shape
        action = ungated_ffn_action(b, t, x.dtype, x.device.type, self.gate_proj.bias is not None,
                                    torch.is_grad_enabled())
        return run_ffn(action, self, x, self.dense)

    def dense(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def can_gate(self, x: torch.Tensor) -> bool:
        """Whether the gated decode GEMVs serve this input (schedule.gemv_serves)."""
        return x.dim() == 3 and gemv_serves(x.shape[0], x.shape[1], x.dtype, x.device.type,
                                            self.gate_proj.bias is not None)

    def gated(self, x: torch.Tensor, gates: Optional[torch.Tensor], sublayer: int) -> torch.Tensor:
        """The FFN through the gated GEMVs (adaskip.runtime.sublayer.gated_swiglu)."""
        return gated_swiglu(self, x, gates, sublayer)

    def run_if(self, x: torch.Tensor, predicate: torch.Tensor) -> torch.Tensor:
        """The FFN inside a CUDA-graph conditional node (adaskip.runtime.sublayer.swiglu_if)."""
        return swiglu_if(self, x, predicate)


class AbsentSublayer(nn.Module):
    """A sublayer without weights (a no-op block of an exported DeciLM model): every schedule
    skips it with scale 1 (adaskip.runtime.schedule), so it is never run and keeps no KV cache."""

    def __init__(self):
        super().__init__()
        self.kv_cache = None
        self.backend = "sdpa"
        self.window = None

    def forward(self, *args, **kwargs):
        raise RuntimeError("adaskip: an absent sublayer was run; the schedule must skip it")


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        absent = set(args.absent_sublayers)
        self.self_attn = AbsentSublayer() if 2 * layer in absent else Attention(args, layer)
        self.mlp = AbsentSublayer() if 2 * layer + 1 in absent else FeedForward(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attention_backend = "sdpa"
        self.decode_paths = DecodePaths()
        self.cache_batch = 0
        self.cache_len = 0
        # Changes whenever the KV caches are replaced: what was captured on the old ones (CUDA
        # graphs hold their addresses) must not be replayed on the new ones.
        self.cache_id = 0

    def set_attention_backend(self, backend: str) -> None:
        """"sdpa" (default: torch's scaled_dot_product_attention) or "flash_attn" (needs the
        flash-attn package; used where no explicit mask is needed, SDPA elsewhere)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"adaskip: unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
        if backend == "flash_attn" and flash_attn_func is None:
            raise ValueError("adaskip: the flash_attn backend needs the flash-attn package, which is not installed")
        for layer in self.model.layers:
            layer.self_attn.backend = backend
        self.attention_backend = backend

    def fuse_qkv(self) -> None:
        """Each attention's q, k and v weights as views of one tensor (Attention.fuse_qkv): done
        at construction and after every move or cast; call it again after assigning new
        parameters (build_model does)."""
        for layer in self.model.layers:
            if isinstance(layer.self_attn, Attention):
                layer.self_attn.fuse_qkv()

    # -- KV cache -------------------------------------------------------------------------

    def setup_caches(self, batch: int, max_len: int, attention_layers=None) -> None:
        """Static KV caches for `batch` sequences of up to `max_len` tokens, allocated only for
        `attention_layers` (default: all): layers whose attention a plan skips keep no cache."""
        self._allocate_caches(batch, max_len, attention_layers)
        self.cache_id += 1

    def _allocate_caches(self, batch: int, max_len: int, attention_layers) -> None:
        """New caches in place of the modules' present ones (checked first, so a cache that does
        not fit leaves them as they were)."""
        check_context_fit(self.args, max_len, f"a cache of {max_len} tokens")
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None  # free the old caches before allocating new ones
        keep = set(range(self.args.num_layers)) if attention_layers is None else set(attention_layers)
        keep -= self.args.absent_attention_layers
        p = self.lm_head.weight
        # Normal tensors even when called under inference_mode (as generate does), so that the
        # caches can also be written by forward calls outside it.
        with torch.inference_mode(False):
            for i, layer in enumerate(self.model.layers):
                layer.self_attn.kv_cache = (KVCache(batch, self.args.num_kv_heads, max_len, self.args.head_dim,
                                                    p.dtype, p.device) if i in keep else None)
        self.cache_batch, self.cache_len = batch, max_len

    @contextmanager
    def scratch_caches(self, batch: int, max_len: int, attention_layers=None):
        """KV caches for the duration of a `with` block (e.g. to time sublayers); the model's
        own caches, and whatever was captured on them, are back untouched afterwards."""
        saved = ([layer.self_attn.kv_cache for layer in self.model.layers], self.cache_batch, self.cache_len,
                 self.cache_id)
        try:
            self._allocate_caches(batch, max_len, attention_layers)
            self.cache_id = -saved[3] - 1  # never equal to an id of the model's own caches
            yield self
        finally:
            caches, self.cache_batch, self.cache_len, self.cache_id = saved
            for layer, cache in zip(self.model.layers, caches):
                layer.self_attn.kv_cache = cache

    def attention_layers_for(self, plan) -> set:
        """The attention layers that keep a KV cache under `plan` (None: the full model)."""
        return kv_layers(self.args, plan)

    def cached_attention_layers(self) -> set:
        return {i for i, l in enumerate(self.model.layers) if l.self_attn.kv_cache is not None}

    def kv_cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for l in self.model.layers if l.self_attn.kv_cache is not None
                   for b in (l.self_attn.kv_cache.k, l.self_attn.kv_cache.v))

    # -- forward ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, input_pos=None, *,
                kv_len: Optional[int] = None, seq_lens: Optional[torch.Tensor] = None, plan=None,
                stats: Optional[torch.Tensor] = None, logits_index: Optional[torch.Tensor] = None,
                block_stats: Optional[torch.Tensor] = None, online=None,
                schedule: Optional[StepSchedule] = None, taps=None, start=None):
        """Logits for input_ids [B, T] -> [B, T, vocab] (or [B, vocab] at `logits_index` [B], or
        [B, K, vocab] at `logits_index` [B, K]).

        Without `input_pos` this is the plain causal forward over the whole sequence (no cache).
        With `input_pos` it reads and writes the KV caches: an int (every sequence's first token
        here is at that position) or a tensor [B] (per-sequence positions, e.g. decode of prompts
        of different lengths). `kv_len` (a host int, >= every position + 1) bounds the slots read.
        seq_lens [B]: valid tokens per sequence (right padding; for statistics).
        plan: skipped sublayers and their compensation scales (None: the full model), every skip
          of it whatever its mode; resolved by request_plan.resolve_forward, as a request's are.
        stats: float32 [2 * num_layers, B, 3] buffer that collects IO-similarity statistics.
        block_stats: float32 [num_layers, B, 3]: the same for whole layers (ShortGPT's ranking).
        online: adaskip.runtime.online.OnlineGates: FFN sublayers gated per sequence on the device.
        schedule: what every sublayer does (adaskip.runtime.schedule), resolved by the caller;
          default: resolved here from plan and online. The buffers it needs are passed as above.
        taps: called as taps(s, x, h, out) for every sublayer s that runs ungated, before its
          output is added: x its normed input, h the residual stream before it, out its output
          (what fitting stand-ins reads; not for captured steps).
        start: (s, x, h): a cache-less forward that begins at sublayer s, from its normed input x and
          the residual stream h before it as `taps` saw them in a forward of the same input_ids
          whose plan agrees on every sublayer before s (those do not run again: what a search that
          tries one more skip at s needs). x and h are copied, not written.
        """
        check_input_ids(input_ids, self.args.vocab_size)  # reads CPU ids only: no device sync
        b, t = input_ids.shape
        if schedule is None:  # resolved as a request's steps are (adaskip.runtime.request_plan)
            request = resolve_forward(self, plan, stats=stats is not None, block_stats=block_stats is not None)
            schedule = request.schedule(request.phases[FORWARD], batch=b, tokens=t, online=online)
        elif plan is not None:
            raise ValueError("adaskip: pass a plan or a schedule resolved from it, not both")
        self._check_schedule(schedule, b, t, stats, block_stats, online)
        device = input_ids.device
        q_pos, positions, kv_len, shared_start = self._positions(b, t, device, input_pos, kv_len)
        if start is not None:
            first, x, h = self._check_start(start, b, t, input_pos, stats, block_stats, online)
        else:
            first, h = 0, self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(q_pos, kv_len, h.dtype)
        # The decode attention kernel reads each sequence's length on the device: no mask.
        kernel = schedule.decode_attention == "kernel" and positions is not None
        masks = {} if kernel else self.attention_masks(q_pos, kv_len, shared_start)
        decode = None
        if schedule.decode_rotary and positions is not None:
            first = positions[:, 0].contiguous()
            decode = (first, first + 1 if kernel else None)
        step = _Step(cos, sin, masks, positions, kv_len, seq_lens, stats, online, taps, decode=decode,
                     gemv=schedule.gemv_projections, q_start=shared_start)

        layers = self.model.layers
        if start is None:
            x = layers[0].input_layernorm(h)
        for i in range(first // 2, len(layers)):
            layer_input = h.clone() if block_stats is not None else None
            if 2 * i >= first:
                x = self._sublayer(2 * i, schedule.sublayers[2 * i], x, h, step)
            x = self._sublayer(2 * i + 1, schedule.sublayers[2 * i + 1], x, h, step)
            if block_stats is not None:
                ops.io_similarity_stats(layer_input, h, block_stats, i, seq_lens=seq_lens)
        if logits_index is not None:  # [B] -> logits [B, vocab]; [B, K] -> [B, K, vocab]
            rows = torch.arange(b, device=device)
            x = x[rows if logits_index.dim() == 1 else rows[:, None], logits_index]
        return project(self.lm_head, x, schedule.gemv_lm_head)

    def _positions(self, b: int, t: int, device, input_pos, kv_len: Optional[int]) -> tuple:
        """(query positions [B, T], the same when the caches are read (else None), the slots read,
        the first position when every sequence shares it (else None)) of a forward."""
        steps = torch.arange(t, device=device)
        if input_pos is None:
            return steps.expand(b, t), None, t, 0
        if kv_len is None:
            raise ValueError("adaskip: pass kv_len (a host int) with input_pos")
        if b > self.cache_batch or kv_len > self.cache_len:
            raise ValueError(f"adaskip: batch {b} x {kv_len} tokens does not fit the KV cache "
                             f"({self.cache_batch} x {self.cache_len}); call setup_caches first")
        if isinstance(input_pos, int):
            q_pos = (steps + input_pos).expand(b, t)
            return q_pos, q_pos, kv_len, input_pos
        q_pos = input_pos.to(device=device, dtype=torch.long)[:, None] + steps
        return q_pos, q_pos, kv_len, None

    def _check_start(self, start, b: int, t: int, input_pos, stats, block_stats, online) -> tuple:
        """(s, x copied, h copied) of a forward's `start`, checked."""
        try:
            s, x, h = start
        except (TypeError, ValueError):
            raise ValueError("adaskip: start must be (sublayer, normed input, residual stream)") from None
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 * self.args.num_layers:
            raise ValueError(f"adaskip: start's sublayer must be in [0, {2 * self.args.num_layers}), got {s!r}")
        if input_pos is not None or stats is not None or block_stats is not None or online is not None:
            raise ValueError("adaskip: a forward from a start sublayer is cache-less and collects no statistics")
        shape = (b, t, self.args.hidden_size)
        for name, v in (("normed input", x), ("residual stream", h)):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape or v.dtype != self.lm_head.weight.dtype:
                raise ValueError(f"adaskip: start's {name} must be a {self.lm_head.weight.dtype} tensor of shape "
                                 f"{list(shape)}")
        return s, x.clone(), h.clone()

    def _sublayer(self, s: int, todo, x: torch.Tensor, h: torch.Tensor, step: "_Step") -> torch.Tensor:
        """Carries out sublayer s as the schedule says (adaskip.runtime.sublayer.run_sublayer): x
        is its normed input, h the residual stream (updated in place); returns the normed input
        of the next sublayer."""
        layer = self.model.layers[s // 2]
        norm = self._norm_after(s)
        attention = layer.self_attn
        return run_sublayer(
            s, todo, x, h, step, norm_weight=norm.weight, eps=norm.eps,
            attend=lambda y: attention(y, step.cos, step.sin, step.masks.get(attention.window), step.positions,
                                       step.kv_len, step.decode, step.gemv, todo.streaming, step.q_start),
            store_kv=lambda y: attention.store_kv(y, step.cos, step.sin, step.positions, step.kv_len),
            dense_ffn=lambda y: layer.mlp.dense(y), mlp=layer.mlp)

    def _norm_after(self, s: int) -> RMSNorm:
        """The norm that follows sublayer s: the FFN's, the next layer's, or the final one."""
        layers = self.model.layers
        i = s // 2
        if s % 2 == 0:
            return layers[i].post_attention_layernorm
        return layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm

    def _check_schedule(self, schedule: StepSchedule, b: int, t: int, stats, block_stats, online) -> None:
        if len(schedule.sublayers) != 2 * self.args.num_layers:
            raise ValueError(f"adaskip: the schedule has {len(schedule.sublayers)} sublayers, the model "
                             f"{2 * self.args.num_layers}")
        if (schedule.batch, schedule.tokens) != (b, t):
            raise ValueError(f"adaskip: the schedule is for {schedule.batch} x {schedule.tokens} tokens, the input "
                             f"is {b} x {t}")
        if schedule.stats != (stats is not None) or schedule.block_stats != (block_stats is not None):
            raise ValueError("adaskip: the schedule and the statistics buffers passed disagree")
        if schedule.uses_online and online is None:
            raise ValueError("adaskip: the schedule gates sublayers online; pass the OnlineGates")

    def rotary(self, q_pos: torch.Tensor, kv_len: int, dtype: torch.dtype):
        """cos, sin of the rotary embedding at positions q_pos [B, T] (for a cache of kv_len)."""
        return cos_sin(self._inv_freq(kv_len, q_pos.device), q_pos, dtype)

    def _inv_freq(self, seq_len: int, device) -> torch.Tensor:
        scaling = self.args.rope_scaling or {}
        if scaling.get("rope_type") == "dynamic" and seq_len > self.args.max_position_embeddings:
            return inv_frequencies(self.args, seq_len, device)  # depends on the length
        cached = getattr(self, "_inv_freq_cache", None)
        if cached is None or cached.device != torch.device(device):
            cached = self._inv_freq_cache = inv_frequencies(self.args, None, device)
        return cached

    def attention_masks(self, q_pos: torch.Tensor, kv_len: int, shared_start: Optional[int]) -> dict:
        """Per sliding window (None: full attention): a boolean mask [B, 1, T, kv_len], or
        "causal" / None when SDPA can mask by itself (and use its flash kernels): queries that are
        exactly the keys 0..T-1, or a single query that is the last key. shared_start: the
        position of every sequence's first query when they share it (a host int), else None."""
        t = q_pos.shape[1]
        masks = {}
        keys = torch.arange(kv_len, device=q_pos.device)
        for window in set(self.args.sliding_windows or [None]):
            fits_window = window is None or kv_len <= window
            if fits_window and shared_start == 0 and kv_len == t:
                masks[window] = "causal"
            elif fits_window and shared_start is not None and t == 1 and kv_len == shared_start + 1:
                masks[window] = None
            else:
                allowed = keys <= q_pos[..., None]
                if window is not None:
                    allowed &= (q_pos[..., None] - keys) < window
                masks[window] = allowed[:, None]
        return masks


@dataclass
class _Step:
    """What every sublayer of one forward reads besides its input and the residual stream."""

    cos: torch.Tensor
    sin: torch.Tensor
    masks: dict
    positions: Optional[torch.Tensor]
    kv_len: int
    seq_lens: Optional[torch.Tensor]
    stats: Optional[torch.Tensor]
    online: object
    taps: object = None
    decode: Optional[tuple] = None  # (positions [B], KV lengths [B]): a step of the decode kernels
    gemv: bool = False  # attention projections through the decode GEMVs
    q_start: Optional[int] = None  # the first query's position when every sequence shares it
