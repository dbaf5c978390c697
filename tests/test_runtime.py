"""Generation, KV cache and skip plans on the runtime (tiny random LLaMA, fp32, CPU)."""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaskip import SamplingParams, SkipPlan, generate, ops  # noqa: E402
from adaskip.runtime.config import ModelArgs  # noqa: E402
from adaskip.runtime.loading import build_model  # noqa: E402
from adaskip.runtime.model import FeedForward  # noqa: E402
from adaskip.runtime.decode import decode_states  # noqa: E402
from adaskip.runtime.online import OnlineGates  # noqa: E402

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5, eos_token_id=None)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CFG)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}
    return hf, build_model(ModelArgs.from_hf_config(d), dict(hf.state_dict()))


def _prompt(n, seed):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_tokens_match_transformers_generate(pair):
    hf, ours = pair
    prompt = _prompt(13, 1)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                               attention_mask=torch.ones(1, 13, dtype=torch.long))[0, 13:].tolist()
    got = generate(ours, [prompt], max_new_tokens=10, eos_token_ids=[])
    assert got.tokens[0] == expected
    assert got.decode_steps == 9 and got.prefill_s > 0


def test_batch_of_different_lengths_equals_single_runs_and_chunking_does_not_matter(pair):
    _, ours = pair
    prompts = [_prompt(5, 2), _prompt(17, 3), _prompt(1, 4)]
    single = [generate(ours, [p], max_new_tokens=7, eos_token_ids=[]).tokens[0] for p in prompts]
    batched = generate(ours, prompts, max_new_tokens=7, eos_token_ids=[], prefill_chunk=4).tokens
    assert batched == single


def test_eos_stops_a_sequence_and_others_continue(pair):
    _, ours = pair
    prompts = [_prompt(6, 5), _prompt(9, 6)]
    free = generate(ours, prompts, max_new_tokens=8, eos_token_ids=[]).tokens
    stop = free[0][2]
    out = generate(ours, prompts, max_new_tokens=8, eos_token_ids=[stop])
    assert out.tokens[0] == free[0][: free[0].index(stop) + 1] and out.finished[0]
    second = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out.tokens[1] == second


def test_sampling_is_reproducible_with_a_seed(pair):
    _, ours = pair
    p = [_prompt(8, 7)]
    a = generate(ours, p, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=3), eos_token_ids=[])
    b = generate(ours, p, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=3), eos_token_ids=[])
    c = generate(ours, p, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=4), eos_token_ids=[])
    greedy = generate(ours, p, max_new_tokens=12, eos_token_ids=[])
    top1 = generate(ours, p, max_new_tokens=12, sampling=SamplingParams(temperature=0.7, top_k=1, seed=9), eos_token_ids=[])
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert top1.tokens == greedy.tokens


def test_kv_cache_is_allocated_only_for_attention_that_runs(pair):
    _, ours = pair
    p = [_prompt(10, 8)]
    ours.setup_caches(1, 14)
    full = ours.kv_cache_bytes()
    assert full == 3 * 2 * 14 * 2 * 16 * 4  # layers x (k, v) x tokens x kv heads x head dim x fp32
    plan = SkipPlan(num_layers=3, skip_scales={2: 1.0, 5: 1.1})  # attention of layer 1, FFN of layer 2
    out = generate(ours, p, max_new_tokens=4, eos_token_ids=[], plan=plan)
    assert out.kv_cache_bytes == full * 2 // 3 and ours.cached_attention_layers() == {0, 2}
    with pytest.raises(RuntimeError, match="no KV cache"), torch.no_grad():
        ours(torch.tensor([p[0][:3]]), torch.zeros(1, dtype=torch.long), kv_len=3)


def test_a_skipped_sublayer_with_scale_one_equals_a_zeroed_sublayer(pair):
    hf, ours = pair
    ids = torch.tensor([_prompt(12, 9)])
    cfg = transformers.LlamaConfig(**CFG)
    zeroed = build_model(ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}),
                         {k: v.clone() for k, v in hf.state_dict().items()})
    with torch.no_grad():
        zeroed.model.layers[1].self_attn.o_proj.weight.zero_()
        zeroed.model.layers[2].mlp.down_proj.weight.zero_()
        plan = SkipPlan(num_layers=3, skip_scales={2: 1.0, 5: 1.0})
        torch.testing.assert_close(ours(ids, plan=plan), zeroed(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(ids, plan=plan), ours(ids), atol=1e-3)


def test_forward_collects_statistics_for_run_sublayers_only(pair):
    _, ours = pair
    ids = torch.tensor([_prompt(12, 10), _prompt(12, 11)])
    stats = ops.new_stats(6, 2)
    plan = SkipPlan(num_layers=3, skip_scales={3: 1.0})
    with torch.no_grad():
        ours(ids, plan=plan, stats=stats, seq_lens=torch.tensor([12, 7]))
    counts = stats[..., 2]
    assert counts[3].tolist() == [0.0, 0.0]
    assert all(counts[s].tolist() == [12.0, 7.0] for s in (0, 1, 2, 4, 5))
    mean_cos, mean_ratio, _ = ops.mean_stats(stats[[0, 1, 2, 4, 5]])
    assert ((mean_cos > -1) & (mean_cos <= 1)).all() and (mean_ratio > 0).all()


def test_bad_requests_are_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="context of 96 tokens"):
        generate(ours, [_prompt(90, 12)], max_new_tokens=10)
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [[]])
    with pytest.raises(ValueError, match="plan is for a model with 4 layers"):
        generate(ours, [_prompt(3, 1)], plan=SkipPlan(num_layers=4, skip_scales={0: 1.0}))
    with pytest.raises(ValueError, match="out of range"):
        SkipPlan(num_layers=3, skip_scales={6: 1.0})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    # Graphs apply on a GPU only; elsewhere cuda_graph=True is the eager path, sampling included.
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=4)
    assert generate(ours, [_prompt(3, 1)], sampling=seeded, cuda_graph=True).tokens == \
        generate(ours, [_prompt(3, 1)], sampling=seeded).tokens
    ours.setup_caches(1, 16)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        ours(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), kv_len=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ours.setup_caches(1, 97)


def test_flash_attn_backend_dispatch_and_layout(pair, monkeypatch):
    """flash-attn cannot be installed here; a stand-in with its calling convention ([B, T, heads,
    D], grouped KV heads) checks that the backend passes the right layouts and falls back to SDPA
    where a mask is needed."""
    from adaskip.runtime import model as model_module

    calls = []

    def stand_in(q, k, v, causal=False):
        calls.append((q.shape, k.shape, causal))
        rep = q.shape[2] // k.shape[2]
        y = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1),
            is_causal=causal)
        return y.transpose(1, 2)

    _, ours = pair
    prompts = [_prompt(9, 20)]
    expected = generate(ours, prompts, max_new_tokens=5, eos_token_ids=[]).tokens
    with pytest.raises(ValueError, match="flash-attn package"):
        monkeypatch.setattr(model_module, "flash_attn_func", None)
        ours.set_attention_backend("flash_attn")
    monkeypatch.setattr(model_module, "flash_attn_func", stand_in)
    ours.set_attention_backend("flash_attn")
    try:
        assert generate(ours, prompts, max_new_tokens=5, eos_token_ids=[]).tokens == expected
        assert calls[0] == ((1, 9, 4, 16), (1, 9, 2, 16), True)  # prefill: causal
        assert calls[-1][0][1] == 1 and calls[-1][2] is False  # decode: one query, no mask
        n = len(calls)
        generate(ours, [_prompt(4, 21), _prompt(6, 22)], max_new_tokens=3, eos_token_ids=[])
        assert len(calls) == n + 3  # prefill of the batch from 0 is causal; per-sequence decode masks use SDPA
    finally:
        ours.set_attention_backend("sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("xformers")


def test_decode_over_the_whole_cache_with_device_positions_equals_the_short_path(pair):
    """What a captured decode step runs: positions from a device tensor and attention over the
    whole cache under a mask, instead of host ints and the filled part only."""
    _, ours = pair
    prompts = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(30))
    with torch.no_grad():
        ours.setup_caches(2, 40)
        ours(prompts, 0, kv_len=12)
        tok = torch.tensor([[3], [7]])
        short = ours(tok, 12, kv_len=13)
        ours(prompts, 0, kv_len=12)  # rewrite the same cache state
        whole = ours(tok, torch.tensor([12, 12]), kv_len=40)
    torch.testing.assert_close(whole, short, rtol=1e-5, atol=1e-5)


def test_decode_ffn_through_the_gated_gemvs(pair):
    """bf16, one token per sequence: the FFN of an online-learning sublayer goes through the gated
    GEMVs (here their PyTorch reference), equal to the plain FFN while gated on; gated off, the
    gated add+norm that follows puts the compensation in its place whatever the GEMVs left."""
    _, ours = pair
    mlp = ours.model.layers[1].mlp
    saved = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    try:
        mlp.to(torch.bfloat16)
        x = torch.randn(2, 1, 64).bfloat16()
        gates = ops.new_gates(6, 2)
        assert mlp.can_gate(x) and not mlp.can_gate(x.float()) and not mlp.can_gate(torch.randn(3, 1, 64).bfloat16())
        torch.testing.assert_close(mlp.gated(x, gates, 3).float(), mlp(x).float(), rtol=2e-2, atol=2e-2)
        gates[3] = ops.GATE_SKIP
        scales = ops.new_scales(6, 2)
        scales[3] = 0.5
        h = torch.randn(2, 1, 64).bfloat16()
        expected = (h.float() * 0.5).bfloat16()
        out = mlp.gated(x, gates, 3)
        ops.fused_add_rms_norm(out, h, torch.ones(64, dtype=torch.bfloat16), 1e-5, gates=gates, scales=scales,
                               sublayer=3)
        assert torch.equal(h, expected)
    finally:
        for n, p in mlp.named_parameters():
            p.data = saved[n]


def test_ffn_run_if_outside_a_capture_is_the_ffn(pair):
    """Outside a CUDA-graph capture the conditional FFN simply runs (the node only exists in a
    graph); with biases too. A bad predicate is refused."""
    _, ours = pair
    mlp = ours.model.layers[0].mlp
    x = torch.randn(3, 1, 64)
    torch.testing.assert_close(mlp.run_if(x, torch.tensor(False)), mlp(x), rtol=1e-6, atol=1e-6)
    biased = FeedForward(dataclasses.replace(ours.args, mlp_bias=True))
    torch.testing.assert_close(biased.run_if(x, torch.tensor(True)), biased(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="predicate"):
        mlp.run_if(x, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="predicate"):
        mlp.run_if(x, torch.tensor(1))


def test_online_gates_track_which_sublayers_still_run():
    online = OnlineGates.start(3, 2, [1, 3, 5], "cpu", conditional=True)
    assert online.running.tolist() == [True] * 6 and online.conditional
    online.stats[1] = torch.tensor([4.0, 4.0, 4.0])  # both sequences: similar
    online.stats[3, 0] = torch.tensor([4.0, 4.0, 4.0])  # one sequence only
    online.stats[3, 1] = torch.tensor([0.0, 4.0, 4.0])
    online.update(window=4, beta=0.5)
    assert online.running.tolist() == [True, False, True, True, True, True]
    buffers = (online.gates, online.scales, online.stats, online.running)
    online.learning.clear()
    online.skipped.add(1)
    online.restart([3, 5])  # a new request on the same buffers (graphs read them)
    assert all(a is b for a, b in zip(buffers, (online.gates, online.scales, online.stats, online.running)))
    assert online.gates[:, 0].tolist() == [ops.GATE_RUN] * 3 + [ops.GATE_UNDECIDED, ops.GATE_RUN, ops.GATE_UNDECIDED]
    assert online.running.all() and not online.stats.any() and (online.scales == 1).all()
    assert online.learning == {3, 5} and not online.skipped and not online.conditional


def test_graph_conditionals_need_graph_decode(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(ours, [_prompt(5, 1)], max_new_tokens=2, graph_conditionals=True)


def test_online_learning_in_bf16_uses_the_gated_ffn(pair):
    hf, _ = pair
    cfg = transformers.LlamaConfig(**CFG)
    model = build_model(ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}),
                        {k: v.clone().bfloat16() for k, v in hf.state_dict().items()})
    p = SkipPlan(3, {2: 1.0}, beta=-1.0, window=3)
    out = generate(model, [_prompt(10, 31), _prompt(7, 32)], max_new_tokens=8, eos_token_ids=[], plan=p)
    assert out.online_skipped == [[1, 3, 5], [1, 3, 5]]
    assert all(len(t) == 8 for t in out.tokens)


def test_step_timing_covers_every_decode_step(pair):
    _, ours = pair
    out = generate(ours, [_prompt(7, 2)], max_new_tokens=9, eos_token_ids=[], step_timing=True)
    assert len(out.step_times_s) == out.decode_steps == 8
    assert all(t > 0 for t in out.step_times_s)
    assert sum(out.step_times_s) <= out.decode_s * 1.01
    assert generate(ours, [_prompt(7, 2)], max_new_tokens=3).step_times_s is None


def test_decode_state_is_reused_and_refilled_between_calls(pair):
    """The decode buffers (what CUDA graphs are captured on) are kept per batch size and refilled
    by each call: a call after other calls gives what it gives on its own. (Plans that skip no
    attention: the KV caches, which the buffers go with, stay the same.)"""
    _, ours = pair
    prompts, others = [_prompt(9, 40), _prompt(5, 41)], [_prompt(7, 42), _prompt(11, 43)]
    online = SkipPlan(3, {3: 1.0}, beta=-1.0, window=3)
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=5)
    # An EOS that ends the other prompts' runs early, so that their finished flags are set.
    eos = [generate(ours, others, max_new_tokens=3, eos_token_ids=[]).tokens[0][1]]
    first = [generate(ours, prompts, max_new_tokens=8, plan=online, eos_token_ids=eos),
             generate(ours, prompts, max_new_tokens=8, sampling=sampled, eos_token_ids=eos)]
    states = dict(decode_states(ours))
    assert [k[1:3] for k in states].count((2, 1)) == 1  # one state for batch 2 and one EOS id
    cut = generate(ours, others, max_new_tokens=6, plan=SkipPlan(3, {3: 1.0}, beta=1.0, window=2),
                   eos_token_ids=eos)
    assert cut.finished[0] and len(cut.tokens[0]) == 2
    generate(ours, others, max_new_tokens=6, sampling=SamplingParams(temperature=0.9, seed=6), eos_token_ids=eos)
    again = [generate(ours, prompts, max_new_tokens=8, plan=online, eos_token_ids=eos),
             generate(ours, prompts, max_new_tokens=8, sampling=sampled, eos_token_ids=eos)]
    assert decode_states(ours) == states  # the same buffers served every call
    for a, b in zip(first, again):
        assert a.tokens == b.tokens and a.online_skipped == b.online_skipped and a.finished == b.finished
    assert first[0].online_skipped == [[1, 5]] * 2


def test_decode_state_is_dropped_with_the_caches_or_moved_weights(pair):
    _, ours = pair
    generate(ours, [_prompt(5, 1)], max_new_tokens=3)
    (old,) = [state for key, state in decode_states(ours).items() if key[1] == 1]
    ours.setup_caches(1, 50)  # the graphs held the old caches' addresses: not to be used again
    generate(ours, [_prompt(5, 1)], max_new_tokens=3)
    ((key, state),) = decode_states(ours).items()  # the stale states are gone
    assert state is not old and key[4] == ours.cache_id
    saved = ours.lm_head.weight
    try:
        ours.lm_head.weight = torch.nn.Parameter(saved.detach().clone())
        generate(ours, [_prompt(5, 1)], max_new_tokens=3)
        assert list(decode_states(ours)) != [key] and len(decode_states(ours)) == 1
    finally:
        ours.lm_head.weight = saved


def test_scratch_caches_leave_the_models_caches_and_decode_states_alone(pair):
    """Timing sublayers (costs.measure_sublayer_costs) uses caches of its own: the decode
    buffers and graphs kept for the model stay valid and in use."""
    from adaskip.skipping.costs import measure_sublayer_costs

    _, ours = pair
    first = generate(ours, [_prompt(6, 3)], max_new_tokens=4, eos_token_ids=[])
    states, cache_id = dict(decode_states(ours)), ours.cache_id
    k_cache = ours.model.layers[0].self_attn.kv_cache
    measure_sublayer_costs(ours, 16, "decode", repeats=1, warmup=0)
    assert ours.cache_id == cache_id and ours.model.layers[0].self_attn.kv_cache is k_cache
    again = generate(ours, [_prompt(6, 3)], max_new_tokens=4, eos_token_ids=[])
    assert decode_states(ours) == states and again.tokens == first.tokens


@pytest.mark.parametrize("vocab", [49152, 128256, 151936, 32000, 1000, 3 * 16384 + 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_is_argmax_with_its_ties(vocab, dtype):
    """The two-pass greedy choice returns argmax's index, the first on ties (within a chunk and
    across chunks), and the same for inf / nan rows."""
    from adaskip.runtime.sampling import greedy_tokens

    g = torch.Generator().manual_seed(vocab)
    ties = torch.randint(0, 3, (4, 3, vocab), generator=g).to(dtype)  # the maximum many times over
    assert torch.equal(greedy_tokens(ties), ties.argmax(-1))
    x = torch.randn(6, vocab, generator=g).to(dtype)
    x[0, vocab // 2] = x[0, vocab - 1] = 9.0  # the same maximum in two chunks: the first wins
    x[1, 7] = x[1, vocab - 3] = float("nan")
    x[2, 3] = x[2, vocab // 3] = float("inf")
    x[3] = float("-inf")
    assert torch.equal(greedy_tokens(x), x.argmax(-1)) and greedy_tokens(x)[0] == vocab // 2
