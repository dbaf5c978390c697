"""Packaging: the extension loads where it was built, and the package degrades cleanly without it."""
import importlib.metadata
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import adaskip
from adaskip import ops


def test_backend_reports_the_active_path():
    assert ops.backend() in ("cuda", "reference")
    assert (ops.backend() == "cuda") == (ops.extension_error() is None)


@pytest.mark.skipif(os.environ.get("ADASKIP_CUDA") != "1", reason="only where the CUDA build is required (CI)")
def test_extension_was_built_and_loads():
    assert ops.backend() == "cuda", ops.extension_error()
    assert hasattr(torch.ops.adaskip, "fused_add_rms_norm")
    from adaskip import _build_info
    assert _build_info.TORCH_VERSION == torch.__version__


def test_import_without_extension_warns_and_runs_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['adaskip._C'] = None\n"  # makes `from . import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import adaskip, torch\n"
        "assert adaskip.ops.backend() == 'reference', adaskip.ops.backend()\n"
        "assert any('adaskip._C is not available' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "x, r = torch.randn(3, 8), torch.randn(3, 8)\n"
        "adaskip.ops.fused_add_rms_norm(x, r, torch.ones(8))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cuda_tensor_without_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with pytest.raises(RuntimeError, match="CUDA extension adaskip._C is not available"):
        ops._op("skip_or_scale", fake_cuda)


def test_version_is_the_one_pyproject_declares_and_the_installed_metadata_carries():
    """_version.py is written by hand, pyproject.toml is what pip builds from: they must agree, and
    the installed distribution must be this version (else the tests run against a stale install)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert adaskip.__version__ == pyproject["project"]["version"]
    assert importlib.metadata.version("adaskip") == adaskip.__version__
