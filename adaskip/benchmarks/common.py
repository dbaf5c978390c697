"""What every benchmark result carries so that it can be trusted later: the device (with the
driver and clocks from NVML on a GPU, since clocks and drivers move timings), the software
versions, the git commit and the date; plus the timing helpers the benchmarks share."""
from __future__ import annotations

import datetime as dt
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# The checkout this package was imported from, when it is one (an editable install); a wheel
# install has no git history to ask.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


def git_commit() -> str:
    """ADASKIP_GIT_COMMIT when set (a copied tree has no .git), else `git rev-parse HEAD` of the
    checkout the package lives in, with "+dirty" when its files differ from it, untracked files
    that git does not ignore included (the code that ran is then not that commit), else
    "unknown"."""
    return git_state()[0]


def git_state() -> tuple:
    """(commit, status): git_commit()'s value and the lines of `git status --porcelain` (untracked
    files included; at most 100), or None for the status when it cannot be known (a tree without
    .git, whose commit came from ADASKIP_GIT_COMMIT)."""
    if os.environ.get("ADASKIP_GIT_COMMIT"):
        return os.environ["ADASKIP_GIT_COMMIT"], None
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=_PACKAGE_ROOT, capture_output=True,  # noqa: E731
                                        text=True, check=True, timeout=10).stdout
        head = run("rev-parse", "HEAD").strip() or "unknown"
        status = [line for line in run("status", "--porcelain").splitlines() if line.strip()]
        if head != "unknown" and status:
            head += "+dirty"
        return head, status[:100]
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def command_line(argv=None) -> str:
    """The command as run, quoted for a shell: the program (`adaskip` for the console script or
    the API, `python -m adaskip` for the module, else the script's path) and `argv` (default
    sys.argv[1:])."""
    program = sys.argv[0] if sys.argv and sys.argv[0] else "adaskip"
    path = Path(program)
    if argv is None:
        argv = sys.argv[1:]
        if path.name == "__main__.py" and path.parent.name == "adaskip":
            program = "python -m adaskip"
        elif path.name == "adaskip":
            program = "adaskip"
        else:
            try:  # a script of this checkout: its path from the checkout's root
                program = "python " + str(path.resolve().relative_to(_PACKAGE_ROOT))
            except ValueError:
                program = "python " + program
    else:  # main(argv) called in-process: what the console script would run
        program = "adaskip"
    return " ".join([program, *(shlex.quote(str(a)) for a in argv)])


def provenance(argv=None) -> dict:
    """What every result file records about the run that wrote it, written by the code: the
    command line (command_line), the commit and whether the tree differed from it (git_state),
    the date, and the software versions (torch, its CUDA, Python; device_info adds the device and,
    on a GPU, the driver). Take it when the run starts: files the run writes are then not in it."""
    commit, status = git_state()
    dirty = bool(status) if status is not None else (True if commit.endswith("+dirty") else None)
    return {"command": command_line(argv), "git_commit": commit, "git_dirty": dirty, "git_status": status,
            "date": now_iso(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version()}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def device_info(device: Optional[torch.device] = None) -> dict:
    """Device and software facts. On a GPU: torch's view of it, then NVML's (name, driver, memory,
    current and max clocks, power limit); an NVML failure is recorded, not raised."""
    from adaskip import ops

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "backend": ops.backend(),
            # the one-row decode GEMV kernel: forced by the environment, or chosen per launch
            "gemv_pipeline": os.environ.get("ADASKIP_GEMV_PIPELINE") or "auto"}
    if device.type != "cuda":
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        info["torch_threads"] = torch.get_num_threads()
        return info
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info.update(device=props.name, sm_count=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    try:
        info.update(_nvml_info(index, props))
    except Exception as e:  # nvidia-ml-py missing or NVML unavailable: say so, keep going
        info["nvml_error"] = repr(e)
    return info


def _nvml_info(index: int, props) -> dict:
    import pynvml

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    pynvml.nvmlInit()
    try:
        handle = None
        uuid = getattr(props, "uuid", None)
        if uuid is not None:  # the same GPU whatever CUDA_VISIBLE_DEVICES renumbers
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except pynvml.NVMLError:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "nvml_name": text(pynvml.nvmlDeviceGetName(handle)),
            "driver": text(pynvml.nvmlSystemGetDriverVersion()),
            "cuda_driver": pynvml.nvmlSystemGetCudaDriverVersion(),
            "memory_total_gib": round(mem.total / 2**30, 1),
            "memory_used_gib": round(mem.used / 2**30, 1),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        }
    finally:
        pynvml.nvmlShutdown()


def result_name(prefix: str, device: str, suffix: str = ".json") -> str:
    """<prefix>-<device slug>-<date><suffix>, the naming of bench/results."""
    slug = device.lower().replace("nvidia", "").strip()
    slug = "-".join("".join(c if c.isalnum() or c in "-." else " " for c in slug).split())
    return f"{prefix}-{slug}-{dt.date.today().isoformat()}{suffix}"


def output_path(out, out_dir, prefix: str, device: str, fallback_dir=None) -> Optional[Path]:
    """--out as given; else a result name in --out-dir, else in `fallback_dir`; else None."""
    if out is not None:
        return Path(out)
    folder = out_dir if out_dir is not None else fallback_dir
    return None if folder is None else Path(folder) / result_name(prefix, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time of a block, synchronising a GPU on both ends so that the block's kernels are
    inside it (perf_counter on a CPU, where calls are synchronous anyway)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds = float("nan")

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def median(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def ratio(a: Optional[float], b: Optional[float], digits: int = 4) -> Optional[float]:
    """a / b rounded, or None when either is missing or b is not positive."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return round(a / b, digits)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_device(device_arg: Optional[str], dtype_arg: Optional[str]) -> tuple:
    """(device, on_gpu, dtype) of a benchmark run: --device (default cuda if available, else
    cpu) and --dtype (default bf16 on a GPU, fp32 on a CPU); a GPU run needs the CUDA extension."""
    from adaskip import ops
    from adaskip.runtime.loading import resolve_device

    device = resolve_device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and ops.backend() != "cuda":
        raise ValueError(f"a GPU run needs the CUDA extension, which is not loaded: {ops.extension_error()}")
    dtype = DTYPES[dtype_arg] if dtype_arg else (torch.bfloat16 if on_gpu else torch.float32)
    return device, on_gpu, dtype
