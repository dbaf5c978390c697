"""The README's result sections, rendered from bench/results/ (`adaskip report --readme`).

A section is the text between `<!-- adaskip:report NAME -->` and `<!-- /adaskip:report -->` in a
markdown file; SECTIONS maps NAME to the function that renders it from the result files. Each
renderer's prose is a template whose every number is a field filled from a JSON (or a setting
the template declares in LITERALS), so the prose cannot say what the files do not. A GPU figure
names the commit and date it was measured on, and "measured on older kernels" when `csrc/`
changed after that commit; a prediction (the roofline model) says so.

The result figures outside the marked sections are registered in readme_figures (the README's words
around each figure, the file and key it comes from); `render` writes their values too, and
`unsourced_numbers` lists the numbers of the README's result prose that have neither kind of source.

`render(text, root)` returns the file with every section and registered figure rendered; `check`
lists those that differ. Nothing else in the file is touched."""
from __future__ import annotations

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

from .readme_figures import QS as QWEN_STDLIB, figures, measured_on, render_figures, unsourced

BEGIN = "<!-- adaskip:report {name} -->"
END = "<!-- /adaskip:report -->"
# A section may sit indented inside a list item: its lines keep the indentation of its markers.
_SECTION = re.compile(r"^([ \t]*)<!-- adaskip:report ([\w-]+) -->\n(.*?)^[ \t]*<!-- /adaskip:report -->",
                      re.DOTALL | re.MULTILINE)


class Results:
    """The result files under `root` (bench/results), read once each, and the checkout's git
    history for the age of a GPU figure's kernels."""

    def __init__(self, root):
        self.root = Path(root)

    @lru_cache(maxsize=None)
    def json(self, rel: str) -> dict:
        path = self.root / rel
        if not path.is_file():
            raise ValueError(f"adaskip: a README section reads {path}, which does not exist")
        return json.loads(path.read_text(encoding="utf-8"))

    @lru_cache(maxsize=None)
    def text(self, rel: str) -> str:
        """A run's log (or any text file) under the results, for figures only a log holds."""
        path = self.root / rel
        if not path.is_file():
            raise ValueError(f"adaskip: a README figure reads {path}, which does not exist")
        return path.read_text(encoding="utf-8", errors="replace")

    def kernels_changed_since(self, commit: str) -> Optional[bool]:
        """Whether csrc/ changed after `commit` (None: no git history here to ask)."""
        try:
            out = subprocess.run(["git", "log", "--format=%h", f"{commit}..HEAD", "--", ":(top)csrc"],
                                 cwd=self.root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return bool(out.stdout.strip()) if out.returncode == 0 else None


def _rows(data: dict, task: str) -> list:
    return data[task]["rows"]


def _row(rows: list, name: str) -> dict:
    for r in rows:
        if r["name"] == name:
            return r
    raise ValueError(f"adaskip: no row {name!r} in the result file")


def _span(values, fmt: str, scale: float = 1.0, sep: str = "-") -> str:
    lo, hi = min(values), max(values)
    if scale != 1.0:
        lo, hi = lo * scale, hi * scale
    a, b = format(lo, fmt), format(hi, fmt)
    return a if a == b else f"{a}{sep}{b}"


def _num(value, fmt: str) -> str:
    text = format(value, fmt)
    return text[:-2] if fmt.endswith("f") and text.endswith(".0") else text


# -- sections --------------------------------------------------------------------------------

RETRIEVAL_KL = "eval-smollm2-retrieval-kl-cpu-2026-12-06/eval.json"


def retrieval_kl_table(results: Results) -> str:
    """The demo profile's plans: predicted speedup, perplexity, passkey and needle per length."""
    data = results.json(RETRIEVAL_KL)
    lines = ["| plan (sublayers skipped) | predicted speedup (paper) | perplexity | passkey 2k / 4k "
             "| needle 2k / 4k |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("target_speedup") is not None:
            continue

        def hits(task, first):
            by = r["details"][task]["by_length"]
            cells = [str(by[k]["correct"]) for k in sorted(by, key=int)]
            total = {by[k]["total"] for k in by}
            return " / ".join(cells) + (f" of {total.pop()}" if first and len(total) == 1 else "")

        if r["strategy"] == "full":
            name = "full"
        else:
            parts = [f"attention {', '.join(str(s // 2) for s in r['skipped'] if s % 2 == 0)}"]
            ffn = [str(s // 2) for s in r["skipped"] if s % 2]
            if ffn:
                parts.append(f"FFN {', '.join(ffn)}")
            name = f"`{r['strategy']}` {r['budget']} ({'; '.join(parts)})"
        first = r["strategy"] == "full"
        lines.append(f"| {name} | {r['predicted_speedup']:.3f} | {r['metrics']['perplexity']:.2f} | "
                     f"{hits('passkey', first)} | {hits('needle', first)} |")
    return "\n".join(lines) + "\n"


TARGETS = "eval-smollm2-targets-cpu-2026-12-06/"
# The evals (their folders), one per prompt length, each with the full model first; 4k ran its
# two tasks as two evals side by side. The first gives the plans' order and their perplexity.
TARGET_RUNS = ("2k", "4k-passkey", "4k-needle", "6k")


def _target_name(r: dict) -> str:
    """A plan's name in the targets table: what it skips or streams, and the tolerance that chose it."""
    if r["strategy"] == "full":
        return "full"
    what = [f"{r['budget']} sublayers"] if r["budget"] else []
    what += [f"{r['streaming_groups']} streaming groups"] if r.get("streaming_groups") else []
    wanted = [f"{n} {r[k]:g}" for n, k in (("`--min-agreement`", "min_agreement"),
                                           ("`--min-retrieval`", "min_retrieval")) if r.get(k) is not None]
    if wanted:
        return f"`{r['strategy']}` by tolerance ({' '.join(wanted)}): {' + '.join(what) or 'nothing skipped'}"
    return f"`{r['strategy']}` {' + '.join(what)}" if r["strategy"] != "groups" else " + ".join(what)


def targets_table(results: Results) -> str:
    """Issue 29's retrieval targets in one table: each plan of the targets evals (one per prompt
    length, the same plans and profile), its predicted prefill speedup, its perplexity on held-out
    essays and its pass keys and needles found at every length."""
    from ..evaluation.report import merge_rows

    runs = [results.json(f"{TARGETS}{f}/eval.json") for f in TARGET_RUNS]
    first = runs[0]
    # eval notes the cost model every row is priced by: "predicted speedups: ..., prefill at N tokens"
    context = next((m.group(1) for x in first["notes"] if x.startswith("predicted speedups")
                    for m in [re.search(r"prefill at (\d+) tokens", x)] if m), None)
    if context is None:
        raise ValueError(f"adaskip: {TARGETS}: the eval priced no plan by a prefill cost model")
    lengths = sorted({int(n) for d in runs for r in d["rows"] for t in r.get("details", {}).values()
                      for n in t["by_length"]})
    named = " / ".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths)
    lines = [f"| plan | predicted prefill at {context} tokens | perplexity (essays) | pass keys {named} | "
             f"needles {named} |", "|---|---|---|---|---|"]
    for r in merge_rows([d["rows"] for d in runs]):  # every length's cells of each plan joined
        def found(task):
            cells = [r["details"].get(task, {}).get("by_length", {}).get(str(n)) for n in lengths]
            return " / ".join("–" if d is None else f"{d['correct']} of {d['total']}" for d in cells)

        ppl = r["metrics"].get("perplexity")
        lines.append(f"| {_target_name(r)} | {r['predicted_speedup']:.3f}x | "
                     f"{'–' if ppl is None else format(ppl, '.2f')} | {found('passkey')} | {found('needle')} |")
    return "\n".join(lines) + "\n"


SMOL_GEN = "eval-smollm2-generation-cpu-2026-12-06/eval.json"
SMOL_BETAS = "eval-smollm2-generation-cpu-2026-12-06/online-betas/eval.json"
# QWEN_STDLIB: the Qwen2.5-Coder stdlib folder, named once (readme_figures.QS)
QWEN_GEN = QWEN_STDLIB + "greedy-loss/generation/eval.json"
QWEN_ADASKIP_GEN = QWEN_STDLIB + "generation/eval.json"

ONLINE_TEMPLATE = (
    "Online learning (decode): at a plan's own beta it gates off {smol_own} extra FFNs per request on\n"
    "SmolLM2 (`greedy-kl` and `adaskip` at 4 and 8 sublayers) and {qwen_own} on Qwen's 8-sublayer\n"
    "`greedy-loss` plan, at no measurable cost (Rouge-L {qwen_on} against {qwen_off} without it). A\n"
    "looser beta is not a knob worth turning on these models: at {smol_beta} on SmolLM2 ({qwen_beta} on\n"
    "Qwen) it gates {gated} FFNs per request and the text breaks the moment the {window}-token\n"
    "window ends, while the predicted decode speedup (roofline model, a prediction) climbs to\n"
    "{speedups}x.\n")


def _online_rows(data, own_only=True):
    return [r for r in _rows(data, "generation") if r["online"] and ("/beta=" not in r["name"]) == own_only]


def online_learning(results: Results) -> str:
    smol = _online_rows(results.json(SMOL_GEN))
    qwen = results.json(QWEN_GEN)
    qwen_rows = _rows(qwen, "generation")
    loose = [r for r in _rows(results.json(SMOL_BETAS), "generation") if r["name"].endswith("/beta=0.97")]
    loose_q = [r for r in qwen_rows if r["name"].endswith("/beta=0.95")]
    on, off = _row(qwen_rows, "greedy-loss@8"), _row(qwen_rows, "greedy-loss@8/no-online")
    windows = {r["window"] for r in smol + [on]}
    return ONLINE_TEMPLATE.format(
        smol_own=_span([r["extra_ffns_gated"] for r in smol], ".3g"), qwen_own=_num(on["extra_ffns_gated"], ".1f"),
        qwen_on=f"{on['rouge_l']:.3f}", qwen_off=f"{off['rouge_l']:.3f}", smol_beta=loose[0]["beta"],
        qwen_beta=loose_q[0]["beta"], gated=_span([r["extra_ffns_gated"] for r in loose + loose_q], ".3g"),
        window=windows.pop() if len(windows) == 1 else "/".join(map(str, sorted(windows))),
        speedups=_span([r["predicted_decode_speedup"] for r in loose + loose_q], ".2f"))


SPEC_FILES = ("eval-smollm2-speculative-cpu-2026-12-06/eval.json",
              "eval-smollm2-speculative-cpu-2026-12-06/large-budgets/eval.json",
              QWEN_STDLIB + "speculative/eval.json", QWEN_STDLIB + "greedy-loss/speculative/eval.json")

LOSSLESS_TEMPLATE = (
    "Lossless decoding (`SpeculativeConfig`, `run --lossless`) always returns the full model's text,\n"
    "but it does not pay on these two models: a draft step skipping {big_share} % of the sublayers is\n"
    "predicted to be only {big_cheaper}x cheaper (roofline model; the vocabulary projection stays),\n"
    "and at that budget the full model keeps {big_kept} % of the drafts; at {small_budgets} sublayers\n"
    "it keeps {small_kept} % of drafts predicted to cost nearly a full step ({small_cheaper}x cheaper).\n"
    "`bench/results/README.md` has the acceptance tables and `adaskip bench speculative` the\n"
    "break-even for a GPU model.\n")

# (SmolLM2, Qwen2.5-Coder-0.5B): sublayers per model, for the share a budget skips
SPEC_SUBLAYERS = {"eval-smollm2": 60, "eval-qwen2.5": 48}


def lossless(results: Results) -> str:
    rows = []
    for rel in SPEC_FILES:
        total = next(v for k, v in SPEC_SUBLAYERS.items() if rel.startswith(k))
        rows += [dict(r, share=r["budget"] / total) for r in results.json(rel)["speculative"]["rows"]
                 if not r.get("online")]
    big = [r for r in rows if r["share"] >= 0.4]
    small = [r for r in rows if r["budget"] <= 8]
    return LOSSLESS_TEMPLATE.format(
        big_share=_span([r["share"] for r in big], ".0f", 100),
        big_cheaper=_span([r["draft_decode_speedup"] for r in big], ".2f"),
        big_kept=_span([r["acceptance_rate"] for r in big], ".0f", 100),
        small_budgets=_span([r["budget"] for r in small], "d"),
        small_kept=_span([r["acceptance_rate"] for r in small], ".0f", 100),
        small_cheaper=_span([r["draft_decode_speedup"] for r in small], ".2f"))


ONLINE_BULLET_TEMPLATE = (
    "- Online learning at the plan's own beta (the least similarity of the sublayers it skips)\n"
    "  gates off {smol} extra FFNs per request on SmolLM2 and {qwen} on Qwen2.5-Coder, and changes\n"
    "  no text on SmolLM2 (Rouge-L with and without it equal); on Qwen's 8-sublayer `greedy-loss`\n"
    "  plan Rouge-L moves from {qwen_off} to {qwen_on}: it neither costs nor buys anything measurable.\n")


def online_bullet(results: Results) -> str:
    smol = _online_rows(results.json(SMOL_GEN))
    qwen = _online_rows(results.json(QWEN_GEN)) + _online_rows(results.json(QWEN_ADASKIP_GEN))
    smol_rows = _rows(results.json(SMOL_GEN), "generation")
    for r in smol:  # the claim "changes no text on SmolLM2" is checked, not typed
        if r["rouge_l"] != _row(smol_rows, r["name"] + "/no-online")["rouge_l"]:
            raise ValueError(f"adaskip: online learning changed SmolLM2's text ({r['name']}): the README's "
                             "sentence no longer holds; rewrite ONLINE_BULLET_TEMPLATE")
    qwen_rows = _rows(results.json(QWEN_GEN), "generation")
    return ONLINE_BULLET_TEMPLATE.format(
        smol=_span([r["extra_ffns_gated"] for r in smol], ".3g"),
        qwen=_span([r["extra_ffns_gated"] for r in qwen], ".3g"),
        qwen_off=f"{_row(qwen_rows, 'greedy-loss@8/no-online')['rouge_l']:.3f}",
        qwen_on=f"{_row(qwen_rows, 'greedy-loss@8')['rouge_l']:.3f}")


GPU_ONLINE = "e2e-online-llama-3.1-8b-h100-80gb-hbm3-2026-11-22.json"
GPU_FORCED = "e2e-online-forced-llama-3.1-8b-h100-80gb-hbm3-2026-11-22.json"
GPU_HF = ("e2e-llama-3.1-8b-h100-80gb-hbm3-2026-11-22.json", "e2e-plans-llama-3.1-8b-h100-80gb-hbm3-2026-11-22.json",
          "e2e-graphs-llama-3.1-8b-h100-80gb-hbm3-2026-11-22.json", GPU_ONLINE)

GPU_DECODE_TEMPLATE = (
    "On an H100 with LLaMA-3.1-8B geometry (random weights, `bench/results/README.md`;\n"
    "{online_when}):\n{graph_ms} ms per token at {context}k context, against {hf_ms} ms for HF transformers'\n"
    "eager decode in {hf_runs} runs; with online learning gating off all {ffns} FFNs after the window, an\n"
    "{budget}-sublayer AdaSkip plan reached {of_ideal} % of its ideal speedup at {contexts}\n({forced_when}).\n")


def gpu_decode(results: Results) -> str:
    base = results.json(GPU_ONLINE)["baseline"][0]
    hf = []
    for rel in GPU_HF:
        data = results.json(rel)
        for r in data.get("rows", []) if "baseline" not in data else data["baseline"]:
            if r.get("context", r.get("prompt_len")) == base["prompt_len"]:
                hf.append(r["decode_ms_per_token"]["hf"] if "decode_ms_per_token" in r else r["tpot_ms"]["hf"])
    forced = [r for r in results.json(GPU_FORCED)["rows"] if r["strategy"] == "adaskip+online"]
    return GPU_DECODE_TEMPLATE.format(
        online_when=measured_on(results, GPU_ONLINE), graph_ms=f"{base['tpot_ms']['ours_graph']:.2f}",
        context=base["prompt_len"] // 1024, hf_ms=_span(hf, ".1f"), hf_runs=len(hf),
        ffns=results.json(GPU_FORCED)["model_args"]["num_layers"], budget=forced[0]["num_sublayers"],
        of_ideal=_span([r["tpot_graph_of_ideal"] for r in forced], ".1f", 100),
        contexts=" and ".join(f"{r['prompt_len'] // 1024}k" for r in forced),
        forced_when=measured_on(results, GPU_FORCED))


SECTIONS: dict[str, Callable[[Results], str]] = {
    "retrieval-kl": retrieval_kl_table,
    "targets": targets_table,
    "online-learning": online_learning,
    "lossless": lossless,
    "online-bullet": online_bullet,
    "gpu-decode": gpu_decode,
}

# Numbers a template may spell out itself: names, and settings of the runs, not results.
NAMES = ("SmolLM2", "Qwen2.5-Coder", "H100", "LLaMA-3.1-8B")
LITERALS = {"online-learning": NAMES + ("8-sublayer", "at 4 and 8 sublayers"), "online-bullet": NAMES + ("8-sublayer",),
            "lossless": NAMES, "gpu-decode": NAMES, "retrieval-kl": NAMES, "targets": NAMES}
TEMPLATES = {"online-learning": ONLINE_TEMPLATE, "lossless": LOSSLESS_TEMPLATE,
             "online-bullet": ONLINE_BULLET_TEMPLATE, "gpu-decode": GPU_DECODE_TEMPLATE}


def sections(text: str) -> dict:
    """NAME -> the text of each marked section in `text`; a name twice or an unknown one is refused."""
    found = {}
    for m in _SECTION.finditer(text):
        name = m.group(2)
        if name in found:
            raise ValueError(f"adaskip: the README marks section {name!r} twice")
        if name not in SECTIONS:
            raise ValueError(f"adaskip: the README marks section {name!r}, which the renderer does not know "
                             f"(known: {', '.join(SECTIONS)})")
        found[name] = m.group(3)
    return found


def render(text: str, root) -> str:
    """`text` with every marked section and every registered figure (readme_figures) rendered from
    the results under `root`."""
    return _render(text, Results(root))[0]


def _render(text: str, results: "Results") -> tuple:
    """(the rendered text, the registered figures whose values changed)."""
    text = _render_sections(text, results)
    return render_figures(text, results, figures())


def _render_sections(text: str, results: "Results") -> str:
    sections(text)  # refuses duplicates and unknown names
    def one(m):
        indent, name = m.group(1), m.group(2)
        body = "".join(indent + line if line.strip() else line for line in SECTIONS[name](results).splitlines(True))
        return indent + BEGIN.format(name=name) + "\n" + body + indent + END

    return _SECTION.sub(one, text)


def check(text: str, root) -> list:
    """The names of the sections, and the words of the registered figures, whose text differs from
    what the results render (a figure whose words are not in the text is refused by ValueError)."""
    out, changed = _render(text, Results(root))
    now, rendered = sections(text), sections(out)
    return [name for name in now if now[name] != rendered[name]] + [f"figure {w!r}" for w in changed]


def unsourced_numbers(text: str) -> list:
    """(line, number, line text) of each number in the README's result prose that has no source:
    neither a registered figure, nor inside a marked section, nor a setting (readme_figures.SETTINGS)."""
    return unsourced(text, figures(), [m.span() for m in _SECTION.finditer(text)])
