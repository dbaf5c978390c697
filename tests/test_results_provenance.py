"""Every file under bench/results/ is the unedited output of a command: its JSON records the run
that wrote it (the command as run, commit, dirty state, date, versions), written by the code, and
the log of that run lies beside it. Files written before the writers recorded all of this are
listed in LEGACY, each named in bench/results/README.md's "What the older files lack"; the list
may only shrink (an entry that no longer lacks anything, or is gone, fails here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaskip.skipping.profile import FORMAT as PROFILE_FORMAT

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
# What benchmarks.common.provenance() writes: the command, the commit, whether the tree
# differed from it (untracked files included), the date, and the versions
RUN_KEYS = ("command", "git_commit", "git_dirty", "date", "torch", "python")
PROGRAMS = ("adaskip ", "python -m adaskip ", "python ")

# Written before the writers recorded their run and kept a log, by top-level file or folder, with
# the name bench/results/README.md's "What the older files lack" gives each (and says what it
# lacks). Only a rerun, or a deletion with the README lines quoting it, takes an entry off.
_H100 = "-h100-80gb-hbm3-2026-11-22"
LEGACY = {
    f"ops{_H100}.json": "`ops-…`",
    f"ffn-gated{_H100}.json": "`ffn-gated-…` (73ea47d)",
    f"ffn-gated{_H100}-c9f1ae9.json": "`ffn-gated-…-c9f1ae9`",
    f"e2e-llama-3.1-8b{_H100}.json": "`e2e-…`",
    f"e2e-plans-llama-3.1-8b{_H100}.json": "`e2e-plans-…`",
    f"e2e-graphs-llama-3.1-8b{_H100}.json": "`e2e-graphs-…`",
    f"e2e-online-llama-3.1-8b{_H100}.json": "`e2e-online-…`",
    f"e2e-online-forced-llama-3.1-8b{_H100}.json": "`e2e-online-forced-…`",
}


def _runs(data) -> list:
    """The run records of a result file: the file itself, or each of its `runs`."""
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return data["runs"]
    return [data]


def lacks(path: Path) -> list:
    """What `path` (a JSON under RESULTS) lacks of a result file's record of its run; [] for none."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"not JSON: {e}"]
    problems = []
    is_profile = isinstance(data, dict) and data.get("format") == PROFILE_FORMAT
    for i, run in enumerate([data.get("provenance") or {}] if is_profile else _runs(data)):
        where = "provenance" if is_profile else (f"runs[{i}]" if run is not data else "the file")
        if not isinstance(run, dict):
            problems.append(f"{where} is not a JSON object")
            continue
        missing = [k for k in RUN_KEYS if k not in run]
        if missing:
            problems.append(f"{where} has no {', '.join(missing)}")
        command = run.get("command")
        if "command" in run and not _as_run(command):
            problems.append(f"{where}'s command is not the command line as run: {command!r}")
        if not is_profile and "device" not in run:
            problems.append(f"{where} names no device")
    if not _logs_beside(path):
        problems.append("no log of the run beside it")
    return problems


def _as_run(command) -> bool:
    """Whether `command` is what benchmarks.common.command_line writes: the program as run
    (`adaskip`, `python -m adaskip` or `python <script>`) and its arguments; not the constant
    "adaskip eval" that `adaskip eval` wrote before it recorded its argv."""
    return isinstance(command, str) and command.startswith(PROGRAMS) and command.strip() != "adaskip eval"


def _logs_beside(path: Path) -> list:
    """Logs in the file's folder or a folder above it inside its result folder; for a file at the
    top of RESULTS, logs named after it."""
    if path.parent == RESULTS:
        return sorted(RESULTS.glob(path.stem + "*.log"))
    logs, folder = [], path.parent
    while folder != RESULTS:
        logs += sorted(folder.glob("*.log"))
        folder = folder.parent
    return logs


def _legacy_entry(path: Path):
    top = path.relative_to(RESULTS).parts[0]
    return top if top in LEGACY else None


def _result_files() -> list:
    return sorted(p for p in RESULTS.rglob("*.json"))


def test_every_result_file_records_its_run_and_has_its_log():
    problems = {str(p.relative_to(RESULTS)): lacks(p) for p in _result_files() if _legacy_entry(p) is None}
    bad = {k: v for k, v in problems.items() if v}
    assert not bad, ("result files must be the unedited output of a writer that records its run, with the log "
                     f"of that run beside them (or be rerun): {bad}")


@pytest.mark.parametrize("entry", sorted(LEGACY))
def test_a_legacy_entry_still_lacks_what_it_says_and_is_documented(entry):
    path = RESULTS / entry
    assert path.exists(), f"{entry} is gone: take it off LEGACY"
    files = [path] if path.is_file() else sorted(path.rglob("*.json"))
    assert any(lacks(p) for p in files), f"every file of {entry} now records its run: take it off LEGACY"
    readme = (RESULTS / "README.md").read_text()
    section = " ".join(readme.split("## What the older files lack", 1)[1].split("\n## ", 1)[0].split())
    assert LEGACY[entry] in section, \
        f"{entry} is not named ({LEGACY[entry]}) in bench/results/README.md's 'What the older files lack'"


def test_the_check_finds_a_hand_made_file_and_passes_a_written_one(tmp_path, monkeypatch):
    """lacks() on files of its own: one as a writer leaves it, one with the command typed in."""
    from adaskip.benchmarks.common import device_info, provenance

    monkeypatch.setattr(__name__ + ".RESULTS", tmp_path)
    folder = tmp_path / "eval-x"
    folder.mkdir()
    written = folder / "eval.json"
    written.write_text(json.dumps({**provenance(["eval", "--tasks", "ppl"]), **device_info(), "rows": []}))
    assert lacks(written) == ["no log of the run beside it"]
    (folder / "eval.log").write_text("ran\n")
    assert lacks(written) == []
    typed = folder / "typed.json"
    typed.write_text(json.dumps({"command": "adaskip eval", "git_commit": "abc", "date": "2026-12-06",
                                 "device": "CPU", "rows": []}))
    assert lacks(typed) == ["the file has no git_dirty, torch, python",
                            "the file's command is not the command line as run: 'adaskip eval'"]
    runs = folder / "runs.json"
    runs.write_text(json.dumps({"runs": [json.loads(written.read_text()), {"git_commit": "abc"}]}))
    assert lacks(runs)[0].startswith("runs[1] has no command")
