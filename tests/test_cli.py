"""The command line on the embedded SmolLM2 (CPU): calibrate, run, clear errors."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from adaskip.data import essay_paths  # noqa: E402
from adaskip.runtime.gguf import find_smollm2_gguf  # noqa: E402

try:
    find_smollm2_gguf()
    ESSAY = essay_paths()[0]
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)


def _cli(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "adaskip", *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "profile.json"
    _cli("calibrate", "--data", str(ESSAY), "--num-requests", "2", "--prompt-len", "256", "--out", str(out))
    return out


def test_calibrate_writes_a_profile(profile):
    data = json.loads(profile.read_text())
    assert data["num_requests"] == 2 and len(data["similarity"]) == 60
    # provenance written by the code, as in every result file: the command as run, commit, dirty state
    run = data["provenance"]
    assert run["command"] == f"python -m adaskip calibrate --data {ESSAY} --num-requests 2 --prompt-len 256 " \
                             f"--out {profile}"
    assert run["git_commit"] and run["git_dirty"] in (True, False, None) and run["date"] and run["torch"]


def test_run_prints_answers_plan_and_timings_as_json(profile):
    proc = _cli("run", "--profile", str(profile), "--num-sublayers", "8", "--max-new-tokens", "6", "--window", "3",
                "--prompt", "Name three colours.", "--json", "--cuda-graph")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["plan"]["strategy"] == "adaskip" and len(r["plan"]["skip_scales"]) == 8
    for run in (r["full"], r["adaskip"]):
        assert run["answer"] and run["ttft_s"] > 0 and run["tpot_s"] > 0 and run["kv_cache_bytes"] > 0
        if torch.cuda.is_available():  # one graph captured per plan
            assert run["graph_capture_s"] > 0
        else:  # without a GPU, --cuda-graph decodes eagerly
            assert run["graph_capture_s"] == 0
    assert r["ttft_speedup"] > 0 and r["tpot_speedup"] > 0


def test_run_text_report_and_baseline_without_profile():
    proc = _cli("run", "--strategy", "early-exit", "--num-sublayers", "4", "--max-new-tokens", "4",
                "--prompt", "Say hello.")
    assert "strategy early-exit" in proc.stdout and "time to first token" in proc.stdout


def test_run_lossless_gives_the_full_models_answer(profile):
    proc = _cli("run", "--profile", str(profile), "--num-sublayers", "12", "--max-new-tokens", "12", "--json",
                "--lossless", "--draft-tokens", "3", "--prompt", "Name three colours.")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["adaskip"]["answer"] == r["full"]["answer"]
    spec = r["adaskip"]["speculative"]
    assert spec["draft_tokens"] == 3 and spec["rounds"] > 0 and 0 <= spec["acceptance_rate"] <= 1
    text = _cli("run", "--profile", str(profile), "--num-sublayers", "12", "--max-new-tokens", "8", "--lossless",
                "--prompt", "Name three colours.").stdout
    assert "the full model verifies" in text and "accepted" in text
    proc = _cli("run", "--profile", str(profile), "--num-sublayers", "12", "--max-new-tokens", "12", "--json",
                "--lossless", "--online-draft", "--draft-tokens", "3", "--prompt", "Name three colours.")
    online = json.loads(proc.stdout.strip().splitlines()[-1])
    assert online["adaskip"]["answer"] == r["full"]["answer"]  # the drafter's gates change no token
    proc = _cli("run", "--profile", str(profile), "--online-draft", "--prompt", "hi", ok=False)
    assert "add --lossless" in proc.stderr and "Traceback" not in proc.stderr


def test_errors(profile, tmp_path):
    proc = _cli("run", "--strategy", "adaskip", "--prompt", "hi", ok=False)
    assert proc.returncode != 0 and "needs an importance profile" in proc.stderr
    data = json.loads(profile.read_text())
    data["fingerprint"]["num_layers"] = 32
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    proc = _cli("run", "--profile", str(other), "--prompt", "hi", ok=False)
    assert "another model" in proc.stderr
    proc = _cli("run", "--profile", str(profile), "--alpha", "40", "--prompt", "hi", ok=False)
    assert "alpha must be in" in proc.stderr
    proc = _cli("run", "--strategy", "full", "--prompt", "word " * 9000, ok=False)
    assert "exceeds the model's context" in proc.stderr


def test_calibrate_with_search_records_sources_and_searches(tmp_path):
    out = tmp_path / "p.json"
    proc = _cli("calibrate", "--data", str(ESSAY), "--num-requests", "1", "--prompt-len", "128", "--search",
                "similarity,blockpruner", "--search-max", "3", "--search-candidates", "2", "--search-requests", "1",
                "--out", str(out))
    data = json.loads(out.read_text())
    assert data["sources"] == [ESSAY.name]
    assert len(data["search"]["similarity"]["order"]) == 3 and "similarity search" in proc.stdout
    bp = data["search"]["blockpruner"]
    assert bp["scales"] == [1.0] * 3 and bp["candidates"] == 2 and bp["notes"]["variant"] == "shortlist"


def test_eval_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "eval"
    proc = _cli("eval", "--calibration-data", "essays", "--num-requests", "2", "--prompt-len", "256",
                "--strategies", "adaskip,shortgpt,greedy-loss,early-exit", "--budgets", "2,3",
                "--speedups", "1.05", "--context-len", "2048", "--search-requests", "1", "--search-candidates", "2",
                "--window-len", "128", "--windows", "2", "--tasks", "ppl,passkey,generation", "--retrieval-lengths",
                "256", "--retrieval-depths", "0.5", "--retrieval-samples", "2", "--retrieval-batch", "2",
                "--generation-lengths", "160", "--generation-prompts", "1", "--generation-tokens", "4",
                "--out", str(out))
    report = json.loads((out / "eval.json").read_text())
    rows = report["rows"]
    assert rows[0]["strategy"] == "full" and rows[0]["metrics"]["top1_agreement"] == 1.0
    # The full model finds both pass keys; every row has a passkey accuracy with its per-cell split.
    assert rows[0]["metrics"]["passkey_accuracy"] == 1.0
    assert all(r["details"]["passkey"]["total"] == 2 and 0 <= r["metrics"]["passkey_accuracy"] <= 1 for r in rows)
    by = {(r["strategy"], r["budget"], r["target_speedup"]): r for r in rows}
    assert ("early-exit", 3, None) not in by and any("odd" in n for n in report["notes"])
    for s in ("adaskip", "shortgpt", "greedy-loss"):
        r = by[(s, 2, None)]
        assert len(r["skipped"]) == 2
        assert r["metrics"]["perplexity"] > 0 and 0 <= r["metrics"]["top1_agreement"] <= 1
        speed = [x for x in rows if x["strategy"] == s and x["target_speedup"] == 1.05]
        assert speed and speed[0]["predicted_speedup"] >= 1.05 - 1e-9
    # Calibration read the first essays; the ppl documents leave them out.
    profile = json.loads((out / "profile.json").read_text())
    assert profile["sources"] and "greedy" not in profile["search"] and "loss" in profile["search"]
    assert profile["provenance"] == {k: report[k] for k in profile["provenance"]}  # the eval's own run
    assert any("left out because calibration read them" in n for n in report["notes"])
    for name in ("eval.md", "quality.png", "similarity-heatmap.png"):
        assert (out / name).stat().st_size > 200
    assert (out / "eval.md").read_text().splitlines()[2].startswith("| full |")
    assert "| shortgpt |" in proc.stdout and report["git_commit"] and report["date"]
    # provenance written by the code: the command as run (a rerun of it writes this file again)
    assert report["command"] == "python -m adaskip eval --calibration-data essays " + " ".join(
        proc.args[proc.args.index("--calibration-data") + 2:])
    assert report["git_dirty"] in (True, False, None) and "torch_cuda" in report
    # generation: the bf16 floor first, adaskip's plan with and without online learning
    names = [r["name"] for r in report["generation"]["rows"]]
    assert names[:3] == ["full/bfloat16", "adaskip@2", "adaskip@2/no-online"] and "shortgpt@2" in names
    assert report["generation"]["prompts"][0]["tokens"] <= 160 and "generation" in report["timings_s"]
    md = (out / "eval.md").read_text()
    assert "| full/bfloat16 | – |" in md and "| full | 2/2 (1.00) |" in md


def test_eval_errors(tmp_path):
    proc = _cli("eval", "--tasks", "ppl,quiz", "--out", str(tmp_path), ok=False)
    assert "unknown eval tasks ['quiz']" in proc.stderr
    proc = _cli("eval", "--tasks", "longbench", "--out", str(tmp_path), ok=False)
    assert "--longbench-dir" in proc.stderr
    proc = _cli("eval", "--strategies", "full", "--budgets", "0", "--window-len", "9000", "--out", str(tmp_path),
                ok=False)
    assert "exceed the model's context of 8192" in proc.stderr
    proc = _cli("eval", "--tasks", "generation", "--generation-lengths", "8190", "--out", str(tmp_path), ok=False)
    assert "plus 64 new tokens exceed the model's context of 8192" in proc.stderr


def test_eval_longbench_on_the_fixtures(tmp_path):
    """The longbench task through the command: every plan scores every dataset asked for."""
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "longbench"
    out = tmp_path / "lb"
    _cli("eval", "--calibration-data", str(ESSAY), "--num-requests", "1", "--prompt-len", "128",
         "--strategies", "shortgpt", "--budgets", "2", "--tasks", "longbench", "--longbench-dir", str(fixtures),
         "--longbench-datasets", "trec,triviaqa", "--limit", "1", "--out", str(out))
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["full", "shortgpt"]
    for r in rows:
        assert set(r["metrics"]) == {"longbench/trec", "longbench/triviaqa"}
        assert all(0 <= v <= 100 for v in r["metrics"].values())
