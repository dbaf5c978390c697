"""Every function in adaskip/ reads as named steps: none is longer than MAX_LINES lines (from its
`def` to its last line, docstring included), as gpt-fast keeps its own."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adaskip"
MAX_LINES = 80


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({length} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for name, line, length in _functions(path)
            if length > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines; split them into named steps: {long}"


def test_the_walk_sees_nested_functions_and_methods(tmp_path):
    source = "class A:\n    def f(self):\n        def g():\n" + "            pass\n" * 90
    path = tmp_path / "m.py"
    path.write_text(source)
    found = {name: length for name, _, length in _functions(path)}
    assert found == {"f": 92, "g": 91}
