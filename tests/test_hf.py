"""adaskip.hf: plans on stock transformers models match our runtime with the same plan (fp32, CPU).

Tiny random LLaMA, Mistral (sliding window) and Qwen2 (q/k/v bias) models here; SmolLM2 loaded
by transformers from the embedded GGUF in test_hf_smollm2.py.
"""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adaskip  # noqa: E402
from adaskip import SkipPlan  # noqa: E402
from adaskip.runtime.config import ModelArgs, UnsupportedArchitecture  # noqa: E402
from adaskip.runtime.loading import build_model  # noqa: E402
from adaskip.runtime.stand_in import StandIn  # noqa: E402
from adaskip.runtime.schedule import NO_DECODE_KERNELS  # noqa: E402
from helpers import randomize_norms_and_biases  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**BASE),
    "mistral-sliding": lambda: transformers.MistralConfig(**BASE, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**BASE),
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOL = dict(rtol=1e-4, atol=1e-4)
# The models' cache argument: `cache` in recent transformers, `past_key_values` before
CACHE_KWARG = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def _pair(name, seed=0):
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    hf = randomize_norms_and_biases(getattr(transformers, CLASSES[cfg.model_type])(cfg).eval())
    d = cfg.to_dict()
    d["architectures"] = [CLASSES[cfg.model_type]]
    ours = build_model(ModelArgs.from_hf_config(d), {k: v.clone() for k, v in hf.state_dict().items()})
    return hf, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return request.param, *_pair(request.param)


def _ids(batch=2, length=20, seed=1):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _stand_ins(hidden=64, rank=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    linear = StandIn("linear", down=torch.randn(rank, hidden, generator=g) * 0.1,
                     down_bias=torch.randn(rank, generator=g) * 0.1, up=torch.randn(hidden, rank, generator=g) * 0.1)
    channel = StandIn("channel", scale=0.9, channel=1 + 0.1 * torch.randn(hidden, generator=g))
    return linear, channel


def _plans(mode, online=False):
    """Layer 0's attention skipped (transformers reads the cache length there), an FFN with a
    linear stand-in, an attention with channel scales, a scalar FFN."""
    linear, channel = _stand_ins()
    extra = dict(beta=0.0, window=3) if online else {}
    return SkipPlan(4, {0: 0.9, 3: 1.0, 4: 1.0, 7: 1.1}, mode=mode, stand_ins={3: linear, 4: channel}, **extra)


@pytest.mark.parametrize("mode", ["prefill", "decode", "e2e"])
def test_forward_with_a_plan_matches_the_runtime(pair, mode):
    name, hf, ours = pair
    ids = _ids()
    plan = _plans(mode)
    with torch.no_grad():
        with adaskip.hf.apply(hf, plan):
            got = hf(ids).logits
        expected = ours(ids, plan=plan.phase("prefill"))
    torch.testing.assert_close(got, expected, **TOL)
    if mode != "decode":
        assert (got - hf(ids).logits).abs().max() > 1e-2  # the plan changed something


@pytest.mark.parametrize("mode", ["prefill", "decode", "e2e"])
@pytest.mark.parametrize("online", [False, True])
def test_greedy_generate_matches_the_runtime(pair, mode, online):
    """Tokens, and with online learning the FFNs gated off per sequence, equal adaskip.generate's."""
    name, hf, ours = pair
    ids = _ids(length=18, seed=4)
    plan = _plans(mode, online)
    with torch.no_grad(), adaskip.hf.apply(hf, plan) as applied:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        hf_skipped = applied.online_skipped()
        assert applied.decode_steps == 9
    expected = adaskip.generate(ours, ids.tolist(), max_new_tokens=10, plan=plan, eos_token_ids=[])
    assert out[:, ids.shape[1]:].tolist() == expected.tokens
    assert hf_skipped == expected.online_skipped
    if plan.online:  # (mode prefill has no decode skips, so no online learning)
        assert any(hf_skipped)  # beta 0: something was gated off, so the comparison means something


def test_left_padded_batch_matches_single_prompts():
    """A left-padded batch under a plan (online learning per sequence) gives each prompt the
    tokens our runtime gives it alone."""
    hf, ours = _pair("llama")
    plan = _plans("e2e", online=True)
    prompts = [_ids(1, 15, seed=5)[0].tolist(), _ids(1, 9, seed=6)[0].tolist()]
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad(), adaskip.hf.apply(hf, plan) as applied:
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        skipped = applied.online_skipped()
    for b, p in enumerate(prompts):
        alone = adaskip.generate(ours, [p], max_new_tokens=8, plan=plan, eos_token_ids=[])
        assert out[b, longest:].tolist() == alone.tokens[0]
        assert skipped[b] == alone.online_skipped[0]


def test_sampling_with_top_k_1_is_greedy_under_a_plan():
    hf, _ = _pair("qwen2")
    ids = _ids(1, 12, seed=7)
    plan = _plans("e2e", online=True)
    with torch.no_grad(), adaskip.hf.apply(hf, plan):
        greedy = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        sampled = hf.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=None, pad_token_id=0)
        free = hf.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.0, eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy, sampled)
    assert free.shape == greedy.shape


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_e2e_caches_only_the_attention_that_runs(cache_kind):
    """No K/V for skipped attention layers (layer 0 among them) with either cache, and the
    tokens are right: the length comes from a layer that keeps up."""
    hf, ours = _pair("llama")
    ids = _ids(1, 16, seed=8)
    plan = _plans("e2e")
    if cache_kind == "dynamic":
        cache = transformers.DynamicCache(config=hf.config)
    else:
        cache = transformers.StaticCache(config=hf.config, max_cache_len=32)
    with torch.no_grad(), adaskip.hf.apply(hf, plan):
        out = hf.generate(ids, **{CACHE_KWARG: cache}, max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    expected = adaskip.generate(ours, ids.tolist(), max_new_tokens=6, plan=plan, eos_token_ids=[])
    assert out[:, 16:].tolist() == expected.tokens
    filled = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None
              and layer.keys.numel() > 0]
    assert filled == sorted(plan.attention_layers) == [1, 3]
    assert int(cache.get_seq_length()) == 16 + 5  # layer 0's question, answered by layer 1


def test_static_cache_generate_matches_dynamic():
    hf, _ = _pair("mistral-sliding")
    ids = _ids(1, 14, seed=9)
    plan = _plans("e2e", online=True)
    with torch.no_grad(), adaskip.hf.apply(hf, plan):
        dynamic = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        static = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                             cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_hidden_states_are_the_layers_outputs():
    """output_hidden_states under a plan that skips nothing equals the stock model's: the fused
    in-place ops never touch a tensor transformers keeps."""
    hf, _ = _pair("llama")
    ids = _ids()
    with torch.no_grad():
        stock = hf(ids, output_hidden_states=True).hidden_states
        with adaskip.hf.apply(hf, SkipPlan(4, {})):
            ours = hf(ids, output_hidden_states=True).hidden_states
        with adaskip.hf.apply(hf, _plans("e2e")):
            skipped = hf(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(stock) == len(skipped) == 5
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, **TOL)
    # Layer 0 skips its attention (scale 0.9) and runs its FFN: its output is not the input scaled.
    assert (skipped[1] - skipped[0] * 0.9).abs().max() > 1e-3


def test_leaving_restores_the_model_exactly():
    hf, _ = _pair("qwen2")
    ids = _ids()
    with torch.no_grad():
        before = hf(ids).logits
        with adaskip.hf.apply(hf, _plans("e2e", online=True)):
            hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        after = hf(ids).logits
    assert torch.equal(before, after)
    assert all("forward" not in vars(layer) for layer in hf.model.layers)
    assert adaskip.hf.applied_plan(hf) is None
    with pytest.raises(RuntimeError, match="boom"), adaskip.hf.apply(hf, _plans("e2e")):
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, before)


def test_entering_twice_or_a_plan_of_another_model_is_an_error():
    hf, _ = _pair("llama")
    plan = _plans("e2e")
    with adaskip.hf.apply(hf, plan):
        assert adaskip.hf.applied_plan(hf) is plan
        with pytest.raises(RuntimeError, match="already runs under adaskip.hf"):
            with adaskip.hf.apply(hf, plan):
                pass
    with pytest.raises(ValueError, match="6 layers"):
        with adaskip.hf.apply(hf, SkipPlan(6, {1: 1.0})):
            pass
    other = SkipPlan(4, {1: 1.0}, model_fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="another model"):
        with adaskip.hf.apply(hf, other):
            pass
    with pytest.raises(ValueError, match="ramp"):
        with adaskip.hf.apply(hf, SkipPlan(4, {1: 1.0}, ramp=True)):
            pass
    with pytest.raises(TypeError, match="SkipPlan"):
        with adaskip.hf.apply(hf, {1: 1.0}):
            pass
    streaming = SkipPlan(4, {1: 1.0}, streaming={2: [0]})
    with pytest.raises(ValueError, match="streaming KV-head groups run on adaskip's runtime only"):
        with adaskip.hf.apply(hf, streaming):
            pass
    with pytest.raises(ValueError, match="streaming KV-head groups run on adaskip's runtime only"):
        adaskip.hf.generate(hf, [[1, 2, 3]], plan=streaming, max_new_tokens=2)
    # Nothing was left installed by the refused entries.
    assert all("forward" not in vars(layer) for layer in hf.model.layers)


def test_unsupported_models_and_versions_are_named(monkeypatch):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        with adaskip.hf.apply(gpt2, SkipPlan(2, {})):
            pass
    gelu = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "hidden_act": "gelu"}))
    with pytest.raises(UnsupportedArchitecture, match="activation"):
        adaskip.hf.calibrate(gelu, [[5, 6, 7, 8]], num_requests=1, prompt_len=4, progress=False)
    hf, _ = _pair("llama")
    monkeypatch.setattr(adaskip.hf, "transformers_version", lambda: "5.16.2")
    with pytest.raises(UnsupportedArchitecture, match="transformers >= 5.17, this is 5.16.2"):
        with adaskip.hf.apply(hf, SkipPlan(4, {})):
            pass


def test_calibration_on_hf_equals_the_runtimes(pair):
    """The same profile from the HF model as from our runtime, interchangeable (same
    fingerprint), searches included."""
    name, hf, ours = pair
    requests = [_ids(1, 24, seed=s)[0].tolist() for s in range(3)]
    kw = dict(num_requests=3, prompt_len=24, progress=False, search=("loss",), search_max_sublayers=3,
              search_candidates=2, search_requests=1)
    from_hf = adaskip.hf.calibrate(hf, requests, **kw)
    from_ours = adaskip.calibrate(ours, requests, **kw)
    assert from_hf.fingerprint == from_ours.fingerprint
    for key in ("similarity", "scale", "block_similarity"):
        torch.testing.assert_close(torch.tensor(getattr(from_hf, key)), torch.tensor(getattr(from_ours, key)),
                                   rtol=1e-5, atol=1e-5)
    assert from_hf.search["loss"]["order"] == from_ours.search["loss"]["order"]
    from_ours.check_model(ours)
    with adaskip.hf.runtime_view(hf) as view:
        from_ours.check_model(view)
    plan = adaskip.plan(from_ours, strategy="greedy-loss", num_sublayers=3)
    with torch.no_grad(), adaskip.hf.apply(hf, plan):
        got = hf(_ids()).logits
    torch.testing.assert_close(got, ours(_ids(), plan=plan.phase("prefill")), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available() or not adaskip.ops.HAS_EXTENSION,
                    reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_bf16_generate_matches_the_runtime(batch):
    """On the GPU in bf16 the FFNs run on the gated decode GEMVs (1-2 sequences) or dense and
    discarded (3): the same tokens and gates as our runtime, which runs the same kernels (SDPA
    for attention, as transformers does)."""
    hf, ours = _pair("llama")
    hf, ours = hf.to("cuda", torch.bfloat16), ours.to("cuda", torch.bfloat16)
    # transformers attends with SDPA: the runtime's decode attention kernel rounds differently.
    ours.decode_paths = NO_DECODE_KERNELS
    ids = _ids(batch, 16, seed=10).cuda()
    plan = _plans("e2e", online=True)
    with torch.no_grad(), adaskip.hf.apply(hf, plan) as applied:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        skipped = applied.online_skipped()
    expected = adaskip.generate(ours, ids.tolist(), max_new_tokens=8, plan=plan, eos_token_ids=[])
    assert out[:, 16:].tolist() == expected.tokens
    assert skipped == expected.online_skipped


def test_a_failed_forward_does_not_leave_its_step_behind():
    """An exception inside a forward under apply(): the next forward still runs the plan for its
    own shape."""
    hf, ours = _pair("llama")
    plan = _plans("e2e", online=True)
    ids = _ids(length=18, seed=4)
    with torch.no_grad(), adaskip.hf.apply(hf, plan) as applied:
        with pytest.raises(Exception):
            hf(torch.tensor([[500, 501]]))  # ids outside the vocabulary fail in the embedding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert applied.decode_steps == 9
        skipped = applied.online_skipped()
    expected = adaskip.generate(ours, ids.tolist(), max_new_tokens=10, plan=plan, eos_token_ids=[])
    assert out[:, ids.shape[1]:].tolist() == expected.tokens and skipped == expected.online_skipped


@pytest.mark.parametrize("mode,online", [("e2e", True), ("decode", True), ("prefill", False)])
def test_hf_generate_runs_on_the_shared_decode_driver(pair, mode, online, monkeypatch):
    """adaskip.hf.generate resolves the request once (as adaskip.generate does) and runs its
    decode steps on the shared driver with generate's own step: prompts of different lengths
    give adaskip.generate's tokens, online gates and EOS stops on the same weights and plan."""
    from adaskip.runtime import driver, generation, request_plan

    name, hf, ours = pair
    plan = _plans(mode, online)
    prompts = [_ids(1, 15, seed=5)[0].tolist(), _ids(1, 9, seed=6)[0].tolist()]
    driven, resolved = [], []

    def drive(step, max_steps, **kwargs):
        run = driver.drive(step, max_steps, **kwargs)
        driven.append((type(step), max_steps, run.steps))
        return run

    def resolve(*args, **kwargs):
        resolved.append(args[0])
        return request_plan.resolve_generation(*args, **kwargs)

    assert adaskip.hf.drive is driver.drive and adaskip.hf.resolve_generation is request_plan.resolve_generation
    monkeypatch.setattr(adaskip.hf, "drive", drive)
    monkeypatch.setattr(adaskip.hf, "resolve_generation", resolve)
    monkeypatch.setattr(adaskip.hf, "resolve_forward", None)  # no step resolves a plan of its own
    got = adaskip.hf.generate(hf, prompts, plan=plan, max_new_tokens=10, eos_token_ids=[])
    expected = adaskip.generate(ours, prompts, max_new_tokens=10, plan=plan, eos_token_ids=[])
    assert driven == [(generation.TokenStep, 9, 9)] and len(resolved) == 1
    assert got.tokens == expected.tokens and got.decode_steps == 9
    assert got.online_skipped == expected.online_skipped
    if plan.online:
        assert any(got.online_skipped)
    # EOS: the token the first sequence makes third ends it there, as in adaskip.generate.
    eos = [expected.tokens[0][2]]
    got = adaskip.hf.generate(hf, prompts, plan=plan, max_new_tokens=10, eos_token_ids=eos)
    expected = adaskip.generate(ours, prompts, max_new_tokens=10, plan=plan, eos_token_ids=eos)
    assert got.tokens == expected.tokens and got.finished == expected.finished and got.finished[0]
    assert len(got.tokens[0]) <= 3
    assert "forward" not in vars(hf.model.layers[0]) and adaskip.hf.applied_plan(hf) is None  # left as it was


def test_hf_generate_without_a_plan_is_the_full_model():
    hf, ours = _pair("qwen2")
    prompts = [_ids(1, 11, seed=9)[0].tolist()]
    got = adaskip.hf.generate(hf, prompts, max_new_tokens=6, eos_token_ids=[])
    with torch.no_grad():
        plain = hf.generate(torch.tensor(prompts), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert got.tokens == plain[:, 11:].tolist() == adaskip.generate(ours, prompts, max_new_tokens=6,
                                                                    eos_token_ids=[]).tokens
    with adaskip.hf.apply(hf, _plans("e2e")), pytest.raises(RuntimeError, match="already runs under adaskip.hf"):
        adaskip.hf.generate(hf, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match="ramp"):
        adaskip.hf.generate(hf, prompts, plan=SkipPlan(4, {1: 1.0}, ramp=True))
