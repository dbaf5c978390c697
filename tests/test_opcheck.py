"""torch.library.opcheck on every op: schema (declared mutations), fake implementations,
dispatch under functionalization. CPU runs the registered reference; CUDA runs the kernels."""
import pytest
import torch

from adaskip import ops

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="ops are registered with torch by the extension")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _samples(device, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    stats = ops.new_stats(3, 2, device)
    lens = torch.tensor([5, 2], device=device)
    gates = torch.tensor([[1, 0], [2, 1], [0, 0]], dtype=torch.uint8, device=device)
    scales = torch.rand(3, 2, generator=g).to(device) + 0.5
    acc = torch.tensor([[[18.0, 20.0, 20.0], [5.0, 20.0, 20.0]]] * 3, device=device)
    # Per-channel compensation tables: float32 whatever the activations' dtype; read only.
    ch = lambda *s: (torch.rand(*s, generator=g) + 0.5).to(device)  # noqa: E731
    samples = [
        ("fused_add_rms_norm", (r(2, 5, 64), r(2, 5, 64), r(64), 1e-6, stats.clone(), 1, lens)),
        ("fused_add_rms_norm", (r(7, 40), r(7, 40), r(40), 1e-5, None, 0, None)),
        ("fused_add_rms_norm", (r(2, 1, 64), r(2, 1, 64), r(64), 1e-6, stats.clone(), 1, None, gates, scales)),
        ("scale_rms_norm", (r(2, 5, 64), r(2, 5, 64), r(64), 1e-6, 0.8)),
        ("scale_rms_norm", (r(7, 40), r(7, 40), r(40), 1e-5, 1 / 3)),
        ("io_similarity_stats", (r(2, 5, 24), r(2, 5, 24), stats.clone(), 2, None)),
        ("skip_or_scale", (r(2, 3, 16), gates, scales, 1)),
        ("fused_add_rms_norm", (r(2, 1, 64), r(2, 1, 64), r(64), 1e-6, stats.clone(), 1, None, gates, scales,
                                ch(3, 64))),
        ("fused_add_rms_norm", (r(2, 3, 40), r(2, 3, 40), r(40), 1e-5, None, 0, None, gates, scales, ch(3, 40))),
        ("scale_rms_norm", (r(2, 5, 64), r(2, 5, 64), r(64), 1e-6, 0.8, ch(64))),
        ("scale_rms_norm", (r(7, 37), r(7, 37), r(37), 1e-5, 1 / 3, ch(37))),
        ("skip_or_scale", (r(2, 3, 16), gates, scales, 1, ch(3, 16))),
        ("skip_or_scale", (r(2, 3, 13), gates, scales, 0, ch(3, 13))),
        ("update_gates", (acc, gates.clone(), scales.clone(), 20, 0.8)),
        ("update_gates", (acc, gates.clone(), scales.clone(), 20, 0.8, torch.ones(3, dtype=torch.bool, device=device))),
        # rotary + KV write: one position inside the cache, one past it (not written)
        ("rotary_kv_write", (r(2, 6, 64), r(2, 2, 64), r(2, 2, 64), r(2, 64), r(2, 64), r(2, 2, 9, 64), r(2, 2, 9, 64),
                             torch.tensor([8, 9], device=device))),
    ]
    if dtype != torch.float32:  # the gated GEMVs take fp16 / bf16
        samples += [
            ("gated_linear", (r(2, 64), r(24, 64), gates, 1, torch.empty(2, 24, device=device, dtype=dtype))),
            ("gated_swiglu_up", (r(2, 64), r(24, 64), r(24, 64), None, 0,
                                 torch.empty(2, 24, device=device, dtype=dtype))),
            # decode attention: GQA group 3, one split and several, a sliding window
            ("decode_attention", (r(2, 6, 64), r(2, 2, 40, 64), r(2, 2, 40, 64), torch.tensor([40, 7], device=device),
                                  0.125, 0, torch.empty(2, 6, 64, device=device, dtype=dtype))),
            ("decode_attention", (r(1, 8, 128), r(1, 4, 3000, 128), r(1, 4, 3000, 128),
                                  torch.tensor([2999], dtype=torch.int32, device=device), 0.09, 512,
                                  torch.empty(1, 8, 128, device=device, dtype=dtype))),
            ("decode_attention", (r(1, 8, 128), r(1, 4, 300, 128), r(1, 4, 300, 128),
                                  torch.tensor([300], device=device), 0.09, 0,
                                  torch.empty(1, 8, 128, device=device, dtype=dtype), 5)),  # 5 splits
        ]
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    for name, args in _samples(device, dtype):
        torch.library.opcheck(getattr(torch.ops.adaskip, name).default, args)


def _bad_samples():
    """Calls every kernel refuses, one wrong thing each: (what, op, args)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    h = lambda *s: r(*s, dtype=torch.bfloat16)  # noqa: E731
    stats, gates, scales = ops.new_stats(3, 2), ops.new_gates(3, 2), ops.new_scales(3, 2)
    out = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    lens = torch.tensor([40, 7])
    cache = lambda cap=40: h(2, 2, cap, 64)  # noqa: E731
    return [
        ("norm weight size", "fused_add_rms_norm", (r(2, 5, 64), r(2, 5, 64), r(63), 1e-6)),
        ("norm stats batch", "fused_add_rms_norm", (r(3, 5, 64), r(3, 5, 64), r(64), 1e-6, stats, 1)),
        ("norm gates without scales", "fused_add_rms_norm", (r(2, 1, 64), r(2, 1, 64), r(64), 1e-6, None, 1, None,
                                                             gates)),
        ("norm channel table shape", "fused_add_rms_norm", (r(2, 1, 64), r(2, 1, 64), r(64), 1e-6, None, 1, None,
                                                            gates, scales, r(3, 63))),
        ("norm seq_lens dtype", "fused_add_rms_norm", (r(2, 5, 64), r(2, 5, 64), r(64), 1e-6, stats, 1, lens.float())),
        ("scale nan", "scale_rms_norm", (r(2, 5, 64), r(2, 5, 64), r(64), 1e-6, float("nan"))),
        ("scale dtypes", "scale_rms_norm", (r(2, 5, 64), h(2, 5, 64), r(64), 1e-6, 0.5)),
        ("io shapes", "io_similarity_stats", (r(2, 5, 24), r(2, 4, 24), stats, 2)),
        ("io sublayer", "io_similarity_stats", (r(2, 5, 24), r(2, 5, 24), stats, 3)),
        ("skip gates batch", "skip_or_scale", (r(3, 3, 16), gates, scales, 1)),
        ("skip gates dtype", "skip_or_scale", (r(2, 3, 16), gates.bool(), scales, 1)),
        ("update window", "update_gates", (stats, gates, scales, 0, 0.8)),
        ("update running shape", "update_gates", (stats, gates, scales, 20, 0.8, torch.ones(2, dtype=torch.bool))),
        ("gemv fp32", "gated_linear", (r(2, 64), r(24, 64), None, 0, torch.empty(2, 24))),
        ("gemv 9 tokens", "gated_linear", (h(9, 64), h(24, 64), None, 0, out(9, 24))),
        ("gemv weight columns", "gated_linear", (h(2, 64), h(24, 63), None, 0, out(2, 24))),
        ("gemv weight not contiguous", "gated_linear", (h(2, 64), h(64, 24).t(), None, 0, out(2, 24))),
        ("gemv out shape", "gated_linear", (h(2, 64), h(24, 64), None, 0, out(2, 23))),
        ("gemv gates batch", "gated_linear", (h(1, 64), h(24, 64), gates, 0, out(1, 24))),
        ("swiglu rows", "gated_swiglu_up", (h(2, 64), h(24, 64), h(23, 64), None, 0, out(2, 24))),
        ("decode head_dim", "decode_attention", (h(2, 6, 96), h(2, 2, 40, 96), h(2, 2, 40, 96), lens, 0.1, 0,
                                                 out(2, 6, 96))),
        ("decode group", "decode_attention", (h(2, 5, 64), cache(), cache(), lens, 0.1, 0, out(2, 5, 64))),
        ("decode capacity", "decode_attention", (h(2, 6, 64), cache(), cache(41), lens, 0.1, 0, out(2, 6, 64))),
        ("decode kv_lens", "decode_attention", (h(2, 6, 64), cache(), cache(), lens.float(), 0.1, 0, out(2, 6, 64))),
        ("decode splits", "decode_attention", (h(2, 6, 64), cache(), cache(), lens, 0.1, 0, out(2, 6, 64), 257)),
        ("rotary positions", "rotary_kv_write", (h(2, 6, 64), h(2, 2, 64), h(2, 2, 64), h(2, 64), h(2, 64), cache(),
                                                  cache(), lens.int())),
        ("rotary v heads", "rotary_kv_write", (h(2, 6, 64), h(2, 2, 64), h(2, 1, 64), h(2, 64), h(2, 64), cache(),
                                                cache(), lens)),
    ]


@pytest.mark.parametrize("case", _bad_samples(), ids=lambda c: c[0])
def test_fake_refuses_what_the_op_refuses(case):
    """torch.compile / FakeTensor tracing refuses a bad call with the op's own message, not later
    inside the kernel: the fakes make every check but those of addresses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, name, args = case
    op = getattr(torch.ops.adaskip, name).default
    with pytest.raises(Exception) as real:
        op(*args)
    assert "adaskip:" in str(real.value)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, pytest.raises(Exception) as fake:
        op(*fake_args)
    assert str(fake.value) == str(real.value)


def test_fakes_accept_every_valid_sample():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (torch.float32, torch.bfloat16):
        for name, args in _samples("cpu", dtype):
            mode = FakeTensorMode()
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with mode:
                getattr(torch.ops.adaskip, name).default(*fake_args)
