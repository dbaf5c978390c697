"""The ops on CPU (the PyTorch reference, through adaskip.ops) against float64 oracles."""
import pytest
import torch

from adaskip import ops
from helpers import DTYPES, ULP, oracle_add_norm, oracle_stats, rand, strided_view

SHAPES = [(7, 33), (3, 5, 64), (2, 9, 577), (1, 1, 4096), (2, 3, 1)]


def _tols(dtype):
    # Output of the norm: two roundings to the dtype (normalized value, then times weight).
    return dict(rtol=2 * ULP[dtype] + 1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_stats", [False, True])
def test_fused_add_rms_norm_matches_oracle(dtype, shape, with_stats):
    g = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    hidden = shape[-1]
    x, residual = rand(shape, dtype, gen=g), rand(shape, dtype, gen=g, scale=3.0)
    weight = rand((hidden,), dtype, gen=g)
    eps = 1e-5
    b_true, out_true = oracle_add_norm(x, residual, weight, eps)
    a_before = residual.clone()
    stats = ops.new_stats(4, 1 if len(shape) == 2 else shape[0]) if with_stats else None

    ops.fused_add_rms_norm(x, residual, weight, eps, stats=stats, sublayer=2)

    torch.testing.assert_close(residual.double(), b_true.double(), rtol=ULP[dtype], atol=0)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))
    if with_stats:
        expected = oracle_stats(a_before, residual, 4, 2)
        torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_stats", [False, True])
def test_gated_fused_add_rms_norm_compensates_gated_off_sequences(dtype, with_stats):
    """Sequence 0 is gated off (its x is garbage the kernel must not read: NaN here), 1 decided
    to run, 2 still undecided: 0 gets residual * scale, the others the plain add; all rows are
    normalized. Statistics compare the stream before and after, whichever way it changed."""
    g = torch.Generator().manual_seed(4)
    shape = (3, 2, 48)
    x, residual = rand(shape, dtype, gen=g), rand(shape, dtype, gen=g, scale=2.0)
    x[0] = float("nan")
    weight = rand((48,), dtype, gen=g)
    gates = ops.new_gates(4, 3)
    gates[1] = torch.tensor([ops.GATE_SKIP, ops.GATE_RUN, ops.GATE_UNDECIDED], dtype=torch.uint8)
    scales = ops.new_scales(4, 3)
    scales[1] = torch.tensor([0.75, 3.0, 5.0])
    a_before = residual.clone()
    expected = residual.clone()
    expected[0] = (a_before[0].float() * 0.75).to(dtype)
    expected[1:] = a_before[1:] + x[1:]
    stats = ops.new_stats(4, 3) if with_stats else None

    ops.fused_add_rms_norm(x, residual, weight, 1e-5, stats=stats, sublayer=1, gates=gates, scales=scales)

    assert torch.equal(residual, expected)
    _, out_true = oracle_add_norm(torch.zeros_like(expected), expected, weight, 1e-5)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))
    assert not x.isnan().any()
    if with_stats:
        torch.testing.assert_close(stats.double(), oracle_stats(a_before, residual, 4, 1), rtol=1e-5, atol=1e-5)
        assert stats[1, 0, 0].item() == pytest.approx(2.0, abs=1e-3)  # two tokens, cosine 1
    with pytest.raises(ValueError, match="'gates' and 'scales' together"):
        ops.fused_add_rms_norm(x, residual, weight, 1e-5, gates=gates)
    with pytest.raises(ValueError, match="holds 3 sequences"):
        ops.fused_add_rms_norm(x[:2], residual[:2], weight, 1e-5, gates=gates, scales=scales)
    with pytest.raises(ValueError, match="out of range"):
        ops.fused_add_rms_norm(x, residual, weight, 1e-5, sublayer=4, gates=gates, scales=scales)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_accumulate_over_calls_and_respect_seq_lens(dtype):
    g = torch.Generator().manual_seed(1)
    shape = (3, 6, 40)
    weight = rand((40,), dtype, gen=g)
    seq_lens = torch.tensor([6, 2, 0])
    stats = ops.new_stats(3, 3)
    expected = torch.zeros(3, 3, 3, dtype=torch.float64)
    for sub in (0, 1, 1):
        x, residual = rand(shape, dtype, gen=g), rand(shape, dtype, gen=g)
        a_before = residual.clone()
        ops.fused_add_rms_norm(x, residual, weight, 1e-6, stats=stats, sublayer=sub, seq_lens=seq_lens)
        expected += oracle_stats(a_before, residual, 3, sub, seq_lens)
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-5)
    assert stats[1, :, 2].tolist() == [12.0, 4.0, 0.0]
    assert stats[2].abs().sum() == 0


def test_seq_lens_are_clamped_to_the_sequence():
    x, residual = rand((2, 4, 16), torch.float32), rand((2, 4, 16), torch.float32)
    stats = ops.new_stats(1, 2)
    ops.fused_add_rms_norm(x, residual, torch.ones(16), stats=stats, seq_lens=torch.tensor([-3, 99], dtype=torch.int32))
    assert stats[0, :, 2].tolist() == [0.0, 4.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_non_contiguous_rows_are_written_in_place_and_padding_untouched(dtype, transpose):
    g = torch.Generator().manual_seed(2)
    shape = (2, 5, 24)
    x, x_base = strided_view(shape, dtype, gen=g, transpose=transpose)
    residual, r_base = strided_view(shape, dtype, gen=g, transpose=not transpose)
    weight = rand((24,), dtype, gen=g)
    x_pad, r_pad = x_base[..., 24:].clone(), r_base[..., 24:].clone()
    b_true, out_true = oracle_add_norm(x, residual, weight, 1e-6)
    stats = ops.new_stats(1, 2)
    a_before = residual.clone()
    ops.fused_add_rms_norm(x, residual, weight, 1e-6, stats=stats)
    torch.testing.assert_close(residual.double(), b_true.double(), rtol=ULP[dtype], atol=0)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))
    assert torch.equal(x_base[..., 24:], x_pad) and torch.equal(r_base[..., 24:], r_pad)
    torch.testing.assert_close(stats.double(), oracle_stats(a_before, residual, 1, 0), rtol=1e-5, atol=1e-5)


def _poison(t):
    """Fills a contiguous t with NaN, inf and -inf: an op that reads it cannot produce finite outputs."""
    flat = t.view(-1)
    flat[0::3], flat[1::3], flat[2::3] = float("nan"), float("inf"), float("-inf")
    return t


# 1 and 3: hidden sizes below any vector width; 67: odd; 576: SmolLM2.
SCALE_SHAPES = [(5, 1), (4, 3), (6, 67), (2, 1, 3), (2, 7, 67), (3, 4, 576)]
# 1/3 is not exact in any dtype: the product has to round. At 1e-3 eps is a large part of the mean square,
# so normalizing the stream before scaling it (RMSNorm is otherwise scale-invariant) would show.
SCALES = [0.75, 1 / 3, 1.7, 1e-3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SCALE_SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_scale_rms_norm_matches_oracle_and_never_reads_x(dtype, shape, scale):
    g = torch.Generator().manual_seed(8)
    residual = rand(shape, dtype, gen=g, scale=3.0)
    weight = rand((shape[-1],), dtype, gen=g)
    x = _poison(torch.empty(shape, dtype=dtype))
    a_before = residual.clone()

    out = ops.scale_rms_norm(x, residual, weight, 1e-5, scale)

    assert out[0] is x and out[1] is residual
    # Rounds exactly like the runtime's former `h.mul_(scale)`, and that is within an ulp of the truth
    # (subnormal products: within one subnormal step).
    assert torch.equal(residual, a_before.clone().mul_(scale))
    torch.testing.assert_close(residual.double(), a_before.double() * scale, rtol=ULP[dtype],
                               atol=torch.finfo(dtype).tiny * ULP[dtype])
    assert x.isfinite().all()
    _, out_true = oracle_add_norm(torch.zeros_like(residual), residual, weight, 1e-5)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rms_norm_by_zero_gives_zeros_not_nan(dtype):
    """A zero stream has zero RMS: eps keeps the normalized output at 0 instead of 0/0."""
    residual = rand((2, 3, 40), dtype, gen=torch.Generator().manual_seed(6))
    x = _poison(torch.empty_like(residual))
    ops.scale_rms_norm(x, residual, torch.ones(40, dtype=dtype), 1e-6, 0.0)
    assert (residual == 0).all() and (x == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_scale_rms_norm_non_contiguous_rows_are_written_in_place_and_padding_untouched(dtype, transpose):
    g = torch.Generator().manual_seed(7)
    shape = (2, 5, 24)
    x, x_base = strided_view(shape, dtype, gen=g, transpose=transpose)
    residual, r_base = strided_view(shape, dtype, gen=g, transpose=not transpose)
    x.fill_(float("nan"))  # the view only: the padding keeps its random values
    weight = rand((24,), dtype, gen=g)
    x_pad, r_pad = x_base[..., 24:].clone(), r_base[..., 24:].clone()
    expected = residual.clone().mul_(0.8)

    ops.scale_rms_norm(x, residual, weight, 1e-6, 0.8)

    assert torch.equal(residual, expected)
    _, out_true = oracle_add_norm(torch.zeros_like(expected), expected, weight, 1e-6)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))
    assert torch.equal(x_base[..., 24:], x_pad) and torch.equal(r_base[..., 24:], r_pad)
    # [tokens, hidden] with padded rows.
    x2, r2 = rand((5, 32), dtype, gen=g)[:, :24], rand((5, 32), dtype, gen=g)[:, :24]
    x2.fill_(float("nan"))
    expected2 = r2.clone().mul_(1.5)
    ops.scale_rms_norm(x2, r2, weight, 1e-6, 1.5)
    assert torch.equal(r2, expected2)
    _, out2 = oracle_add_norm(torch.zeros_like(expected2), expected2, weight, 1e-6)
    torch.testing.assert_close(x2.double(), out2, **_tols(dtype))


def test_scale_rms_norm_rejected_calls_change_nothing():
    x, residual, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.ones(8)
    x_before, r_before = x.clone(), residual.clone()
    for scale in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="'scale' must be finite"):
            ops.scale_rms_norm(x, residual, w, 1e-6, scale)
    with pytest.raises(ValueError, match="'eps'"):
        ops.scale_rms_norm(x, residual, w, -1e-6, 0.5)
    assert torch.equal(x, x_before) and torch.equal(residual, r_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 31), (2, 7, 128)])
def test_io_similarity_stats_matches_oracle(dtype, shape):
    g = torch.Generator().manual_seed(3)
    a = rand(shape, dtype, gen=g)
    b = (a.float() * 0.9 + rand(shape, torch.float32, gen=g) * 0.3).to(dtype)
    batch = 1 if len(shape) == 2 else shape[0]
    lens = torch.tensor([shape[-2] - 1] * batch)
    stats = ops.new_stats(2, batch)
    a_copy, b_copy = a.clone(), b.clone()
    ops.io_similarity_stats(a, b, stats, 1, seq_lens=lens)
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy)  # inputs only read
    torch.testing.assert_close(stats.double(), oracle_stats(a, b, 2, 1, lens), rtol=1e-5, atol=1e-5)


def test_io_similarity_known_values():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[6.0, 8.0], [0.0, 2.0]])  # cos 1, ratio 2; cos 0, ratio 2
    stats = ops.new_stats(1, 1)
    ops.io_similarity_stats(a, b, stats, 0)
    assert stats[0, 0].tolist() == pytest.approx([1.0, 4.0, 2.0])
    mean_cos, mean_ratio, count = ops.mean_stats(stats)
    assert mean_cos.item() == pytest.approx(0.5) and mean_ratio.item() == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_or_scale_per_sequence(dtype):
    g = torch.Generator().manual_seed(4)
    residual = rand((3, 4, 20), dtype, gen=g)
    before = residual.clone()
    gates = torch.tensor([[ops.GATE_SKIP, ops.GATE_UNDECIDED, ops.GATE_RUN],
                          [ops.GATE_RUN, ops.GATE_SKIP, ops.GATE_SKIP]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 3.0, 3.0], [7.0, 1.25, 2.0]])
    ops.skip_or_scale(residual, gates, scales, 1)
    assert torch.equal(residual[0], before[0])
    torch.testing.assert_close(residual[1].double(), before[1].double() * 1.25, rtol=ULP[dtype], atol=0)
    torch.testing.assert_close(residual[2].double(), before[2].double() * 2.0, rtol=0, atol=0)


def test_update_gates_decides_once_after_the_window():
    u, s, r = ops.GATE_UNDECIDED, ops.GATE_SKIP, ops.GATE_RUN
    stats = ops.new_stats(3, 2)
    gates = torch.tensor([[u, u], [u, r], [s, u]], dtype=torch.uint8)
    scales = ops.new_scales(3, 2)
    scales[2, 0] = 0.75
    # (sum cos, sum ratio, count): sublayer 0 seq 0 is similar, seq 1 is not.
    stats[0, 0] = torch.tensor([19.0, 21.0, 20.0])
    stats[0, 1] = torch.tensor([10.0, 30.0, 20.0])
    stats[1, 0] = torch.tensor([9.9, 11.0, 10.0])  # window not complete yet
    stats[1, 1] = torch.tensor([20.0, 20.0, 20.0])  # already decided RUN: stays
    stats[2, :] = torch.tensor([20.0, 40.0, 20.0])  # seq 0 already SKIP: its scale stays
    ops.update_gates(stats, gates, scales, window=20, beta=0.9)
    assert gates.tolist() == [[s, r], [u, r], [s, s]]
    torch.testing.assert_close(scales, torch.tensor([[21 / 20, 1.0], [1.0, 1.0], [0.75, 2.0]]))
    # Later statistics do not undo decisions.
    stats[0, 1] = torch.tensor([40.0, 40.0, 40.0])
    ops.update_gates(stats, gates, scales, window=20, beta=0.9)
    assert gates.tolist() == [[s, r], [u, r], [s, s]]
    # The mean equal to beta counts as similar enough.
    stats[1, 0] = torch.tensor([10.0, 10.0, 20.0])
    ops.update_gates(stats, gates, scales, window=20, beta=0.5)
    assert gates[1, 0] == s


def test_update_gates_reports_which_sublayers_still_run():
    """running[s]: does any sequence still run sublayer s (the predicate a CUDA-graph
    conditional node reads). It follows the gates as they are decided."""
    u, s, r = ops.GATE_UNDECIDED, ops.GATE_SKIP, ops.GATE_RUN
    gates = torch.tensor([[u, u], [s, r], [s, s], [u, s]], dtype=torch.uint8)
    scales = ops.new_scales(4, 2)
    stats = ops.new_stats(4, 2)
    running = torch.zeros(4, dtype=torch.bool)
    ops.update_gates(stats, gates, scales, window=4, beta=0.9, running=running)  # nothing decided yet
    assert running.tolist() == [True, True, False, True]
    stats[0] = torch.tensor([4.0, 4.0, 4.0])  # both sequences similar: gated off everywhere
    stats[3, 0] = torch.tensor([1.0, 4.0, 4.0])  # not similar: runs
    ops.update_gates(stats, gates, scales, window=4, beta=0.9, running=running)
    assert gates.tolist() == [[s, s], [s, r], [s, s], [r, s]]
    assert running.tolist() == [False, True, False, True]


def test_statistics_are_deterministic():
    g = torch.Generator().manual_seed(5)
    x0, r0 = rand((2, 50, 96), torch.bfloat16, gen=g), rand((2, 50, 96), torch.bfloat16, gen=g)
    w = rand((96,), torch.bfloat16, gen=g)
    results = []
    for _ in range(2):
        stats = ops.new_stats(1, 2)
        ops.fused_add_rms_norm(x0.clone(), r0.clone(), w, stats=stats)
        results.append(stats)
    assert torch.equal(results[0], results[1])


def _bad_calls():
    f32 = lambda *s: torch.randn(*s)  # noqa: E731
    w = torch.ones(8)
    st = ops.new_stats(2, 2)
    gates, scales = ops.new_gates(2, 2), ops.new_scales(2, 2)

    def srn(x, residual, weight=w, eps=1e-6, scale=0.5):
        return ops.scale_rms_norm(x, residual, weight, eps, scale)

    return [
        ("int x", lambda: ops.fused_add_rms_norm(torch.ones(2, 3, 8, dtype=torch.int32), torch.ones(2, 3, 8, dtype=torch.int32), w), "'x'"),
        ("dtype mismatch", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8).half(), w), "'residual'"),
        ("shape mismatch", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 4, 8), w), "shape"),
        ("1-d x", lambda: ops.fused_add_rms_norm(f32(8), f32(8), w), "'x'"),
        ("strided hidden", lambda: ops.fused_add_rms_norm(f32(2, 8, 3).transpose(1, 2), f32(2, 3, 8), w), "last (hidden)"),
        ("weight size", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), torch.ones(7)), "'weight'"),
        ("weight dtype", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w.half()), "'weight'"),
        ("eps", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, 0.0), "'eps'"),
        ("aliased", lambda: (lambda t: ops.fused_add_rms_norm(t, t, w))(f32(2, 3, 8)), "different tensors"),
        ("sublayer range", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, stats=st, sublayer=2), "'sublayer'"),
        ("negative sublayer", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, stats=st, sublayer=-1), "'sublayer'"),
        ("stats batch", lambda: ops.fused_add_rms_norm(f32(3, 3, 8), f32(3, 3, 8), w, stats=st), "'stats'"),
        ("stats dtype", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, stats=st.double()), "'stats'"),
        ("stats shape", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, stats=torch.zeros(2, 2, 2)), "'stats'"),
        ("seq_lens dtype", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, stats=st, seq_lens=torch.ones(2)), "'seq_lens'"),
        ("seq_lens size", lambda: ops.fused_add_rms_norm(f32(2, 3, 8), f32(2, 3, 8), w, stats=st, seq_lens=torch.ones(3, dtype=torch.int64)), "'seq_lens'"),
        ("io dtype", lambda: ops.io_similarity_stats(f32(2, 3, 8), f32(2, 3, 8).bfloat16(), st, 0), "'after'"),
        ("io sublayer", lambda: ops.io_similarity_stats(f32(2, 3, 8), f32(2, 3, 8), st, 5), "'sublayer'"),
        ("gates dtype", lambda: ops.skip_or_scale(f32(2, 3, 8), gates.bool(), scales, 0), "'gates'"),
        ("scales shape", lambda: ops.skip_or_scale(f32(2, 3, 8), gates, torch.ones(2, 3), 0), "'scales'"),
        ("gates batch", lambda: ops.skip_or_scale(f32(3, 3, 8), gates, scales, 0), "'gates'"),
        ("gate sublayer", lambda: ops.skip_or_scale(f32(2, 3, 8), gates, scales, 2), "'sublayer'"),
        ("window", lambda: ops.update_gates(st, gates, scales, 0, 0.9), "'window'"),
        ("beta range", lambda: ops.update_gates(st, gates, scales, 20, 1.5), "'beta'"),
        ("beta nan", lambda: ops.update_gates(st, gates, scales, 20, float("nan")), "'beta'"),
        ("stats/gates", lambda: ops.update_gates(ops.new_stats(3, 2), gates, scales, 20, 0.9), "sublayers"),
        ("running dtype", lambda: ops.update_gates(st, gates, scales, 20, 0.9, torch.ones(2, dtype=torch.uint8)), "'running'"),
        ("running shape", lambda: ops.update_gates(st, gates, scales, 20, 0.9, torch.ones(3, dtype=torch.bool)), "'running'"),
        ("scale nan", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), scale=float("nan")), "'scale' must be finite"),
        ("scale inf", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), scale=float("-inf")), "'scale' must be finite"),
        ("scale int x", lambda: srn(torch.ones(3, 8, dtype=torch.int32), torch.ones(3, 8, dtype=torch.int32)), "'x'"),
        ("scale dtype mismatch", lambda: srn(f32(2, 3, 8), f32(2, 3, 8).bfloat16()), "'residual' has dtype"),
        ("scale shape mismatch", lambda: srn(f32(2, 3, 8), f32(3, 2, 8)), "'x' has shape"),
        ("scale 2-d vs 3-d", lambda: srn(f32(6, 8), f32(2, 3, 8)), "'x' has shape"),
        ("scale 1-d x", lambda: srn(f32(8), f32(8)), "'x' must be"),
        ("scale strided hidden", lambda: srn(f32(2, 3, 8), f32(2, 8, 3).transpose(1, 2)), "last (hidden)"),
        ("scale aliased", lambda: (lambda t: srn(t, t))(f32(2, 3, 8)), "different tensors"),
        ("scale aliased view", lambda: (lambda t: srn(t.view(2, 3, 8), t))(f32(2, 3, 8)), "different tensors"),
        ("scale weight size", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), weight=torch.ones(9)), "'weight' must be"),
        ("scale weight 2-d", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), weight=torch.ones(1, 8)), "'weight' must be"),
        ("scale weight dtype", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), weight=w.half()), "'weight' has dtype"),
        ("scale eps zero", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), eps=0.0), "'eps' must be positive"),
        ("scale eps negative", lambda: srn(f32(2, 3, 8), f32(2, 3, 8), eps=-1e-5), "'eps' must be positive"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_is_a_clear_error(case):
    _, call, needle = case
    with pytest.raises((ValueError, RuntimeError), match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_gated_gemvs_match_float64_and_skip_when_every_sequence_is_gated(dtype, tokens):
    g = torch.Generator().manual_seed(40)
    x = rand((tokens, 72), dtype, gen=g)
    wg, wu, wd = rand((48, 72), dtype, gen=g, scale=0.2), rand((48, 72), dtype, gen=g, scale=0.2), rand((72, 48), dtype, gen=g, scale=0.2)
    gates = ops.new_gates(4, tokens)
    gates[3] = ops.GATE_SKIP
    if tokens > 1:
        gates[1, 0] = ops.GATE_SKIP  # only some sequences: the GEMV still runs for all
    act = torch.empty(tokens, 48, dtype=dtype)
    ops.gated_swiglu_up(x, wg, wu, gates, 1, act)
    gd, ud = x.double() @ wg.double().t(), x.double() @ wu.double().t()
    expected = torch.nn.functional.silu(gd) * ud
    torch.testing.assert_close(act.double(), expected, rtol=3 * ULP[dtype], atol=3 * ULP[dtype])
    out = torch.empty(tokens, 72, dtype=dtype)
    ops.gated_linear(act, wd, gates, 1, out)
    torch.testing.assert_close(out.double(), act.double() @ wd.double().t(), rtol=2 * ULP[dtype], atol=2 * ULP[dtype])
    poisoned = torch.full((tokens, 72), float("nan"), dtype=dtype)
    ops.gated_linear(act, wd, gates, 3, poisoned)  # every sequence gated off: nothing written
    assert poisoned.isnan().all()
    ops.gated_linear(act, wd, None, 0, poisoned)  # no gates: always computed
    assert not poisoned.isnan().any()


def test_gated_gemv_errors():
    x, w = torch.randn(2, 16).half(), torch.randn(8, 16).half()
    out = torch.empty(2, 8).half()
    cases = [
        (lambda: ops.gated_linear(x.float(), w.float(), None, 0, out.float()), "'x'"),
        (lambda: ops.gated_linear(torch.randn(9, 16).half(), w, None, 0, torch.empty(9, 8).half()), "1 to 8 tokens"),
        (lambda: ops.gated_linear(x, torch.randn(8, 15).half(), None, 0, out), "'weight'"),
        (lambda: ops.gated_linear(x, w, None, 0, torch.empty(2, 7).half()), "'out'"),
        (lambda: ops.gated_linear(x, w, ops.new_gates(2, 3), 0, out), "'gates'"),
        (lambda: ops.gated_linear(x, w, ops.new_gates(2, 2), 2, out), "'sublayer'"),
        (lambda: ops.gated_swiglu_up(x, w, torch.randn(7, 16).half(), None, 0, out), "'w_up'"),
    ]
    for call, needle in cases:
        with pytest.raises((ValueError, RuntimeError), match=needle):
            call()


# ---------------------------------------------------------------------------------------------
# Per-channel compensation tables (channel_scales)

# Hidden sizes 1 and 3 (below any vector width), 577 and 4099 (odd, not a multiple of 8); 2-D and 3-D.
CHANNEL_SHAPES = [(5, 1), (2, 1, 3), (4, 577), (2, 3, 577), (3, 4099), (1, 2, 4099)]


def oracle_channel(a, scale, channel):
    """Emulated in float64: the fp32 product scale * channel[h] (exact in float64, then rounded once to
    fp32), a * that (exact in float64, rounded once to fp32), then rounded to a's dtype. scale: a float
    (taken as fp32, as the op takes it) or a float32 tensor broadcasting against a."""
    s = torch.as_tensor(scale, dtype=torch.float32).double()
    factor = (s * channel.double()).float().double()
    return (a.double() * factor).float().to(a.dtype)


def _channel_table(shape, gen):
    """Random per-channel scales in [0.25, 2.25) with a few exact values (1, 0.5, 0) among them."""
    t = torch.rand(shape, generator=gen) * 2 + 0.25
    flat = t.view(-1)
    flat[::7], flat[3::11], flat[5::13] = 1.0, 0.5, 0.0
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=str)
@pytest.mark.parametrize("scale", [0.75, 1 / 3, 1e-3])
def test_scale_rms_norm_with_channel_scales_matches_oracle(dtype, shape, scale):
    g = torch.Generator().manual_seed(30)
    hidden = shape[-1]
    residual = rand(shape, dtype, gen=g, scale=3.0)
    weight = rand((hidden,), dtype, gen=g)
    channel = _channel_table((hidden,), g)
    x = torch.full(shape, float("nan"), dtype=dtype)  # only written
    a_before, channel_before = residual.clone(), channel.clone()
    expected = oracle_channel(a_before, scale, channel)

    out = ops.scale_rms_norm(x, residual, weight, 1e-5, scale, channel_scales=channel)

    assert out[0] is x and out[1] is residual
    assert torch.equal(residual, expected)
    assert torch.equal(channel, channel_before)  # read only
    # Within an ulp (two roundings: to fp32, then to the dtype) of the float64 truth.
    truth = a_before.double() * scale * channel.double()
    torch.testing.assert_close(residual.double(), truth, rtol=ULP[dtype] + 2 * ULP[torch.float32],
                               atol=torch.finfo(dtype).tiny * ULP[dtype])
    assert x.isfinite().all()
    _, out_true = oracle_add_norm(torch.zeros_like(expected), expected, weight, 1e-5)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))


def _mixed_gates(num_sublayers, batch):
    """Sublayer 1: RUN, SKIP, UNDECIDED, ... per sequence; sublayer 2: SKIP, RUN, SKIP, ...; others RUN."""
    gates = ops.new_gates(num_sublayers, batch, state=ops.GATE_RUN)
    cycle1 = [ops.GATE_RUN, ops.GATE_SKIP, ops.GATE_UNDECIDED]
    cycle2 = [ops.GATE_SKIP, ops.GATE_RUN]
    gates[1] = torch.tensor([cycle1[b % 3] for b in range(batch)], dtype=torch.uint8)
    gates[2] = torch.tensor([cycle2[b % 2] for b in range(batch)], dtype=torch.uint8)
    return gates


# (3, 1, 4099): batch > 1 and decode rows; (2, 577) is one sequence: SKIP under sublayer 2, RUN under 1.
GATED_CHANNEL_SHAPES = [(3, 2, 1), (3, 1, 3), (4, 3, 577), (2, 577), (3, 1, 4099), (5, 4099)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATED_CHANNEL_SHAPES, ids=str)
@pytest.mark.parametrize("sublayer", [1, 2])
@pytest.mark.parametrize("with_stats", [False, True])
def test_gated_fused_add_rms_norm_with_channel_scales_matches_oracle(dtype, shape, sublayer, with_stats):
    """Gated-off sequences (x poisoned: never read) get residual * (scale * channel_scales[sublayer]);
    the others the plain add; every row is normalized."""
    g = torch.Generator().manual_seed(31 + sublayer)
    hidden = shape[-1]
    batch = 1 if len(shape) == 2 else shape[0]
    x, residual = rand(shape, dtype, gen=g), rand(shape, dtype, gen=g, scale=2.0)
    weight = rand((hidden,), dtype, gen=g)
    gates = _mixed_gates(4, batch)
    scales = torch.rand(4, batch, generator=g) + 0.5
    channel = _channel_table((4, hidden), g)
    skip = gates[sublayer] == ops.GATE_SKIP
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    x3[skip] = float("nan")
    a_before = residual.clone()
    a3 = a_before.unsqueeze(0) if a_before.dim() == 2 else a_before
    expected3 = (a3.double() + x3.double()).to(dtype)
    for b in range(batch):
        if skip[b]:
            expected3[b] = oracle_channel(a3[b], scales[sublayer, b].item(), channel[sublayer])
    expected = expected3.view(shape)
    stats = ops.new_stats(4, batch) if with_stats else None

    ops.fused_add_rms_norm(x, residual, weight, 1e-5, stats=stats, sublayer=sublayer, gates=gates,
                           scales=scales, channel_scales=channel)

    assert torch.equal(residual, expected)
    assert not x.isnan().any()
    _, out_true = oracle_add_norm(torch.zeros_like(expected), expected, weight, 1e-5)
    torch.testing.assert_close(x.double(), out_true, **_tols(dtype))
    if with_stats:
        torch.testing.assert_close(stats.double(), oracle_stats(a_before, residual, 4, sublayer),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATED_CHANNEL_SHAPES, ids=str)
def test_skip_or_scale_with_channel_scales_matches_oracle(dtype, shape):
    g = torch.Generator().manual_seed(33)
    hidden = shape[-1]
    batch = 1 if len(shape) == 2 else shape[0]
    residual = rand(shape, dtype, gen=g, scale=3.0)
    gates = _mixed_gates(3, batch)
    scales = torch.rand(3, batch, generator=g) + 0.5
    channel = _channel_table((3, hidden), g)
    expected = residual.clone()
    e3 = expected.unsqueeze(0) if expected.dim() == 2 else expected
    for sublayer in (1, 2):
        for b in range(batch):
            if gates[sublayer, b] == ops.GATE_SKIP:
                e3[b] = oracle_channel(e3[b], scales[sublayer, b].item(), channel[sublayer])
        ops.skip_or_scale(residual, gates, scales, sublayer, channel_scales=channel)
        assert torch.equal(residual, expected)
    assert (gates[1:] == ops.GATE_SKIP).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 577), (2, 1, 4099)], ids=str)
def test_channel_scales_of_ones_give_the_no_table_result(dtype, shape):
    g = torch.Generator().manual_seed(34)
    hidden = shape[-1]
    batch = 1 if len(shape) == 2 else shape[0]
    residual, x = rand(shape, dtype, gen=g, scale=3.0), rand(shape, dtype, gen=g)
    weight = rand((hidden,), dtype, gen=g)
    gates = _mixed_gates(3, batch)
    scales = torch.rand(3, batch, generator=g) + 0.5
    ones = torch.ones(3, hidden)

    def both(call):
        (x1, r1), (x2, r2) = (x.clone(), residual.clone()), (x.clone(), residual.clone())
        call(x1, r1, None)
        call(x2, r2, ones)
        assert torch.equal(r1, r2) and torch.equal(x1, x2)
        return r1

    for scale in (1 / 3, 0.7, 1e-3):
        r = both(lambda xx, rr, t: ops.scale_rms_norm(xx, rr, weight, 1e-5, scale,
                                                    channel_scales=None if t is None else t[0]))
        assert not torch.equal(r, residual)
    for sublayer in (1, 2):
        both(lambda xx, rr, t: ops.fused_add_rms_norm(xx, rr, weight, 1e-5, sublayer=sublayer, gates=gates,
                                                      scales=scales, channel_scales=t))
        both(lambda xx, rr, t: ops.skip_or_scale(rr, gates, scales, sublayer, channel_scales=t))


def channel_scales_bad_calls(device="cpu"):
    """(id, call, residual it would change): calls every op must refuse, naming 'channel_scales'.
    Shared with test_ops_cuda.py (device='cuda')."""
    f32 = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    w = torch.ones(8, device=device)
    gates = ops.new_gates(2, 2, device, state=ops.GATE_SKIP)
    scales = ops.new_scales(2, 2, device)
    x, residual = f32(2, 3, 8), f32(2, 3, 8)
    good1, good2 = torch.ones(8, device=device), torch.ones(2, 8, device=device)

    def srn(t):
        return lambda: ops.scale_rms_norm(x, residual, w, 1e-6, 0.5, channel_scales=t)

    def fused(t, gated=True):
        kw = dict(gates=gates, scales=scales) if gated else {}
        return lambda: ops.fused_add_rms_norm(x, residual, w, 1e-6, sublayer=1, channel_scales=t, **kw)

    def sos(t):
        return lambda: ops.skip_or_scale(residual, gates, scales, 1, channel_scales=t)

    cases = []
    for op, table_good, bad_shapes in (
            ("scale_rms_norm", good1, [(9,), (7,), (1, 8), (2, 8)]),
            ("fused_add_rms_norm", good2, [(8,), (3, 8), (1, 8), (2, 9), (2, 1, 8)]),
            ("skip_or_scale", good2, [(8,), (3, 8), (1, 8), (2, 7), (16,)])):
        make = {"scale_rms_norm": srn, "fused_add_rms_norm": fused, "skip_or_scale": sos}[op]
        cases += [
            (f"{op} float64", make(table_good.double())),
            (f"{op} float16", make(table_good.half())),
            (f"{op} bfloat16", make(table_good.bfloat16())),
            (f"{op} int32", make(table_good.int())),
            (f"{op} non-contiguous", make(torch.ones(8, 2, device=device).t() if table_good.dim() == 2
                                          else torch.ones(16, device=device)[::2])),
        ]
        cases += [(f"{op} shape {s}", make(torch.ones(*s, device=device))) for s in bad_shapes]
    cases.append(("fused_add_rms_norm without gates", fused(good2, gated=False)))
    cases.append(("fused_add_rms_norm without gates, 1-d", fused(good1, gated=False)))
    return cases, x, residual


@pytest.mark.parametrize("case", range(len(channel_scales_bad_calls()[0])),
                         ids=[c[0] for c in channel_scales_bad_calls()[0]])
def test_bad_channel_scales_are_a_clear_error_and_change_nothing(case):
    cases, x, residual = channel_scales_bad_calls()
    x_before, r_before = x.clone(), residual.clone()
    _, call = cases[case]
    with pytest.raises(ValueError, match="'channel_scales'"):
        call()
    assert torch.equal(x, x_before) and torch.equal(residual, r_before)
