"""`adaskip report --readme`: render the README's marked result sections and its registered figures
from bench/results/ (adaskip.benchmarks.readme, readme_figures); `--check` only compares, and fails
when one differs."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    r = subparsers.add_parser("report", help="render the README's result sections from bench/results/")
    r.add_argument("--readme", nargs="?", const="README.md", required=True, metavar="FILE",
                   help="the markdown file whose <!-- adaskip:report NAME --> sections to render (default README.md)")
    r.add_argument("--results", help="the result files (default: bench/results beside FILE)")
    r.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming each section that differs from what the results render")
    r.set_defaults(func=cmd_report)


def cmd_report(a) -> None:
    from .._util import write_atomic
    from ..benchmarks.readme import check, render, unsourced_numbers
    from ..benchmarks.readme_figures import unscoped_measurements
    from .common import check_in_file

    readme = check_in_file("--readme", a.readme)
    results = Path(a.results) if a.results else readme.resolve().parent / "bench" / "results"
    if not results.is_dir():
        raise SystemExit(f"adaskip: --results {results} is not a folder")
    text = readme.read_text(encoding="utf-8")
    if a.check:
        stale = check(text, results)
        # a number of the result prose with no source is drift waiting to happen: --check fails on it
        loose = unsourced_numbers(text) + unscoped_measurements(text)
        if loose:
            raise SystemExit(f"adaskip: {readme}: {len(loose)} number(s) of the result prose have no source in "
                             f"{results}: " + "; ".join(f"line {no}: {num!r}" for no, num, _ in loose)
                             + " (register them in adaskip/benchmarks/readme_figures.py)")
        if stale:
            raise SystemExit(f"adaskip: {readme}: {len(stale)} section(s) or figure(s) differ from {results}: "
                             f"{', '.join(stale)}; "
                             "run `adaskip report --readme` to render them")
        print(f"{readme}: every marked section and registered figure matches {results}")
        return
    new = render(text, results)
    if new != text:
        write_atomic(readme, new.encode("utf-8"))
        print(f"rendered {readme} from {results}")
    else:
        print(f"{readme}: already matches {results}")
