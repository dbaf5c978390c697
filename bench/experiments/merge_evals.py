"""Several `adaskip eval` runs of the same plans (one per prompt length, or per task) as one:
their retrieval tables and the two retrieval plots (against skipped sublayers and against the
predicted speedup) over every length together, written beside them. The runs' own eval.json files
stay the results; this writes only what it derives from them (adaskip.evaluation.report.merge_rows).

    python bench/experiments/merge_evals.py --out DIR EVAL_DIR [EVAL_DIR ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaskip.benchmarks.common import command_line
from adaskip.evaluation.report import markdown_table, merge_rows, plot_retrieval, plot_retrieval_by_speedup, retrieval_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="+", help="folders holding an eval.json each")
    ap.add_argument("--out", required=True, help="folder for merged.md, retrieval.png, retrieval-speedup.png")
    ap.add_argument("--title", default="retrieval", help="the plots' title")
    a = ap.parse_args()
    files = [Path(d) / "eval.json" for d in a.evals]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"merge_evals: no eval.json in {missing}")
    rows = merge_rows([json.loads(f.read_text())["rows"] for f in files])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in ("passkey", "needle") if any(k in r.get("details", {}) for r in rows)]
    text = [f"Merged by `{command_line()}` from {', '.join(str(f) for f in files)} (each run's eval.json is the result).",
            "", markdown_table(rows, metrics=[m for m in ("perplexity", "top1_agreement") if any(m in r["metrics"] for r in rows)])]
    for k in kinds:
        text += ["", f"{k} (correct / tasks at each context length, every depth together):", "", retrieval_table(rows, k)]
    (out / "merged.md").write_text("\n".join(text) + "\n")
    written = [out / "merged.md", plot_retrieval(rows, out / "retrieval.png", kinds=kinds, title=f"{a.title}: against skipped sublayers"),
               plot_retrieval_by_speedup(rows, out / "retrieval-speedup.png", kinds=kinds,
                                         title=f"{a.title}: against the predicted speedup")]
    print("wrote " + ", ".join(str(p) for p in written if p is not None))


if __name__ == "__main__":
    main()
