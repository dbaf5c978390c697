"""The microbenchmark script runs end to end (on CPU: the reference path, labelled)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ops_runs_and_writes_json(tmp_path):
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ops.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
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
    args = ["--config", "tiny", "--contexts", "32,64", "--decode-tokens", "4", "--repeats", "1"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_e2e.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["logits_parity_rel_err"] < 3e-2
    for row in result["rows"]:
        assert row["prefill_ms"]["ours"] > 0 and row["decode_ms_per_token"]["hf"] > 0
    assert result["plans"] and all(r["prefill_speedup"] > 0 and r["decode_ideal_speedup"] > 1 for r in result["plans"])
