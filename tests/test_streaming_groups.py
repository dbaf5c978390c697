"""Streaming KV-head groups (adaskip.runtime.streaming): a group's query heads see only the sink and
a recent window, in prefill and decode; every other group, and every model without them, is as
before."""
import math

import pytest
import torch

from adaskip.runtime.generation import generate
from adaskip.runtime.rope import apply_rotary
from adaskip.runtime.streaming import StreamingGroups, band_mask, set_streaming, streaming_groups
from helpers import random_requests, tiny_llama

VOCAB = 101


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, context=160, layers=2).eval()


def _forward(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]


def test_window_covering_the_prompt_is_the_full_model(model):
    ids = random_requests(1, length=48, seed=1)[0]
    full = _forward(model, ids)
    with streaming_groups(model, {0: [0, 1], 1: [1]}, sink=4, window=48):
        wide = _forward(model, ids)
    assert torch.equal(full, wide)
    assert all(layer.self_attn.streaming is None for layer in model.model.layers)
    with streaming_groups(model, {0: [0, 1], 1: [1]}, sink=4, window=8):
        narrow = _forward(model, ids)
    assert not torch.allclose(full, narrow, atol=1e-4)  # the window is seen


def _reference_attention(attn, x, cos, sin, allowed_per_head):
    """Explicit masked softmax attention in float64: allowed_per_head [H, T, T] booleans."""
    b, t, _ = x.shape
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = apply_rotary(attn.q_proj(x).view(b, t, h, d).transpose(1, 2), cos, sin).double()
    k = apply_rotary(attn.k_proj(x).view(b, t, kvh, d).transpose(1, 2), cos, sin).double()
    v = attn.v_proj(x).view(b, t, kvh, d).transpose(1, 2).double()
    k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~allowed_per_head[None], float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, -1).float())


@pytest.mark.parametrize("groups,sink,window", [((0,), 2, 5), ((1,), 0, 3), ((0, 1), 4, 7), ((1,), 3, 1)])
def test_small_window_matches_explicit_masked_softmax(model, groups, sink, window):
    attn = model.model.layers[1].self_attn
    t = 30
    x = torch.randn(1, t, model.args.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(t)[None]
    cos, sin = model.rotary(pos, t, x.dtype)
    rep = attn.num_heads // attn.num_kv_heads
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    band = band_mask(pos, t, sink, window)[0]
    allowed = torch.stack([band if hq // rep in groups else causal for hq in range(attn.num_heads)])
    want = _reference_attention(attn, x, cos, sin, allowed)
    attn.streaming = StreamingGroups(tuple(groups), sink, window)
    try:
        with torch.no_grad():
            got = attn(x, cos, sin, "causal")
    finally:
        attn.streaming = None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_band_mask():
    m = band_mask(torch.tensor([[0, 5, 9]]), 10, sink=2, window=3)[0]
    assert m[0].tolist() == [True] + [False] * 9
    assert [j for j in range(10) if m[1, j]] == [0, 1, 3, 4, 5]
    assert [j for j in range(10) if m[2, j]] == [0, 1, 7, 8, 9]


def test_decode_sees_the_same_band_as_a_cacheless_forward(model):
    """Generated tokens (prefill with the cache, then decode steps, batch of two prompts of
    different lengths) are the greedy choices of cache-less forwards under the same groups."""
    prompts = [random_requests(1, length=37, seed=5)[0], random_requests(1, length=30, seed=6)[0]]
    layers = {0: [1], 1: [0]}
    with streaming_groups(model, layers, sink=3, window=6):
        out = generate(model, prompts, max_new_tokens=6, eos_token_ids=[])
        for prompt, new in zip(prompts, out.tokens):
            logits = _forward(model, prompt + new[:-1])
            assert logits[len(prompt) - 1:].argmax(-1).tolist() == new
    with torch.inference_mode():
        plain = generate(model, prompts, max_new_tokens=6, eos_token_ids=[])
    assert plain.tokens != out.tokens  # the band changed something


def test_bad_groups(model):
    with pytest.raises(ValueError, match="out of range"):
        set_streaming(model, {0: [2]}, sink=4, window=8)
    with pytest.raises(ValueError, match="out of range"):
        set_streaming(model, {5: [0]}, sink=4, window=8)
    with pytest.raises(ValueError, match="window >= 1"):
        StreamingGroups((0,), 4, 0)
    set_streaming(model, {}, sink=4, window=8)
    assert all(layer.self_attn.streaming is None for layer in model.model.layers)


def test_streaming_costs():
    from adaskip.benchmarks.models import model_args
    from adaskip.skipping.costs import _band_pairs, streaming_plan_costs, sublayer_costs

    args = model_args("smollm2")
    for n, s, w in ((50, 4, 8), (7, 2, 3), (300, 0, 256), (10, 4, 256)):
        brute = sum(sum(1 for j in range(i + 1) if j < s or i - j < w) for i in range(n))
        assert _band_pairs(n, s, w) == brute
    n = 4096
    base = sublayer_costs(args, n, "prefill")
    none = streaming_plan_costs(args, n, "prefill", [], {})
    assert none["plan_s"] == pytest.approx(base.total) and none["speedup"] == pytest.approx(1.0)
    skip = streaming_plan_costs(args, n, "prefill", [4, 5], {})
    assert skip["speedup"] == pytest.approx(base.speedup([4, 5]))
    one = streaming_plan_costs(args, n, "prefill", [], {3: 1}, sink=4, window=256)
    three = streaming_plan_costs(args, n, "prefill", [], {3: 3}, sink=4, window=256)
    assert 0 < one["saving_s"] < three["saving_s"] < base.per_sublayer[6]
    # a band as long as the prompt saves nothing; a group in a skipped layer adds nothing
    assert streaming_plan_costs(args, n, "prefill", [], {3: 3}, sink=4, window=n)["saving_s"] == pytest.approx(0)
    assert streaming_plan_costs(args, n, "prefill", [6], {3: 3})["plan_s"] == pytest.approx(
        streaming_plan_costs(args, n, "prefill", [6], {})["plan_s"])
    assert one["kv_entries_full"] - one["kv_entries_plan"] == n - 260
    dec = streaming_plan_costs(args, n, "decode", [], {3: 3})
    assert dec["speedup"] > 1


def test_group_scores_are_the_layer_output_change(model):
    """At layer 0 (whose input streaming elsewhere cannot change) the score of a group is the
    relative change of the attention's output when that group alone streams."""
    from adaskip.skipping.head_groups import score_groups
    from adaskip.skipping.probes import Probe

    ids = random_requests(1, length=90, seed=8)[0]
    probe = Probe("passkey", ids, 84, "1", 0.5)
    sink, window = 2, 10
    scores = score_groups(model, [probe], [], sink=sink, window=window, progress=False)
    captured = {}

    def tap(s, x, h, out):
        if s == 0:
            captured.setdefault("h", h.clone())
            captured.setdefault("out", []).append(out.clone())

    positions = probe.answer_positions
    with torch.inference_mode():
        model(torch.tensor([ids]), taps=tap)
        for g in range(model.args.num_kv_heads):
            with streaming_groups(model, {0: [g]}, sink=sink, window=window):
                model(torch.tensor([ids]), taps=tap)
    full, h = captured["out"][0], captured["h"]
    for g in range(model.args.num_kv_heads):
        diff = (captured["out"][g + 1] - full)[0, positions].norm(dim=-1) / h[0, positions].norm(dim=-1)
        assert scores.retrieval_change[0, g].item() == pytest.approx(diff.mean().item(), rel=1e-4)
    ranking = scores.ranking()
    assert len(ranking) == model.args.num_layers * model.args.num_kv_heads

