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
