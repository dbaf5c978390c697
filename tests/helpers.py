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
