"""The README cannot drift from bench/results/: its marked result sections are what `adaskip
report --readme` renders from the result files (checked here on the real README), a changed figure
is caught by --check, and the prose templates hold no number that is not read from a result file
(or declared a setting of the run)."""
import re
import shutil
from pathlib import Path

import pytest

from adaskip.benchmarks import readme
from adaskip.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def test_the_readme_sections_match_the_results(capsys):
    main(["report", "--readme", str(ROOT / "README.md"), "--check"])
    assert "every marked section and registered figure matches" in capsys.readouterr().out
    text = (ROOT / "README.md").read_text()
    assert set(readme.sections(text)) == set(readme.SECTIONS), "a section the renderer knows is not in the README"


@pytest.mark.parametrize("name", sorted(readme.TEMPLATES))
def test_every_number_in_the_prose_comes_from_a_result_file(name):
    rest = re.sub(r"\{[^}]*\}", "", readme.TEMPLATES[name])
    for literal in readme.LITERALS[name]:
        rest = rest.replace(literal, "")
    assert not re.findall(r"\d[\d.,]*", rest), f"section {name!r} types a number instead of reading it"


def test_a_changed_figure_fails_the_check_and_rendering_restores_it(tmp_path, capsys):
    good = (ROOT / "README.md").read_text()
    drifted = good.replace("gates off 0-0.375 extra FFNs per request on\nSmolLM2",
                           "gates nothing on\nSmolLM2", 1)
    assert drifted != good
    copy = tmp_path / "README.md"
    copy.write_text(drifted)
    with pytest.raises(SystemExit) as e:
        main(["report", "--readme", str(copy), "--results", str(RESULTS), "--check"])
    assert "online-learning" in str(e.value.code) and copy.read_text() == drifted
    main(["report", "--readme", str(copy), "--results", str(RESULTS)])
    assert copy.read_text() == good


def test_a_gpu_figure_names_its_commit_and_whether_the_kernels_changed(monkeypatch):
    results = readme.Results(RESULTS)
    for changed, says in ((True, "measured on older kernels"), (False, ""), (None, "no git history")):
        monkeypatch.setattr(readme.Results, "kernels_changed_since", lambda self, c, v=changed: v)
        text = readme.measured_on(results, readme.GPU_FORCED)
        assert text.startswith("2026-11-22, commit f9a652e") and says in text
        assert (changed is False) == (text == "2026-11-22, commit f9a652e")


def test_unknown_or_repeated_sections_and_missing_files_are_refused(tmp_path):
    section = "<!-- adaskip:report {} -->\nx\n<!-- /adaskip:report -->\n"
    with pytest.raises(ValueError, match="'bogus', which the renderer does not know"):
        readme.sections(section.format("bogus"))
    with pytest.raises(ValueError, match="marks section 'lossless' twice"):
        readme.sections(section.format("lossless") * 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="which does not exist"):
        readme.render(section.format("lossless"), tmp_path / "empty")
    shutil.rmtree(tmp_path / "empty")


def test_the_targets_table_joins_the_evals_of_every_length(tmp_path):
    """Issue 29's table: a row per plan of the 2k eval, the pass keys and needles of each length
    from whichever eval of that length ran the task, a dash where none did."""
    import json

    def row(strategy, budget, tasks, length=2048, **extra):  # an eval row: its cells at one length
        details = {t: {"by_length": {str(length): {"correct": c, "total": n}}, "correct": c, "total": n}
                   for t, (c, n) in tasks.items()}
        return {"strategy": strategy, "budget": budget, "predicted_speedup": extra.pop("speed", 1.0),
                "metrics": extra.pop("metrics", {}), "details": details, **extra}

    def write(folder, rows):
        d = tmp_path / readme.TARGETS / folder
        d.mkdir(parents=True)
        notes = ["predicted speedups: roofline model of L20 (bf16 dense), prefill at 6144 tokens"]
        (d / "eval.json").write_text(json.dumps({"rows": rows, "notes": notes}))

    tol = dict(streaming_groups=36, min_agreement=0.8, min_retrieval=0.9)
    write("2k", [row("full", 0, {"passkey": (23, 24), "needle": (24, 24)}, metrics={"perplexity": 23.15}),
                 row("greedy-kl", 8, {"passkey": (22, 24), "needle": (19, 24)}, speed=1.159,
                     metrics={"perplexity": 35.93}),
                 row("greedy-kl", 0, {"passkey": (24, 24), "needle": (23, 24)}, speed=1.201, **tol)])
    write("4k-passkey", [row("full", 0, {"passkey": (24, 24)}, 4096),
                         row("greedy-kl", 8, {"passkey": (20, 24)}, 4096, speed=1.159),
                         row("greedy-kl", 0, {"passkey": (21, 24)}, 4096, speed=1.201, **tol)])
    write("4k-needle", [row("full", 0, {"needle": (24, 24)}, 4096),
                        row("greedy-kl", 0, {"needle": (22, 24)}, 4096, speed=1.201, **tol)])
    write("6k", [row("full", 0, {"passkey": (10, 12), "needle": (12, 12)}, 6144)])
    lines = readme.targets_table(readme.Results(tmp_path)).splitlines()
    assert lines[0].startswith("| plan | predicted prefill at 6144 tokens | perplexity (essays) | pass keys 2k / 4k / 6k")
    assert lines[2] == "| full | 1.000x | 23.15 | 23 of 24 / 24 of 24 / 10 of 12 | 24 of 24 / 24 of 24 / 12 of 12 |"
    assert lines[3] == "| `greedy-kl` 8 sublayers | 1.159x | 35.93 | 22 of 24 / 20 of 24 / – | 19 of 24 / – / – |"
    assert lines[4] == ("| `greedy-kl` by tolerance (`--min-agreement` 0.8 `--min-retrieval` 0.9): 36 streaming groups "
                        "| 1.201x | – | 24 of 24 / 21 of 24 / – | 23 of 24 / 22 of 24 / – |")
