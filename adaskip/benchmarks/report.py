"""How an end-to-end result is shown: markdown tables (pasteable into bench/results/README.md)
and a plot of measured speedup against the paper's alpha, with each plan's ideal beside it, so
that the gap between equal-cost accounting, what the skipped sublayers really cost, and what
the runtime delivers is visible at a glance."""
from __future__ import annotations

from pathlib import Path


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def markdown_tables(result: dict) -> str:
    lines = []
    if result.get("baseline"):
        lines += ["Full model, ours vs HF transformers (same weights):", "",
                  "| prompt | TTFT ours (ms) | TTFT HF (ms) | ours / HF | TPOT ours (ms) | TPOT ours, graph (ms) "
                  "| TPOT HF (ms) | ours / HF | KV ours (MiB) | KV HF (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["baseline"]:
            t, d, kv = r["ttft_ms"], r["tpot_ms"], r["kv_cache_bytes"]
            lines.append(f"| {r['prompt_len']} | {_f(t['ours'], '.2f')} | {_f(t.get('hf'), '.2f')} "
                         f"| {_f(r.get('ttft_ratio_ours_over_hf'))} | {_f(d['ours'])} | {_f(d.get('ours_graph'))} "
                         f"| {_f(d.get('hf'))} | {_f(r.get('tpot_ratio_ours_over_hf'))} | {_mib(kv['ours'])} "
                         f"| {_mib(kv.get('hf'))} |")
        lines.append("")
    batch = result.get("batch", 1)
    lines += [f"Skipping plans (profile: {result.get('profile') or 'none needed'}"
              + (f"; batch of {batch} sequences" if batch > 1 else "") + "); speedups against our full "
              "model, ideal = full time over (full time - measured time of the skipped sublayers):", "",
              "| prompt | strategy | skipped | attn / FFN | paper alpha | TTFT (ms) | TTFT x | ideal | of ideal "
              "| TPOT (ms) | TPOT x | ideal | of ideal | graph TPOT x | graph ideal | of ideal | KV (MiB) | KV / full |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['prompt_len']} | {r['strategy']} | {r['num_sublayers']} | {r['skipped_attention']} / "
                     f"{r['skipped_ffn']} | {_f(r['paper_alpha'])} | {_f(r['ttft_ms'], '.2f')} "
                     f"| {_f(r['ttft_speedup'])} | {_f(r['ideal_ttft_speedup'])} | {_f(r['ttft_of_ideal'])} "
                     f"| {_f(r['tpot_ms'])} | {_f(r['tpot_speedup'])} | {_f(r['ideal_tpot_speedup'])} "
                     f"| {_f(r['tpot_of_ideal'])} | {_f(r.get('tpot_graph_speedup'))} "
                     f"| {_f(r.get('ideal_tpot_graph_speedup'))} | {_f(r.get('tpot_graph_of_ideal'))} "
                     f"| {_mib(r['kv_cache_bytes'])} "
                     f"| {_f(r['kv_cache_ratio'])} |")
    online = [r for r in result["rows"] if "tpot_before_window_ms" in r]
    if online:
        lines += ["", "Online learning: time per decode step (medians) in the window and after it, against the same "
                  "plan without online learning (offline); the drop after the window against the measured time of "
                  "the FFNs it gated off (predicted); window cost: in window minus offline:", "",
                  "| prompt | strategy | skipped | FFNs gated off | offline (ms) | in window (ms) | after (ms) "
                  "| drop vs offline (ms) | predicted (ms) | drop / predicted | window cost (ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in online:
            lines.append(f"| {r['prompt_len']} | {r['strategy']} | {r['num_sublayers']} "
                         f"| {len(r.get('online_skipped', []))} | {_f(r.get('offline_tpot_ms'))} "
                         f"| {_f(r['tpot_before_window_ms'])} | {_f(r['tpot_after_window_ms'])} "
                         f"| {_f(r.get('drop_vs_offline_ms'))} | {_f(r['online_drop_predicted_ms'])} "
                         f"| {_f(r.get('drop_vs_offline_of_predicted'))} | {_f(r.get('window_overhead_ms'))} |")
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """One row per prompt length, prefill (TTFT) left and decode (TPOT) right: per strategy the
    measured speedup (solid), the ideal of the same plans (dotted, hollow) and, on a GPU, the
    CUDA-graph decode (dashed); the diagonal is the paper's alpha."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    lengths = result["prompt_lens"]
    # The strategies asked for, then variants only the rows name (e.g. "adaskip+online").
    names = list(dict.fromkeys([*result["strategies"], *(r["strategy"] for r in result["rows"])]))
    names = [s for s in names if s != "full"]
    colors = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(names)}
    fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 4 * len(lengths)), squeeze=False)
    alphas = [r["paper_alpha"] for r in result["rows"]] or [1.0]
    lo, hi = 1.0, max(alphas)
    styles = {}  # series label -> (matplotlib style, marker face), for the legend
    for row_axes, length in zip(axes, lengths):
        for ax, (phase, key, ideal) in zip(row_axes, (("prefill (TTFT)", "ttft_speedup", "ideal_ttft_speedup"),
                                                      ("decode (TPOT)", "tpot_speedup", "ideal_tpot_speedup"))):
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="paper's alpha")
            for s in names:
                rows = sorted((r for r in result["rows"] if r["strategy"] == s and r["prompt_len"] == length),
                              key=lambda r: r["num_sublayers"])
                if not rows:
                    continue
                x = [1.0] + [r["paper_alpha"] for r in rows]
                series = [(key, "o-", None, "measured"), (ideal, "s:", "none", "ideal")]
                if key == "tpot_speedup" and any("tpot_graph_speedup" in r for r in rows):
                    series.append(("tpot_graph_speedup", "x--", None, "graph decode"))
                for field, style, face, label in series:
                    y = [1.0] + [_nan(r.get(field)) for r in rows]
                    kw = {"markerfacecolor": face} if face is not None else {}
                    ax.plot(x, y, style, color=colors[s], **kw)
                    styles[label] = (style, face)
            ax.set_title(f"{result['model']}, prompt {length}: {phase}")
            ax.set_xlabel("paper's alpha  M / (M - k/2)")
            ax.set_ylabel("speedup over the full model")
            ax.grid(alpha=0.3)
    # One legend for the figure: a colour per strategy, a line style per series.
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="k", ls="--", label="paper's alpha")]
    handles += [Line2D([], [], color="gray", ls=style[1:], marker=style[0], label=label,
                       **({"markerfacecolor": face} if face is not None else {}))
                for label, (style, face) in styles.items()]
    handles += [Line2D([], [], color=colors[s], lw=3, label=s) for s in names]
    ncol = 5
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_in = 0.25 + 0.22 * -(-len(handles) // ncol)
    device = result.get("device", "")
    fig.suptitle(f"adaskip bench e2e: {device}, {result.get('dtype', '')}, {result.get('weights', '')} weights"
                 + (" (CPU smoke run)" if result.get("smoke_run") else ""))
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, legend_in / height, 1, 1 - 0.35 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _nan(v) -> float:
    return float("nan") if v is None else v
