"""Shared by the benchmark scripts: puts the checkout on sys.path (so the scripts run without an
install) and names bench/results, where their GPU results go by default. The benchmark code
itself lives in adaskip.benchmarks, installed with the package."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
