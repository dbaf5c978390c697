"""Shared test helpers: random inputs, float64 oracles, tolerances."""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative size of one unit in the last place, per dtype.
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def rand(shape, dtype, device="cpu", gen=None, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def random_requests(n, length=40, seed=0, vocab=101):
    """n seeded token-id lists of `length` ids below `vocab` (the tiny test models' vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def strided_view(shape, dtype, device="cpu", gen=None, pad=8, transpose=False):
    """A random tensor of `shape` ([B, S, H]) that is not contiguous: rows padded by `pad`
    elements, and optionally batch and seq strides swapped. Returns (view, base)."""
    b, s, h = shape
    if transpose:
        base = rand((s, b, h + pad), dtype, device, gen)
        return base.transpose(0, 1)[..., :h], base
    base = rand((b, s, h + pad), dtype, device, gen)
    return base[..., :h], base


def oracle_add_norm(x, residual, weight, eps):
    """float64 truth: b = a + x rounded to the dtype, out = b / rms(b) * weight (unrounded)."""
    b = (residual.double() + x.double()).to(residual.dtype)
    bd = b.double()
    out = bd * torch.rsqrt(bd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return b, out


def oracle_stats(a, b, num_sublayers, sublayer, seq_lens=None):
    """float64 per-token loop: [num_sublayers, batch, 3] with only `sublayer` filled."""
    a3 = a.unsqueeze(0) if a.dim() == 2 else a
    b3 = b.unsqueeze(0) if b.dim() == 2 else b
    batch, seq = a3.shape[:2]
    out = torch.zeros(num_sublayers, batch, 3, dtype=torch.float64)
    for i in range(batch):
        n = seq if seq_lens is None else max(0, min(int(seq_lens[i]), seq))
        for t in range(n):
            av, bv = a3[i, t].double().cpu(), b3[i, t].double().cpu()
            na, nb = av.norm(), bv.norm()
            out[sublayer, i, 0] += (av @ bv) / (max(na, 1e-12) * max(nb, 1e-12))
            out[sublayer, i, 1] += nb / max(na, 1e-12)
            out[sublayer, i, 2] += 1
    return out


def tiny_llama(vocab_size, context=160, eos=2, layers=2, scale=0.2, seed=0):
    """A small LlamaForCausalLM of the runtime with seeded random weights (norms at 1)."""
    from adaskip.runtime.config import ModelArgs
    from adaskip.runtime.loading import build_model
    from adaskip.runtime.model import Transformer

    args = ModelArgs.from_hf_config(dict(
        architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        rms_norm_eps=1e-5, rope_theta=10000.0, eos_token_id=eos))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return build_model(args, {k: (torch.ones(s) if k.endswith("norm.weight") else scale * torch.randn(s, generator=gen))
                              for k, s in shapes.items()})


def randomize_norms_and_biases(module):
    """Random norm weights and biases (initialised to 1 and 0), so that parity tests exercise them."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return module


def oracle_decode_attention(q, k_cache, v_cache, kv_lens, window=0, scale=None):
    """float64 truth of decode attention, one sequence and head at a time: softmax over the
    slots [max(0, n - window) if window else 0, n), n = kv_lens[b] clamped to the capacity;
    zeros for a sequence without keys. [batch, heads, head_dim], float64 on the CPU."""
    batch, heads, dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = max(0, min(int(kv_lens[b]), capacity))
        first = max(0, n - window) if window else 0
        if n == first:
            continue
        for h in range(heads):
            k = k_cache[b, h // group, first:n].double().cpu()
            v = v_cache[b, h // group, first:n].double().cpu()
            p = torch.softmax(k @ q[b, h].double().cpu() * scale, dim=0)
            out[b, h] = p @ v
    return out
