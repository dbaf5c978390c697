"""Calibration, profiles, planning and execution modes on a tiny random LLaMA (fp32, CPU)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaskip import SkipPlan, generate  # noqa: E402
from adaskip.skipping.calibration import calibrate  # noqa: E402
from adaskip.runtime.config import ModelArgs  # noqa: E402
from adaskip.runtime.loading import build_model  # noqa: E402
from adaskip.skipping.strategies import paper_speedup, plan, sublayers_for_alpha  # noqa: E402
from adaskip.skipping.profile import ImportanceProfile  # noqa: E402

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _model(seed=0, layers=6):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**CFG, "num_hidden_layers": layers})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return hf, build_model(ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}),
                           dict(hf.state_dict()))


@pytest.fixture(scope="module")
def tiny():
    return _model()


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 101, (48,), generator=g).tolist() for _ in range(4)]


@pytest.fixture(scope="module")
def profile(tiny, requests):
    return calibrate(tiny[1], requests, num_requests=4, prompt_len=48, progress=False)


def test_profile_shape_and_block_similarity_match_transformers_hidden_states(tiny, requests, profile):
    hf, _ = tiny
    assert len(profile.similarity) == 12 and len(profile.block_similarity) == 6
    assert profile.num_requests == 4 and profile.tokens == 192
    assert all(-1 <= s <= 1 for s in profile.similarity) and all(r > 0 for r in profile.scale)
    expected = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for r in requests:
            hs = hf(torch.tensor([r]), output_hidden_states=True).hidden_states
            for i in range(5):  # the last entry of hidden_states is after the final norm
                a, b = hs[i][0].double(), hs[i + 1][0].double()
                expected[i] += torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() / len(requests)
    torch.testing.assert_close(torch.tensor(profile.block_similarity[:5], dtype=torch.float64), expected[:5],
                               rtol=1e-4, atol=1e-5)
    per_request = torch.tensor(profile.per_request_similarity, dtype=torch.float64)
    torch.testing.assert_close(per_request.mean(0), torch.tensor(profile.similarity, dtype=torch.float64))


def test_profile_round_trip_and_fingerprint(tmp_path, tiny, profile):
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = ImportanceProfile.load(path)
    assert loaded == profile
    loaded.check_model(tiny[1])
    _, other = _model(seed=1, layers=4)
    with pytest.raises(ValueError, match="another model"):
        loaded.check_model(other)
    (tmp_path / "bad.json").write_text("{\"format\": \"nope\"}")
    with pytest.raises(ValueError, match="not an adaskip importance profile"):
        ImportanceProfile.load(tmp_path / "bad.json")


def test_alpha_to_sublayers_follows_the_paper():
    assert sublayers_for_alpha(32, 1.14) == 8 and sublayers_for_alpha(32, 1.33) == 16
    assert sublayers_for_alpha(32, 1.0) == 0
    assert math.isclose(paper_speedup(32, 16), 32 / 24)
    with pytest.raises(ValueError, match=r"alpha must be in \[1, 32\]"):
        sublayers_for_alpha(32, 0.9)
    with pytest.raises(ValueError, match="alpha"):
        sublayers_for_alpha(32, 40)


def test_adaskip_plan_skips_the_most_similar_sublayers(profile):
    p = plan(profile, num_sublayers=4)
    order = sorted(range(12), key=lambda s: -profile.similarity[s])
    assert set(p.skip_scales) == set(order[:4])
    assert all(p.skip_scales[s] == profile.scale[s] for s in p.skip_scales)
    assert p.beta == min(profile.similarity[s] for s in order[:4]) and p.online
    assert plan(profile, num_sublayers=4, mode="prefill").beta is None
    assert math.isclose(p.predicted_speedup, 6 / 4)


def test_baselines_at_equal_budgets(profile):
    assert plan(profile, num_sublayers=4, strategy="early-exit").skipped_attention_layers == {4, 5}
    sd = plan(profile, num_sublayers=6, strategy="skipdecode")
    assert sd.skipped_attention_layers == sd.skipped_ffn_layers == {1, 2, 3} and sd.ramp
    assert [sorted({s // 2 for s in sd.phase("decode", t, 10).skip_scales}) for t in (0, 5, 9)] == [[1], [1, 2], [1, 2, 3]]
    assert plan(profile, num_sublayers=4, strategy="unified").skipped_attention_layers == {1, 4}
    short = plan(profile, num_sublayers=4, strategy="shortgpt")
    top = sorted(range(6), key=lambda i: -profile.block_similarity[i])[:2]
    assert short.skipped_attention_layers == set(top) and set(short.skip_scales.values()) == {1.0}
    assert plan(num_layers=6, strategy="full").skip_scales == {}
    with pytest.raises(ValueError, match="even number"):
        plan(profile, num_sublayers=3, strategy="early-exit")
    with pytest.raises(ValueError, match="needs an importance profile"):
        plan(num_layers=6, num_sublayers=2, strategy="shortgpt")
    with pytest.raises(ValueError, match="exactly one budget"):
        plan(profile, alpha=1.2, num_sublayers=2)
    with pytest.raises(ValueError, match="unknown strategy"):
        plan(profile, num_sublayers=2, strategy="random")


def test_modes_prefill_decode_e2e(tiny):
    _, model = tiny
    prompt = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    full = generate(model, [prompt], max_new_tokens=6, eos_token_ids=[])
    full_bytes = full.kv_cache_bytes
    k1_full = model.model.layers[1].self_attn.kv_cache.k[0, :, :20].clone()
    skip = {2: 1.0, 9: 1.02}  # attention of layer 1, FFN of layer 4
    e2e = generate(model, [prompt], max_new_tokens=6, eos_token_ids=[], plan=SkipPlan(6, skip, mode="e2e"))
    assert e2e.kv_cache_bytes == full_bytes * 5 // 6
    pre = generate(model, [prompt], max_new_tokens=6, eos_token_ids=[], plan=SkipPlan(6, skip, mode="prefill"))
    # Attention of layer 1 was skipped in prefill but its K/V were stored for decode, and they equal
    # the full model's (nothing before layer 1's attention changed).
    assert pre.kv_cache_bytes == full_bytes
    torch.testing.assert_close(model.model.layers[1].self_attn.kv_cache.k[0, :, :20], k1_full)
    dec = generate(model, [prompt], max_new_tokens=6, eos_token_ids=[], plan=SkipPlan(6, skip, mode="decode"))
    assert dec.tokens[0][0] == full.tokens[0][0]  # the first token comes from the full prefill
    assert pre.tokens[0][0] == e2e.tokens[0][0] != full.tokens[0][0]  # both prefill with the plan
    assert len({tuple(x.tokens[0]) for x in (full, pre, dec, e2e)}) == 4  # each mode changes the answer its own way


def test_online_learning_gates_ffns_after_the_window(tiny, profile):
    _, model = tiny
    prompt = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    p = plan(profile, num_sublayers=2, window=4)
    # beta -1 gates every candidate off after the window; beta 1 keeps them all.
    always = SkipPlan(6, p.skip_scales, beta=-1.0, window=4)
    never = SkipPlan(6, p.skip_scales, beta=1.0, window=4)
    out_always = generate(model, [prompt, prompt[:17]], max_new_tokens=10, eos_token_ids=[], plan=always)
    out_never = generate(model, [prompt, prompt[:17]], max_new_tokens=10, eos_token_ids=[], plan=never)
    candidates = [s for s in range(1, 12, 2) if s not in p.skip_scales]
    assert out_always.online_skipped == [candidates, candidates]
    assert out_never.online_skipped == [[], []]
    # The first window tokens are identical (every candidate still runs); afterwards they differ.
    plain = generate(model, [prompt, prompt[:17]], max_new_tokens=10, eos_token_ids=[], plan=SkipPlan(6, p.skip_scales))
    assert out_never.tokens == plain.tokens
    assert [t[:5] for t in out_always.tokens] == [t[:5] for t in plain.tokens]
    assert out_always.tokens != plain.tokens
