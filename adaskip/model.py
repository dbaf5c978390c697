"""One runtime for the LLaMA family (LLaMA 2/3/3.1, Vicuna, Mistral, Qwen2, InternLM v1).

Every decoder layer is two sublayers, attention (sublayer 2i) and FFN (sublayer 2i + 1). The
residual stream goes through adaskip.ops.fused_add_rms_norm after each sublayer, which also
collects the sublayer's IO-similarity statistics when a stats buffer is passed. Parameter names
follow Hugging Face's, so HF state dicts load as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._reference import rms_norm
from .conditional import capturing, only_if
from .config import ModelArgs
from .rope import apply_rotary, cos_sin, inv_frequencies

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

    def _keys_values(self, x, cos, sin, positions, kv_len):
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
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

    def forward(self, x, cos, sin, mask, positions=None, kv_len=None):
        """mask: a boolean [B, 1, T, kv_len] mask, or "causal" / None for SDPA's own masking."""
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k, v = self._keys_values(x, cos, sin, positions, kv_len)
        causal = isinstance(mask, str)
        if self.backend == "flash_attn" and (causal or mask is None):
            # flash-attn takes [B, T, heads, D] and grouped KV heads as they are; explicit masks
            # (padding, per-sequence positions, sliding windows) stay on SDPA.
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return self.o_proj(y.reshape(b, t, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, h, bias=args.mlp_bias)

    def forward(self, x):
        if x.is_cuda and not torch.is_grad_enabled() and self.can_gate(x):
            # One token per sequence: our GEMVs beat cuBLAS here (H100, 8B FFN: 124 vs 132 us,
            # bench/results), so ungated decode uses them too.
            return self.gated(x, None, 0)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def can_gate(self, x: torch.Tensor) -> bool:
        """Whether the gated decode GEMVs serve this input: one token per sequence, at most two
        sequences (beyond that cuBLAS is faster, bench/results), fp16/bf16, no biases."""
        return (x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= 2 and self.gate_proj.bias is None
                and x.dtype in (torch.float16, torch.bfloat16) and (ops.HAS_EXTENSION or not x.is_cuda))

    def gated(self, x: torch.Tensor, gates: Optional[torch.Tensor], sublayer: int) -> torch.Tensor:
        """The FFN through the gated GEMVs: when every sequence's gate of `sublayer` is SKIP the
        kernels return at once (decided on the device) and write nothing. The rows of gated-off
        sequences are undefined: the gated add+norm that follows does not read them. gates None:
        every row is computed."""
        b, _, h = x.shape
        act = torch.empty(b, self.gate_proj.out_features, dtype=x.dtype, device=x.device)
        ops.gated_swiglu_up(x.reshape(b, h), self.gate_proj.weight, self.up_proj.weight, gates, sublayer, act)
        out = torch.empty(b, h, dtype=x.dtype, device=x.device)
        ops.gated_linear(act, self.down_proj.weight, gates, sublayer, out)
        return out.view(b, 1, h)

    def run_if(self, x: torch.Tensor, predicate: torch.Tensor) -> torch.Tensor:
        """The FFN inside a conditional node of the CUDA graph being captured: replays run it
        only while `predicate` (a bool on the device) is true, and skip its GEMMs otherwise (the
        output is then undefined; the gated add+norm that follows does not read it)."""
        out = torch.empty_like(x)  # allocated outside the node: read after it either way
        with only_if(predicate):
            act = F.silu(self.gate_proj(x)) * self.up_proj(x)
            if self.down_proj.bias is None:
                torch.matmul(act, self.down_proj.weight.t(), out=out)
            else:
                out.copy_(self.down_proj(act))
        return out


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = FeedForward(args)
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
        self.cache_batch = 0
        self.cache_len = 0
        # adaskip.generate's decode buffers and CUDA graphs per batch size; they hold the KV
        # caches' addresses, so new caches (or another attention backend) drop them.
        self.decode_states = {}

    def set_attention_backend(self, backend: str) -> None:
        """"sdpa" (default: torch's scaled_dot_product_attention) or "flash_attn" (needs the
        flash-attn package; used where no explicit mask is needed, SDPA elsewhere)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"adaskip: unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
        if backend == "flash_attn" and flash_attn_func is None:
            raise ValueError("adaskip: the flash_attn backend needs the flash-attn package, which is not installed")
        for layer in self.model.layers:
            layer.self_attn.backend = backend
        self.decode_states.clear()

    # -- KV cache -------------------------------------------------------------------------

    def setup_caches(self, batch: int, max_len: int, attention_layers=None) -> None:
        """Static KV caches for `batch` sequences of up to `max_len` tokens, allocated only for
        `attention_layers` (default: all): layers whose attention a plan skips keep no cache."""
        if max_len > self.args.max_position_embeddings:
            raise ValueError(f"adaskip: a cache of {max_len} tokens exceeds the model's context of "
                             f"{self.args.max_position_embeddings} tokens")
        keep = set(range(self.args.num_layers)) if attention_layers is None else set(attention_layers)
        p = self.lm_head.weight
        # Normal tensors even when called under inference_mode (as generate does), so that the
        # caches can also be written by forward calls outside it.
        self.decode_states.clear()
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None  # free the old caches before allocating new ones
        with torch.inference_mode(False):
            for i, layer in enumerate(self.model.layers):
                if i in keep:
                    layer.self_attn.kv_cache = KVCache(batch, self.args.num_kv_heads, max_len, self.args.head_dim,
                                                       p.dtype, p.device)
        self.cache_batch, self.cache_len = batch, max_len

    def cached_attention_layers(self) -> set:
        return {i for i, l in enumerate(self.model.layers) if l.self_attn.kv_cache is not None}

    def kv_cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for l in self.model.layers if l.self_attn.kv_cache is not None
                   for b in (l.self_attn.kv_cache.k, l.self_attn.kv_cache.v))

    # -- forward ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, input_pos=None, *,
                kv_len: Optional[int] = None, seq_lens: Optional[torch.Tensor] = None, plan=None,
                stats: Optional[torch.Tensor] = None, logits_index: Optional[torch.Tensor] = None,
                block_stats: Optional[torch.Tensor] = None, online=None):
        """Logits for input_ids [B, T] -> [B, T, vocab] (or [B, vocab] at `logits_index` [B]).

        Without `input_pos` this is the plain causal forward over the whole sequence (no cache).
        With `input_pos` it reads and writes the KV caches: an int (every sequence's first token
        here is at that position) or a tensor [B] (per-sequence positions, e.g. decode of prompts
        of different lengths). `kv_len` (a host int, >= every position + 1) bounds the slots read.
        seq_lens [B]: valid tokens per sequence (right padding; for statistics).
        plan: skipped sublayers and their compensation scales (None: the full model).
        stats: float32 [2 * num_layers, B, 3] buffer that collects IO-similarity statistics.
        block_stats: float32 [num_layers, B, 3]: the same for whole layers (ShortGPT's ranking).
        online: adaskip.online.OnlineGates: FFN sublayers gated per sequence on the device.
        """
        b, t = input_ids.shape
        device = input_ids.device
        steps = torch.arange(t, device=device)
        shared_start = None
        if input_pos is None:
            q_pos, positions, kv_len, shared_start = steps.expand(b, t), None, t, 0
        else:
            if kv_len is None:
                raise ValueError("adaskip: pass kv_len (a host int) with input_pos")
            if b > self.cache_batch or kv_len > self.cache_len:
                raise ValueError(f"adaskip: batch {b} x {kv_len} tokens does not fit the KV cache "
                                 f"({self.cache_batch} x {self.cache_len}); call setup_caches first")
            if isinstance(input_pos, int):
                shared_start = input_pos
                q_pos = (steps + input_pos).expand(b, t)
            else:
                q_pos = input_pos.to(device=device, dtype=torch.long)[:, None] + steps
            positions = q_pos
        h = self.model.embed_tokens(input_ids)
        cos, sin = cos_sin(self._inv_freq(kv_len, device), q_pos, h.dtype)
        masks = self._masks(q_pos, kv_len, shared_start)
        skip = plan.skip_scales if plan is not None else {}
        kv_only = getattr(plan, "kv_only_attention", ())

        layers = self.model.layers
        x = layers[0].input_layernorm(h)
        for i, layer in enumerate(layers):
            layer_input = h.clone() if block_stats is not None else None
            for s, next_norm in ((2 * i, layer.post_attention_layernorm),
                                 (2 * i + 1, layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm)):
                is_attention = s % 2 == 0
                # Where each sublayer's skip decision is taken.
                if s in skip:  # skipped by the plan: not run; the compensated input stands in
                    if is_attention and i in kv_only:
                        layer.self_attn.store_kv(x, cos, sin, positions, kv_len)
                    h.mul_(skip[s])
                    x = next_norm(h)
                    continue
                if online is not None and s in online.skipped:  # gated off for every sequence
                    ops.skip_or_scale(h, online.gates, online.scales, s)
                    x = next_norm(h)
                    continue
                gated = online is not None and s in online.learning  # decided per sequence, on the device
                if is_attention:
                    out = layer.self_attn(x, cos, sin, masks[layer.self_attn.window], positions, kv_len)
                elif gated and layer.mlp.can_gate(x):
                    out = layer.mlp.gated(x, online.gates, s)
                elif gated and online.conditional and capturing():
                    out = layer.mlp.run_if(x, online.running[s])
                else:
                    out = layer.mlp(x)
                if gated:  # gated-off sequences: the compensation instead of the add, in the same pass
                    ops.fused_add_rms_norm(out, h, next_norm.weight, next_norm.eps, stats=online.stats, sublayer=s,
                                           seq_lens=seq_lens, gates=online.gates, scales=online.scales)
                else:
                    ops.fused_add_rms_norm(out, h, next_norm.weight, next_norm.eps, stats=stats, sublayer=s,
                                           seq_lens=seq_lens)
                x = out
            if block_stats is not None:
                ops.io_similarity_stats(layer_input, h, block_stats, i, seq_lens=seq_lens)
        if logits_index is not None:
            x = x[torch.arange(b, device=device), logits_index]
        return self.lm_head(x)

    def _inv_freq(self, seq_len: int, device) -> torch.Tensor:
        scaling = self.args.rope_scaling or {}
        if scaling.get("rope_type") == "dynamic" and seq_len > self.args.max_position_embeddings:
            return inv_frequencies(self.args, seq_len, device)  # depends on the length
        cached = getattr(self, "_inv_freq_cache", None)
        if cached is None or cached.device != torch.device(device):
            cached = self._inv_freq_cache = inv_frequencies(self.args, None, device)
        return cached

    def _masks(self, q_pos: torch.Tensor, kv_len: int, shared_start: Optional[int]) -> dict:
        """Per sliding window (None: full attention): a boolean mask [B, 1, T, kv_len], or
        "causal" / None when SDPA can mask by itself (and use its flash kernels): queries that are
        exactly the keys 0..T-1, or a single query that is the last key."""
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
