"""Shared by the benchmark scripts: device facts, git commit, result files. The code lives in
adaskip.benchmarks.common (installed with the package); this keeps the scripts' imports and
their default of writing into bench/results."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adaskip.benchmarks import common as _common  # noqa: E402
from adaskip.benchmarks.common import device_info, git_commit, now_iso, write_json  # noqa: E402,F401

RESULTS = ROOT / "bench" / "results"
__all__ = ["ROOT", "RESULTS", "default_result_path", "device_info", "git_commit", "now_iso", "write_json"]


def default_result_path(prefix: str, device: str) -> Path:
    return _common.default_result_path(prefix, device, RESULTS)
