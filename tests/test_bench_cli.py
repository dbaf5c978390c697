"""`adaskip bench kernels|e2e` through the parser `register` builds, on CPU at tiny sizes: the
JSON carries what makes a result trustworthy later (device, torch, commit, date), every
strategy at every budget is timed with an ideal above 1 where something is skipped, plans that
skip attention shrink the KV cache, the plot is written, and bad requests fail clearly."""
import argparse
import contextlib
import io
import json
from types import SimpleNamespace

import pytest
import torch

from adaskip.benchmarks import e2e, measure, register
from adaskip.skipping.strategies import PAPER_COMPARISON
from adaskip.cli import main
from adaskip._util import json_safe
from adaskip.benchmarks.common import device_info, git_commit, output_path
from adaskip.skipping.costs import SublayerCosts
from adaskip.runtime.skip_plan import SkipPlan


@pytest.fixture(autouse=True)
def one_thread():
    """The CPU machines running the tests are shared: one thread keeps the timings sane."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(*argv):
    p = argparse.ArgumentParser(prog="adaskip")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", *argv])
    return args.func(args)


def test_kernels_quick_writes_json(tmp_path):
    out = tmp_path / "ops.json"
    _run("kernels", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    for key in ("device", "torch", "git_commit", "date", "copy_gbps", "rows", "timing", "command", "git_dirty",
                "git_status", "torch_cuda", "python"):
        assert key in result
    assert {"add_rmsnorm+stats", "add_rmsnorm", "scale_rmsnorm", "io_similarity_stats", "skip_or_scale(skip)",
            "torch add_+rms_norm", "torch mul_+rms_norm"} <= {r["op"] for r in result["rows"]}
    assert all(r["time_us"] > 0 and r["bytes"] > 0 and r["gbps"] >= 0 for r in result["rows"])
    if not torch.cuda.is_available():
        assert "reference on CPU" in result["path"] and result["ffn_rows"] == []


@pytest.fixture(scope="module")
def e2e_result(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out_dir = tmp_path_factory.mktemp("e2e")
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _run("e2e", "--config", "tiny", "--prompt-lens", "32", "--decode-tokens", "3", "--repeats", "2",
             "--budgets", "2,4", "--out-dir", str(out_dir))
    (path,) = out_dir.glob("e2e-tiny-*.json")
    return json.loads(path.read_text()), path, printed.getvalue()


def test_e2e_json_header(e2e_result):
    result, _, _ = e2e_result
    for key in ("device", "torch", "git_commit", "date", "dtype", "rows", "baseline", "sublayer_costs"):
        assert result[key] is not None, key
    assert result["weights"] == "random" and result["num_layers"] == 4
    assert result["profile"] == "calibrated on random tokens (speed only)"
    assert result["prompt_lens"] == [32] and result["budgets"] == [2, 4]
    assert result["smoke_run"] == (not torch.cuda.is_available())
    assert {c["mode"] for c in result["sublayer_costs"]} == {"prefill", "decode"}
    assert all(len(c["per_sublayer_ms"]) == 8 and min(c["per_sublayer_ms"]) > 0 for c in result["sublayer_costs"])


def test_e2e_hf_side_by_side(e2e_result):
    result, _, _ = e2e_result
    # Same weights: equal up to rounding (fp32 on a CPU; bf16 by default on a GPU)
    assert result["logits_parity_rel_err"] < (1e-4 if result["dtype"] == "float32" else 3e-2)
    (row,) = result["baseline"]
    full = next(r for r in result["rows"] if r["strategy"] == "full")
    assert row["ttft_ms"]["ours"] == full["ttft_ms"] and row["tpot_ms"]["ours"] == full["tpot_ms"]
    assert row["ttft_ms"]["hf"] > 0 and row["tpot_ms"]["hf"] > 0
    assert row["ttft_ratio_ours_over_hf"] == pytest.approx(row["ttft_ms"]["ours"] / row["ttft_ms"]["hf"], rel=1e-3)
    assert row["tpot_ratio_ours_over_hf"] == pytest.approx(row["tpot_ms"]["ours"] / row["tpot_ms"]["hf"], rel=1e-3)
    a = result["model_args"]
    per_token = a["num_layers"] * 2 * a["num_kv_heads"] * a["head_dim"] * (4 if result["dtype"] == "float32" else 2)
    # Ours: a static cache for the prompt and every output token; HF's DynamicCache holds the
    # tokens it was fed, the last output token not among them.
    assert row["kv_cache_bytes"] == {"ours": per_token * (32 + 3 + 1), "hf": per_token * (32 + 3)}


def test_e2e_every_strategy_at_every_budget(e2e_result):
    result, _, _ = e2e_result
    rows = result["rows"]
    full = next(r for r in rows if r["strategy"] == "full")
    assert full["ttft_speedup"] == full["ideal_ttft_speedup"] == 1.0 and full["kv_cache_ratio"] == 1.0
    seen = {(r["strategy"], r["num_sublayers"]) for r in rows if r["strategy"] != "full"}
    assert seen == {(s, k) for s in PAPER_COMPARISON for k in (2, 4)}
    for r in rows:
        if r["strategy"] == "full":
            continue
        assert r["skipped_attention"] + r["skipped_ffn"] == r["num_sublayers"] == len(r["skipped_sublayers"])
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["paper_alpha"] > 1
        assert r["ideal_ttft_speedup"] > 1 and r["ideal_tpot_speedup"] > 1, r
        assert r["ttft_of_ideal"] == pytest.approx(r["ttft_speedup"] / r["ideal_ttft_speedup"], rel=1e-3)
        # Layers whose attention never runs keep no KV cache; SkipDecode's ramp runs some of
        # the attention it skips in prefill, so it may keep more.
        per_layer = full["kv_cache_bytes"] // 4
        kept, rest = divmod(r["kv_cache_bytes"], per_layer)
        assert rest == 0 and r["kv_cache_ratio"] == pytest.approx(kept / 4, abs=1e-4), r
        if r["strategy"] == "skipdecode":
            assert 4 - r["skipped_attention"] <= kept <= 4, r
        else:
            assert kept == 4 - r["skipped_attention"], r


def test_e2e_plot_and_tables(e2e_result):
    result, path, printed = e2e_result
    png = path.with_suffix(".png")
    assert result["plot"] == str(png) and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One table line per row, in the row order of the JSON, and the path it was written to.
    lines = [line for line in printed.splitlines() if line.startswith("| 32 | ")]
    assert len(lines) == len(result["baseline"]) + len(result["rows"])
    assert [line.split(" | ")[1:3] for line in lines[1:]] == [[r["strategy"], str(r["num_sublayers"])]
                                                             for r in result["rows"]]
    assert printed.rstrip().endswith(f"wrote {path}")


def test_ideal_speedup_counts_the_skipped_sublayers():
    costs = SublayerCosts(per_sublayer=[1.0, 2.0, 3.0, 4.0], fixed=0.5, context_len=8, mode="decode",
                          source="measured")
    assert measure.ideal_speedup(10.0, costs, [{0, 1}]) == pytest.approx(10 / 7, abs=1e-4)
    # SkipDecode's ramp: the mean saving over the decode steps
    assert measure.ideal_speedup(10.0, costs, [{0}, {0, 1}]) == pytest.approx(10 / 8, abs=1e-4)
    assert measure.ideal_speedup(2.0, costs, [{2, 3}]) is None  # noise made the skipped part the whole


def test_ideal_decode_of_an_online_plan_adds_the_gated_ffns_after_the_window():
    costs = SublayerCosts(per_sublayer=[1.0, 2.0, 3.0, 4.0], fixed=0.5, context_len=8, mode="decode",
                          source="measured")
    plan_ = SkipPlan(2, {0: 1.0}, beta=0.9, window=2, mode="e2e")
    timing = {"ttft_s": 1.0, "tpot_s": 1.0, "kv_cache_bytes": 1, "online_skipped": [3]}
    args = SimpleNamespace(decode_tokens=4)
    # Steps 0, 1 save sublayer 0 (1 s); steps 2, 3 also FFN 3 (4 s more): a mean saving of 3 s.
    full = {"ttft_s": 20.0, "tpot_s": 20.0, "kv_cache_bytes": 1}
    row = measure.plan_row(8, "adaskip", 1, plan_, timing, full, {"prefill": costs, "decode": costs}, args, 2)
    assert row["ideal_tpot_speedup"] == pytest.approx(20 / 17, abs=1e-4)
    assert row["online_skipped"] == [3]
    assert "ideal_tpot_graph_speedup" not in row  # no graph decode measured


def test_graph_decode_has_its_own_ideal_from_graph_timed_sublayers():
    eager = SublayerCosts([1.0, 2.0, 3.0, 4.0], 0.5, 8, "decode", "measured")
    in_graph = SublayerCosts([0.5, 1.0, 1.5, 2.0], 0.2, 8, "decode", "measured in CUDA graphs")
    plan_ = SkipPlan(2, {0: 1.0}, beta=0.9, window=2, mode="e2e")
    timing = {"ttft_s": 1.0, "tpot_s": 1.0, "tpot_graph_s": 8.0, "kv_cache_bytes": 1, "online_skipped": [3],
              "step_times_s": [9.0, 9.0, 9.0, 9.0, 9.0, 7.0, 7.0]}
    full = {"ttft_s": 20.0, "tpot_s": 20.0, "tpot_graph_s": 10.0, "kv_cache_bytes": 1}
    costs = {"prefill": eager, "decode": eager, "decode_graph": in_graph}
    row = measure.plan_row(8, "adaskip+online", 1, plan_, timing, full, costs, SimpleNamespace(decode_tokens=4), 2)
    # Steps 0, 1 save 0.5 s in a graph, steps 2, 3 also FFN 3's 2 s: a mean saving of 1.5 s of 10.
    assert row["ideal_tpot_graph_speedup"] == pytest.approx(10 / 8.5, abs=1e-4)
    assert row["tpot_graph_speedup"] == 1.25
    assert row["tpot_graph_of_ideal"] == pytest.approx(1.25 / (10 / 8.5), abs=1e-3)
    assert row["online_drop_predicted_ms"] == 2_000  # graph-timed FFN 3, like the graph step times


def test_online_window_effect_compares_steps_before_and_after_the_window():
    costs = SublayerCosts(per_sublayer=[1.0, 2.0, 3.0, 4.0], fixed=0.5, context_len=8, mode="decode",
                          source="measured")
    plan_ = SkipPlan(2, {0: 1.0}, beta=0.9, window=3, mode="e2e")
    # step 0 (warm-up) is left out, steps 1-2 learn, 3-5 settle, then 4 s less per step.
    m = {"step_times_s": [50.0, 10.0, 10.0, 9.0, 8.0, 7.0, 6.0, 6.0], "online_skipped": [3]}
    effect = measure.online_window_effect(plan_, m, costs)
    assert effect["tpot_before_window_ms"] == 10_000 and effect["tpot_after_window_ms"] == 6_000
    assert effect["online_drop_ms"] == 4_000 and effect["online_drop_predicted_ms"] == 4_000
    assert effect["online_drop_of_predicted"] == 1.0
    assert "too few" in measure.online_window_effect(plan_, {"step_times_s": [1.0] * 5}, costs)["online_note"]


def test_online_plans_run_beside_their_offline_twins_with_the_given_beta():
    from adaskip.benchmarks.e2e import _plans
    from adaskip.skipping.profile import ImportanceProfile

    sim = [0.9, 0.8, 0.95, 0.7, 0.85, 0.6, 0.5, 0.4]
    profile = ImportanceProfile(4, sim, [1.0] * 8, [0.0] * 8, [1.0] * 8, [0.5] * 4, {}, 1, 8, 8)
    plans = _plans(profile, ["adaskip", "early-exit"], [2], 4, True, [], online_beta=-1.0)
    betas = {s: p.beta for s, _, p, _ in plans}
    assert betas == {"adaskip": None, "adaskip+online": -1.0, "early-exit": None}  # offline and online side by side
    by_name = {s: p for s, _, p, _ in plans}
    assert by_name["adaskip"].skip_scales == by_name["adaskip+online"].skip_scales
    with_cond = _plans(profile, ["adaskip"], [2], 4, True, [], conditional=True)
    assert [(s, c) for s, _, _, c in with_cond] == [("adaskip", False), ("adaskip+online", False),
                                                  ("adaskip+online+cond", True)]


def test_online_rows_are_compared_with_their_offline_twin():
    rows = [{"strategy": "adaskip", "prompt_len": 64, "num_sublayers": 8, "tpot_ms": 12.0, "tpot_graph_ms": 10.0},
            {"strategy": "adaskip", "prompt_len": 64, "num_sublayers": 16, "tpot_ms": 9.0},
            {"strategy": "adaskip+online", "prompt_len": 64, "num_sublayers": 8, "tpot_before_window_ms": 10.5,
             "tpot_after_window_ms": 8.0, "online_drop_predicted_ms": 2.5},
            {"strategy": "adaskip+online", "prompt_len": 64, "num_sublayers": 16, "tpot_before_window_ms": 9.2,
             "tpot_after_window_ms": 9.0, "online_drop_predicted_ms": 0.0}]
    measure.compare_with_offline(rows)
    assert rows[2]["offline_tpot_ms"] == 10.0  # graph decode, like the step times
    assert rows[2]["drop_vs_offline_ms"] == 2.0 and rows[2]["drop_vs_offline_of_predicted"] == 0.8
    assert rows[2]["window_overhead_ms"] == 0.5
    assert rows[3]["offline_tpot_ms"] == 9.0 and rows[3]["drop_vs_offline_of_predicted"] is None
    assert "offline_tpot_ms" not in rows[0]
    cond = {**rows[2], "strategy": "adaskip+online+cond"}
    for key in ("offline_tpot_ms", "drop_vs_offline_ms"):
        del cond[key]
    measure.compare_with_offline(rows + [cond])
    assert cond["offline_tpot_ms"] == 10.0  # the conditional-node run has the same offline twin


def test_skipdecode_e2e_plan_keeps_the_caches_its_ramp_reads():
    # Layers 1 and 2 skipped in prefill; decode starts with only layer 1 skipped, so layer 2's
    # attention runs over the prompt: its cache is kept and filled in prefill.
    p = SkipPlan(4, {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, ramp=True, mode="e2e")
    assert p.attention_layers == {0, 2, 3}
    assert p.phase("prefill").kv_only_attention == {2}
    plain = SkipPlan(4, {2: 1.0, 3: 1.0}, mode="e2e")
    assert plain.attention_layers == {0, 2, 3} and plain.phase("prefill").kv_only_attention == frozenset()
    assert SkipPlan(4, {2: 1.0}, mode="prefill").phase("prefill").kv_only_attention == {1}


def test_device_info_and_commit(monkeypatch):
    monkeypatch.setenv("ADASKIP_GIT_COMMIT", "abc123")
    assert git_commit() == "abc123"  # a copied tree without .git says where it came from
    info = device_info(torch.device("cpu"))
    assert info["device"].startswith("CPU") and info["torch"] == torch.__version__ and "backend" in info


def test_commit_of_a_changed_checkout_says_so(tmp_path, monkeypatch):
    """A tree whose tracked files differ from HEAD did not run HEAD's code: "+dirty"."""
    import subprocess

    from adaskip.benchmarks import common

    monkeypatch.delenv("ADASKIP_GIT_COMMIT", raising=False)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(common, "_PACKAGE_ROOT", tmp_path)
    head = git("rev-parse", "HEAD")
    assert git_commit() == head
    (tmp_path / ".gitignore").write_text("ignored/\n")
    git("add", ".gitignore")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    head = git("rev-parse", "HEAD")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "out.json").write_text("{}")  # what git ignores is not the code
    assert git_commit() == head and common.provenance()["git_dirty"] is False
    (tmp_path / "new.py").write_text("")  # an untracked file may be imported: it counts
    assert git_commit() == head + "+dirty"
    record = common.provenance()
    assert record["git_dirty"] is True and record["git_status"] == ["?? new.py"]
    (tmp_path / "new.py").unlink()
    (tmp_path / "f.py").write_text("x = 2\n")
    assert git_commit() == head + "+dirty" and common.provenance()["git_status"] == [" M f.py"]


def test_provenance_names_the_command_and_the_versions(monkeypatch):
    """Written by the code, never typed: the command as run, the commit, the date and the versions."""
    from adaskip.benchmarks import common

    monkeypatch.setenv("ADASKIP_GIT_COMMIT", "abc123+dirty")
    monkeypatch.setattr(common.sys, "argv", ["/x/.venv/bin/adaskip", "eval", "--out", "a b"])
    record = common.provenance()
    assert record["command"] == "adaskip eval --out 'a b'"
    assert record["git_commit"] == "abc123+dirty" and record["git_dirty"] is True and record["git_status"] is None
    assert record["torch"] == torch.__version__ and record["python"] and record["date"].startswith("20")
    monkeypatch.setattr(common.sys, "argv", [str(common._PACKAGE_ROOT / "adaskip" / "__main__.py"), "bench", "e2e"])
    assert common.command_line() == "python -m adaskip bench e2e"
    monkeypatch.setattr(common.sys, "argv", [str(common._PACKAGE_ROOT / "tests" / "integration" / "x.py"), "out"])
    assert common.command_line() == "python tests/integration/x.py out"
    assert common.command_line(["run", "--prompt", "it's"]) == """adaskip run --prompt 'it'"'"'s'"""
    monkeypatch.setenv("ADASKIP_GIT_COMMIT", "abc123")
    assert common.provenance()["git_dirty"] is None  # a copied tree: unknown, not clean


def test_result_paths_and_json_cleaning(tmp_path):
    assert output_path(tmp_path / "x.json", None, "e2e", "CPU", None) == tmp_path / "x.json"
    assert output_path(None, None, "e2e", "CPU", None) is None
    name = output_path(None, tmp_path, "ops", "NVIDIA H100 80GB HBM3", None).name
    assert name.startswith("ops-h100-80gb-hbm3-") and name.endswith(".json")
    assert json_safe({"a": [float("inf"), 1.0], "b": float("nan")}) == {"a": [None, 1.0], "b": None}


@pytest.mark.parametrize("argv, message", [
    (["--prompt-lens", "4000"], "exceeds the model's context of 2048"),
    (["--budgets", "7"], "out of range"),
    (["--strategies", "adaskip,bogus"], "unknown strategies ['bogus']"),
    (["--model", "smollm2", "--layers", "2"], "--layers shrinks a random-weight config"),
    (["--online-beta", "-1"], "it needs --online"),
    (["--online", "--online-beta", "1.5"], "cosine similarity in [-1, 1]"),
    (["--graph-conditionals"], "it needs --online"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_e2e_errors_are_clear(argv, message, capsys):
    argv = (["--config", "tiny"] if "--model" not in argv else []) + argv
    with pytest.raises(SystemExit) as e:
        main(["bench", "e2e", *argv])
    assert message in str(e.value)


def test_e2e_unknown_config_and_foreign_profile(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--config", "llama-9"])
    assert "invalid choice: 'llama-9'" in capsys.readouterr().err
    from adaskip.benchmarks.models import random_model
    from adaskip.skipping.calibration import calibrate

    other = random_model("tiny", 2, torch.float32, "cpu").model  # 2 layers, not 4
    calibrate(other, [list(range(16))], num_requests=1, prompt_len=16, progress=False).save(tmp_path / "p.json")
    with pytest.raises(SystemExit) as e:
        main(["bench", "e2e", "--config", "tiny", "--profile", str(tmp_path / "p.json"), "--out-dir", str(tmp_path)])
    assert "made for another model" in str(e.value)


def test_e2e_real_weights_from_an_hf_directory(tmp_path):
    """--model DIR: real weights through adaskip.load_model, and transformers on the same tensors."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from adaskip.benchmarks.models import hf_config_dict, model_args, random_weights

    model_dir = tmp_path / "tiny-hf"
    model_dir.mkdir()
    cfg = {**hf_config_dict("tiny", 2), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    save_file(random_weights(model_args("tiny", 2), torch.float32, "cpu", seed=5), str(model_dir / "model.safetensors"))
    out = tmp_path / "real.json"
    result = _run("e2e", "--model", str(model_dir), "--device", "cpu", "--prompt-lens", "16", "--decode-tokens", "2",
                  "--repeats", "1", "--warmup", "0", "--budgets", "2", "--strategies", "adaskip,early-exit",
                  "--out", str(out), "--no-plot")
    assert json.loads(out.read_text())["weights"] == "real" and not out.with_suffix(".png").exists()
    assert result["num_layers"] == 2 and result["logits_parity_rel_err"] < 1e-4
    assert result["baseline"][0]["tpot_ms"]["hf"] > 0
    assert any("random token ids" in n for n in result["notes"])
    assert {r["strategy"] for r in result["rows"]} == {"full", "adaskip", "early-exit"}


def test_decode_breakdown_sorts_kernels_by_kind():
    from adaskip.benchmarks.breakdown import kind_of

    assert kind_of("void adaskip::(anonymous namespace)::split_kv_kernel<c10::BFloat16, 128, 4>(...)") == \
        "attention: decode kernel"
    assert kind_of("pytorch_flash::flash_fwd_splitkv_kernel<...>") == "attention: SDPA"
    assert kind_of("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention: SDPA"
    assert kind_of("void adaskip::gated_gemv_kernel<c10::BFloat16, 8, 1, true>(...)") == "GEMVs (ours: FFN, projections)"
    assert kind_of("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "cuBLAS GEMM / GEMV"
    assert kind_of("void adaskip::fused_add_rms_norm_kernel<...>") == "add + RMSNorm / skips (ours)"
    assert kind_of("void at::native::index_elementwise_kernel<...>") == "rotary, KV writes, sampling, other"


def test_decode_roofline_counts_what_a_step_reads():
    """Weights of the sublayers that run (plus norms, the lm_head and one embedding row per
    sequence) and the K and V of the attention layers that run, at context + 1 slots."""
    from adaskip.benchmarks.breakdown import roofline_bytes
    from behaviour_cases import tiny_model

    model = tiny_model("llama")
    a = model.args
    full = roofline_bytes(model, 100, batch=2)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if a.tie_word_embeddings:
        params += model.lm_head.weight.numel()
    assert full["weight_bytes"] == 4 * (params + 2 * a.hidden_size)
    assert full["kv_bytes"] == 4 * 2 * 2 * a.num_layers * a.num_kv_heads * 101 * a.head_dim
    plan = SkipPlan(a.num_layers, {0: 1.0, 3: 1.0})  # attention 0 and the FFN of layer 1
    part = roofline_bytes(model, 100, batch=2, plan=plan)
    attn0 = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
    ffn1 = sum(p.numel() for p in model.model.layers[1].mlp.parameters())
    assert part["weight_bytes"] == full["weight_bytes"] - 4 * (attn0 + ffn1)
    assert part["kv_bytes"] == full["kv_bytes"] // a.num_layers * (a.num_layers - 1)


def test_decode_breakdown_needs_a_gpu_and_paths_are_checked():
    from adaskip.benchmarks.breakdown import graph_decode_breakdown
    from behaviour_cases import tiny_model

    with pytest.raises(ValueError, match="needs a GPU"):
        graph_decode_breakdown(tiny_model("llama"), 16)
    assert [p.attention for p in e2e.decode_path_variants("kernel/gemv/gemv, sdpa/cublas/cublas")] == ["kernel", "sdpa"]
    for bad, message in (("kernel/gemv", "is not attention/projections/lm_head"),
                         ("kernel/gemv/fast", "decode path lm_head must be one of"), (" , ", "names no paths")):
        with pytest.raises(ValueError, match=message):
            e2e.decode_path_variants(bad)


def test_profile_kernel_times_keep_device_events_only():
    """kernel_ms sums device time per kernel name (us -> ms) and leaves host events out; older
    torch names the attribute self_cuda_time_total."""
    from adaskip.benchmarks.breakdown import kernel_ms

    ev = lambda key, t, dev, old=False: SimpleNamespace(  # noqa: E731
        key=key, device_type=f"DeviceType.{dev}", **({"self_cuda_time_total": t} if old else {"self_device_time_total": t}))
    prof = SimpleNamespace(key_averages=lambda: [ev("gemv", 1500.0, "CUDA"), ev("aten::mm", 900.0, "CPU"),
                                                 ev("gemv", 500.0, "CUDA"), ev("split_kv", 250.0, "CUDA", old=True),
                                                 ev("idle", 0.0, "CUDA")])
    assert kernel_ms(prof) == {"gemv": 2.0, "split_kv": 0.25}


def test_speculative_bench_reports_rounds_and_the_break_even(tmp_path):
    """`bench speculative` on CPU at tiny size: every drafter x k timed beside the full model's
    step, the break-even and the predicted speedups derived from those times."""
    out = tmp_path / "spec.json"
    _run("speculative", "--config", "tiny", "--layers", "2", "--prompt-lens", "32", "--decode-tokens", "6",
         "--repeats", "1", "--warmup", "0", "--budgets", "1,2", "--draft-tokens", "1,3", "--tokens-per-round",
         "1.5,3.5", "--calib-len", "16", "--out", str(out))
    r = json.loads(out.read_text())
    for key in ("device", "torch", "git_commit", "date", "definitions", "profile", "smoke_run"):
        assert key in r
    assert [(row["budget"], row["draft_tokens"]) for row in r["rows"]] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in r["rows"]:
        assert row["step_ms"] > 0 and row["draft_step_ms"] > 0 and row["round_ms"] > 0
        assert row["break_even_tokens_per_round"] == pytest.approx(row["round_ms"] / row["step_ms"])
        assert row["verify_ms"] == pytest.approx(row["round_ms"] - row["draft_tokens"] * row["draft_step_ms"])
        assert row["attention_skipped"] + row["ffn_skipped"] == row["budget"]
        # a value above k + 1 tokens a round cannot happen: no prediction for it
        assert set(row["predicted_speedup"]) == ({"1.5"} if row["draft_tokens"] == 1 else {"1.5", "3.5"})
        assert row["predicted_speedup"]["1.5"] == pytest.approx(1.5 * row["step_ms"] / row["round_ms"])


@pytest.mark.parametrize("argv, message", [
    (["--draft-tokens", "0"], "--draft-tokens must be integers >= 1"),
    (["--tokens-per-round", "0.5"], "--tokens-per-round values are >= 1"),
    (["--strategy", "bogus"], "unknown drafter strategy 'bogus'"),
    (["--budgets", "9"], "out of range"),
    (["--decode-tokens", "1"], "--decode-tokens >= 2"),
])
def test_speculative_bench_errors_are_clear(argv, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "speculative", "--config", "tiny", *argv])
    assert message in str(e.value)
