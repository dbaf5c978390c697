"""The decode kernels. adaskip.ops.decode_attention: its reference on the CPU against a float64
oracle, its argument checks, and (GPU only) the split-KV kernel against the reference: GQA groups
1-8, head_dim 64 / 128, lengths read on the device, sliding windows, cache views, determinism and
one CUDA graph replayed over changing lengths. adaskip.ops.rotary_kv_write: the reference is the
unfused runtime path bit for bit, and the kernel is the reference bit for bit."""
import pytest
import torch

from adaskip import ops
from helpers import oracle_decode_attention, rand

HALF = [torch.float16, torch.bfloat16]
on_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_EXTENSION),
                            reason="needs a CUDA GPU and the compiled extension")


def _inputs(batch, heads, kv_heads, dim, capacity, dtype, device, gen, lens):
    q = rand((batch, heads, dim), dtype, device, gen)
    k = rand((batch, kv_heads, capacity, dim), dtype, device, gen)
    v = rand((batch, kv_heads, capacity, dim), dtype, device, gen)
    return q, k, v, torch.tensor(lens, device=device)


def _rel_err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()


# (batch, heads, kv_heads, head_dim, capacity, lengths, window)
CASES = [
    (1, 32, 8, 128, 300, [300], 0),        # LLaMA-3.1-8B heads, the whole cache
    (2, 9, 3, 64, 257, [1, 200], 0),       # SmolLM2 heads (group 3), a one-key sequence
    (3, 14, 2, 64, 129, [129, 0, 77], 0),  # group 7; a sequence without keys gets zeros
    (2, 8, 8, 128, 96, [50, 96], 16),      # MHA with a sliding window
    (1, 16, 2, 128, 1000, [999], 100),     # group 8, window inside a long cache
    (2, 4, 2, 64, 40, [500, -3], 0),       # lengths past the capacity / negative are clamped
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_the_oracle(dtype, case):
    batch, heads, kv_heads, dim, capacity, lens, window = case
    g = torch.Generator().manual_seed(3)
    q, k, v, kv_lens = _inputs(batch, heads, kv_heads, dim, capacity, dtype, "cpu", g, lens)
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, k, v, kv_lens, window=window, out=out)
    want = oracle_decode_attention(q, k, v, kv_lens, window)
    assert not out.isnan().any()
    assert _rel_err(out, want) < 1e-2
    assert torch.equal(out[torch.tensor(lens) <= 0], torch.zeros_like(out[torch.tensor(lens) <= 0]))


def test_reference_takes_the_scale_it_is_given():
    g = torch.Generator().manual_seed(4)
    q, k, v, lens = _inputs(1, 4, 2, 64, 20, torch.bfloat16, "cpu", g, [17])
    got = ops.decode_attention(q, k, v, lens, scale=0.3)
    assert _rel_err(got, oracle_decode_attention(q, k, v, lens, scale=0.3)) < 1e-2
    assert _rel_err(got, oracle_decode_attention(q, k, v, lens)) > 5e-2  # the scale matters here


def _bad_calls(device):
    g = torch.Generator().manual_seed(5)
    q, k, v, lens = _inputs(2, 8, 2, 64, 16, torch.bfloat16, device, g, [3, 16])
    out = torch.empty_like(q)
    call = lambda **kw: (lambda: ops.decode_attention(  # noqa: E731
        kw.get("q", q), kw.get("k", k), kw.get("v", v), kw.get("lens", lens), window=kw.get("window", 0),
        scale=kw.get("scale"), out=kw.get("out", out), num_splits=kw.get("splits", 0)))
    return out, [
        ("'q' must be float16 or bfloat16", call(q=q.float(), out=out.float())),
        ("'q' must be \\[batch, heads, head_dim\\]", call(q=q[:, None])),
        ("head_dim 64 or 128, got 32", call(q=q[..., :32], k=k[..., :32], v=v[..., :32], out=out[..., :32])),
        ("'q' must be contiguous in head_dim", call(q=q.as_strided(q.shape, (512, 1, 8)))),
        ("'k_cache' has dtype", call(k=k.half())),
        ("'v_cache' must be \\[batch, kv_heads, capacity, head_dim\\]", call(v=v[0])),
        ("'k_cache' holds 1 sequences", call(k=k[:1])),
        ("'v_cache' has 1 KV heads", call(v=v[:, :1])),
        ("not a multiple of the cache's 3 KV heads", call(k=k.repeat(1, 2, 1, 1)[:, :3], v=v.repeat(1, 2, 1, 1)[:, :3])),
        ("at most 8 query heads per KV head, got 32", call(q=q.repeat(1, 4, 1), out=out.repeat(1, 4, 1),
                                                           k=k[:, :1], v=v[:, :1])),
        ("'v_cache' holds 8 slots", call(v=v[:, :, :8])),
        ("'k_cache' must be contiguous in head_dim", call(k=k.transpose(2, 3).contiguous().transpose(2, 3))),
        ("'kv_lens' must be int32 or int64", call(lens=lens.float())),
        ("'kv_lens' must be \\[batch\\] = \\[2\\]", call(lens=lens[:1])),
        ("'window' must be >= 0", call(window=-1)),
        ("'scale' must be a positive finite number", call(scale=float("nan"))),
        ("'scale' must be a positive finite number", call(scale=0.0)),
        ("'out' must be", call(out=out[:1])),
        ("'out' must be", call(out=out.half())),
        ("'num_splits' must be in \\[0, 256\\]", call(splits=-1)),
        ("'num_splits' must be in \\[0, 256\\]", call(splits=257)),
    ]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.HAS_EXTENSION else []))
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu")[1])), ids=[m for m, _ in _bad_calls("cpu")[1]])
def test_bad_arguments_are_a_clear_error_and_write_nothing(device, case):
    out, cases = _bad_calls(device)
    message, call = cases[case]
    out.fill_(7.0)
    with pytest.raises(ValueError, match=message):
        call()
    assert (out == 7.0).all(), message


# -- the CUDA kernel -------------------------------------------------------------------------------

GPU_CASES = CASES + [
    (1, 32, 8, 128, 8192, [8192], 0),      # a full 8k cache: many splits
    (1, 32, 8, 128, 8192, [4097], 0),      # half-filled: the splits follow the length
    (4, 32, 8, 128, 2048, [1, 2048, 1000, 63], 0),
    (2, 12, 4, 64, 5000, [4999, 3], 1024),
    (1, 5, 5, 64, 33, [33], 0),            # group 1, a short cache: one split
    (2, 10, 2, 128, 700, [700, 350], 0),   # group 5
    (1, 12, 2, 64, 300, [300], 0),         # group 6
]


@on_gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("lens_dtype", [torch.int64, torch.int32])
def test_kernel_matches_the_reference(dtype, case, lens_dtype):
    batch, heads, kv_heads, dim, capacity, lens, window = case
    g = torch.Generator().manual_seed(capacity + heads)
    q, k, v, kv_lens = _inputs(batch, heads, kv_heads, dim, capacity, dtype, "cuda", g, lens)
    kv_lens = kv_lens.to(lens_dtype)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    ops.decode_attention(q, k, v, kv_lens, window=window, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    want = oracle_decode_attention(q, k, v, kv_lens, window)
    ref = torch.empty_like(q).cpu()
    ops.decode_attention(q.cpu(), k.cpu(), v.cpu(), kv_lens.cpu(), window=window, out=ref)
    err, ref_err = _rel_err(out, want), _rel_err(ref, want)
    assert err < 1e-2, (err, ref_err)  # bf16 / fp16 outputs: one rounding, fp32 inside
    assert err < 2 * ref_err + 1e-3
    empty = (kv_lens.cpu() <= 0)
    assert torch.equal(out.cpu()[empty], torch.zeros_like(out.cpu()[empty]))


@on_gpu
@pytest.mark.parametrize("dtype", HALF)
def test_kernel_reads_views_of_a_larger_cache(dtype):
    """The runtime passes cache[:batch, :, :kv_len] of a static cache, and q as a strided view."""
    g = torch.Generator().manual_seed(9)
    big_k = rand((3, 4, 600, 128), dtype, "cuda", g)
    big_v = rand((3, 4, 600, 128), dtype, "cuda", g)
    q_full = rand((2, 1, 16, 128), dtype, "cuda", g).transpose(1, 2)  # [B, H, 1, D] as the model makes it
    q = q_full[:, :, 0]
    k, v = big_k[:2, :, :513], big_v[:2, :, :513]
    lens = torch.tensor([513, 260], device="cuda")
    out = torch.full((2, 16, 128), float("nan"), dtype=dtype, device="cuda")
    ops.decode_attention(q, k, v, lens, out=out)
    assert _rel_err(out, oracle_decode_attention(q, k, v, lens)) < 1e-2


@on_gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 33, 256])
# (dtype, heads, kv_heads, head_dim, lengths, window)
@pytest.mark.parametrize("case", [(torch.bfloat16, 32, 8, 128, [3000, 450], 0),
                                  (torch.float16, 16, 4, 64, [3000, 0], 0),  # a sequence without keys
                                  (torch.bfloat16, 8, 8, 64, [2999, 5], 700)],  # a sliding window
                         ids=["bf16-d128", "fp16-d64-empty", "bf16-d64-window"])
def test_any_number_of_splits_gives_the_same_attention(splits, case):
    """num_splits chosen by the caller (benchmarks sweep it): one split writes the output itself,
    more are merged, splits past the length hold no keys; all agree with the reference."""
    dtype, heads, kv_heads, dim, lengths, window = case
    g = torch.Generator().manual_seed(11)
    q, k, v, lens = _inputs(2, heads, kv_heads, dim, 3000, dtype, "cuda", g, lengths)
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, k, v, lens, window=window, out=out, num_splits=splits)
    assert not out.isnan().any()
    assert _rel_err(out, oracle_decode_attention(q, k, v, lens, window=window)) < 1e-2
    torch.testing.assert_close(out, ops.decode_attention(q, k, v, lens, window=window), rtol=2e-2, atol=2e-3)


@on_gpu
def test_kernel_is_deterministic_and_leaves_its_inputs_alone():
    g = torch.Generator().manual_seed(10)
    q, k, v, lens = _inputs(1, 32, 8, 128, 4096, torch.bfloat16, "cuda", g, [4000])
    before = [t.clone() for t in (q, k, v, lens)]
    first = ops.decode_attention(q, k, v, lens)
    for _ in range(3):
        assert torch.equal(ops.decode_attention(q, k, v, lens), first)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, lens)))


@on_gpu
def test_one_cuda_graph_serves_every_length():
    """The lengths are read on the device: a graph captured once is right after they change."""
    g = torch.Generator().manual_seed(12)
    q, k, v, lens = _inputs(2, 32, 8, 128, 2048, torch.bfloat16, "cuda", g, [1, 1])
    out = torch.empty_like(q)
    ops.decode_attention(q, k, v, lens, out=out)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode_attention(q, k, v, lens, out=out)
    for n in ([1, 2048], [700, 5], [2048, 1300]):
        lens.copy_(torch.tensor(n))
        q.copy_(rand(q.shape, q.dtype, "cuda", g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, oracle_decode_attention(q, k, v, lens)) < 1e-2, n


# -- rotary embedding + KV-cache write (adaskip.ops.rotary_kv_write) -------------------------------

def _rotary_inputs(batch, heads, kv_heads, dim, capacity, dtype, device, gen, positions):
    from adaskip.runtime.rope import cos_sin

    q = rand((batch, heads, dim), dtype, device, gen)
    k = rand((batch, kv_heads, dim), dtype, device, gen)
    v = rand((batch, kv_heads, dim), dtype, device, gen)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    pos = torch.tensor(positions, device=device)
    cos, sin = cos_sin(inv, pos.clamp_min(0)[:, None], dtype)
    caches = [rand((batch, kv_heads, capacity, dim), dtype, device, gen) for _ in range(2)]
    return q, k, v, cos[:, 0], sin[:, 0], caches[0], caches[1], pos


def _unfused(q, k, v, cos, sin, k_cache, v_cache, positions):
    """What the runtime did before the fused op: apply_rotary on [B, heads, 1, D] views and the
    KV cache's indexed write (positions inside the cache only)."""
    from adaskip.runtime.rope import apply_rotary

    q_out = apply_rotary(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0]
    k_rot = apply_rotary(k[:, :, None], cos[:, None], sin[:, None])[:, :, 0]
    kc, vc = k_cache.clone(), v_cache.clone()
    for b, p in enumerate(positions.tolist()):
        if 0 <= p < kc.shape[2]:
            kc[b, :, p] = k_rot[b]
            vc[b, :, p] = v[b]
    return q_out, kc, vc


ROTARY_CASES = [(1, 32, 8, 128, 40, [39]), (3, 9, 3, 64, 17, [0, 16, 5]), (2, 4, 4, 6, 5, [4, 9]),
                (2, 6, 2, 80, 8, [-1, 3])]  # odd head_dim 6 / 80; positions outside the cache


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=str)
def test_rotary_kv_write_reference_is_the_unfused_path_bit_for_bit(dtype, case):
    g = torch.Generator().manual_seed(21)
    args = _rotary_inputs(*case[:5], dtype, "cpu", g, case[5])
    want = _unfused(*args)
    q, k, v, cos, sin, kc, vc, pos = args
    ops.rotary_kv_write(q, k, v, cos, sin, kc, vc, pos)
    assert torch.equal(q, want[0]) and torch.equal(kc, want[1]) and torch.equal(vc, want[2])


def test_rotary_kv_write_bad_arguments_change_nothing():
    g = torch.Generator().manual_seed(22)
    q, k, v, cos, sin, kc, vc, pos = _rotary_inputs(2, 8, 2, 64, 16, torch.bfloat16, "cpu", g, [3, 5])
    before = [t.clone() for t in (q, kc, vc)]
    cases = [
        ("'q' must be \\[batch, heads, head_dim\\]", dict(q=q[:, None])),
        ("head_dim must be even", dict(q=q[..., :63], k=k[..., :63], v=v[..., :63], cos=cos[:, :63], sin=sin[:, :63],
                                       kc=kc[..., :63], vc=vc[..., :63])),
        ("'k' has dtype", dict(k=k.half())),
        ("'v' has 1 heads but 'k' has 2", dict(v=v[:, :1])),
        ("'cos' must be \\[batch, head_dim\\] = \\[2, 64\\]", dict(cos=cos[:1])),
        ("'sin' has dtype", dict(sin=sin.float())),
        ("'k_cache' has 1 KV heads but 'k' has 2", dict(kc=kc[:, :1])),
        ("'v_cache' must be \\[batch, kv_heads, capacity, head_dim\\]", dict(vc=vc[0])),
        ("'k_cache' holds 1 sequences but 'q' has 2", dict(kc=kc[:1])),
        ("'v_cache' has head_dim 32 but 'q' has 64", dict(vc=vc[..., :32])),
        ("'v_cache' holds 8 slots but 'k_cache' holds 16", dict(vc=vc[:, :, :8])),
        ("'positions' must be int64 \\[batch\\]", dict(pos=pos.int())),
        ("'positions' must be int64 \\[batch\\]", dict(pos=pos[:1])),
    ]
    for message, kw in cases:
        a = dict(q=q, k=k, v=v, cos=cos, sin=sin, kc=kc, vc=vc, pos=pos, **{})
        a.update(kw)
        with pytest.raises(ValueError, match=message):
            ops.rotary_kv_write(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["kc"], a["vc"], a["pos"])
        assert all(torch.equal(x, y) for x, y in zip(before, (q, kc, vc))), message


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("case", ROTARY_CASES + [(2, 32, 8, 128, 4096, [4095, 17])], ids=str)
def test_rotary_kv_write_kernel_is_the_reference_bit_for_bit(dtype, case):
    g = torch.Generator().manual_seed(23)
    args = _rotary_inputs(*case[:5], dtype, "cuda", g, case[5])
    cpu = [t.cpu().clone() for t in args]
    ops.rotary_kv_write(*args)
    ops.rotary_kv_write(*cpu)
    for got, want in zip((args[0], args[5], args[6]), (cpu[0], cpu[5], cpu[6])):
        assert torch.equal(got.cpu(), want)


@on_gpu
def test_rotary_kv_write_kernel_takes_strided_views():
    """As the runtime passes them: q, k, v views of a projection output, cos / sin rows of a
    [B, 1, D] table, the caches a batch slice of a larger static cache."""
    g = torch.Generator().manual_seed(24)
    fused = rand((2, (8 + 2 + 2) * 64), torch.bfloat16, "cuda", g)
    q, k, v = fused[:, :512].view(2, 8, 64), fused[:, 512:640].view(2, 2, 64), fused[:, 640:].view(2, 2, 64)
    table = rand((2, 3, 64), torch.bfloat16, "cuda", g)
    big = [rand((4, 2, 30, 64), torch.bfloat16, "cuda", g) for _ in range(2)]
    pos = torch.tensor([29, 0], device="cuda")
    args = (q, k, v, table[:, 1], table[:, 2], big[0][:2], big[1][:2], pos)
    cpu = [t.cpu().clone() for t in args]
    untouched = [b[2:].clone() for b in big]
    ops.rotary_kv_write(*args)
    ops.rotary_kv_write(*cpu)
    assert torch.equal(q.cpu(), cpu[0]) and torch.equal(big[0][:2].cpu(), cpu[5]) and torch.equal(big[1][:2].cpu(), cpu[6])
    assert all(torch.equal(b[2:], u) for b, u in zip(big, untouched))
