"""The CUDA kernels against the PyTorch reference (GPU only; skipped without a GPU)."""
import pytest
import torch

from adaskip import ops
from adaskip.ops import reference as ref
from helpers import DTYPES, ULP, rand, strided_view

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_EXTENSION),
                                reason="needs a CUDA GPU and the compiled extension")

# (shape, note): decode rows, odd hidden sizes (scalar path), LLaMA / SmolLM2 sizes, 16k hidden.
SHAPES = [(1, 4096), (3, 1, 4096), (2, 37, 576), (1, 300, 4095), (1, 5, 16384), (1, 3, 16383),
          (2, 64, 8192), (4, 17, 13), (2, 2, 1)]
LAYOUTS = ["contiguous", "padded", "transposed", "misaligned"]


def _tensor(shape, dtype, layout, gen, scale=1.0):
    """A CUDA tensor with the given layout; returns (view, base) where base holds the view."""
    if len(shape) == 2 or layout == "contiguous":
        t = rand(shape, dtype, "cuda", gen, scale)
        return t, t
    if layout == "misaligned":  # rows start one element off a 16-byte boundary
        b, s, h = shape
        base = rand((b * s * h + 1,), dtype, "cuda", gen, scale)
        return base[1:].view(b, s, h), base
    v, base = strided_view(shape, dtype, "cuda", gen, pad=8, transpose=layout == "transposed")
    return v.mul_(scale), base


def _cpu(*ts):
    return [None if t is None else t.detach().cpu().clone() for t in ts]


def _out_tols(dtype):
    return dict(rtol=2 * ULP[dtype] + 2e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_stats", [True, False])
def test_fused_add_rms_norm_matches_reference(dtype, shape, layout, with_stats):
    g = torch.Generator().manual_seed(11)
    x, x_base = _tensor(shape, dtype, layout, g)
    residual, r_base = _tensor(shape, dtype, layout, g, scale=4.0)
    if layout == "padded" and len(shape) == 3:
        x_base_before, r_base_before = x_base.clone(), r_base.clone()
    weight = rand((shape[-1],), dtype, "cuda", g)
    batch = 1 if len(shape) == 2 else shape[0]
    seq = shape[-2]
    lens = torch.tensor([max(seq - i, 0) for i in range(batch)], device="cuda") if batch > 1 else None
    stats = None
    if with_stats:  # existing contents must be added to, other sublayers left alone
        stats = torch.rand(3, batch, 3, generator=g).cuda()
    xc, rc, wc, sc, lc = _cpu(x, residual, weight, stats, lens)

    ops.fused_add_rms_norm(x, residual, weight, 1e-5, stats=stats, sublayer=1, seq_lens=lens)
    ref.fused_add_rms_norm(xc, rc, wc, 1e-5, sc, 1, lc)

    assert torch.equal(residual.cpu(), rc)  # the add rounds exactly like torch's
    torch.testing.assert_close(x.cpu(), xc, **_out_tols(dtype))
    if with_stats:
        torch.testing.assert_close(stats.cpu(), sc, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats[[0, 2]].cpu(), sc[[0, 2]])
    if layout == "padded" and len(shape) == 3:  # nothing written outside the views
        assert torch.equal(x_base[..., shape[-1]:], x_base_before[..., shape[-1]:])
        assert torch.equal(r_base[..., shape[-1]:], r_base_before[..., shape[-1]:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 4096), (3, 1, 577), (3, 40, 576)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
@pytest.mark.parametrize("with_stats", [True, False])
def test_gated_fused_add_rms_norm_matches_reference(dtype, shape, layout, with_stats):
    """Sequence 0 gated off with NaN in its x (never read), 1 run, 2 undecided."""
    g = torch.Generator().manual_seed(12)
    x, _ = _tensor(shape, dtype, layout, g)
    residual, _ = _tensor(shape, dtype, layout, g, scale=3.0)
    x[0] = float("nan")
    weight = rand((shape[-1],), dtype, "cuda", g)
    gates = ops.new_gates(3, 3, "cuda")
    gates[2] = torch.tensor([ops.GATE_SKIP, ops.GATE_RUN, ops.GATE_UNDECIDED], dtype=torch.uint8)
    scales = (torch.rand(3, 3, generator=g) + 0.5).cuda()
    stats = torch.rand(3, 3, 3, generator=g).cuda() if with_stats else None
    xc, rc, wc, sc, gc, scc = _cpu(x, residual, weight, stats, gates, scales)

    ops.fused_add_rms_norm(x, residual, weight, 1e-5, stats=stats, sublayer=2, gates=gates, scales=scales)
    ref.fused_add_rms_norm(xc, rc, wc, 1e-5, sc, 2, None, gc, scc)

    assert torch.equal(residual.cpu(), rc)
    torch.testing.assert_close(x.cpu(), xc, **_out_tols(dtype))
    assert not x.isnan().any()
    if with_stats:
        torch.testing.assert_close(stats.cpu(), sc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
# 0.618...: not exact in any dtype, so the product rounds. 1e-3: eps is a large part of the mean square, so
# normalizing the stream before scaling it (RMSNorm is otherwise scale-invariant) would show.
@pytest.mark.parametrize("scale", [0.6180339887, 1e-3])
def test_scale_rms_norm_matches_reference(dtype, shape, layout, scale):
    """x arrives poisoned (NaN): the kernel only writes it. Both vector widths are covered: hidden
    divisible by the vector width or not, and misaligned rows."""
    g = torch.Generator().manual_seed(18)
    x, x_base = _tensor(shape, dtype, layout, g)
    residual, r_base = _tensor(shape, dtype, layout, g, scale=4.0)
    x.fill_(float("nan"))
    x_base_before, r_base_before = x_base.clone(), r_base.clone()
    weight = rand((shape[-1],), dtype, "cuda", g)
    xc, rc, wc = _cpu(x, residual, weight)
    torch_mul = residual.clone().mul_(scale)  # what the runtime ran before, on the GPU

    ops.scale_rms_norm(x, residual, weight, 1e-5, scale)
    ref.scale_rms_norm(xc, rc, wc, 1e-5, scale)

    assert torch.equal(residual.cpu(), rc) and torch.equal(residual, torch_mul)
    assert x.isfinite().all()
    torch.testing.assert_close(x.cpu(), xc, **_out_tols(dtype))
    if x_base is not x:  # nothing written outside the views (row padding, the element before a misaligned view)
        hidden = shape[-1]
        outside = (lambda t: t[..., hidden:]) if layout != "misaligned" else (lambda t: t[:1])
        assert torch.equal(outside(x_base), outside(x_base_before))
        assert torch.equal(outside(r_base), outside(r_base_before))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 4096), (2, 5, 577), (4, 1)], ids=str)
def test_scale_rms_norm_by_zero_gives_zeros_not_nan(dtype, shape):
    g = torch.Generator().manual_seed(19)
    residual = rand(shape, dtype, "cuda", g)
    x = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    ops.scale_rms_norm(x, residual, rand((shape[-1],), dtype, "cuda", g), 1e-6, 0.0)
    assert (residual == 0).all() and (x == 0).all()


def test_scale_rms_norm_in_a_cuda_graph_matches_eager():
    """A decode step whose attention runs (fused add + norm) and whose FFN the plan skips
    (scale + norm), captured once and replayed per token: bit-identical to eager calls."""
    g = torch.Generator().manual_seed(20)
    batch, hidden, steps, scale = 2, 1024, 4, 0.87
    attn_outs = [rand((batch, 1, hidden), torch.bfloat16, "cuda", g) for _ in range(steps)]
    base_residual = rand((batch, 1, hidden), torch.bfloat16, "cuda", g, scale=8.0)
    w_attn, w_ffn = rand((hidden,), torch.bfloat16, "cuda", g), rand((hidden,), torch.bfloat16, "cuda", g)

    def step(attn_out, residual, ffn_in):
        ops.fused_add_rms_norm(attn_out, residual, w_attn, 1e-6)
        ops.scale_rms_norm(ffn_in, residual, w_ffn, 1e-6, scale)

    residual, ffn_in = base_residual.clone(), torch.empty_like(base_residual)
    eager = []
    for t in range(steps):
        ffn_in.fill_(float("nan"))
        step(attn_outs[t].clone(), residual, ffn_in)
        eager.append((ffn_in.clone(), residual.clone()))

    g_attn, g_res, g_ffn = torch.empty_like(base_residual), base_residual.clone(), torch.empty_like(base_residual)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(g_attn.clone(), g_res.clone(), g_ffn.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(g_attn, g_res, g_ffn)
    g_res.copy_(base_residual)
    for t in range(steps):
        g_attn.copy_(attn_outs[t])
        g_ffn.fill_(float("nan"))
        graph.replay()
        assert torch.equal(g_ffn, eager[t][0]) and torch.equal(g_res, eager[t][1])
    assert g_ffn.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (4, 1, 576), (3, 129, 1000), (1, 2048, 8192), (2, 7, 33)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "misaligned"])
def test_io_similarity_stats_matches_reference(dtype, shape, layout):
    g = torch.Generator().manual_seed(12)
    a, _ = _tensor(shape, dtype, layout, g)
    noise, _ = _tensor(shape, dtype, layout, g)
    b = (a.float() * 1.1 + noise.float() * 0.4).to(dtype)
    batch = 1 if len(shape) == 2 else shape[0]
    lens = torch.arange(batch, device="cuda", dtype=torch.int32) + shape[-2] // 2
    stats = torch.full((2, batch, 3), 0.25, device="cuda")
    ac, bc, sc, lc = _cpu(a, b, stats, lens)
    a_before, b_before = a.clone(), b.clone()
    ops.io_similarity_stats(a, b, stats, 0, seq_lens=lens)
    ref.io_similarity_stats(ac, bc, sc, 0, lc)
    assert torch.equal(a, a_before) and torch.equal(b, b_before)
    torch.testing.assert_close(stats.cpu(), sc, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats[1].cpu(), sc[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 4096), (3, 50, 577), (2, 5, 8192)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
def test_skip_or_scale_matches_reference(dtype, shape, layout):
    g = torch.Generator().manual_seed(13)
    residual, _ = _tensor(shape, dtype, layout, g)
    gates = torch.tensor([[ops.GATE_SKIP, ops.GATE_RUN, ops.GATE_UNDECIDED][: shape[0]],
                          [ops.GATE_RUN, ops.GATE_SKIP, ops.GATE_SKIP][: shape[0]]],
                         dtype=torch.uint8, device="cuda")
    scales = (torch.rand(2, shape[0], generator=g) + 0.5).cuda()
    rc, gc, scc = _cpu(residual, gates, scales)
    for sub in (0, 1):
        ops.skip_or_scale(residual, gates, scales, sub)
        ref.skip_or_scale(rc, gc, scc, sub)
        assert torch.equal(residual.cpu(), rc)


def test_update_gates_matches_reference():
    g = torch.Generator().manual_seed(14)
    layers, batch = 64, 8
    count = torch.randint(0, 40, (layers, batch), generator=g).float()
    stats = torch.stack([count * (0.6 + 0.4 * torch.rand(layers, batch, generator=g)),
                         count * (0.9 + 0.2 * torch.rand(layers, batch, generator=g)), count], -1)
    gates = torch.randint(0, 3, (layers, batch), generator=g, dtype=torch.uint8)
    scales = torch.rand(layers, batch, generator=g) + 0.5
    gates[:3] = ops.GATE_SKIP  # sublayers no sequence runs
    sc, gc, scc = _cpu(stats, gates, scales)
    stats, gates, scales = stats.cuda(), gates.cuda(), scales.cuda()
    running, rc = torch.ones(layers, dtype=torch.bool, device="cuda"), torch.ones(layers, dtype=torch.bool)
    ops.update_gates(stats, gates, scales, 20, 0.8, running)
    ref.update_gates(sc, gc, scc, 20, 0.8, rc)
    assert torch.equal(gates.cpu(), gc)
    assert torch.equal(scales.cpu(), scc)
    assert torch.equal(running.cpu(), rc) and not rc[:3].any() and rc[3:].any()
    assert (gc == ops.GATE_SKIP).any() and (gc == ops.GATE_RUN).any() and (gc == ops.GATE_UNDECIDED).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_statistics_are_bit_identical_across_runs(dtype):
    g = torch.Generator().manual_seed(15)
    x0, r0 = rand((2, 2048, 4096), dtype, "cuda", g), rand((2, 2048, 4096), dtype, "cuda", g)
    w = rand((4096,), dtype, "cuda", g)
    runs = []
    for _ in range(3):
        stats = ops.new_stats(1, 2, "cuda")
        ops.fused_add_rms_norm(x0.clone(), r0.clone(), w, stats=stats)
        ops.io_similarity_stats(x0, r0, stats, 0)
        runs.append(stats)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_device_mismatch_is_a_clear_error():
    x, r = torch.randn(2, 8, device="cuda"), torch.randn(2, 8, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="'weight'"):
        ops.fused_add_rms_norm(x, r, torch.ones(8))
    with pytest.raises((ValueError, RuntimeError), match="'stats'"):
        ops.fused_add_rms_norm(x, r, torch.ones(8, device="cuda"), stats=ops.new_stats(1, 1))
    with pytest.raises((ValueError, RuntimeError), match="'seq_lens'"):
        ops.fused_add_rms_norm(x, r, torch.ones(8, device="cuda"), stats=ops.new_stats(1, 1, "cuda"),
                               seq_lens=torch.tensor([2]))
    with pytest.raises((ValueError, RuntimeError), match="'weight'"):
        ops.scale_rms_norm(x, r, torch.ones(8), 1e-6, 0.5)
    with pytest.raises((ValueError, RuntimeError), match="'residual'"):
        ops.scale_rms_norm(x, r.cpu(), torch.ones(8, device="cuda"), 1e-6, 0.5)


def _decode_step(x, residual, weight, stats, gates, scales, lens, window, beta, chunk):
    """A miniature decode step: every op on one token per sequence, plus a prefill-shaped
    statistics call (several tokens per sequence: the path with a scratch buffer)."""
    ops.fused_add_rms_norm(x, residual, weight, 1e-6, stats=stats, sublayer=0, seq_lens=lens)
    ops.io_similarity_stats(x, residual, stats, 1, seq_lens=lens)
    ops.io_similarity_stats(chunk[0], chunk[1], stats, 2, seq_lens=lens * 4)
    ops.update_gates(stats, gates, scales, window, beta)
    ops.skip_or_scale(residual, gates, scales, 0)
    ops.skip_or_scale(residual, gates, scales, 1)


def test_ops_capture_in_a_cuda_graph_and_gates_flip_during_replays():
    g = torch.Generator().manual_seed(16)
    batch, hidden, steps, window = 3, 1024, 6, 3
    inputs = [rand((batch, 1, hidden), torch.bfloat16, "cuda", g) for _ in range(steps)]
    base_residual = rand((batch, 1, hidden), torch.bfloat16, "cuda", g, scale=8.0)
    weight = rand((hidden,), torch.bfloat16, "cuda", g)
    lens = torch.tensor([1, 1, 0], device="cuda")  # the third sequence has finished
    chunk = (rand((batch, 4, hidden), torch.bfloat16, "cuda", g), rand((batch, 4, hidden), torch.bfloat16, "cuda", g))

    def fresh():
        return (torch.empty_like(inputs[0]), base_residual.clone(), ops.new_stats(3, batch, "cuda"),
                ops.new_gates(3, batch, "cuda"), ops.new_scales(3, batch, "cuda"))

    # Eager run.
    x, residual, stats, gates, scales = fresh()
    eager = []
    for step in range(steps):
        x.copy_(inputs[step])
        _decode_step(x, residual, weight, stats, gates, scales, lens, window, 0.0, chunk)
        eager.append((x.clone(), residual.clone(), gates.clone()))

    # Captured once (after a warm-up on a side stream), replayed per step.
    gx, gres, gstats, ggates, gscales = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = [t.clone() for t in (gx, gres, gstats, ggates, gscales)]
        _decode_step(*warm[:2], weight, *warm[2:], lens, window, 0.0, chunk)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _decode_step(gx, gres, weight, gstats, ggates, gscales, lens, window, 0.0, chunk)
    gx.zero_(), gres.copy_(base_residual), gstats.zero_(), ggates.zero_(), gscales.fill_(1.0)
    for step in range(steps):
        gx.copy_(inputs[step])
        graph.replay()
        ex, eres, egates = eager[step]
        assert torch.equal(gx, ex) and torch.equal(gres, eres) and torch.equal(ggates, egates)
    assert torch.equal(gstats, stats)
    # The window closed inside replays: undecided gates of live sequences were decided there.
    assert (eager[window - 2][2][:2] == ops.GATE_UNDECIDED).all()
    assert (ggates[:, :2] != ops.GATE_UNDECIDED).all()
    assert (ggates[:, 2] == ops.GATE_UNDECIDED).all()  # no tokens counted for the finished one
    assert (ggates == ops.GATE_SKIP).any()


def test_ops_never_sync_with_the_host():
    g = torch.Generator().manual_seed(17)
    x, r = rand((2, 33, 4096), torch.bfloat16, "cuda", g), rand((2, 33, 4096), torch.bfloat16, "cuda", g)
    w = rand((4096,), torch.bfloat16, "cuda", g)
    stats, gates, scales = ops.new_stats(2, 2, "cuda"), ops.new_gates(2, 2, "cuda"), ops.new_scales(2, 2, "cuda")
    lens = torch.tensor([33, 10], device="cuda")  # int64: converted on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.fused_add_rms_norm(x, r, w, stats=stats, sublayer=0, seq_lens=lens)
        ops.fused_add_rms_norm(x[:, :1], r[:, :1], w, stats=stats, sublayer=1)
        ops.io_similarity_stats(x, r, stats, 1)
        ops.update_gates(stats, gates, scales, 4, 0.5)
        ops.skip_or_scale(r, gates, scales, 0)
        ops.scale_rms_norm(x, r, w, 1e-6, 0.9)
        ops.scale_rms_norm(x[:, 0], r[:, 0], w, 1e-6, 1.1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8])  # a warp takes several rows from 3 tokens on
# (hidden, ffn). Odd sizes: the scalar path; few rows: warps and blocks past the last row.
@pytest.mark.parametrize("shape", [(576, 1536), (4096, 1000), (130, 77), (512, 10), (64, 3)], ids=str)
def test_gated_gemvs_match_reference(dtype, tokens, shape):
    g = torch.Generator().manual_seed(41)
    h, f = shape
    x = rand((tokens, h), dtype, "cuda", g)
    wg, wu = rand((f, h), dtype, "cuda", g, 0.05), rand((f, h), dtype, "cuda", g, 0.05)
    wd = rand((h, f), dtype, "cuda", g, 0.05)
    gates = ops.new_gates(3, tokens, "cuda")
    gates[2] = ops.GATE_SKIP
    if tokens > 1:
        gates[1, 0] = ops.GATE_SKIP
    act = torch.full((tokens, f), float("nan"), dtype=dtype, device="cuda")  # poisoned: must be overwritten
    ops.gated_swiglu_up(x, wg, wu, gates, 1, act)
    act_ref = torch.empty(tokens, f, dtype=dtype)
    ref.gated_swiglu_up(*_cpu(x, wg, wu, gates), 1, act_ref)
    assert not act.isnan().any()
    torch.testing.assert_close(act.cpu(), act_ref, rtol=2e-2, atol=2e-3)
    out = torch.full((tokens, h), float("nan"), dtype=dtype, device="cuda")
    ops.gated_linear(act, wd, gates, 1, out)
    out_ref = torch.empty(tokens, h, dtype=dtype)
    ref.gated_linear(*_cpu(act, wd, gates), 1, out_ref)
    torch.testing.assert_close(out.cpu(), out_ref, rtol=2e-2, atol=2e-3)
    skipped = torch.full((tokens, h), float("nan"), dtype=dtype, device="cuda")
    ops.gated_linear(act, wd, gates, 2, skipped)
    ops.gated_swiglu_up(x, wg, wu, gates, 2, act)
    assert skipped.isnan().all()  # every sequence gated off: the kernel wrote nothing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2])
# (rows, in_features): one wave or many, the double-buffered loop's remainder, the loop and then a
# tail on the same lane (1536), the scalar path looping (1001) and not (77)
@pytest.mark.parametrize("shape", [(4096, 4096), (6144, 4096), (1024, 4096), (300, 14336), (64, 1536), (77, 1000),
                                   (9, 1001), (9, 77)], ids=str)
# the weight at an address that is not 16-byte aligned (contiguous all the same): the scalar loads
@pytest.mark.parametrize("offset", [0, 1])
def test_pipelined_and_plain_one_row_gemvs_give_the_same_bits(dtype, tokens, shape, offset, monkeypatch):
    """The pipelined one-row GEMV (next chunks loaded while the current ones are used) sums the
    same chunks in the same order as the plain one: the same bits, and the reference's values."""
    g = torch.Generator().manual_seed(47)
    rows, k = shape
    x = rand((tokens, k), dtype, "cuda", g)
    w = rand((rows * k + offset,), dtype, "cuda", g, 0.05)[offset:].view(rows, k)
    got = {}
    for mode in ("off", "on", "auto", " On\t"):  # case and surrounding whitespace are ignored
        monkeypatch.setenv("ADASKIP_GEMV_PIPELINE", mode)
        got[mode] = torch.full((tokens, rows), float("nan"), dtype=dtype, device="cuda")
        ops.gated_linear(x, w, None, 0, got[mode])
    assert torch.equal(got["off"], got["on"]) and torch.equal(got["off"], got["auto"])
    assert torch.equal(got["on"], got[" On\t"])
    want = torch.empty(tokens, rows, dtype=dtype)
    ref.gated_linear(*_cpu(x, w), None, 0, want)
    torch.testing.assert_close(got["on"].cpu(), want, rtol=2e-2, atol=2e-3)
    monkeypatch.setenv("ADASKIP_GEMV_PIPELINE", "sideways")
    with pytest.raises(ValueError, match="ADASKIP_GEMV_PIPELINE must be on, off or auto"):
        ops.gated_linear(x, w, None, 0, got["on"])


def test_gated_swiglu_up_reads_the_halves_of_a_fused_gate_up_matrix():
    g = torch.Generator().manual_seed(43)
    fused = rand((2 * 1000, 576), torch.bfloat16, "cuda", g, 0.05)  # [gate; up], as some checkpoints store it
    x = rand((3, 576), torch.bfloat16, "cuda", g)
    from_views = torch.full((3, 1000), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.gated_swiglu_up(x, fused[:1000], fused[1000:], None, 0, from_views)
    separate = torch.empty_like(from_views)
    ops.gated_swiglu_up(x, fused[:1000].clone(), fused[1000:].clone(), None, 0, separate)
    assert torch.equal(from_views, separate)


def test_gated_gemvs_flip_inside_a_cuda_graph():
    g = torch.Generator().manual_seed(42)
    x, w = rand((2, 512), torch.bfloat16, "cuda", g), rand((256, 512), torch.bfloat16, "cuda", g, 0.05)
    gates = ops.new_gates(1, 2, "cuda")
    out = torch.zeros(2, 256, dtype=torch.bfloat16, device="cuda")
    ops.gated_linear(x, w, gates, 0, out)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gated_linear(x, w, gates, 0, out)
    out.zero_()
    graph.replay()
    computed = out.clone()
    assert computed.abs().sum() > 0
    out.zero_()
    gates.fill_(ops.GATE_SKIP)  # flipped on the device; the same graph now skips the GEMV
    graph.replay()
    assert out.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Per-channel compensation tables (channel_scales)

# Hidden sizes: multiples of 8 (vectorized for every dtype), 4092 (vectorized for fp32 only), odd ones and
# 1 (scalar path); 2-D and 3-D; decode rows and prefill rows.
CHANNEL_SHAPES = [(1, 4096), (3, 1, 4096), (2, 37, 576), (2, 5, 577), (1, 3, 4099), (2, 2, 4092),
                  (1, 5, 16384), (4, 17, 13), (2, 2, 1), (3, 3)]
GATED_CHANNEL_SHAPES = [(3, 1, 4096), (3, 1, 577), (3, 40, 576), (3, 2, 4092), (3, 4, 13), (3, 2, 1), (5, 4099)]


def _channel_table(shape, gen, table="aligned"):
    """float32 per-channel scales on the GPU. 'offset': a contiguous view one float past an aligned start,
    so its rows cannot be read a vector at a time (the kernels must fall back to the scalar path)."""
    t = torch.rand(shape, generator=gen) * 2 + 0.25
    if table == "aligned":
        return t.cuda()
    base = torch.full((t.numel() + 1,), float("nan"), device="cuda")
    view = base[1:].view(shape)
    view.copy_(t)
    return view


def _channel_gates(num_sublayers, batch, device="cuda"):
    """Sublayer 1: RUN, SKIP, UNDECIDED, ...; sublayer 2: SKIP, RUN, SKIP, ...; sublayer 0 all RUN."""
    cycles = [[ops.GATE_RUN], [ops.GATE_RUN, ops.GATE_SKIP, ops.GATE_UNDECIDED], [ops.GATE_SKIP, ops.GATE_RUN]]
    return torch.tensor([[c[b % len(c)] for b in range(batch)] for c in cycles[:num_sublayers]],
                        dtype=torch.uint8, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("table", ["aligned", "offset"])
def test_scale_rms_norm_with_channel_scales_matches_reference(dtype, shape, layout, table):
    """x poisoned (only written); residual bit-identical to the reference's fp32 product and multiply."""
    g = torch.Generator().manual_seed(21)
    x, x_base = _tensor(shape, dtype, layout, g)
    residual, r_base = _tensor(shape, dtype, layout, g, scale=4.0)
    x.fill_(float("nan"))
    x_base_before, r_base_before = x_base.clone(), r_base.clone()
    weight = rand((shape[-1],), dtype, "cuda", g)
    channel = _channel_table((shape[-1],), g, table)
    channel_before = channel.clone()
    xc, rc, wc, cc = _cpu(x, residual, weight, channel)
    scale = 0.6180339887

    ops.scale_rms_norm(x, residual, weight, 1e-5, scale, channel_scales=channel)
    ref.scale_rms_norm(xc, rc, wc, 1e-5, scale, cc)

    assert torch.equal(residual.cpu(), rc)
    assert torch.equal(channel, channel_before)  # read only
    assert x.isfinite().all()
    torch.testing.assert_close(x.cpu(), xc, **_out_tols(dtype))
    if x_base is not x:
        hidden = shape[-1]
        outside = (lambda t: t[..., hidden:]) if layout != "misaligned" else (lambda t: t[:1])
        assert torch.equal(outside(x_base), outside(x_base_before))
        assert torch.equal(outside(r_base), outside(r_base_before))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATED_CHANNEL_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
@pytest.mark.parametrize("table", ["aligned", "offset"])
@pytest.mark.parametrize("sublayer", [1, 2])
def test_gated_fused_add_rms_norm_with_channel_scales_matches_reference(dtype, shape, layout, table, sublayer):
    """Gated-off sequences have NaN in x (never read) and take residual * (scale * channel_scales[sublayer]).
    Statistics on for sublayer 2."""
    with_stats = sublayer == 2
    g = torch.Generator().manual_seed(22)
    batch = 1 if len(shape) == 2 else shape[0]
    x, _ = _tensor(shape, dtype, layout, g)
    residual, _ = _tensor(shape, dtype, layout, g, scale=3.0)
    weight = rand((shape[-1],), dtype, "cuda", g)
    gates = _channel_gates(3, batch)
    skip = gates[sublayer] == ops.GATE_SKIP
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    x3[skip] = float("nan")
    scales = (torch.rand(3, batch, generator=g) + 0.5).cuda()
    channel = _channel_table((3, shape[-1]), g, table)
    stats = torch.rand(3, batch, 3, generator=g).cuda() if with_stats else None
    xc, rc, wc, sc, gc, scc, cc = _cpu(x, residual, weight, stats, gates, scales, channel)

    ops.fused_add_rms_norm(x, residual, weight, 1e-5, stats=stats, sublayer=sublayer, gates=gates, scales=scales,
                           channel_scales=channel)
    ref.fused_add_rms_norm(xc, rc, wc, 1e-5, sc, sublayer, None, gc, scc, cc)

    assert torch.equal(residual.cpu(), rc)
    torch.testing.assert_close(x.cpu(), xc, **_out_tols(dtype))
    assert not x.isnan().any()
    if with_stats:
        torch.testing.assert_close(stats.cpu(), sc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 4096), (3, 50, 577), (2, 5, 8192), (3, 2, 4092), (3, 4, 13), (3, 2, 1),
                                   (5, 4099)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
@pytest.mark.parametrize("table", ["aligned", "offset"])
def test_skip_or_scale_with_channel_scales_matches_reference(dtype, shape, layout, table):
    g = torch.Generator().manual_seed(23)
    batch = 1 if len(shape) == 2 else shape[0]
    residual, _ = _tensor(shape, dtype, layout, g)
    gates = _channel_gates(3, batch)
    scales = (torch.rand(3, batch, generator=g) + 0.5).cuda()
    channel = _channel_table((3, shape[-1]), g, table)
    rc, gc, scc, cc = _cpu(residual, gates, scales, channel)
    before = residual.clone()
    for sub in (0, 1, 2):
        ops.skip_or_scale(residual, gates, scales, sub, channel_scales=channel)
        ref.skip_or_scale(rc, gc, scc, sub, cc)
        assert torch.equal(residual.cpu(), rc)
    assert not torch.equal(residual, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 4096), (2, 7, 577), (3, 2, 1)], ids=str)
def test_channel_scales_of_ones_give_the_no_table_result(dtype, shape):
    g = torch.Generator().manual_seed(24)
    hidden, batch = shape[-1], shape[0]
    x, residual = rand(shape, dtype, "cuda", g), rand(shape, dtype, "cuda", g, scale=3.0)
    weight = rand((hidden,), dtype, "cuda", g)
    gates = _channel_gates(3, batch)
    scales = (torch.rand(3, batch, generator=g) + 0.5).cuda()
    ones = torch.ones(3, hidden, device="cuda")
    for call in (lambda xx, rr, t: ops.scale_rms_norm(xx, rr, weight, 1e-5, 0.37, None if t is None else t[0]),
                 lambda xx, rr, t: ops.fused_add_rms_norm(xx, rr, weight, 1e-5, sublayer=2, gates=gates,
                                                          scales=scales, channel_scales=t),
                 lambda xx, rr, t: ops.skip_or_scale(rr, gates, scales, 1, t)):
        (x1, r1), (x2, r2) = (x.clone(), residual.clone()), (x.clone(), residual.clone())
        call(x1, r1, None)
        call(x2, r2, ones)
        assert torch.equal(r1, r2) and torch.equal(x1, x2)


def test_bad_channel_scales_are_refused_like_the_reference():
    """The kernels refuse what the reference refuses, with the same message up to the printed
    dtype / shape; nothing is written."""
    from test_ops_reference import channel_scales_bad_calls

    cpu_cases, _, _ = channel_scales_bad_calls("cpu")
    cuda_cases, x, residual = channel_scales_bad_calls("cuda")
    x_before, r_before = x.clone(), residual.clone()
    assert [c[0] for c in cpu_cases] == [c[0] for c in cuda_cases]
    for (name, cpu_call), (_, cuda_call) in zip(cpu_cases, cuda_cases):
        with pytest.raises(ValueError, match="'channel_scales'") as cpu_err:
            cpu_call()
        with pytest.raises(ValueError, match="'channel_scales'") as cuda_err:
            cuda_call()
        assert str(cuda_err.value).split(", got")[0] == str(cpu_err.value).split(", got")[0], name
    assert torch.equal(x, x_before) and torch.equal(residual, r_before)


def test_channel_scales_on_another_device_are_refused():
    x, r, w = torch.randn(2, 3, 8, device="cuda"), torch.randn(2, 3, 8, device="cuda"), torch.ones(8, device="cuda")
    gates, scales = ops.new_gates(2, 2, "cuda", state=ops.GATE_SKIP), ops.new_scales(2, 2, "cuda")
    r_before = r.clone()
    with pytest.raises(ValueError, match="'channel_scales'"):
        ops.scale_rms_norm(x, r, w, 1e-6, 0.5, channel_scales=torch.ones(8))
    with pytest.raises(ValueError, match="'channel_scales'"):
        ops.fused_add_rms_norm(x, r, w, 1e-6, gates=gates, scales=scales, channel_scales=torch.ones(2, 8))
    with pytest.raises(ValueError, match="'channel_scales'"):
        ops.skip_or_scale(r, gates, scales, 0, channel_scales=torch.ones(2, 8))
    assert torch.equal(r, r_before)


def _channel_step(x, residual, ffn_in, w_attn, w_ffn, gates, scales, table, vector):
    """A decode step with per-channel compensation: the gated attention add (seq-dependent), a
    gated sublayer compensated on its own, and a plan-skipped FFN (scale + table, then the norm)."""
    ops.fused_add_rms_norm(x, residual, w_attn, 1e-6, sublayer=0, gates=gates, scales=scales, channel_scales=table)
    ops.skip_or_scale(residual, gates, scales, 1, channel_scales=table)
    ops.scale_rms_norm(ffn_in, residual, w_ffn, 1e-6, 0.9, channel_scales=vector)


@pytest.mark.parametrize("hidden", [1024, 1001])  # vectorized; scalar path
def test_channel_scales_in_a_cuda_graph_follow_device_side_updates(hidden):
    """Captured once; gates and both tables change on the device between replays: bit-identical to eager."""
    g = torch.Generator().manual_seed(25)
    batch, steps = 3, 4
    w_attn, w_ffn = rand((hidden,), torch.bfloat16, "cuda", g), rand((hidden,), torch.bfloat16, "cuda", g)
    base_residual = rand((batch, 1, hidden), torch.bfloat16, "cuda", g, scale=8.0)
    gate_steps = [torch.randint(0, 3, (2, batch), generator=g, dtype=torch.uint8).cuda() for _ in range(steps)]
    gate_steps[0][:, 0] = ops.GATE_SKIP
    scale_steps = [(torch.rand(2, batch, generator=g) + 0.5).cuda() for _ in range(steps)]
    table_steps = [(torch.rand(2, hidden, generator=g) + 0.5).cuda() for _ in range(steps)]
    vector_steps = [(torch.rand(hidden, generator=g) + 0.5).cuda() for _ in range(steps)]
    inputs = []
    for t in range(steps):
        xt = rand((batch, 1, hidden), torch.bfloat16, "cuda", g)
        xt[gate_steps[t][0] == ops.GATE_SKIP] = float("nan")  # gated off: never read
        inputs.append(xt)

    residual, ffn_in = base_residual.clone(), torch.empty_like(base_residual)
    eager = []
    for t in range(steps):
        ffn_in.fill_(float("nan"))
        _channel_step(inputs[t].clone(), residual, ffn_in, w_attn, w_ffn, gate_steps[t], scale_steps[t],
                      table_steps[t], vector_steps[t])
        eager.append((ffn_in.clone(), residual.clone()))

    gx, gres, gffn = torch.empty_like(base_residual), base_residual.clone(), torch.empty_like(base_residual)
    ggates, gscales = gate_steps[0].clone(), scale_steps[0].clone()
    gtable, gvector = table_steps[0].clone(), vector_steps[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _channel_step(gx.clone().zero_(), gres.clone(), gffn.clone(), w_attn, w_ffn, ggates, gscales, gtable, gvector)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _channel_step(gx, gres, gffn, w_attn, w_ffn, ggates, gscales, gtable, gvector)
    gres.copy_(base_residual)
    for t in range(steps):
        gx.copy_(inputs[t])
        ggates.copy_(gate_steps[t]), gscales.copy_(scale_steps[t])
        gtable.copy_(table_steps[t]), gvector.copy_(vector_steps[t])
        gffn.fill_(float("nan"))
        graph.replay()
        assert torch.equal(gffn, eager[t][0]) and torch.equal(gres, eager[t][1])
    assert gffn.isfinite().all()


def test_channel_scales_ops_never_sync_with_the_host():
    g = torch.Generator().manual_seed(26)
    x, r = rand((2, 33, 4096), torch.bfloat16, "cuda", g), rand((2, 33, 4096), torch.bfloat16, "cuda", g)
    w = rand((4096,), torch.bfloat16, "cuda", g)
    gates, scales = ops.new_gates(2, 2, "cuda", state=ops.GATE_SKIP), ops.new_scales(2, 2, "cuda")
    table, vector = torch.ones(2, 4096, device="cuda"), torch.ones(4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.fused_add_rms_norm(x, r, w, sublayer=1, gates=gates, scales=scales, channel_scales=table)
        ops.skip_or_scale(r, gates, scales, 0, channel_scales=table)
        ops.scale_rms_norm(x, r, w, 1e-6, 0.9, channel_scales=vector)
        ops.scale_rms_norm(x[:, 0], r[:, 0], w, 1e-6, 1.1, channel_scales=vector)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
