"""The benchmark scripts (thin wrappers of adaskip.benchmarks, called by gpu_check.sh and the
Makefile) still run end to end with their flags (on CPU: the reference path, labelled)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# One thread: the CPU machines running the tests are shared; two threads waiting on each other
# only add noise and time.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _script(name, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_ops_runs_and_writes_json(tmp_path):
    out = tmp_path / "ops.json"
    _script("bench_ops.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    for key in ("device", "torch", "git_commit", "date", "copy_gbps", "rows"):
        assert key in result
    ops_seen = {r["op"] for r in result["rows"]}
    assert {"add_rmsnorm+stats", "add_rmsnorm", "io_similarity_stats", "skip_or_scale(skip)"} <= ops_seen
    assert all(r["time_us"] > 0 for r in result["rows"])
    if not torch.cuda.is_available():
        assert "reference on CPU" in result["path"]


def test_bench_e2e_runs_and_writes_json(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    args = ["--config", "tiny", "--contexts", "32", "--decode-tokens", "3", "--repeats", "1", "--budgets", "2"]
    proc = _script("bench_e2e.py", *args, "--out", str(out))
    assert "| prompt |" in proc.stdout  # the markdown tables
    result = json.loads(out.read_text())
    assert result["logits_parity_rel_err"] < 3e-2
    for row in result["baseline"]:
        assert row["ttft_ms"]["ours"] > 0 and row["tpot_ms"]["hf"] > 0
    plans = [r for r in result["rows"] if r["strategy"] != "full"]
    assert plans and all(r["ttft_speedup"] > 0 and r["ideal_tpot_speedup"] > 1 for r in plans)
    assert out.with_suffix(".png").stat().st_size > 0
