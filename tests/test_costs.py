"""Per-sublayer costs (FLOP/byte model and measured) and the cost-aware sublayer selection."""
import itertools
import math
import random

import pytest
import torch

from adaskip import ops
from adaskip.runtime.config import ModelArgs
from adaskip.skipping.costs import (H100_SPEC, L20_SPEC, DeviceSpec, SublayerCosts, measure_sublayer_costs,
                                    paper_speedup, select_by_cost, sublayer_costs)

LLAMA31_8B = ModelArgs.from_hf_config(dict(
    architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5))
BW, FLOPS = L20_SPEC.bytes_per_s, L20_SPEC.flops_per_s


# -- the FLOP / byte model --------------------------------------------------------------------


def test_decode_attention_grows_with_context_and_ffn_does_not():
    runs = [sublayer_costs(LLAMA31_8B, n, "decode") for n in (1024, 8192, 32768, 131072)]
    for c in runs:
        assert len(c.per_sublayer) == 64 and c.source == "model" and c.mode == "decode"
    attn = [c.per_sublayer[0] for c in runs]
    ffn = [c.per_sublayer[1] for c in runs]
    assert attn == sorted(attn) and len(set(attn)) == 4
    assert len(set(ffn)) == 1
    # With 8 KV heads the cache read (4 KiB per token per layer) passes the FFN weights (336 MiB)
    # only beyond ~64k tokens: short contexts are FFN-dominated, 128k is attention-dominated.
    assert attn[0] < ffn[0] / 3
    assert all(runs[-1].per_sublayer[2 * i] > 1.5 * runs[-1].per_sublayer[2 * i + 1] for i in range(32))


def test_decode_bytes_and_flops_by_hand():
    c = sublayer_costs(LLAMA31_8B, 8192, "decode")  # bf16, batch 1, L20
    attn_weights = 4096 * (4096 + 2 * 1024) + 4096 * 4096  # q, k, v (GQA: 8 x 128), o
    assert attn_weights == 41943040
    kv_read = 2 * 8192 * 1024 * 2  # k and v, 8192 tokens, 8 KV heads x 128, 2 bytes
    act = 2 * 4096 + 4 * 4096 + 4 * 1024  # one token's activations (see the module)
    assert c.bytes_moved[0] == 2 * (attn_weights + act) + kv_read == 117497856
    assert c.bytes_moved[1] == 2 * (3 * 4096 * 14336 + 2 * 4096 + 6 * 14336) == 352509952
    assert c.flops[0] == 2 * 4096 * (2 * 4096 + 2 * 1024) + 4 * 8192 * 32 * 128
    assert c.flops[1] == 2 * 3 * 4096 * 14336
    # Decode is byte-bound: time = bytes / bandwidth.
    assert c.per_sublayer[0] == pytest.approx(117497856 / BW, rel=1e-12)
    assert c.per_sublayer[1] == pytest.approx(352509952 / BW, rel=1e-12)
    # Fixed: embedding row, 2M + 1 norm passes over one token, lm_head weight read.
    fixed = (2 * 4096 * 2 + (4 * 64 + 2) * 4096 * 2 + 2 * (4096 * 128256 + 4096 + 128256)) / BW
    assert c.fixed == pytest.approx(fixed, rel=1e-12)
    # Each extra token of context adds exactly one K and one V row per layer.
    longer = sublayer_costs(LLAMA31_8B, 8192 + 1000, "decode")
    assert longer.bytes_moved[0] - c.bytes_moved[0] == 2 * 1000 * 1024 * 2
    # Batch: weights are read once, caches and activations per sequence.
    four = sublayer_costs(LLAMA31_8B, 8192, "decode", batch=4)
    assert four.bytes_moved[0] - c.bytes_moved[0] == 3 * (kv_read + 2 * act)
    # fp32 doubles every byte.
    assert sublayer_costs(LLAMA31_8B, 8192, "decode", dtype_bytes=4).bytes_moved[0] == 2 * c.bytes_moved[0]


def test_prefill_has_the_quadratic_attention_term():
    c8, c32 = (sublayer_costs(LLAMA31_8B, n, "prefill", spec=H100_SPEC) for n in (8192, 32768))
    assert c32.per_sublayer[0] > 4 * c8.per_sublayer[0]
    assert c32.per_sublayer[1] == pytest.approx(4 * c8.per_sublayer[1], rel=1e-6)  # FFN: linear
    pairs = 8192 * 8193 // 2  # causal query-key pairs
    assert c8.flops[0] == 2 * 8192 * 4096 * (2 * 4096 + 2 * 1024) + 4 * pairs * 32 * 128
    assert c8.per_sublayer[0] == pytest.approx(c8.flops[0] / H100_SPEC.flops_per_s)  # FLOP-bound
    assert c8.flops[1] == 2 * 8192 * 3 * 4096 * 14336


def test_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'train'"):
        sublayer_costs(LLAMA31_8B, 1024, "train")
    with pytest.raises(ValueError, match="context_len"):
        sublayer_costs(LLAMA31_8B, 0, "decode")
    with pytest.raises(ValueError, match="positive"):
        DeviceSpec(flops_per_s=0, bytes_per_s=1e12)


def test_speedup_by_hand():
    c = SublayerCosts(per_sublayer=[1.0, 2.0, 3.0, 4.0], fixed=2.0, context_len=10, mode="decode", source="model")
    assert c.total == 12.0
    assert c.speedup([]) == 1.0
    assert c.speedup([1, 3]) == 12 / (12 - 6) == 2.0
    assert c.speedup([3, 1, 1]) == 2.0  # a sublayer counts once
    assert c.speedup([0, 1, 2, 3]) == 6.0
    with pytest.raises(ValueError, match="out of range"):
        c.speedup([4])
    assert paper_speedup(32, 8) == pytest.approx(32 / 28) and paper_speedup(32, 16) == pytest.approx(4 / 3)


# -- select_by_cost against brute force --------------------------------------------------------------------


def _brute(importance, costs, target, allowed, min_saving=None):
    """Least importance over subsets of `allowed` reaching the target (or saving >= min_saving)."""
    best = math.inf
    for r in range(len(allowed) + 1):
        for sub in itertools.combinations(allowed, r):
            ok = costs.speedup(sub) >= target if min_saving is None else costs.saving(sub) >= min_saving
            if ok:
                best = min(best, math.fsum(importance[s] for s in sub))
    return best


@pytest.mark.parametrize("resolution", [4000, 40])
def test_selection_matches_brute_force_within_the_discretisation(resolution):
    rng = random.Random(resolution)
    for _ in range(40):
        costs = SublayerCosts(per_sublayer=[rng.uniform(0.05, 1.0) for _ in range(10)], fixed=rng.uniform(0.5, 3.0),
                              context_len=1, mode="decode", source="model")
        imp = [rng.uniform(0, 1) for _ in range(10)]
        allowed = list(range(10)) if rng.random() < 0.7 else sorted(rng.sample(range(10), 7))
        target = 1 + rng.uniform(0.01, 0.95) * (costs.speedup(allowed) - 1)
        got = select_by_cost(imp, costs, target, allowed=allowed, resolution=resolution)
        assert costs.speedup(got.sublayers) >= target and got.predicted_speedup == costs.speedup(got.sublayers)
        assert set(got.sublayers) <= set(allowed) and got.sublayers == sorted(got.sublayers)
        assert got.importance_lost == pytest.approx(sum(imp[s] for s in got.sublayers))
        opt = _brute(imp, costs, target, allowed)
        # Rounding each cost down loses less than one step per member, so the DP is at least as
        # good as the best set that saves one step per sublayer more than required.
        required = costs.total - costs.total / target
        harder = _brute(imp, costs, target, allowed, min_saving=required * (1 + len(allowed) / resolution) + 1e-12)
        assert opt - 1e-12 <= got.importance_lost <= harder + 1e-12
        assert got.importance_bound <= opt + 1e-12  # the rounded-up DP is a true lower bound
        if resolution == 4000:  # fine steps: these seeded instances all come out optimal
            assert got.importance_lost == pytest.approx(opt, abs=1e-12)
        certified = got.importance_bound >= got.importance_lost - 1e-9 * max(1.0, got.importance_lost)
        assert ("optimal for these costs" in got.explanation) == certified


def test_selection_is_exact_when_costs_are_whole_steps():
    rng = random.Random(7)
    for _ in range(40):
        per = [float(rng.randint(1, 9)) for _ in range(10)]
        costs = SublayerCosts(per_sublayer=per, fixed=float(rng.randint(2, 20)), context_len=1, mode="prefill",
                              source="model")
        imp = [rng.uniform(0, 1) for _ in range(10)]
        need = rng.randint(1, int(sum(per)))
        target = costs.total / (costs.total - need)
        got = select_by_cost(imp, costs, target, resolution=100 * need)  # every cost a whole number of steps
        assert costs.speedup(got.sublayers) >= target
        assert got.importance_lost == pytest.approx(_brute(imp, costs, target, list(range(10))), abs=1e-12)


def test_selection_edge_cases():
    costs = SublayerCosts(per_sublayer=[1.0, 2.0, 3.0, 4.0], fixed=2.0, context_len=10, mode="decode",
                          source="model")
    imp = [0.1, 0.15, 0.3, 0.4]
    none = select_by_cost(imp, costs, 1.0)
    assert none.sublayers == [] and none.predicted_speedup == 1.0 and none.importance_lost == 0.0
    with pytest.raises(ValueError, match=r"at most 6\.0000x"):
        select_by_cost(imp, costs, 6.5)
    assert select_by_cost(imp, costs, 6.0).sublayers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"at most 2\.0000x"):
        select_by_cost(imp, costs, 2.5, allowed=[1, 3])  # attention not allowed: 12 / (12 - 6)
    assert select_by_cost(imp, costs, 1.5, allowed=[1, 3]).sublayers == [3]
    # A saving of exactly 3: {0, 1} (0.25) beats {2} (0.3) and {3} (0.4). Costs rounded down
    # alone miss {0, 1} here (1333 + 2666 steps < 4000); the rounded-up pass finds it.
    assert select_by_cost(imp, costs, 12 / 9).sublayers == [0, 1]
    with pytest.raises(ValueError, match=">= 1"):
        select_by_cost(imp, costs, 0.9)
    with pytest.raises(ValueError, match="4 sublayers"):
        select_by_cost(imp[:3], costs, 1.2)
    with pytest.raises(ValueError, match=">= 0"):
        select_by_cost([0.1, -0.5, 0.1, 0.1], costs, 1.2)
    with pytest.raises(ValueError, match="out of range"):
        select_by_cost(imp, costs, 1.2, allowed=[7])


# -- behaviour on LLaMA-3.1-8B geometry --------------------------------------------------------------


def test_equal_importance_skips_what_is_expensive_at_this_context():
    flat = [0.1] * 64
    long = select_by_cost(flat, sublayer_costs(LLAMA31_8B, 131072, "decode"), 1.3)
    short = select_by_cost(flat, sublayer_costs(LLAMA31_8B, 1024, "decode"), 1.3)
    assert long.sublayers and all(s % 2 == 0 for s in long.sublayers)  # attention reads the 128k cache
    assert short.sublayers and all(s % 2 == 1 for s in short.sublayers)  # the FFN weights dominate
    # Both need fewer sublayers than the equal-cost rule (round(2 * (32 - 32 / 1.3)) = 15).
    assert len(long.sublayers) < 15 and len(short.sublayers) < 15
    assert "0 attention, " in short.explanation and "131072 tokens" in long.explanation


def test_importance_wins_over_cost_when_the_gap_is_large():
    # Long-context decode makes attention expensive, but here it is much more important: skip FFNs.
    imp = [0.5 if s % 2 == 0 else 0.05 for s in range(64)]
    got = select_by_cost(imp, sublayer_costs(LLAMA31_8B, 131072, "decode"), 1.2)
    assert all(s % 2 == 1 for s in got.sublayers)
    # Short-context decode makes attention cheap (a quarter of an FFN); if it is five times less
    # important it is still the better buy per unit of importance.
    imp = [0.02 if s % 2 == 0 else 0.1 for s in range(64)]
    got = select_by_cost(imp, sublayer_costs(LLAMA31_8B, 1024, "decode"), 1.1)
    n_attn = sum(1 for s in got.sublayers if s % 2 == 0)
    assert n_attn > len(got.sublayers) - n_attn


def test_never_worse_than_skipping_the_least_important_first():
    rng = random.Random(3)
    for n, mode in ((4096, "prefill"), (32768, "decode"), (131072, "decode")):
        costs = sublayer_costs(LLAMA31_8B, n, mode)
        imp = [rng.uniform(0.0, 0.3) if s % 2 == 0 else rng.uniform(0.05, 0.5) for s in range(64)]
        ranked = sorted(range(64), key=lambda s: imp[s])  # the paper's order, with our costs
        for target in (1.1, 1.3, 1.5):
            k = next(k for k in range(65) if costs.speedup(ranked[:k]) >= target)
            got = select_by_cost(imp, costs, target)
            assert costs.speedup(got.sublayers) >= target
            assert got.importance_lost <= sum(imp[s] for s in ranked[:k]) + 1e-9


# -- measured costs on a tiny model ------------------------------------------------------------------


def _tiny(**extra):
    from adaskip.runtime.loading import build_model
    from adaskip.runtime.model import Transformer

    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=101, hidden_size=64, intermediate_size=96,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
               rms_norm_eps=1e-5, rope_theta=10000.0)
    args = ModelArgs.from_hf_config({**cfg, **extra})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.ones(s) if k.endswith("norm.weight") else 0.05 * torch.randn(s, generator=gen))
               for k, s in shapes.items()}
    return build_model(args, weights)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_measure_sublayer_costs_on_a_tiny_model(mode):
    from adaskip import generate

    model = _tiny()
    with torch.inference_mode():
        c = measure_sublayer_costs(model, 32, mode, repeats=3, warmup=1)
    assert c.source == "measured" and c.mode == mode and c.context_len == 32 and c.device == "cpu"
    assert len(c.per_sublayer) == 6 and all(t > 0 for t in c.per_sublayer) and c.fixed > 0
    sel = select_by_cost([0.1] * 6, c, 1.05)
    assert c.speedup(sel.sublayers) >= 1.05 and "measured timings" in sel.explanation
    # Outside inference_mode too, and the model still generates afterwards (caches released).
    again = measure_sublayer_costs(model, 8, mode, repeats=1, warmup=0)
    assert len(again.per_sublayer) == 6 and model.cached_attention_layers() == set()
    assert len(generate(model, [[1, 2, 3]], max_new_tokens=3, eos_token_ids=[]).tokens[0]) == 3
    four = measure_sublayer_costs(model, 16, mode, repeats=1, warmup=0, batch=4)  # decode of 4 sequences
    assert four.batch == 4 and len(four.per_sublayer) == 6 and all(t > 0 for t in four.per_sublayer)
    with pytest.raises(ValueError, match="batch"):
        measure_sublayer_costs(model, 16, mode, batch=0)


def test_measure_with_sliding_windows_and_errors():
    model = _tiny(architectures=["MistralForCausalLM"], sliding_window=8)  # explicit-mask path
    for mode in ("prefill", "decode"):
        c = measure_sublayer_costs(model, 20, mode, repeats=1, warmup=0)
        assert len(c.per_sublayer) == 6 and all(t > 0 for t in c.per_sublayer)
    with pytest.raises(ValueError, match="'train'"):
        measure_sublayer_costs(model, 8, "train")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        measure_sublayer_costs(model, 96, "decode")  # needs 97 cache slots


def test_graph_timing_is_for_gpu_decode_only():
    model = _tiny()
    with pytest.raises(ValueError, match="mode 'decode' on a GPU"):
        measure_sublayer_costs(model, 8, "decode", graphs=True)  # this model is on the CPU
    with pytest.raises(ValueError, match="cache_len applies to graphs=True"):
        measure_sublayer_costs(model, 8, "decode", cache_len=20)


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_EXTENSION), reason="needs a CUDA GPU")
def test_graph_timing_of_decode_sublayers_on_the_gpu():
    model = _tiny().to(device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold"):
        measure_sublayer_costs(model, 32, "decode", graphs=True, cache_len=32)
    c = measure_sublayer_costs(model, 32, "decode", repeats=3, warmup=1, graphs=True, cache_len=48)
    assert c.source == "measured in CUDA graphs" and len(c.per_sublayer) == 6
    assert all(t > 0 for t in c.per_sublayer) and c.fixed > 0
    assert model.cached_attention_layers() == set()
