"""Shared by the benchmark scripts: device facts, git commit, result files."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    if os.environ.get("ADASKIP_GIT_COMMIT"):
        return os.environ["ADASKIP_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info() -> dict:
    from adaskip import ops

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "backend": ops.backend()}
    if not torch.cuda.is_available():
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, sm_count=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info.update(
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            sm_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            mem_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            power_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
        )
        pynvml.nvmlShutdown()
    except Exception as e:  # nvidia-ml-py missing or NVML unavailable: say so, keep going
        info["nvml_error"] = repr(e)
    return info


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def default_result_path(prefix: str, device: str) -> Path:
    slug = device.lower().replace("nvidia", "").strip().replace(" ", "-")
    return ROOT / "bench" / "results" / f"{prefix}-{slug}-{dt.date.today().isoformat()}.json"


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
