"""Each attention's q, k and v weights live in one tensor (Attention.fuse_qkv) so that a decode
step reads them with one GEMV: the parameters, the state dict and every output stay as they were,
and a fused copy that no longer backs the parameters is never read (CPU: the GEMV's reference)."""
import pytest
import torch

from adaskip.runtime.loading import build_model
from adaskip.runtime.model import Attention

from helpers import tiny_llama


def _attentions(model):
    return [layer.self_attn for layer in model.model.layers]


def _assert_fused(attn: Attention):
    fused = attn.fused_qkv()
    assert fused is not None
    nq, nk = attn.q_proj.out_features, attn.k_proj.out_features
    assert fused.shape == (nq + 2 * nk, attn.q_proj.in_features)
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn.k_proj.weight.data_ptr() == fused[nq:].data_ptr()
    assert attn.v_proj.weight.data_ptr() == fused[nq + nk:].data_ptr()
    assert torch.equal(fused, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def test_built_models_hold_fused_views_with_the_checkpoints_values_and_names():
    model = tiny_llama(61)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for attn in _attentions(model):
        _assert_fused(attn)
    assert not any("qkv" in k for k in state)  # Hugging Face's names only
    rebuilt = build_model(model.args, dict(state))
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, state[k]), k
    for attn in _attentions(rebuilt):
        _assert_fused(attn)


def test_build_model_consumes_the_weights_only_when_asked():
    model = tiny_llama(61)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    build_model(model.args, weights)
    assert len(weights) == len(model.state_dict())
    build_model(model.args, weights, consume=True)
    assert weights == {}


def test_moving_or_casting_the_model_fuses_again():
    model = tiny_llama(61)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    for attn in _attentions(model):
        _assert_fused(attn)
        assert attn.qkv_weight.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k].bfloat16()), k
    # load_state_dict without assign copies into the views: the fused tensor sees the new values
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new)
    for i, attn in enumerate(_attentions(model)):
        _assert_fused(attn)
        assert torch.equal(attn.qkv_weight[: attn.q_proj.out_features], new[f"model.layers.{i}.self_attn.q_proj.weight"])


def test_an_in_place_apply_keeps_the_fused_weight():
    """share_memory() moves the storage in place: the parameters stay views of the same fused
    weight, now shared, and no second copy is made."""
    model = tiny_llama(61)
    fused = [attn.qkv_weight for attn in _attentions(model)]
    model.share_memory()
    for attn, before in zip(_attentions(model), fused):
        _assert_fused(attn)
        assert attn.qkv_weight is before and attn.qkv_weight.is_shared() and attn.q_proj.weight.is_shared()


def test_a_copied_or_pickled_model_is_fused_with_its_own_tensors():
    import copy
    import io

    model = tiny_llama(61)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        for mine, theirs in zip(_attentions(model), _attentions(other)):
            _assert_fused(theirs)
            assert theirs.qkv_weight.data_ptr() != mine.qkv_weight.data_ptr()
            assert torch.equal(theirs.qkv_weight, mine.qkv_weight)


def test_a_replaced_parameter_is_never_read_through_the_stale_fused_copy():
    model = tiny_llama(61).to(torch.bfloat16)
    attn = _attentions(model)[0]
    x = torch.randn(1, 1, 32).bfloat16()
    old_k = attn.k_proj.weight.detach().clone()
    attn.k_proj.weight = torch.nn.Parameter(torch.randn_like(old_k), requires_grad=False)
    assert attn.fused_qkv() is None and attn.qkv_weight is None  # dropped, not read
    _, k, _ = attn._decode_qkv(x, gemv=True)
    expected = (x[:, 0].float() @ attn.k_proj.weight.float().t()).bfloat16().view(1, 1, -1)
    assert torch.equal(k.reshape(1, 1, -1), expected)
    assert not torch.equal(k.reshape(1, 1, -1), (x[:, 0].float() @ old_k.float().t()).bfloat16().view(1, 1, -1))
    model.fuse_qkv()
    _assert_fused(attn)


@pytest.mark.parametrize("batch", [1, 2])
def test_one_gemv_over_the_fused_weight_gives_what_three_give(batch):
    model = tiny_llama(61).to(torch.bfloat16)
    attn = _attentions(model)[1]
    x = torch.randn(batch, 1, 32).bfloat16()
    fused = attn._decode_qkv(x, gemv=True)
    attn.qkv_weight = None  # the three projections apart
    apart = attn._decode_qkv(x, gemv=True)
    for a, b, heads in zip(fused, apart, (attn.num_heads, attn.num_kv_heads, attn.num_kv_heads)):
        assert a.shape == b.shape == (batch, heads, attn.head_dim)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_decode_step_with_the_fused_projections_matches_the_plain_forward():
    """The GPU decode path (rotary + KV write in one op, GEMV projections, SDPA over the whole
    cache under a mask), here on the ops' references, against the plain cached forward of the
    same token."""
    torch.manual_seed(0)
    model = tiny_llama(61).to(torch.bfloat16)
    attn = _attentions(model)[0]
    b, prompt = 2, 5
    model.setup_caches(b, 16)
    h = torch.randn(b, prompt + 1, 32).bfloat16()
    pos = torch.arange(prompt + 1).expand(b, -1)
    cos, sin = model.rotary(pos, 16, torch.bfloat16)
    attn(h[:, :prompt], cos[:, :prompt], sin[:, :prompt], "causal", pos[:, :prompt], prompt)
    saved = (attn.kv_cache.k.clone(), attn.kv_cache.v.clone())
    last = pos[:, prompt:]
    plain = attn(h[:, prompt:], cos[:, prompt:], sin[:, prompt:], None, last, prompt + 1)
    attn.kv_cache.k.copy_(saved[0])
    attn.kv_cache.v.copy_(saved[1])
    first = last[:, 0].contiguous()
    assert attn.fused_qkv() is not None
    mask = (torch.arange(16) <= prompt).expand(b, 1, 1, 16)
    fast = attn(h[:, prompt:], cos[:, prompt:], sin[:, prompt:], mask, last, 16, decode=(first, None), gemv=True)
    torch.testing.assert_close(fast.float(), plain.float(), rtol=3e-2, atol=3e-2)
    assert torch.isfinite(fast).all()
    assert attn.kv_cache.k[:, :, prompt].abs().sum() > 0  # the decode path wrote the token's key
