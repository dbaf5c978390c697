"""The runtime on a GPU: parity with transformers through our CUDA kernels, and a decode loop
that never waits on the host (GPU only; skipped without one)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaskip import SamplingParams, SkipPlan, SpeculativeConfig, generate, ops  # noqa: E402
from adaskip.runtime import conditional  # noqa: E402
from adaskip.runtime.conditional import only_if  # noqa: E402
from adaskip.runtime.config import ModelArgs  # noqa: E402
from adaskip.runtime.loading import build_model  # noqa: E402
from adaskip.runtime.stand_in import StandIn  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_EXTENSION),
                                reason="needs a CUDA GPU and the compiled extension")
# torch 2.11 (the GPU machines' image) has no CUDAGraph.begin_capture_to_if_node.
needs_conditional_nodes = pytest.mark.skipif(not conditional.supported(),
                                             reason="this torch / CUDA has no CUDA-graph conditional nodes")

CFG = dict(vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pair(request):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CFG)
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg).eval().to(device="cuda", dtype=request.param)
    ours = build_model(ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}),
                       {k: v.clone() for k, v in hf.state_dict().items()})
    return hf, ours, request.param


def test_logits_match_transformers_on_the_gpu(pair):
    hf, ours, dtype = pair
    ids = torch.randint(0, 257, (2, 96), device="cuda")
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


def test_decode_never_waits_on_the_host(pair):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (40, 23)]
    always = SkipPlan(4, {2: 1.0}, beta=-1.0, window=4)  # every candidate FFN gated off after 4 tokens
    for batch in (prompts, prompts[:1]):
        for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3)):
            strict = generate(ours, batch, max_new_tokens=12, eos_token_ids=[], plan=always, sampling=sampling,
                              forbid_host_sync=True, step_timing=True)
            assert len(strict.step_times_s) == strict.decode_steps
            relaxed = generate(ours, batch, max_new_tokens=12, eos_token_ids=[], plan=always, sampling=sampling)
            assert strict.tokens == relaxed.tokens
            assert strict.online_skipped == [[1, 3, 5, 7]] * len(batch)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_eos_stops_without_waiting(pair, cuda_graph):
    _, ours, _ = pair
    prompt = torch.randint(0, 257, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    free = generate(ours, [prompt], max_new_tokens=16, eos_token_ids=[]).tokens[0]
    stop = free[3]
    out = generate(ours, [prompt], max_new_tokens=16, eos_token_ids=[stop], forbid_host_sync=True,
                   cuda_graph=cuda_graph)
    assert out.tokens[0] == free[: free.index(stop) + 1] and out.finished == [True]
    if not cuda_graph:  # replays run ahead of the GPU, so the graph path may notice later
        assert out.decode_steps < 15  # stopped early, a step or two after the EOS at most


@pytest.mark.parametrize("k", [1, 4])
def test_speculative_rounds_are_graph_replays_that_never_wait(pair, k):
    """Lossless decoding with acceptance on the device: each round (k draft steps, the verify pass
    over k + 1 positions, the acceptance) is one CUDA-graph replay, the loop never waits on the
    host, the graph is reused by the next call, and the tokens are those of eager rounds (and, in
    fp32, of plain greedy decoding)."""
    _, ours, dtype = pair
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (37, 64, 90)]
    spec = SpeculativeConfig(SkipPlan(4, {2: 1.0, 5: 1.0}), draft_tokens=k)
    eager = generate(ours, prompts, max_new_tokens=24, eos_token_ids=[], speculative=spec)
    graph = generate(ours, prompts, max_new_tokens=24, eos_token_ids=[], speculative=spec, cuda_graph=True,
                     forbid_host_sync=True)
    assert graph.tokens == eager.tokens and graph.graphs_captured == 1
    assert graph.speculative["accepted"] == eager.speculative["accepted"]
    if dtype == torch.float32:
        assert graph.tokens == generate(ours, prompts, max_new_tokens=24, eos_token_ids=[]).tokens
    again = generate(ours, prompts, max_new_tokens=24, eos_token_ids=[], speculative=spec, cuda_graph=True,
                     forbid_host_sync=True)
    assert again.tokens == graph.tokens and again.graphs_captured == 0 and again.graphs_reused == 1
    stop = eager.tokens[1][5]  # the second sequence ends there; the others run on
    ended = generate(ours, prompts, max_new_tokens=24, eos_token_ids=[stop], speculative=spec, cuda_graph=True,
                     forbid_host_sync=True)
    assert ended.tokens[1] == eager.tokens[1][: eager.tokens[1].index(stop) + 1] and ended.finished[1]
    sampling = SamplingParams(temperature=0.8, top_k=50, seed=11)
    drawn = [generate(ours, prompts, max_new_tokens=16, eos_token_ids=[], speculative=spec, sampling=sampling,
                      cuda_graph=True, forbid_host_sync=True).tokens for _ in range(2)]
    assert drawn[0] == drawn[1]  # the seeded generator's state is registered with the graph


def test_online_drafting_in_graph_replays(pair):
    """The drafter's online gates decided on the device inside the replayed rounds, then settled
    (a new round graph once every sequence has decided): the same tokens and gates as eager rounds."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (33, 70)]
    spec = SpeculativeConfig(SkipPlan(4, {2: 1.0}, beta=-1.0, window=4), draft_tokens=2, online=True)
    eager = generate(ours, prompts, max_new_tokens=24, eos_token_ids=[], speculative=spec)
    graph = generate(ours, prompts, max_new_tokens=24, eos_token_ids=[], speculative=spec, cuda_graph=True,
                     forbid_host_sync=True)
    assert graph.tokens == eager.tokens and graph.online_skipped == eager.online_skipped == [[1, 3, 5, 7]] * 2
    assert graph.graphs_captured >= 1


def _stand_ins(g) -> dict:
    """A linear stand-in for attention sublayer 2 and a channel one for FFN sublayer 5 (hidden 256)."""
    return {2: StandIn("linear", down=0.05 * torch.randn(16, 256, generator=g), down_bias=torch.randn(16, generator=g),
                       up=0.05 * torch.randn(256, 16, generator=g)),
            5: StandIn("channel", channel=0.5 + torch.rand(256, generator=g))}


@pytest.mark.parametrize("plan_kind", ["none", "online", "ramp", "stand-ins"])
def test_cuda_graph_decode_matches_eager(pair, plan_kind):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(5)
    plans = {"none": None,
             "online": SkipPlan(4, {2: 1.0}, beta=-1.0, window=4),
             "ramp": SkipPlan(4, {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, ramp=True, mode="decode"),
             # online learning next to fitted stand-ins: FFNs 1 and 7 are gated off after the window
             "stand-ins": SkipPlan(4, {2: 1.0, 3: 0.9, 5: 1.0}, stand_ins=_stand_ins(g), beta=-1.0, window=4)}
    p = plans[plan_kind]
    for lengths in ((40, 23), (31,)):
        prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in lengths]
        eager = generate(ours, prompts, max_new_tokens=12, eos_token_ids=[], plan=p)
        graph = generate(ours, prompts, max_new_tokens=12, eos_token_ids=[], plan=p, cuda_graph=True,
                         forbid_host_sync=True)
        assert graph.tokens == eager.tokens
        assert graph.online_skipped == eager.online_skipped
        assert graph.graphs_captured >= 1
        if plan_kind == "online":
            # Gated per sequence inside the replays. Settling (a second graph that no longer runs
            # those FFNs) waits for a non-blocking read of the gates, which may land after the
            # last token when the host runs ahead of the GPU: one or two graphs.
            assert graph.graphs_captured in (1, 2) and graph.online_skipped == [[1, 3, 5, 7]] * len(lengths)
        if plan_kind == "ramp":  # one graph per step of the ramp (1, then 2 layers)
            assert graph.graphs_captured == 2
        if plan_kind == "stand-ins":
            assert graph.online_skipped == [[1, 7]] * len(lengths)


def test_stand_ins_on_the_gpu_match_the_cpu(pair):
    """The channel stand-in through our CUDA kernel and the linear one through cuBLAS give the
    logits the CPU reference gives (same weights, fp32 on the CPU)."""
    _, ours, dtype = pair
    p = SkipPlan(4, {2: 1.0, 3: 0.9, 5: 1.0}, stand_ins=_stand_ins(torch.Generator().manual_seed(6)))
    ids = torch.randint(0, 257, (2, 50), generator=torch.Generator().manual_seed(7))
    cpu = build_model(ours.args, {k: v.detach().float().cpu() for k, v in ours.state_dict().items()})
    with torch.no_grad():
        expected = cpu(ids, plan=p)
        got = ours(ids.cuda(), plan=p).float().cpu()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 3e-2), rel


def test_cuda_graph_decode_samples_on_the_device(pair):
    """Sampling inside the captured step: seeded runs repeat exactly, top_k=1 is the greedy
    choice, and no replay waits on the host."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (33, 20)]
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    first = generate(ours, prompts, max_new_tokens=16, eos_token_ids=[], sampling=sampled, cuda_graph=True,
                     forbid_host_sync=True)
    again = generate(ours, prompts, max_new_tokens=16, eos_token_ids=[], sampling=sampled, cuda_graph=True)
    assert first.tokens == again.tokens and first.graphs_captured >= 1
    assert all(0 <= t < 257 for seq in first.tokens for t in seq)
    other = generate(ours, prompts, max_new_tokens=16, eos_token_ids=[], sampling=SamplingParams(
        temperature=1.0, top_p=0.95, seed=12), cuda_graph=True)
    assert other.tokens != first.tokens
    greedy = generate(ours, prompts, max_new_tokens=16, eos_token_ids=[], cuda_graph=True)
    top1 = generate(ours, prompts, max_new_tokens=16, eos_token_ids=[], cuda_graph=True,
                    sampling=SamplingParams(temperature=1.0, top_k=1, seed=1))
    assert top1.tokens == greedy.tokens


@needs_conditional_nodes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conditional_node_runs_its_cublas_body_only_while_the_predicate_holds(dtype):
    """adaskip.conditional.only_if in a captured graph: the GEMM inside runs at replay only while
    the device bool is true; otherwise its output is left as it was (poisoned here)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    a = torch.randn(3, 1, 256, generator=g, device="cuda").to(dtype)
    w = torch.randn(512, 256, generator=g, device="cuda").to(dtype)
    out = torch.empty(3, 1, 512, device="cuda", dtype=dtype)
    pred = torch.tensor(False, device="cuda")
    torch.matmul(a, w.t(), out=out)  # warm-up outside the capture
    expected = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with only_if(pred):
            torch.matmul(a, w.t(), out=out)
    for run, poison in ((False, 7.0), (True, 7.0), (False, -3.0), (True, -3.0)):
        out.fill_(poison)
        pred.fill_(run)
        graph.replay()
        torch.cuda.synchronize()
        if run:  # the body may run on another stream with its own cuBLAS workspace: allow rounding
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
        else:
            assert (out == poison).all()


@needs_conditional_nodes
@pytest.mark.parametrize("beta", [-1.0, 1.0], ids=["all-gated-off", "none-gated-off"])
def test_graph_decode_with_conditional_ffns_matches_eager(pair, beta):
    """Three sequences (beyond the gated GEMVs; fp32 never uses them): the learning FFNs are
    captured in conditional nodes on whether any sequence still runs them. Tokens and gates equal
    the eager path's, and no replay waits on the host."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (40, 23, 31)]
    p = SkipPlan(4, {2: 1.0}, beta=beta, window=4)
    eager = generate(ours, prompts, max_new_tokens=12, eos_token_ids=[], plan=p)
    graph = generate(ours, prompts, max_new_tokens=12, eos_token_ids=[], plan=p, cuda_graph=True,
                     graph_conditionals=True, forbid_host_sync=True)
    assert graph.tokens == eager.tokens
    assert graph.online_skipped == eager.online_skipped
    assert eager.online_skipped == ([[1, 3, 5, 7]] if beta < 0 else [[]]) * 3


def test_cuda_graph_decode_reuses_its_graphs_in_later_calls(pair):
    """Captured once per batch size and cache: a later request of the same shape replays the
    graphs an earlier one captured (from its first step on, without waiting on the host) and
    gets the eager path's tokens."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(23)
    earlier = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (30, 17)]
    later = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (25, 28)]
    online = SkipPlan(4, {3: 1.0}, beta=-1.0, window=4)  # an FFN skip: the KV caches stay as they are
    for plan in (None, online):
        generate(ours, earlier, max_new_tokens=10, eos_token_ids=[], plan=plan, cuda_graph=True)
        again = generate(ours, later, max_new_tokens=10, eos_token_ids=[], plan=plan, cuda_graph=True,
                         forbid_host_sync=True)
        eager = generate(ours, later, max_new_tokens=10, eos_token_ids=[], plan=plan)
        assert again.tokens == eager.tokens and again.online_skipped == eager.online_skipped
        assert again.graphs_reused >= 1
        if plan is None:
            assert again.graphs_captured == 0


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_decode_ffn_runs_through_our_gemvs_when_they_serve_it(batch, monkeypatch):
    """FeedForward.forward on one bf16 token per sequence, without autograd, takes the (ungated)
    GEMVs for up to two sequences and cuBLAS beyond; both agree with the fp32 math. With autograd
    on it stays on cuBLAS (the GEMVs have no backward)."""
    from adaskip.runtime.model import FeedForward

    torch.manual_seed(4)
    ffn = FeedForward(ModelArgs.from_hf_config({**CFG, "architectures": ["LlamaForCausalLM"]}))
    ffn = ffn.to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, 1, CFG["hidden_size"], device="cuda").to(torch.bfloat16)
    calls = []
    real = ops.gated_swiglu_up
    monkeypatch.setattr(ops, "gated_swiglu_up", lambda *a: calls.append(a[3]) or real(*a))
    w = {k: v.float() for k, v in ffn.state_dict().items()}
    xf = x.float()
    expected = (torch.nn.functional.silu(xf @ w["gate_proj.weight"].t()) * (xf @ w["up_proj.weight"].t())
                ) @ w["down_proj.weight"].t()
    with torch.no_grad():
        got = ffn(x)
    assert calls == ([None] if batch <= 2 else [])
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    calls.clear()
    trained = ffn(x)
    assert calls == [] and trained.requires_grad


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("paths", [("kernel", "cublas", "cublas"), ("kernel", "gemv", "gemv"), ("sdpa", "gemv", "cublas")],
                         ids=lambda p: "-".join(p))
def test_decode_kernels_give_the_sdpa_cublas_logits(pair, paths, batch, monkeypatch):
    """A decode step (sequences at different positions, whole-cache bound as in graph decode)
    through the decode attention kernel and / or the projection (one sequence) and lm_head GEMVs:
    each chosen path runs, and the logits agree with SDPA + cuBLAS."""
    from adaskip.runtime.schedule import DecodePaths

    _, ours, dtype = pair
    if dtype != torch.bfloat16:
        pytest.skip("the decode kernels take fp16 / bf16")
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 257, (batch, 30), generator=g).cuda()
    pos = torch.tensor([30, 17][:batch], device="cuda")
    calls = {"attention": 0, "gemv": 0}
    real_attention, real_linear = ops.decode_attention, ops.gated_linear
    monkeypatch.setattr(ops, "decode_attention",
                        lambda *a, **k: calls.__setitem__("attention", calls["attention"] + 1) or real_attention(*a, **k))
    monkeypatch.setattr(ops, "gated_linear",
                        lambda *a, **k: calls.__setitem__("gemv", calls["gemv"] + 1) or real_linear(*a, **k))

    def decode_logits(p):
        ours.decode_paths = DecodePaths(*p)
        ours.setup_caches(batch, 64)
        with torch.inference_mode():
            ours(ids, 0, kv_len=30)
            return ours(ids[:, -1:], pos, kv_len=64, logits_index=torch.zeros(batch, dtype=torch.long, device="cuda"))

    try:
        want = decode_logits(("sdpa", "cublas", "cublas")).float()
        ffn_gemvs = calls["gemv"]  # the decode FFNs' down projections take the GEMV either way
        assert calls["attention"] == 0 and ffn_gemvs == ours.args.num_layers
        got = decode_logits(paths).float()
    finally:
        ours.decode_paths = DecodePaths()
    layers = ours.args.num_layers
    assert calls["attention"] == (layers if paths[0] == "kernel" else 0)
    projections = 2 * layers if paths[1] == "gemv" and batch == 1 else 0  # q / k / v fused, o
    assert calls["gemv"] - 2 * ffn_gemvs == projections + (1 if paths[2] == "gemv" else 0)
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_fused_qkv_gemv_gives_the_three_gemvs_logits_bit_for_bit(pair):
    """One GEMV over each attention's fused q / k / v weight (Attention.fuse_qkv): every output row
    is one warp's dot product, as in three GEMVs, so the decode logits are the same bits."""
    from adaskip.runtime.schedule import DecodePaths

    _, ours, dtype = pair
    if dtype != torch.bfloat16:
        pytest.skip("the decode GEMVs take fp16 / bf16")
    ids = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(9)).cuda()
    attentions = [layer.self_attn for layer in ours.model.layers]

    def decode_logits():
        ours.setup_caches(1, 64)
        with torch.inference_mode():
            ours(ids, 0, kv_len=30)
            return ours(ids[:, -1:], torch.tensor([30], device="cuda"), kv_len=64,
                        logits_index=torch.zeros(1, dtype=torch.long, device="cuda"))

    ours.decode_paths = DecodePaths("sdpa", "gemv", "gemv")
    try:
        assert all(a.fused_qkv() is not None for a in attentions)
        fused = decode_logits()
        for a in attentions:
            a.qkv_weight = None
        apart = decode_logits()
    finally:
        ours.fuse_qkv()
        ours.decode_paths = DecodePaths()
    assert torch.equal(fused, apart)


def test_evaluate_speculative_with_graph_replays(pair):
    """eval --speculative-cuda-graph: plain steps and rounds as graph replays, the output still the
    full model's, capture off the clock."""
    from adaskip.evaluation.generation import GenerationPrompt
    from adaskip.evaluation.speculative import evaluate_speculative

    _, ours, dtype = pair
    g = torch.Generator().manual_seed(12)
    prompts = [GenerationPrompt(ids=torch.randint(0, 257, (n,), generator=g).tolist(), length=n, document=0, start=0)
               for n in (40, 72)]
    out = evaluate_speculative(ours, prompts, {"d": SkipPlan(4, {2: 1.0, 5: 1.0})}, draft_tokens=[2],
                               max_new_tokens=16, progress=False, cuda_graph=True)
    row = out["rows"][0]
    assert out["cuda_graph"] and out["device"] == torch.cuda.get_device_name()
    assert row["measured_decode_speedup"] > 0 and row["rounds"] > 0
    if dtype == torch.float32:
        assert row["identical"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_on_the_gpu_is_argmax(dtype):
    """The two-pass greedy choice on CUDA: argmax's index, the first on ties."""
    from adaskip.runtime.sampling import greedy_tokens

    g = torch.Generator(device="cuda").manual_seed(3)
    for vocab in (128256, 151936, 49152):
        ties = torch.randint(0, 3, (4, 3, vocab), generator=g, device="cuda").to(dtype)
        assert torch.equal(greedy_tokens(ties), ties.argmax(-1))
        x = torch.randn(5, vocab, generator=g, device="cuda").to(dtype)
        x[0, 5] = x[0, vocab - 2] = 50.0
        assert torch.equal(greedy_tokens(x), x.argmax(-1)) and greedy_tokens(x)[0].item() == 5
