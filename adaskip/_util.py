"""Small helpers every layer may use: the JSON writer and the progress bar."""
from __future__ import annotations

import json
import math
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
    """Writes `data` as indented standard JSON (non-finite floats as null), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")
    return path


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
