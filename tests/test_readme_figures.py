"""Every number in the README's result prose has a source in bench/results/.

The result prose (adaskip.benchmarks.readme_figures.result_prose) is: the whole "## Which strategy"
section, where the measured quality figures live, and every other paragraph or list item that cites
`bench/results` (the GPU figures, the demo's calibration time). Code blocks and inline code are not
prose. A number there must be one of:
- a registered figure (readme_figures.figures(): the README's words around it and the result file,
  key and format it comes from), which `adaskip report --readme` writes and `--check` compares;
- inside a marked section, whose template reads every number from a result file (test_report.py);
- a setting of a run or a name (readme_figures.SETTINGS: budgets, lengths, prompt counts, model
  names, bounds a claim is judged by), never a number with a unit of measurement (x, %, s, ms...),
  except the few time limits readme_figures.LIMITS names by their whole sentence.
Numbers elsewhere in the README (versions, flags, sizes in examples, the API's defaults) are not
results; so that no result hides there, none of them may carry a unit of measurement (x, %, s, ms,
us, minutes) outside code, except the bounds readme_figures.LIMITS names."""
import re
import shutil
from pathlib import Path

import pytest

from adaskip.benchmarks import readme, readme_figures
from adaskip.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_number_in_the_result_prose_has_a_source():
    # a renamed heading would silently shrink the scope
    for heading in readme_figures.RESULT_HEADINGS:
        assert re.search(f"^{re.escape(heading)}", README, re.MULTILINE), f"the README has no {heading!r} section"
    missing = readme.unsourced_numbers(README)
    assert not missing, "numbers in the README's result prose with no source (register them in " \
        "adaskip/benchmarks/readme_figures.py):\n" + "\n".join(f"  line {no}: {num!r} in {line!r}" for no, num, line in missing)


def test_no_measurement_sits_outside_the_result_prose():
    """The scope above holds every measured figure: outside it, no number carries a unit of
    measurement, so a result typed elsewhere (without citing bench/results) fails here."""
    assert readme_figures.unscoped_measurements(README) == []
    typed = README.replace("## Install\n", "## Install\n\nIt builds in 95 s.\n", 1)
    assert [num for _, num, _ in readme_figures.unscoped_measurements(typed)] == ["95"]


def test_a_number_typed_into_the_result_prose_is_found():
    typed = README.replace("## Which strategy\n", "## Which strategy\n\nThe plan is 1.31x faster.\n", 1)
    found = readme.unsourced_numbers(typed)
    assert [num for _, num, _ in found] == ["1.31"]
    # outside the result sections a number counts only in a paragraph that cites bench/results
    cites = README.replace("## Install\n", "## Install\n\nIt took 7 minutes (`bench/results/x`).\n", 1)
    assert [num for _, num, _ in readme.unsourced_numbers(cites)] == ["7"]
    plain = README.replace("## Install\n", "## Install\n\nIt took 7 minutes.\n", 1)
    assert readme.unsourced_numbers(plain) == []


def test_a_setting_never_exempts_a_measurement():
    """Settings are budgets, lengths and counts; a number with a unit of measurement (x, %, s, ms, us,
    minutes) is a result even where a setting pattern matches around it."""
    typed = README.replace("## Which strategy\n", "## Which strategy\n\nThe 8-sublayer plan read 2048 tokens at 4 "
                           "sublayers in 12 s, 35 % faster, 1.2x.\n", 1)
    assert [num for _, num, _ in readme.unsourced_numbers(typed)] == ["12", "35", "1.2"]


def test_a_changed_registered_figure_fails_the_check_and_rendering_restores_it(tmp_path):
    good = README
    drifted = good.replace("at perplexity 31.37\n  against the full model's 23.15", "at perplexity 30.00\n  against the full "
                           "model's 23.15", 1)
    assert drifted != good
    copy = tmp_path / "README.md"
    copy.write_text(drifted, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["report", "--readme", str(copy), "--results", str(RESULTS), "--check"])
    assert "at perplexity {}" in str(e.value.code) and copy.read_text(encoding="utf-8") == drifted
    main(["report", "--readme", str(copy), "--results", str(RESULTS)])
    assert copy.read_text(encoding="utf-8") == good


def test_a_figure_whose_words_changed_or_repeat_is_refused():
    fig = readme_figures.figure("at perplexity {}\nagainst the full model's {}", readme_figures.ppl(readme_figures.W4, "full"),
                                readme_figures.ppl(readme_figures.W4, "full"))
    reworded = README.replace("at perplexity 31.37", "with perplexity 31.37", 1)
    with pytest.raises(ValueError, match="is not in the README"):
        readme_figures.locate(reworded, fig)
    twice = README + "\nat perplexity 1.00 against the full model's 2.00\n"
    with pytest.raises(ValueError, match="matches 2 places"):
        readme_figures.locate(twice, fig)
    with pytest.raises(ValueError, match="has 1 places and 2 sources"):
        readme_figures.figure("{} only", *fig.sources).pattern()


def test_a_figure_reading_a_missing_key_or_file_names_it(tmp_path):
    results = readme.Results(RESULTS)
    bad = readme_figures.figure("at perplexity {}", readme_figures.J(readme_figures.W4, "rows:full", "metrics", "bogus"))
    with pytest.raises(ValueError, match="do not have: KeyError.'bogus'"):
        readme_figures.render_figures("at perplexity 31.37", results, [bad])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="which does not exist"):
        readme_figures.log("run.log", "x").get(readme.Results(tmp_path / "empty"))
    shutil.rmtree(tmp_path / "empty")


def test_a_gpu_figure_outside_the_sections_says_when_and_on_which_kernels(monkeypatch):
    results = readme.Results(RESULTS)
    gpu = readme_figures._figures_gpu()[0]
    for changed, says in ((True, "measured on older kernels"), (False, ""), (None, "no git history")):
        monkeypatch.setattr(readme.Results, "kernels_changed_since", lambda self, c, v=changed: v)
        text = gpu.sources[-1].text(results)
        assert text.startswith("2026-11-22, commit c9f1ae9") and says in text
        # the README's words still match whichever the renderer writes
        assert re.fullmatch(readme_figures.MEASURED, text)


def test_the_best_of_a_row_is_bold_because_it_is_lowest():
    results = readme.Results(RESULTS)
    rel = readme_figures.G16 + "ppl-essays/eval.json"
    low, high = readme_figures.ppl(rel, "greedy-loss@8"), readme_figures.ppl(rel, "blockpruner@8")
    assert readme_figures.lowest(low, high).text(results) == f"**{low.text(results)}**"
    assert readme_figures.lowest(high, low).text(results) == high.text(results)


def test_the_check_fails_on_a_number_with_no_source(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text(README.replace("## Which strategy\n", "## Which strategy\n\nThe plan is 1.31x faster.\n", 1),
                    encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["report", "--readme", str(copy), "--results", str(RESULTS), "--check"])
    assert "have no source" in str(e.value.code) and "'1.31'" in str(e.value.code)


def test_two_figures_claiming_one_number_are_refused():
    results = readme.Results(RESULTS)
    full = readme_figures.ppl(readme_figures.W4, "full")
    one = readme_figures.figure("against the full model's {} on that folder's windows", full)
    other = readme_figures.figure("against the full model's {} on that", full)
    with pytest.raises(ValueError, match="two registered figures claim '23.15'"):
        readme_figures.render_figures(README, results, [one, other])


def test_a_predicted_figure_is_called_a_prediction():
    predictions = [f for f in readme_figures.figures() if any(s.prediction for s in f.sources)]
    assert len(predictions) >= 3  # the demo's and the streaming groups' predicted speedups
    for fig in predictions:
        assert "predict" in fig.words, f"the figure {fig.words!r} quotes a cost model's value without saying so"


def _results_with(tmp_path, rel, change):
    """A results tree like bench/results whose file `rel` is a copy changed by `change(data)`; every
    other entry links to the real one (the real files are never written)."""
    import json
    import os
    root = tmp_path / "results"
    root.mkdir()
    top = rel.split("/")[0]
    for entry in RESULTS.iterdir():
        if entry.name != top:
            os.symlink(entry, root / entry.name)
    shutil.copytree(RESULTS / top, root / top, symlinks=True)
    data = json.loads((root / rel).read_text(encoding="utf-8"))
    change(data)
    (root / rel).write_text(json.dumps(data), encoding="utf-8")
    return root


def test_a_new_value_in_a_result_file_is_rendered_into_the_prose(tmp_path, monkeypatch):
    """The registry reads the files: a changed perplexity rewrites its figure and the figures computed
    from it (the excess in %), and nothing else."""
    # the copy has no git history: ask the checkout's whether the kernels changed, as the real tree does
    real, ask_git = readme.Results(RESULTS), readme.Results.kernels_changed_since
    monkeypatch.setattr(readme.Results, "kernels_changed_since", lambda self, commit: ask_git(real, commit))

    def change(data):
        readme_figures.select(data["rows"], "greedy-kl@8")["metrics"]["perplexity"] = 29.0
    root = _results_with(tmp_path, readme_figures.W4, change)
    stale = readme.check(README, root)
    assert stale and all(s.startswith("figure ") for s in stale)
    new = readme.render(README, root)
    assert "at perplexity 29.00\n  against the full model's 23.15 on that folder's windows (+25 %" in new
    assert readme.check(new, root) == []
    changed = [l for l in new.split("\n") if l not in README.split("\n")]
    # the weight-4 sentence (the value and its excess, on two lines) and the grid16 bullet that quotes it
    assert len(changed) == 3 and "the same search scored 29.00" in changed[2], changed
