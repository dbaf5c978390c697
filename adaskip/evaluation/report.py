"""Tables and plots of `adaskip eval` results: a markdown table (full model first), JSON, quality
vs budget per strategy, and a per-layer heatmap of a profile's sublayer IO similarity."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = ("perplexity", "kl_per_token")
OFF_SCALE = 10.0  # perplexity plots stop at this multiple of the full model's


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if name == "perplexity":
        return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"
    if name == "kl_per_token":
        return f"{value:.3f}"
    if name.endswith("accuracy") or name == "top1_agreement":
        return f"{value:.3f}"
    return f"{value:.1f}"


def row_label(row: dict) -> str:
    if row["strategy"] == "full":
        return "full"
    groups = f" + {row['streaming_groups']} groups" if row.get("streaming_groups") else ""
    if row.get("target_speedup") is not None:
        return f"x{row['target_speedup']:g} ({row['budget']} sublayers)"
    wanted = [f"{n} >= {row[k]:g}" for n, k in (("agreement", "min_agreement"), ("retrieval", "min_retrieval"))
              if row.get(k) is not None]
    if wanted:
        return f"{', '.join(wanted)} ({row['budget']} sublayers{groups})"
    if row["strategy"] == "groups":
        return f"{row['streaming_groups']} groups"
    return f"{row['budget']}{groups}"


def plan_name(row: dict) -> str:
    """A row's plan in one phrase: "full", "N streaming groups", or its strategy and label."""
    if row["strategy"] == "full":
        return "full"
    if row["strategy"] == "groups":
        return f"{row['streaming_groups']} streaming groups"
    return f"{row['strategy']} {row_label(row)}"


def markdown_table(rows: Sequence[dict], metrics: Optional[Sequence[str]] = None) -> str:
    """One line per (strategy, budget), the full model first, a column per metric, plus the
    skipped attention / FFN counts and the predicted speedup."""
    if metrics is None:
        metrics = []
        for r in rows:
            metrics += [m for m in r["metrics"] if m not in metrics]
    streaming = any(r.get("streaming_groups") for r in rows)
    head = ["strategy", "budget", "attn / FFN skipped", *(["streaming groups"] if streaming else []),
            "predicted speedup", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(rows, key=lambda r: r["strategy"] != "full")
    for r in ordered:
        skipped = "" if r["strategy"] == "full" else f"{r['skipped_attention']} / {r['skipped_ffn']}"
        speed = "" if r.get("predicted_speedup") is None else f"{r['predicted_speedup']:.3f}"
        groups = [str(r.get("streaming_groups") or "")] if streaming else []
        cells = [r["strategy"], row_label(r) if r["strategy"] != "full" else "", skipped, *groups, speed,
                 *(_fmt(m, r["metrics"].get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# A retrieval length where the full model itself answers fewer than this fraction measures nothing.
FULL_MODEL_FAILS = 0.5


def retrieval_table(rows: Sequence[dict], kind: str) -> str:
    """Markdown: one line per plan (the full model first), a column per context length with the
    correct answers out of the tasks there (every depth together). A length where the full model
    answers fewer than FULL_MODEL_FAILS of its tasks is marked: a plan's score there says nothing."""
    have = [r for r in rows if kind in r.get("details", {})]
    if not have:
        return ""
    ordered = sorted(have, key=lambda r: r["strategy"] != "full")
    lengths = sorted({int(n) for r in have for n in r["details"][kind]["by_length"]})
    full = next((r for r in have if r["strategy"] == "full"), None)
    failed = set()
    if full is not None:
        by_length = {int(n): v for n, v in full["details"][kind]["by_length"].items()}
        failed = {n for n in lengths if by_length[n]["correct"] < FULL_MODEL_FAILS * by_length[n]["total"]}
    head = ["run", *(f"{n} tokens" + (" (full model fails)" if n in failed else "") for n in lengths), "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered:
        d = r["details"][kind]
        cells = [plan_name(r)]
        for n in lengths:
            v = next((v for k, v in d["by_length"].items() if int(k) == n), None)
            cells.append("–" if v is None else f"{v['correct']}/{v['total']} ({v['correct'] / v['total']:.2f})")
        cells.append(f"{d['correct']}/{d['total']}")
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines.append(f"\nThe full model answers fewer than {FULL_MODEL_FAILS:.0%} at "
                     f"{', '.join(str(n) for n in sorted(failed))} tokens: a plan's score there measures nothing.")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, plt) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _at_a_budget(row: dict) -> bool:
    """A row planned at a number of skipped sublayers alone: not at a target speedup or a
    tolerance, and with no streaming groups (which a count of sublayers does not measure)."""
    return (row.get("target_speedup") is None and row.get("min_agreement") is None
            and row.get("min_retrieval") is None and not row.get("streaming_groups"))


def plot_quality(rows: Sequence[dict], path, metrics: Optional[Sequence[str]] = None,
                 title: str = "") -> Optional[Path]:
    """Quality against the number of skipped sublayers, one line per strategy, the full model
    as a dashed line. Rows at a target speedup go into a second row of panels against it.
    metrics: default every metric the rows have but KL (perplexity and agreement tell it)."""
    if metrics is None:
        metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"] if m != "kl_per_token"))
    metrics = [m for m in metrics if any(m in r["metrics"] for r in rows)]
    if not metrics:
        return None
    plt = _pyplot()
    by_count = [r for r in rows if r["strategy"] != "full" and _at_a_budget(r)]
    by_speed = [r for r in rows if r["strategy"] != "full" and r.get("target_speedup") is not None]
    panels = [("budget", "skipped sublayers", by_count), ("target_speedup", "predicted speedup", by_speed)]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    full = next((r for r in rows if r["strategy"] == "full"), None)
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(5.2 * len(metrics), 3.8 * len(panels)),
                             squeeze=False)
    for i, (key, xlabel, subset) in enumerate(panels):
        strategies = list(dict.fromkeys(r["strategy"] for r in subset))
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for s in strategies:
                pts = sorted((r[key], r["metrics"][metric]) for r in subset
                             if r["strategy"] == s and r["metrics"].get(metric) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
            if full is not None and full["metrics"].get(metric) is not None:
                ax.axhline(full["metrics"][metric], color="black", linestyle="--", linewidth=1, label="full")
            if metric == "perplexity":
                from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
                if full is not None and full["metrics"].get(metric):
                    # Baselines that break the model reach 1e7; keep the useful range readable.
                    values = [r["metrics"][metric] for r in subset if r["metrics"].get(metric) is not None]
                    top = min(max(values, default=1.0), OFF_SCALE * full["metrics"][metric])
                    ax.set_ylim(full["metrics"][metric] * 0.95, top * 1.05)
                    if max(values, default=0.0) > top * 1.05:
                        ax.set_title(f"points above {top:.0f} are off scale", fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, plt)


def plot_profile_heatmap(profile, path, title: str = "") -> Path:
    """Attention and FFN IO similarity of every layer (rows: sublayer type; columns: layer),
    drawn as 1 - similarity on a log scale: the similarities crowd near 1, and what matters
    for skipping is how far below 1 each one is. Each cell is labelled with the similarity."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    m = profile.num_layers
    sim = np.array([[profile.similarity[2 * i] for i in range(m)], [profile.similarity[2 * i + 1] for i in range(m)]])
    distance = np.clip(1.0 - sim, 1e-4, None)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * m + 2), 2.8))
    im = ax.imshow(distance, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=distance.min(), vmax=distance.max()))
    for (row, col), value in np.ndenumerate(sim):
        ax.text(col, row, f"{value:.2f}"[1:] if 0 <= value < 1 else f"{value:.1f}", ha="center", va="center",
                fontsize=6, color="white" if distance[row, col] > np.sqrt(distance.min() * distance.max()) else "black")
    ax.set_yticks([0, 1], ["attention", "FFN"])
    ax.set_xticks(range(0, m, max(1, m // 16)))
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="1 - IO cosine similarity")
    ax.set_title(title or f"sublayer IO similarity ({profile.num_requests} requests, {profile.tokens} tokens)")
    return _save(fig, path, plt)


def retrieval_points(rows: Sequence[dict], kind: str) -> dict:
    """{strategy: {context_len: [(budget, accuracy), ...] sorted by budget}} of the plans at a
    number of skipped sublayers (budget 0 for the full model), from each row's details[kind]."""
    points: dict = {}
    for r in rows:
        if kind not in r.get("details", {}) or not _at_a_budget(r):
            continue
        budget = 0 if r["strategy"] == "full" else r["budget"]
        for n, v in r["details"][kind]["by_length"].items():
            points.setdefault(r["strategy"], {}).setdefault(int(n), []).append((budget, v["correct"] / v["total"]))
    return {s: {n: sorted(p) for n, p in sorted(by_len.items())} for s, by_len in points.items()}


def plot_retrieval(rows: Sequence[dict], path, kinds: Sequence[str] = ("passkey", "needle"),
                   title: str = "") -> Optional[Path]:
    """Retrieval accuracy against the number of skipped sublayers: a panel per task kind, a line
    per (strategy, context length), each line starting from the full model's own accuracy at 0.
    The aggregate over lengths (plot_quality) hides the length where a plan breaks; this shows it."""
    by_kind = {k: retrieval_points(rows, k) for k in kinds}
    by_kind = {k: v for k, v in by_kind.items() if v}
    if not by_kind:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_kind), figsize=(6.0 * len(by_kind), 4.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (kind, points) in zip(axes[0], by_kind.items()):
        full = points.get("full", {})
        lengths = sorted({n for by_len in points.values() for n in by_len})
        colors = {n: f"C{i % 10}" for i, n in enumerate(lengths)}
        for j, (strategy, by_len) in enumerate((s, v) for s, v in points.items() if s != "full"):
            for n, pts in by_len.items():
                pts = full.get(n, [])[:1] + pts  # the full model is the line's point at budget 0
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[n],
                        linestyle=styles[j % len(styles)], label=f"{strategy}, {n} tokens")
        if len(points) == 1 and full:  # the full model alone: its points, nothing to join
            for n, pts in full.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[n], label=f"full, {n} tokens")
        _accuracy_axis(ax, kind, "skipped sublayers (0: the full model)", legend_size=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path, plt)


def _accuracy_axis(ax, kind: str, xlabel: str, legend_size: int) -> None:
    """A retrieval panel's axes: accuracy from 0 to 1, labels, grid and legend."""
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{kind} accuracy")
    ax.set_title(kind)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_retrieval_by_speedup(rows: Sequence[dict], path, kinds: Sequence[str] = ("passkey", "needle"),
                              title: str = "") -> Optional[Path]:
    """Retrieval accuracy against the predicted speedup: a panel per task kind, a point per
    (plan, context length), the full model at 1. Plans of sublayers, of streaming KV-head groups
    and chosen by tolerance meet on one axis here, which a count of sublayers cannot give them.
    None when no plan with retrieval results has a predicted speedup."""
    have = [r for r in rows if r.get("predicted_speedup") is not None and any(k in r.get("details", {}) for k in kinds)]
    if not any(r["strategy"] != "full" for r in have):
        return None
    kinds = [k for k in kinds if any(k in r.get("details", {}) for r in have)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.6), squeeze=False)
    lengths = sorted({int(n) for r in have for k in kinds if k in r["details"] for n in r["details"][k]["by_length"]})
    colors = {n: f"C{i % 10}" for i, n in enumerate(lengths)}
    markers = "osD^vP*X<>"
    for ax, kind in zip(axes[0], kinds):
        for j, r in enumerate(x for x in have if kind in x["details"]):
            name = plan_name(r)
            for n, v in sorted(r["details"][kind]["by_length"].items(), key=lambda kv: int(kv[0])):
                ax.scatter(r["predicted_speedup"], v["correct"] / v["total"], color=colors[int(n)],
                           marker=markers[j % len(markers)], label=f"{name}, {n} tokens")
        _accuracy_axis(ax, kind, "predicted speedup (the eval's cost model)", legend_size=6)
    if title:
        fig.suptitle(title)
    return _save(fig, path, plt)


def merge_rows(evals: Sequence[Sequence[dict]]) -> list:
    """The rows of several evals of the same plans (one per prompt length, or per task) as one
    eval's: a row per plan, in the order first seen, with every eval's task details joined
    (by_length cells added up, correct and total summed, the accuracy metrics over them; other
    metrics from the first eval that has them). A plan is its strategy, budget, streaming groups
    and tolerance; the same plan must carry the same predicted speedup."""
    out: dict = {}
    for rows in evals:
        for r in rows:
            key = (r["strategy"], r["budget"], r.get("target_speedup"), r.get("streaming_groups"),
                   r.get("min_agreement"), r.get("min_retrieval"))
            have = out.setdefault(key, {**r, "metrics": dict(r.get("metrics", {})), "details": {}})
            if have.get("predicted_speedup") != r.get("predicted_speedup") or have.get("skipped") != r.get("skipped"):
                raise ValueError(f"adaskip: the evals hold two plans named {plan_name(r)!r} (other sublayers or "
                                 "another predicted speedup): merge evals of the same profile and cost model")
            for task, d in r.get("details", {}).items():
                cells = have["details"].setdefault(task, {"by_length": {}, "correct": 0, "total": 0})
                for n, v in d["by_length"].items():
                    if str(n) in cells["by_length"]:
                        raise ValueError(f"adaskip: two evals hold {task} at {n} tokens for {plan_name(r)!r}")
                    cells["by_length"][str(n)] = dict(v)
                cells["correct"] += d["correct"]
                cells["total"] += d["total"]
            for m, v in r.get("metrics", {}).items():  # an eval's other metrics, from the first that has them
                have["metrics"].setdefault(m, v)
    for have in out.values():  # retrieval accuracy over the joined cells, not one eval's
        for task, cells in have["details"].items():
            have["metrics"][f"{task}_accuracy"] = cells["correct"] / cells["total"]
    return list(out.values())
