"""`adaskip export --format adaskip` (fitted stand-ins for the adaskip_vllm plugin), without vLLM.

The exported folder is run by a small LLaMA forward written here in plain torch that follows
the plugin's rules (adaskip_vllm.model): no-op sublayers pass the stream through, a linear
stand-in adds its map of the normed input, a channel stand-in scales the stream with the
plugin's own arithmetic (adaskip_vllm.stand_ins). Its logits must equal our runtime's with the
plan: that checks the fold of scalar compensation around the stand-ins, the scaling of a linear
map behind earlier scalar skips, and when a channel stand-in is folded and when it is applied.
The real vLLM serving the same format is `make test-vllm` (tests/integration/).
"""
import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

import adaskip  # noqa: E402
from adaskip import SkipPlan  # noqa: E402
from adaskip.cli import main as cli  # noqa: E402
from adaskip.exporting import PLUGIN_ARCHITECTURE, plugin_install_command  # noqa: E402
from adaskip.runtime.stand_in import StandIn  # noqa: E402
from adaskip_vllm import ARCHITECTURE  # noqa: E402
from adaskip_vllm.stand_ins import apply_channel, stand_in_of  # noqa: E402
from test_export import _ids, _model, _relative  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 64


def _linear(rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return StandIn("linear", down=torch.randn(rank, HIDDEN, generator=g) * 0.2,
                   down_bias=torch.randn(rank, generator=g) * 0.1, up=torch.randn(HIDDEN, rank, generator=g) * 0.2)


def _channel(seed=0, scale=1.1):
    g = torch.Generator().manual_seed(seed)
    return StandIn("channel", channel=torch.rand(HIDDEN, generator=g) + 0.5, scale=scale)


def _uniform_channel():
    return StandIn("channel", channel=torch.full((HIDDEN,), 0.75), scale=1.2)


# scalar skips before and after the stand-ins (the fold divides what comes later), a linear map
# on layer 0's attention (the first sublayer: no residual yet), a varied channel (applied) and
# a uniform one (folded as its scalar).
PLANS = {
    "linear-behind-scalars": lambda: SkipPlan(4, {1: 1.3, 2: 0.8, 5: 1.0, 6: 1.2},
                                              stand_ins={5: _linear()}),
    "linear-first-sublayer": lambda: SkipPlan(4, {0: 1.0, 3: 0.9, 7: 1.0}, stand_ins={0: _linear(4, 1),
                                                                                    7: _linear(6, 2)}),
    "channel-applied-and-folded": lambda: SkipPlan(4, {0: 0.7, 3: 1.0, 4: 1.0, 6: 1.1},
                                                   stand_ins={3: _channel(), 4: _uniform_channel()}),
    "channel-first-sublayer": lambda: SkipPlan(4, {0: 1.0, 5: 1.0}, stand_ins={0: _channel(3, 0.9),
                                                                            5: _linear(4, 5)}),
}


def _rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x, theta):
    """HF LLaMA's rotary embedding (rotate_half) of x [B, heads, S, D] at positions 0..S-1."""
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], -1)
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * emb.cos() + half * emb.sin()


def _attention(w, p, x, cfg):
    b, s, _ = x.shape
    heads, kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def proj(name, n):
        y = F.linear(x, w[f"{p}self_attn.{name}.weight"], w.get(f"{p}self_attn.{name}.bias"))
        return y.view(b, s, n, dim).transpose(1, 2)

    q, k, v = _rope(proj("q_proj", heads), cfg["rope_theta"]), _rope(proj("k_proj", kv), cfg["rope_theta"]), \
        proj("v_proj", kv)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, heads * dim)
    return F.linear(out, w[f"{p}self_attn.o_proj.weight"], w.get(f"{p}self_attn.o_proj.bias"))


def _ffn(w, p, x):
    def lin(name, y):
        return F.linear(y, w[f"{p}mlp.{name}.weight"], w.get(f"{p}mlp.{name}.bias"))

    return lin("down_proj", F.silu(lin("gate_proj", x)) * lin("up_proj", x))


def _plugin_forward(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the exported folder under the plugin's rules (see the module docstring)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w, eps = load_file(str(folder / "model.safetensors")), cfg["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][ids]
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        for part, norm, stand_in in (("attention", "input_layernorm", "attn_stand_in"),
                                     ("ffn", "post_attention_layernorm", "mlp_stand_in")):
            entry = block[part]
            kind = entry.get("stand_in", {}).get("kind")
            if kind == "channel":
                h = apply_channel(h, w[f"{p}{stand_in}.channel"])
            elif kind == "linear":
                x = _rms_norm(h, w[f"{p}{norm}.weight"], eps)
                h = h + F.linear(F.linear(x, w[f"{p}{stand_in}.down.weight"], w[f"{p}{stand_in}.down.bias"]),
                                 w[f"{p}{stand_in}.up.weight"])
            elif not entry["no_op"]:
                x = _rms_norm(h, w[f"{p}{norm}.weight"], eps)
                h = h + (_attention(w, p, x, cfg) if part == "attention" else _ffn(w, p, x))
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return F.linear(_rms_norm(h, w["model.norm.weight"], eps), head)


@pytest.mark.parametrize("name", list(PLANS))
def test_the_plugin_rules_on_the_export_equal_the_runtime_with_the_plan(tmp_path, name):
    ours, plan = _model(), PLANS[name]()
    out = adaskip.export(ours, plan, tmp_path / "out", format="adaskip")
    ids = _ids()
    with torch.no_grad():
        expected = ours(ids, plan=plan)
        assert _relative(_plugin_forward(out, ids), expected) <= 1e-4
        # The stand-ins matter here: the same skips with scalar compensation answer otherwise.
        assert _relative(ours(ids, plan=SkipPlan(4, plan.skip_scales)), expected) > 1e-2


def test_what_the_adaskip_format_writes(tmp_path):
    ours, plan = _model(), PLANS["channel-applied-and-folded"]()
    plan = SkipPlan(4, {**plan.skip_scales, 5: 1.0}, stand_ins={**plan.stand_ins, 5: _linear(8)})
    out = adaskip.export(ours, plan, tmp_path / "out", format="adaskip")
    cfg = transformers.AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert cfg.architectures == [PLUGIN_ARCHITECTURE] == [ARCHITECTURE] and cfg.model_type == "nemotron-nas"
    blocks = cfg.block_configs
    assert [b.attention.no_op for b in blocks] == [True, False, True, True]
    assert [b.ffn.no_op for b in blocks] == [False, True, True, False]
    # What the plugin reads: the applied channel, the linear map with its rank; the uniform
    # channel (sublayer 4) is folded and leaves no stand-in behind.
    assert stand_in_of(blocks[1].ffn, "1 ffn") == ("channel", None)
    assert stand_in_of(blocks[2].attention, "2 attention") is None
    assert stand_in_of(blocks[2].ffn, "2 ffn") == ("linear", 8)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = {k: f.get_slice(k).get_shape() for k in f.keys()}
        channel = f.get_tensor("model.layers.1.mlp_stand_in.channel")
    assert names["model.layers.2.mlp_stand_in.down.weight"] == [8, HIDDEN]
    assert names["model.layers.2.mlp_stand_in.down.bias"] == [8]
    assert names["model.layers.2.mlp_stand_in.up.weight"] == [HIDDEN, 8]
    assert "model.layers.2.post_attention_layernorm.weight" in names  # the linear map's input norm
    assert not any(k.startswith("model.layers.2.attn_stand_in") or k.startswith("model.layers.2.input_layernorm")
                   for k in names)
    assert channel.dtype == torch.float32
    assert torch.equal(channel, plan.stand_ins[3].channel.float() * plan.stand_ins[3].scale)
    record = json.loads((out / "adaskip_plan.json").read_text())
    assert record["format"] == "adaskip"
    assert {s: r["exported"].split()[0] for s, r in record["stand_ins"].items()} == {
        "3": "applied", "4": "folded", "5": "low-rank"}


def test_the_adaskip_format_of_a_scalar_plan_is_the_decilm_one_with_the_plugin_class(tmp_path):
    ours, plan = _model(), SkipPlan(4, {0: 0.8, 3: 1.3})
    a = adaskip.export(ours, plan, tmp_path / "a", format="adaskip")
    d = adaskip.export(ours, plan, tmp_path / "d", format="decilm")
    ca, cd = (json.loads((f / "config.json").read_text()) for f in (a, d))
    assert ca.pop("architectures") == [ARCHITECTURE] and cd.pop("architectures") == ["DeciLMForCausalLM"]
    assert ca == cd
    assert (a / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()


@pytest.mark.parametrize("fmt", ["decilm", "llama"])
@pytest.mark.parametrize("kind", ["channel", "linear"])
def test_the_scalar_formats_refuse_fitted_stand_ins_naming_the_adaskip_format(tmp_path, fmt, kind):
    stand_in = _linear() if kind == "linear" else _channel()
    plan = SkipPlan(4, {2: 1.0, 3: 1.0}, stand_ins={3: stand_in})
    with pytest.raises(ValueError, match=f"{kind} stand-ins need --format adaskip"):
        adaskip.export(_model(), plan, tmp_path / "out", format=fmt)
    assert not list(tmp_path.iterdir())


def test_cli_export_adaskip_prints_the_plugin_and_the_serve_command(tmp_path, capsys):
    src = tmp_path / "src"
    adaskip.export(_model(), SkipPlan(4, {}), src, format="llama")
    cli(["export", "--model", str(src), "--strategy", "early-exit", "--num-sublayers", "2", "--format", "adaskip",
         "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert f"serve it with: vllm serve {tmp_path / 'out'} --trust-remote-code" in printed
    assert plugin_install_command() in printed and "--no-deps" in printed
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [ARCHITECTURE]


def test_cli_refuses_a_fitted_stand_in_for_decilm_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="linear stand-ins need --format adaskip"):
        cli(["export", "--model", str(tmp_path / "nowhere"), "--strategy", "greedy-kl", "--stand-in", "linear",
             "--format", "decilm", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("entry, match", [
    ({"no_op": True, "stand_in": {"kind": "affine"}}, "unknown kind 'affine'"),
    ({"no_op": False, "stand_in": {"kind": "channel"}}, "runs"),
    ({"no_op": True, "stand_in": {"kind": "linear", "rank": 0}}, "positive integer rank"),
    ({"no_op": True, "stand_in": {"kind": "linear"}}, "positive integer rank"),
])
def test_the_plugin_refuses_block_configs_it_cannot_serve(entry, match):
    from types import SimpleNamespace

    part = SimpleNamespace(no_op=entry["no_op"], stand_in=SimpleNamespace(**entry["stand_in"]))
    with pytest.raises(ValueError, match=match):
        stand_in_of(part, "layer 1's ffn")


def test_the_channel_arithmetic_is_the_runtimes():
    """float32 product, rounded once to the stream's dtype: adaskip's scale_rms_norm does the same."""
    from adaskip.ops import reference

    stand_in = _channel(7, 1.3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = (torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
        runtime = h.clone()
        x = torch.empty_like(h)
        reference.scale_rms_norm(x, runtime, torch.ones(HIDDEN, dtype=dtype), 1e-5, 1.0,
                                 channel_scales=stand_in.channel.float() * stand_in.scale)
        assert torch.equal(apply_channel(h, stand_in.channel.float() * stand_in.scale), runtime)


def test_the_plugin_imports_only_torch_vllm_and_the_standard_library():
    """vLLM's environment has its own torch and no adaskip extension: the plugin must not need them."""
    import sys

    allowed = {"torch", "vllm", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "adaskip_vllm").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), f"{path.name} imports {names}"


def test_pyproject_declares_the_plugin():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"adaskip": "adaskip_vllm:register"}
    assert project["optional-dependencies"]["vllm"] == []  # nothing that could move vLLM's torch
