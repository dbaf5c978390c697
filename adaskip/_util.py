"""Small helpers every layer may use: the JSON writer, the progress bar and the CUDA-event timer."""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path


def json_safe(value):
    """JSON has no inf / nan: they become None (json.dumps would write non-standard Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path, data) -> Path:
    """Writes `data` as indented standard JSON (non-finite floats as null), creating folders;
    whole or not at all (write_atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, (json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n").encode())


def write_atomic(path, blob: bytes) -> Path:
    """Writes `blob` to `path` through a temporary file beside it and a rename: an interrupt or
    a full disk leaves the old file (or none), never half of the new one."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the write, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected a file name", str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _new_file_mode(path: Path) -> int:
    """The mode the file replaced had, or what open() would give a new one (0o666 less the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class _Quiet:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, desc: str, unit: str):
    """A tqdm bar, or a silent stand-in when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _Quiet()
        return tqdm(total=total, desc=desc, unit=unit)
    return _Quiet()


def check_room(prompt_lengths, max_new_tokens: int, context: int, what: str = "prompts") -> None:
    """Fails before any work when a prompt plus the tokens to generate would not fit the model's
    context (generate would refuse it only when its turn comes)."""
    too_long = [n for n in prompt_lengths if n + max_new_tokens > context]
    if too_long:
        raise ValueError(f"adaskip: {what} of {max(too_long)} tokens plus {max_new_tokens} new tokens exceed "
                         f"the model's context of {context} tokens")


def cuda_event_seconds(run, repeats: int, *, before=None, per_call: int = 1, back_to_back: bool = False) -> list:
    """Seconds of each of `repeats` calls of run() on the current CUDA stream, by CUDA events,
    divided by `per_call` (the calls run() makes). before(), if given, runs untimed ahead of each.
    back_to_back: no wait between the calls, so that the host's launches hide behind the device's
    work (device throughput); else each call is waited for before the next begins."""
    import torch

    events = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        if not back_to_back:
            end.synchronize()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 / per_call for start, end in events]
