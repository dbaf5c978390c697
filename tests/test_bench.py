"""The microbenchmark script runs end to end (on CPU: the reference path, labelled)."""
import json
import subprocess
import sys
from pathlib import Path

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
