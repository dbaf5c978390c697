"""adaskip.export: a static plan folded into weights, read back by our runtime and by transformers."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import adaskip  # noqa: E402
from adaskip import SkipPlan  # noqa: E402
from adaskip.cli import main as cli  # noqa: E402
from adaskip.runtime.config import ModelArgs  # noqa: E402
from adaskip.runtime.loading import build_model  # noqa: E402
from adaskip.runtime.stand_in import StandIn  # noqa: E402
from helpers import randomize_norms_and_biases  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def _model(cls="LlamaForCausalLM", **kw):
    """A tiny random model of ours, its residual stream large enough that RMSNorm's eps is
    negligible (folding is exact up to eps)."""
    torch.manual_seed(0)
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config}[cls]
    cfg = config_cls(**{**BASE, **kw})
    hf = randomize_norms_and_biases(getattr(transformers, cls)(cfg).eval())
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(50)
    d = cfg.to_dict()
    d["architectures"] = [cls]
    return build_model(ModelArgs.from_hf_config(d), {k: v.clone() for k, v in hf.state_dict().items()})


def _ids():
    return torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


PLANS = {
    "layer-0-attention-and-ffns": SkipPlan(4, {0: 0.8, 3: 1.3, 4: 0.9, 5: 1.1}),
    "whole-layers": SkipPlan(4, {2: 0.7, 3: 1.2, 6: 1.0, 7: 1.0}),
    "online-learning": SkipPlan(4, {1: 1.2, 6: 0.9}, beta=0.5, window=4),
}


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("bias", [False, True])
def test_exported_model_equals_the_runtime_with_the_plan(tmp_path, name, bias):
    ours = _model(attention_bias=bias, mlp_bias=bias)
    plan = PLANS[name]
    out = adaskip.export(ours, plan, tmp_path / "out")
    back, tokenizer = adaskip.load_model(out, device="cpu")
    assert back.args.architecture == "DeciLMForCausalLM" and tokenizer is None
    assert set(back.args.absent_sublayers) == set(plan.skip_scales)
    ids = _ids()
    with torch.no_grad():
        assert _relative(back(ids), ours(ids, plan=plan)) <= 1e-4
    static = SkipPlan(4, plan.skip_scales)  # online learning is not exported
    got = adaskip.generate(back, ids.tolist(), max_new_tokens=6, eos_token_ids=[])
    expected = adaskip.generate(ours, ids.tolist(), max_new_tokens=6, plan=static, eos_token_ids=[])
    assert got.tokens == expected.tokens
    full = adaskip.generate(ours, ids.tolist(), max_new_tokens=6, eos_token_ids=[])
    assert plan.skipped_attention_layers and got.kv_cache_bytes == expected.kv_cache_bytes < full.kv_cache_bytes
    # No weights, and no norm in front, for a skipped sublayer.
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for s in plan.skip_scales:
        part = "self_attn." if s % 2 == 0 else "mlp."
        assert not any(k.startswith(f"model.layers.{s // 2}.{part}") for k in names)
    record = json.loads((out / "adaskip_plan.json").read_text())
    assert record["skipped_sublayers"] == sorted(plan.skip_scales)
    assert bool(record["not_exported"]) == plan.online


def test_decilm_config_loads_with_trust_remote_code(tmp_path):
    ours = _model()
    plan = PLANS["layer-0-attention-and-ffns"]
    out = adaskip.export(ours, plan, tmp_path / "out")
    cfg = transformers.AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert cfg.model_type == "nemotron-nas" and cfg.architectures == ["DeciLMForCausalLM"]
    assert [b.attention.no_op for b in cfg.block_configs] == [True, False, True, False]
    assert [b.ffn.no_op for b in cfg.block_configs] == [False, True, True, False]
    assert {b.attention.n_heads_in_group for b in cfg.block_configs} == {2}
    assert {b.ffn.intermediate_size for b in cfg.block_configs} == {96}


def test_llama_format_drops_whole_layers_and_transformers_runs_it(tmp_path):
    ours = _model()
    plan = PLANS["whole-layers"]
    out = adaskip.export(ours, plan, tmp_path / "out", format="llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_hidden_layers == 2
    ids = _ids()
    with torch.no_grad():
        assert _relative(hf(ids).logits, ours(ids, plan=plan)) <= 1e-4
    back, _ = adaskip.load_model(out, device="cpu")
    with torch.no_grad():
        assert _relative(back(ids), ours(ids, plan=plan)) <= 1e-4


def test_sharded_export_reads_back(tmp_path):
    ours = _model()
    plan = PLANS["layer-0-attention-and-ffns"]
    out = adaskip.export(ours, plan, tmp_path / "out", max_shard_bytes=40_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    back, _ = adaskip.load_model(out, device="cpu")
    with torch.no_grad():
        assert _relative(back(_ids()), ours(_ids(), plan=plan)) <= 1e-4


def _nothing_written(tmp_path):
    return [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("case", ["another-model", "decode-mode", "ramp", "linear-stand-in", "llama-partial",
                                  "qwen2", "mistral-sliding", "unknown-format", "not-a-plan"])
def test_bad_exports_are_refused_and_write_nothing(tmp_path, case):
    ours = _model()
    plan = PLANS["layer-0-attention-and-ffns"]
    kw = {}
    if case == "another-model":
        plan, match = SkipPlan(4, {1: 1.0}, model_fingerprint="0123456789abcdef"), "another model"
    elif case == "decode-mode":
        plan, match = SkipPlan(4, {1: 1.0}, mode="decode"), "mode decode"
    elif case == "ramp":
        plan, match = SkipPlan(4, {1: 1.0, 3: 1.0}, ramp=True), "ramp"
    elif case == "linear-stand-in":
        linear = StandIn("linear", down=torch.zeros(2, 64), up=torch.zeros(64, 2))
        plan, match = SkipPlan(4, {1: 1.0}, stand_ins={1: linear}), "linear stand-ins"
    elif case == "llama-partial":
        kw, match = {"format": "llama"}, "only one sublayer of layers"
    elif case == "qwen2":
        ours, match = _model("Qwen2ForCausalLM"), "Qwen2ForCausalLM"
    elif case == "mistral-sliding":
        ours, match = _model("MistralForCausalLM", sliding_window=6), "MistralForCausalLM"
    elif case == "unknown-format":
        kw, match = {"format": "gguf"}, "unknown export format"
    else:
        plan, match = {1: 1.0}, "SkipPlan"
    with pytest.raises((ValueError, TypeError), match=match):
        adaskip.export(ours, plan, tmp_path / "out", **kw)
    assert _nothing_written(tmp_path)


def test_a_folder_in_use_is_refused_unless_forced(tmp_path):
    ours = _model()
    plan = PLANS["layer-0-attention-and-ffns"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        adaskip.export(ours, plan, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        adaskip.export(ours, plan, tmp_path / "file")
    out = adaskip.export(ours, plan, tmp_path / "out", force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]  # no temporary folder left


def test_cli_export_round_trip(tmp_path):
    """`adaskip export` from an HF dir with a plan that needs no profile (early-exit)."""
    ours = _model()
    src = tmp_path / "src"
    adaskip.export(ours, SkipPlan(4, {}), src, format="llama")  # the model itself, as a LLaMA dir
    cli(["export", "--model", str(src), "--strategy", "early-exit", "--num-sublayers", "2",
         "--out", str(tmp_path / "out")])
    back, _ = adaskip.load_model(tmp_path / "out", device="cpu")
    assert back.args.absent_sublayers == (6, 7)
    plan = SkipPlan(4, {6: 1.0, 7: 1.0})
    with torch.no_grad():
        assert _relative(back(_ids()), ours(_ids(), plan=plan)) <= 1e-4
    with pytest.raises(SystemExit, match="not empty"):
        cli(["export", "--model", str(src), "--strategy", "early-exit", "--num-sublayers", "2",
             "--out", str(tmp_path / "out")])


def test_rope_scaling_is_carried_over(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    ours = _model(rope_scaling=rope)
    plan = PLANS["layer-0-attention-and-ffns"]
    out = adaskip.export(ours, plan, tmp_path / "out")
    back, _ = adaskip.load_model(out, device="cpu")
    assert back.args.rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        assert _relative(back(_ids()), ours(_ids(), plan=plan)) <= 1e-4


def test_exported_files_have_default_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    out = adaskip.export(_model(), PLANS["whole-layers"], tmp_path / "out")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o666 & ~umask}
