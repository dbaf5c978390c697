"""The package's layers import only downward, and no module imports itself back in a cycle.

ops (kernels and references) <- runtime <- skipping <- evaluation, hf (the transformers
adapter) and exporting <- benchmarks <- cli. Helpers
that any layer may use (_util, _version, data) sit below ops; the package's __init__ and
__main__ sit above everything. Every import counts, including those inside functions.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adaskip"
LAYERS = {"_util": 0, "_version": 0, "data": 0, "_C": 0, "_build_info": 0, "ops": 1, "runtime": 2,
          "skipping": 3, "evaluation": 4, "hf": 4, "exporting": 4, "benchmarks": 5, "cli": 6, "__main__": 7, "": 7}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set:
    """Modules of adaskip (dotted, without 'adaskip.') that `module` imports anywhere."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            # `import adaskip` is the top-level package (""), above every layer
            found |= {a.name[len("adaskip."):] for a in node.names if a.name.startswith("adaskip.")}
            found |= {"" for a in node.names if a.name == "adaskip"}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module != "adaskip" and not (node.module or "").startswith("adaskip."):
                    continue
                base = (node.module or "")[len("adaskip"):].lstrip(".")
            else:
                parts = module.split(".") if module else []
                package = parts if is_package else parts[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import ops` imports the module ops
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if _is_module(candidate) else base)
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or dotted in ("_C", "_build_info")


def _graph() -> dict:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in _graph() if m.split(".")[0] not in LAYERS]
    assert not unknown, f"modules outside the layer map: {unknown}"


def _shown(module: str) -> str:
    return module or "adaskip (the top-level package)"


def test_imports_point_downward():
    # The top-level package ("") counts as a target too: `from adaskip import generate` (or
    # `from .. import plan`) inside a layer is an upward import of the public API.
    upward = [f"{_shown(m)} -> {_shown(t)}" for m, targets in _graph().items() for t in targets
              if _layer(t) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: {t for t in targets if t != m} for m, targets in _graph().items()}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checks above would catch a violation: an ops module importing the runtime."""
    fake = tmp_path / "adaskip"
    (fake / "ops").mkdir(parents=True)
    (fake / "runtime").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "runtime" / "__init__.py").write_text("from .. import ops\n")
    (fake / "ops" / "__init__.py").write_text("def f():\n    from ..runtime import model\n")
    (fake / "runtime" / "model.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="ops -> runtime"):
        test_imports_point_downward()
    (fake / "runtime" / "model.py").write_text("from ..ops import f\n")
    (fake / "ops" / "__init__.py").write_text("from ..runtime import model\n")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


@pytest.mark.parametrize("statement", ["from adaskip import generate", "from .. import generate", "import adaskip",
                                       "from adaskip import __version__ as v"])
def test_the_checker_sees_an_import_of_the_top_level_api(tmp_path, monkeypatch, statement):
    """A layer that imports a name of the package's own __init__ reaches above every layer."""
    fake = tmp_path / "adaskip"
    (fake / "runtime").mkdir(parents=True)
    (fake / "__init__.py").write_text("from .runtime import generate\n")
    (fake / "runtime" / "__init__.py").write_text("from .model import generate\n")
    (fake / "runtime" / "model.py").write_text(f"def generate():\n    {statement}\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"runtime.model -> adaskip \(the top-level package\)"):
        test_imports_point_downward()
