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
