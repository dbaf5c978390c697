"""The README's result figures outside its marked sections: a registry of figure -> result file.

Most of the README's measured figures sit in running prose and small tables that people edit
often; rendering whole paragraphs from templates there would make every wording change a code
change. So each such figure is registered here instead: a `Figure` is the README's own words
around one or more numbers, with `{}` where each number goes, and one `Source` per `{}` that reads
the value from a file under bench/results/ (a JSON key, or a line of a run's log when the run wrote
no JSON) and formats it. `adaskip report --readme` writes the values into the README (the words
stay as they are), and `--check` fails when a value differs or a figure's words are no longer in
the README.

Which numbers must have a source (`result_prose`): every number in the README's "Which strategy"
section (where the measured quality figures live), and every number in any other paragraph that
cites `bench/results/`. Such a number must be a registered figure, inside a marked section (whose
template reads it from a file), or a setting of the run that the patterns in SETTINGS recognise
(a budget, a prompt length, a count of prompts, a model's name). A number followed by a unit of
measurement (x, %, s, ms, us, minutes) is never a setting, and none may stand outside the result
prose (`unscoped_measurements`), except the few limits LIMITS names by their sentence.
`unsourced` lists the numbers that break the rule; tests/test_readme_figures.py and
`adaskip report --readme --check` fail on them.

A figure that only a log holds (a run that wrote no JSON for it) reads the log line, and a figure
derived from others (a sum, an excess in %) says how in its `calc`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

# A number as the README writes it: 12, 0.9797, .920, 1,188 (never a sign: signs are words of the
# template). A figure's placeholder captures exactly this.
NUMBER = r"(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"


@dataclass(frozen=True)
class Source:
    """One value from a result file: `get(results)` reads it raw, `fmt` writes it as the README does
    (a format spec; "dot3" is .3f without the leading zero, as tables of agreement write it)."""
    what: str                       # the file (or files) it reads, for error messages
    get: Callable
    fmt: str = ".2f"
    capture: str = NUMBER           # what its place in the README holds (a number, or a list of them)
    prediction: bool = False        # a cost model's value, not a measurement: its words must say so

    def text(self, results) -> str:
        value = self.get(results)
        if self.fmt == "str":
            return str(value)
        if self.fmt == "list":
            return ", ".join(str(v) for v in value)
        if self.fmt == "dot3":
            out = format(value, ".3f")
            return out[1:] if out.startswith("0.") else out
        return format(value, self.fmt)


def select(rows: list, sel: str) -> dict:
    """The eval row `sel` names: "full", "STRATEGY@BUDGET" or "STRATEGY@BUDGET/STAND_IN" (an equal-
    budget row, never a --speedups one), or a generation / speculative row's own `name`."""
    for r in rows:
        if r.get("name") == sel:
            return r
    strategy, _, rest = sel.partition("@")
    budget, _, stand_in = rest.partition("/")
    for r in rows:
        if r.get("target_speedup") is not None or "strategy" not in r:
            continue
        # an eval of several stand-ins names its rows "greedy-kl/linear"
        named = r["strategy"] in (strategy, f"{strategy}/{stand_in}")
        if named and (strategy == "full" or str(r["budget"]) == budget) and (not stand_in or r.get("stand_in") == stand_in):
            return r
    raise ValueError(f"adaskip: no row {sel!r} in the result file")


def J(rel: str, *keys, fmt: str = ".2f") -> Source:
    """The value at `keys` in the JSON `rel`; a key "rows:SEL" picks a row of that list by select()."""
    def get(results):
        node = results.json(rel)
        for k in keys:
            if isinstance(k, str) and ":" in k:
                name, sel = k.split(":", 1)
                try:
                    node = select(node[name], sel)
                except ValueError as e:
                    raise ValueError(f"{e} {rel}") from None
            else:
                node = node[k]
        return node
    return Source(rel, get, fmt)


def ppl(rel: str, sel: str, fmt: str = ".2f") -> Source:
    return J(rel, "rows:" + sel, "metrics", "perplexity", fmt=fmt)


def hits(rel: str, sel: str, task: str, length: int, key: str = "correct") -> Source:
    """Facts found (or, key="total", prompts asked) by row `sel` at haystack `length` tokens."""
    return J(rel, "rows:" + sel, "details", task, "by_length", str(length), key, fmt="d")


def gen(rel: str, name: str, key: str, fmt: str = ".3f") -> Source:
    return J(rel, "generation", "rows:" + name, key, fmt=fmt)


# How a GPU figure says where it comes from (measured_on): its date and commit, and whether the kernels
# changed after it.
AGE = {True: ", measured on older kernels than `csrc/` holds now", False: "",
       None: ", kernels since unknown (no git history)"}
# (the README may wrap it anywhere: any space matches any whitespace)
MEASURED = (r"\d{4}-\d\d-\d\d, commit [0-9a-f]{7}(?:" + "|".join(re.escape(a) for a in AGE.values() if a)
            + ")?").replace(r"\ ", " ").replace(" ", r"\s+")


def measured_on(results, rel: str) -> str:
    """"DATE, commit HASH" of the result file `rel`, with ", measured on older kernels than `csrc/` holds
    now" when csrc/ changed after that commit (results.kernels_changed_since asks git)."""
    data = results.json(rel)
    commit, date = str(data["git_commit"])[:7], str(data["date"])[:10]
    return f"{date}, commit {commit}{AGE[results.kernels_changed_since(commit)]}"


def measured(rel: str) -> Source:
    """measured_on as a registered figure's value."""
    return Source(rel, lambda results: measured_on(results, rel), "str", MEASURED)


def log(rel: str, pattern: str, fmt: str = "str", convert: Callable = str) -> Source:
    """The first group of the first match of `pattern` in the log `rel` (for runs that wrote no JSON
    for the figure; the log is the unedited output of the run)."""
    def get(results):
        m = re.search(pattern, results.text(rel), re.MULTILINE)
        if not m:
            raise ValueError(f"adaskip: {rel} has no line matching {pattern!r}")
        return convert(m.group(1))
    return Source(rel, get, fmt)


def calc(fmt: str, fn: Callable, *sources: Source) -> Source:
    """A value computed from others (a sum, a ratio): `fn` of their raw values."""
    return Source(" + ".join(s.what for s in sources), lambda results: fn(*(s.get(results) for s in sources)), fmt)


def excess(a: Source, full: Source) -> Source:
    """How much higher a plan's perplexity is than the full model's, in % (rounded)."""
    return calc(".0f", lambda x, f: 100 * (x / f - 1), a, full)


@dataclass(frozen=True)
class Figure:
    """The README's words around one or more figures, `{}` for each (whitespace and line breaks in
    the README may differ: any run of spaces matches any run of whitespace), and their sources."""
    words: str
    sources: tuple

    def pattern(self) -> re.Pattern:
        parts = self.words.split("{}")
        if len(parts) - 1 != len(self.sources):
            raise ValueError(f"adaskip: figure {self.words!r} has {len(parts) - 1} places and "
                             f"{len(self.sources)} sources")
        # every run of whitespace in the words matches any run of whitespace (the README wraps lines)
        lit = ["".join(r"\s+" if t.isspace() else re.escape(t) for t in re.split(r"(\s+)", p) if t) for p in parts]
        out = lit[0]
        for src, after in zip(self.sources, lit[1:]):
            out += f"(?<![\\d.,])({src.capture})(?!\\d)" + after
        return re.compile(out)


def figure(words: str, *sources: Source) -> Figure:
    return Figure(words, sources)


def predicted(src: Source) -> Source:
    """`src`, marked as a prediction (the roofline or paper cost model): the figure's words must
    say "predict" (tests/test_readme_figures.py checks it)."""
    return Source(src.what, src.get, src.fmt, src.capture, prediction=True)


def locate(text: str, fig: Figure) -> re.Match:
    """The one place of `fig` in `text`; none or two are refused (the registry must name a figure
    unambiguously, and a figure whose words changed must be registered again)."""
    found = list(fig.pattern().finditer(text))
    if len(found) != 1:
        how = "is not in the README (its words changed?)" if not found else f"matches {len(found)} places"
        raise ValueError(f"adaskip: the registered figure {fig.words!r} {how}")
    return found[0]


def render_figures(text: str, results, figures) -> tuple:
    """`text` with every registered figure's values written from its sources, and the figures whose
    values changed. Two figures that claim the same number are refused (the registry is wrong)."""
    places, changed = [], []   # (start, end, value) of every figure's every number
    for fig in figures:
        m = locate(text, fig)
        try:
            values = [s.text(results) for s in fig.sources]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"adaskip: the registered figure {fig.words!r} reads a key its result files "
                             f"({', '.join(sorted({s.what for s in fig.sources}))}) do not have: {e!r}") from None
        places += [(m.start(i), m.end(i), v) for i, v in enumerate(values, 1)]
        # a list wrapped across lines is the same list
        if any(re.sub(r"\s+", " ", m.group(i)) != v for i, v in enumerate(values, 1)):
            changed.append(fig.words)
    places.sort()
    for (_, end, _), (start, _, _) in zip(places, places[1:]):
        if start < end:
            raise ValueError(f"adaskip: two registered figures claim {text[start:end]!r}")
    for start, end, v in reversed(places):
        if re.sub(r"\s+", " ", text[start:end]) != v:
            text = text[:start] + v + text[end:]
    return text, changed


# -- where results are, and what is a setting rather than a result ---------------------------------

RESULT_HEADINGS = ("## Which strategy",)
CITES_RESULTS = "bench/results"

# Numbers in result prose that are settings of the runs or names, not results: each pattern's
# whole match is exempt. Keep them narrow: a pattern that also matches a measured figure hides it.
SETTINGS = (
    r"SmolLM2-135M", r"Qwen2\.5-Coder-0\.5B", r"Qwen2\.5-Coder", r"LLaMA-3\.1-8B", r"\b\d+B\b", r"H100", r"L20", r"top-1",
    r"issue \d+", r"\d{4}-\d\d-\d\d",                                  # names, dates of folders
    # budgets: "at 8 sublayers", "at 16:", "up to 16", "below 8", a table's header
    r"(?:at |to |At )?\d+(?: / \d+)*(?:,? (?:and|or) \d+)? sublayers", r"\b[Aa]t \d+\b(?![.,]\d| ?(?:%|x\b|s\b|ms\b))",
    r"up to \d+", r"below \d+", r"\| skipped sublayers(?: \| \d+)+ \|",
    r"`[\w-]+` \d+(?: / \d+)?", r"(?:\w+ )?\d+-(?:sublayer|token|candidate|prompt)",
    # lengths and counts of what a run was given
    r"\b\d+k(?: / \d+k)*\b", r"\d+ tokens?", r"\d+ new\b", r"\d+ (?:windows|requests|probes|prompts)(?: a \w+)?",
    r"(?:weight|weighted) \d+", r"default is now \d+", r"depths? \d?\.\d(?: / \d?\.\d)*", r"\d+ of the \d+ groups",
    r"\d+ (?:essay|retrieval) (?:requests|probes)", r"\d+ (?:streaming )?groups\b", r"first \d+ tokens and the last \d+", r"with its \d+",
    r"window of \d+", r"\(\d+ prompts a depth\)", r"on \d+ of the same prompts",
    r"\d+ (?:quiet |busy )?CPU cores", r"\d+-core", r"batch <= \d+", r"(?:CUDA|torch) (?:>= )?\d+\.\d+",
    # the bounds a claim is judged by
    r"within \d+ of the full model", r"of \d+ cells",
    # the device-call plan of bench/gpu_check.sh
    r"\(\d\)", r"\(part \d",
)
# Numbers with a unit that are bounds someone sets, not measurements: a user's tolerance ("find at
# least 90 % of") and the time limits of bench/gpu_check.sh's device calls. Exempt even with a unit,
# so each names its words, and cannot exempt a measured figure.
LIMITS = (r"at least \d+ % of", r"\(timeout \d+ s,",
          r"the worst case the three calls take \d+ s with a \d+-s start, which is all of the \d+-minute")


def result_prose(text: str) -> list:
    """(line number, line) of every line the rule in the module docstring covers: the sections
    under RESULT_HEADINGS and every paragraph (or list item) elsewhere that cites bench/results/.
    Code blocks are not prose."""
    lines = text.split("\n")
    out, in_code, in_result, para = [], False, False, []

    def flush():
        if para and any(CITES_RESULTS in l for _, l in para):
            out.extend(para)
        para.clear()

    for no, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
            flush()
            continue
        if in_code:
            continue
        if line.startswith("## "):
            flush()
            in_result = line.startswith(RESULT_HEADINGS)
            continue
        if in_result:
            out.append((no, line))
            continue
        # a paragraph ends at a blank line or where a new list item starts
        if not line.strip() or line.lstrip().startswith("- "):
            flush()
        if line.strip():
            para.append((no, line))
    flush()
    return sorted(set(out))


# A number as prose writes it: not part of a word (SmolLM2, fp32) or of a decimal.
_PROSE_NUMBER = re.compile(r"(?<![A-Za-z_\d.])" + NUMBER + r"(?!\d)")
# A number followed by one of these is a measurement (a ratio, a share, a time): no setting pattern
# exempts it, however broad, so only a registered figure or a marked section can source it.
_RESULT_UNIT = re.compile(r"\s*(?:x\b|%|ms\b|us\b|µs\b|s\b|min\b|minutes?\b|hours?\b|GB/s\b|TFLOP)")


def _unfenced(text: str) -> str:
    """`text` with its fenced code blocks blanked (lines and offsets kept), so that their backticks
    pair with no inline code span."""
    return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.DOTALL | re.MULTILINE)


def _inline_code(text: str) -> list:
    """The spans of inline code (`...`, which may wrap a line but never spans a paragraph), which is
    not prose."""
    return [m.span() for m in re.finditer(r"`[^`]*`", _unfenced(text)) if "\n\n" not in m.group()]


def _spaced(pattern: str) -> re.Pattern:
    return re.compile(pattern.replace(" ", r"\s+"))


def unsourced(text: str, figures, rendered_spans) -> list:
    """(line number, number, line) for each number in the result prose (result_prose) that no
    registered figure, marked section (`rendered_spans`: their (start, end) in `text`), setting
    pattern or inline code span covers."""
    covered = list(rendered_spans)
    for fig in figures:
        try:
            m = locate(text, fig)
        except ValueError:
            continue  # --check reports a figure that is not found; here its numbers count as unsourced
        covered += [(m.start(i), m.end(i)) for i in range(1, len(fig.sources) + 1)]
    settings = [m.span() for pattern in SETTINGS for m in _spaced(pattern).finditer(text)]
    covered += [m.span() for pattern in LIMITS for m in _spaced(pattern).finditer(text)]
    covered += _inline_code(text)
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    out = []
    for no, line in result_prose(text):
        base = starts[no - 1]
        for m in _PROSE_NUMBER.finditer(line):
            a, b = base + m.start(), base + m.end()
            if any(s <= a and b <= e for s, e in covered):
                continue
            if not _RESULT_UNIT.match(text, b) and any(s <= a and b <= e for s, e in settings):
                continue
            out.append((no, m.group(), line.strip()))
    return out


# -- sources of a few kinds the registry reads -------------------------------------------------------

LIST = NUMBER + r"(?:,\s+" + NUMBER + r")*"     # a list may wrap across lines


def layers(rel: str, sel: str, kind: str, below: int = 10 ** 6) -> Source:
    """The layers (under `below`) whose attention (kind "attention") or FFN a row's plan skips,
    ascending: "5, 6, 25"."""
    odd = kind == "ffn"
    def get(results):
        skipped = select(results.json(rel)["rows"], sel)["skipped"]
        return sorted(s // 2 for s in skipped if s % 2 == odd and s // 2 < below)
    return Source(rel, get, "list", LIST)


def log_layers(rel: str, pattern: str) -> Source:
    """The list of layers `pattern`'s group matches in the log `rel` ("[5, 6, 25]"), as layers() gives it."""
    src = log(rel, pattern, convert=lambda s: [int(x) for x in s.split(",")])
    return Source(rel, src.get, "list", LIST)


def logdict(rel: str, line: str, key: str, fmt: str = ".2f") -> Source:
    """`key` of the dict a log line starting with `line` prints (refit_stand_ins.py writes one per text)."""
    import ast

    def get(results):
        m = re.search(rf"^{line} (\{{.*\}})$", results.text(rel), re.MULTILINE)
        if not m:
            raise ValueError(f"adaskip: {rel} has no line {line!r} followed by a dict")
        return ast.literal_eval(m.group(1))[key]
    return Source(rel, get, fmt)


def kv_run(rel: str, config: str, task: str, length: int, key: str = "correct") -> Source:
    """The kv_head_groups experiment's `task` hits (or prompts) of `config` at `length`, summed over
    the runs its eval.json holds (runs of one configuration on other prompts of a cell add up)."""
    def get(results):
        total, seen = 0, False
        for run in results.json(rel)["runs"]:
            for r in run["rows"]:
                cell = r["config"] == config and r["metrics"].get(task, {}).get("by_length", {}).get(str(length))
                if cell:
                    total, seen = total + cell[key], True
        if not seen:
            raise ValueError(f"adaskip: {rel} has no {task} at {length} for {config!r}")
        return total
    return Source(rel, get, "d")


def ttft_row(rel: str, config: str, tokens: int, key: str, fmt: str = ".3f") -> Source:
    """`key` of the kv_head_groups ttft stage's row of `config` at a prompt of `tokens` tokens
    (the last run that measured it)."""
    def get(results):
        found = [r for run in results.json(rel)["runs"] for r in run["rows"]
                 if r["config"] == config and r["prompt_tokens"] == tokens]
        if not found:
            raise ValueError(f"adaskip: no ttft row {config!r} at {tokens} tokens in {rel}")
        return found[-1][key]
    return Source(rel, get, fmt)


def kv_row(rel: str, config: str, *keys, fmt: str = ".2f") -> Source:
    """A value of the first row of `config` in the kv_head_groups experiment's runs."""
    def get(results):
        for run in results.json(rel)["runs"]:
            for r in run["rows"]:
                if r["config"] == config:
                    node = r
                    for k in keys:
                        node = node[k]
                    return node
        raise ValueError(f"adaskip: {rel} has no row {config!r}")
    return Source(rel, get, fmt)


def costs_row(rel: str, length: int, window: int, key: str, fmt: str = ".3f") -> Source:
    def get(results):
        for r in results.json(rel)["rows"]:
            if r["context_len"] == length and r["mode"] == "prefill" and r["window"] == window:
                return r[key]
        raise ValueError(f"adaskip: {rel} has no prefill row at {length} tokens, window {window}")
    return Source(rel, get, fmt)


def total_hits(rel: str, sel: str, task: str, key: str = "correct") -> Source:
    return J(rel, "rows:" + sel, "details", task, key, fmt="d")


def minutes(rel: str, pattern: str) -> Source:
    """A duration from a log, in minutes: `pattern`'s groups are (minutes, seconds) or (seconds,)."""
    def get(results):
        m = re.search(pattern, results.text(rel))
        if not m:
            raise ValueError(f"adaskip: {rel} has no line matching {pattern!r}")
        g = [float(x) for x in m.groups()]
        return g[0] + g[1] / 60 if len(g) == 2 else g[0] / 60
    return Source(rel, get, ".0f")


def tqdm_total(rel: str, label: str, done: str) -> Source:
    """The elapsed time, in minutes, a progress bar `label` printed when it reached `done` ("8/16")."""
    return minutes(rel, re.escape(label) + r":[^\r\n]*?\|\s*" + re.escape(done) + r" \[(\d+):(\d+)<")


# -- the registry ---------------------------------------------------------------------------------
# Folders of bench/results/ the README quotes outside its marked sections.
KL = "eval-smollm2-retrieval-kl-cpu-2026-12-06/"
W4 = "eval-smollm2-retrieval-kl-w4-cpu-2026-12-06/eval.json"
STD = "eval-smollm2-stdlib-standins-cpu-2026-12-06/eval.json"
DEMO_GROUPS = "demo-smollm2-cpu-2026-12-06-02772de/"
REFIT = "eval-smollm2-refit-cpu-2026-12-05/run.log"
G16 = "eval-smollm2-retrieval-grid16-cpu-2026-12-06-bf5049d/"
Q16 = "eval-qwen2.5-coder-retrieval16-cpu-2026-12-06-91d98d1/"
KV = "eval-smollm2-kv-head-groups-cpu-2026-12-06-bf5049d/"
SI = "eval-smollm2-standins-cpu-2026-12-06-bf5049d/"
ESSAYS = "eval-smollm2-essays-cpu-2026-12-06-ceafa42/eval.json"
GEN = "eval-smollm2-generation-cpu-2026-12-06/eval.json"
QS = "eval-qwen2.5-coder-stdlib-cpu-2026-12-06-91d98d1/"
GRID = "eval-smollm2-retrieval-grid-cpu-2026-12-06-91d98d1/"
QR = "eval-qwen2.5-coder-retrieval-cpu-2026-12-06-91d98d1/"
G16_KL = ("greedy-kl@8", "greedy-kl@16")


def _kl_search(*keys):
    return J(KL + "smollm2-essays-kl-retrieval-profile.json", "search", "kl", *keys, fmt=".0f")


def _grid16_rows():
    """The grid16 retrieval table: full / greedy-kl 8 / 16 at 2k, 4k (grid/) and 6k (grid6k/)."""
    out = []
    for sel in ("full",) + G16_KL:
        cells = []
        for task in ("passkey", "needle"):
            cells += [hits(G16 + "grid/eval.json", sel, task, 2048), hits(G16 + "grid/eval.json", sel, task, 4096)]
            if sel == "full":
                cells.append(hits(G16 + "grid/eval.json", sel, task, 4096, "total"))
            cells.append(hits(G16 + "grid6k/eval.json", sel, task, 6144))
            if sel == "full":
                cells.append(hits(G16 + "grid6k/eval.json", sel, task, 6144, "total"))
        name = "full" if sel == "full" else f"`greedy-kl` {sel.split('@')[1]}"
        words = "{} / {} of {}, {} of {}" if sel == "full" else "{} / {}, {}"
        out.append(figure(f"| {name} | {words} | {words} |", *cells))
    return out


def lowest(src: Source, *others: Source) -> Source:
    """`src`'s value, in bold when it is the lowest of itself and `others` (the best perplexity of a
    table row at one budget)."""
    def get(results):
        v = src.get(results)
        return f"**{format(v, src.fmt)}**" if v <= min(o.get(results) for o in others) else format(v, src.fmt)
    return Source(src.what, get, "str", rf"\*\*{NUMBER}\*\*|{NUMBER}")


def _grid16_ppl():
    out = []
    for folder, label in (("ppl-essays", "held-out essays"), ("ppl-pydoc", "stdlib help prose, `pydoc_data/topics.py`"),
                          ("ppl-stdlib", "stdlib Python source")):
        rel = G16 + folder + "/eval.json"
        cells = [ppl(rel, "full")]
        for strategy in ("greedy-kl", "greedy-loss", "blockpruner"):
            for b in (8, 16):
                rivals = [ppl(rel, f"{s}@{b}") for s in ("greedy-kl", "greedy-loss", "blockpruner") if s != strategy]
                cells.append(lowest(ppl(rel, f"{strategy}@{b}"), *rivals))
        out.append(figure(f"| {label} ({{}}) | {{}} / {{}} | {{}} / {{}} | {{}} / {{}} |", *cells))
    return out


def _standins_table():
    rel, loss = SI + "eval.json", SI + "greedy-loss/eval.json"
    budgets = (2, 4, 8, 12, 16)
    rows = [("| perplexity: **`greedy-kl`, linear stand-ins** |" + " **{}** |" * 5, rel, "greedy-kl@{}/linear", "perplexity"),
            ("| `greedy-kl`, channel stand-ins (same choices) |" + " {} |" * 5, rel, "greedy-kl@{}/channel", "perplexity"),
            ("| `greedy-kl`, scalar stand-ins (same choices) |" + " {} |" * 5, rel, "greedy-kl@{}/scalar", "perplexity"),
            ("| `greedy-loss` |" + " {} |" * 5, loss, "greedy-loss@{}", "perplexity"),
            ("| `blockpruner` (BlockPruner, identity) |" + " {} |" * 5, rel, "blockpruner@{}", "perplexity"),
            ("| top-1 agreement: `greedy-kl`, linear |" + " {} |" * 5, rel, "greedy-kl@{}/linear", "top1_agreement"),
            ("| `blockpruner` |" + " {} |" * 5, rel, "blockpruner@{}", "top1_agreement")]
    return [figure(words, *(J(f, "rows:" + sel.format(b), "metrics", key,
                              fmt=".2f" if key == "perplexity" else "dot3") for b in budgets))
            for words, f, sel, key in rows]


def excess_lower(a: Source, b: Source, full: Source) -> Source:
    """How much lower plan a's excess perplexity over the full model is than plan b's, in %."""
    return calc(".0f", lambda x, y, f: 100 * (1 - (x - f) / (y - f)), a, b, full)


def _figures_retrieval_kl():
    """'Which strategy': the first retrieval-aware profile, weight 4, stand-ins on stdlib."""
    kl8, kl_eval = "greedy-kl@8", KL + "eval.json"
    std = [ppl(STD, f"{s}@{b}{suffix}") for s, suffix in (("greedy-kl", "/linear"), ("greedy-kl", "/channel"),
                                                           ("greedy-kl", "/scalar"), ("adaskip", ""), ("shortgpt", ""))
           for b in (4, 8)]
    both = lambda rel, sel, key="correct": calc("d", lambda a, b: a + b, hits(rel, sel, "needle", 2048, key),
                                                 hits(rel, sel, "needle", 4096, key))
    return [
        figure("6-candidate shortlist of attention and FFN; {} forward passes counted whole, {} in\n"
               "whole-forward equivalents, {} minutes", _kl_search("forward_passes"), _kl_search("notes", "pass_equivalents"),
               calc(".0f", lambda s: s / 60, J(KL + "smollm2-essays-kl-retrieval-profile.json", "search", "kl", "wall_s"))),
        figure("skipped attention {} and found", layers(GRID + "eval.json", "greedy-kl@4", "attention")),
        figure("and found {} of {} pass keys at 4k in the grid below", hits(GRID + "eval.json", "greedy-kl@4", "passkey", 4096),
               hits(GRID + "eval.json", "greedy-kl@4", "passkey", 4096, "total")),
        figure("(needle {} of {} against {})", both(kl_eval, kl8), both(kl_eval, kl8, "total"), both(kl_eval, "full")),
        # "early": the first third of SmolLM2's 30 layers
        figure("takes early attention (layers {})", layers(kl_eval, kl8, "attention", below=10)),
        figure("the 8-sublayer plan (attention {}, FFN {}) finds {}/{}, {}/{} pass keys and\n{}/{}, {}/{} needles",
               layers(W4, kl8, "attention"), layers(W4, kl8, "ffn"),
               *[hits(W4, kl8, t, n, k) for t in ("passkey", "needle") for n in (2048, 4096) for k in ("correct", "total")]),
        figure("at perplexity {}\nagainst the full model's {} on that folder's windows (+{} %, against +{} % with weight 1)",
               ppl(W4, kl8), ppl(W4, "full"), excess(ppl(W4, kl8), ppl(W4, "full")),
               excess(ppl(kl_eval, kl8), ppl(kl_eval, "full"))),
        figure("of the standard library, full model {};", ppl(STD, "full")),
        figure("score\n{} / {} at 4 / 8 sublayers, with channel ones {} / {}, with the scalar {} /\n{} (`adaskip` {} / {}, "
               "`shortgpt` {} / {})", *std),
    ]


def _demo_beta_ffn(results):
    """The FFN the demo plan's beta comes from: the least similar of the kl search's first 8 choices."""
    kl = results.json(DEMO_GROUPS + "profile/smollm2-essays-kl-groups-demo-profile.json")["search"]["kl"]
    sims = kl["similarity"][:8]
    chosen = kl["order"][sims.index(min(sims))]
    if chosen % 2 == 0:
        raise ValueError("adaskip: the demo plan's least similar choice is an attention sublayer; the README says FFN")
    return chosen // 2


def _figures_demo():
    """'Which strategy': the demo's 8-sublayer plan alone (`--num-sublayers 8`), with online gating
    off and on, from the demo folder's logs (the demo writes no JSON)."""
    cal, demo = DEMO_GROUPS + "calibrate.log", DEMO_GROUPS + "demo-8-sublayers.log"
    online = DEMO_GROUPS + "demo-8-sublayers-online.log"
    found = log(cal, r"\(of 8\): full model \d+, 4 sublayers \d+, 8 sublayers (\d+)")
    gated = calc("d", lambda s: len(s.split(",")), log(online, r"skipped the FFN sublayers \[([\d, ]+)\]"))
    return [
        figure("The sublayer plan alone at 8 (`--num-sublayers 8`: attention {}, FFN {}; it finds {}\n  of {} "
               "held-out probes, the full model {}): predicted {}x, measured time to first token {}x\n  (median of {} "
               "alternating runs each, {}-token prompt",
               log_layers(demo, r"attention skipped in layers \[([\d, ]+)\]"),
               log_layers(demo, r"FFN skipped in layers \[([\d, ]+)\]"),
               found, log(cal, r"retrieval probes found at \d+ tokens \(of (\d+)\)"),
               log(cal, r"\(of 8\): full model (\d+),"), predicted(log(demo, r"^\s*predicted speedup (\d+\.\d+)")),
               log(demo, r"^time to first token\s+\S+\s+\S+\s+(\d+\.\d+)"), log(demo, r"median of (\d+) runs"),
               log(demo, r"^prompt: (\d+) tokens")),
        figure("At the plan's own beta ({}: the kl\n  search took FFN {} at that similarity) it gated {} more FFNs after {} tokens",
               log(online, r"beta = (\d\.\d+)"), Source(DEMO_GROUPS + "profile/", _demo_beta_ffn, "d"), gated,
               log(online, r"the first (\d+) decoded tokens")),
        figure("the demo's `greedy-kl` 8 plan (beta {},\n  from an FFN the kl search took at that similarity) gated {} more FFNs",
               log(online, r"beta = (\d\.\d+)"), gated),
    ]


def _figures_demo_groups():
    """'Which strategy': `make demo` with streaming groups validated beside the sublayer plans."""
    cal, demo = DEMO_GROUPS + "calibrate.log", DEMO_GROUPS + "demo.log"
    alone = DEMO_GROUPS + "demo-min-retrieval.log"
    groups = r"^\s*{} sublayers \+ 36 streaming groups: KL (\S+) agreement (\d\.\d+), retrieval (\d+)"

    def row(budget, i):
        return Source(cal, lambda results: re.search(groups.format(budget), results.text(cal), re.MULTILINE).group(i),
                      "str")
    ttft = r"^time to first token\s+\S+\s+\S+\s+(\d+\.\d+)"
    return [
        figure("the 36 groups alone\n  keep top-1 agreement {} (KL per token {}) against {} ({}) at 8 sublayers, and\n"
               "  find {} of 8 probes (the full model {})", row(0, 2), row(0, 1),
               log(cal, r"8 sublayers KL \S+ agreement (\d\.\d+)"), log(cal, r"8 sublayers KL (\S+) agreement"),
               row(0, 3), log(cal, r"\(of 8\): full model (\d+),")),
        figure("only the groups alone meet: predicted {}x prefill at 6k. Measured: time to first\n  token {}x",
               predicted(log(demo, r"^\s*predicted speedup (\d+\.\d+)")), log(demo, ttft)),
        figure("(agreement {}): predicted {}x, measured {}x", row(8, 2),
               predicted(log(alone, r"^\s*predicted speedup (\d+\.\d+)")), log(alone, ttft)),
    ]


def _figures_refit():
    def r(text, key):
        return logdict(REFIT, text, key)
    pydoc = r"\S*pydoc_data/topics\.py"
    return [figure("on held-out essays the scalar plans score {} / {} refitted against {} / {}\nat 8 / 16 sublayers, and on "
                   "`pydoc_data` {} / {} against {} / {}. Linear stand-ins\ngain a little on essays ({} / {} against {} / {}) "
                   "and lose on `pydoc_data` ({} /\n{} against {} / {})",
                   *[r(text, f"greedy-kl {b} {kind}{refit}") for text, kinds in
                     (("essays", ("scalar",)), (pydoc, ("scalar",)), ("essays", ("linear",)), (pydoc, ("linear",)))
                     for kind in kinds for refit in (" refit", "") for b in (8, 16)])]


def _figures_grid16():
    grid, loss = G16 + "grid/eval.json", G16 + "grid-loss/eval.json"
    g6 = G16 + "grid6k/eval.json"
    lost = [calc("d", lambda f, p: f - p, hits(grid, "full", "needle", n), hits(grid, "greedy-kl@8", "needle", n))
            for n in (2048, 4096)] + [calc("d", lambda f, p: f - p, hits(g6, "full", "needle", 6144),
                                           hits(g6, "greedy-kl@8", "needle", 6144))]
    wins = calc("d", lambda *v: sum(a < b for a, b in zip(v[::2], v[1::2])),
                *[s for folder in ("ppl-essays", "ppl-pydoc", "ppl-stdlib") for b in (8, 16)
                  for s in (ppl(G16 + folder + "/eval.json", f"greedy-loss@{b}"),
                            ppl(G16 + folder + "/eval.json", f"greedy-kl@{b}"))])
    q4, q8 = Q16 + "passkey-4k/eval.json", Q16 + "passkey-8k/eval.json"
    qr = lambda task, n: QR + f"{task}-{n // 1024}k/eval.json"
    return _grid16_rows() + _grid16_ppl() + [
        figure("needles do not\n  ({}, {} and {} lost)", *lost),
        figure("`greedy-loss`\n  (text loss alone) beats it in {} of 6 cells. With linear stand-ins the same search scored {}\n"
               "  on essays at 8", wins, ppl(W4, "greedy-kl@8")),
        figure("its 8-sublayer plan\n  finds {} / {} pass keys and {} / {} needles (full model {} / {} each; `greedy-kl` 8 "
               "found {} /\n  {} and {} / {}), and at 16 sublayers {} / {} of each",
               hits(loss, "greedy-loss@8", "passkey", 4096), hits(loss, "greedy-loss@8", "passkey", 4096, "total"),
               hits(loss, "greedy-loss@8", "needle", 4096), hits(loss, "greedy-loss@8", "needle", 4096, "total"),
               hits(loss, "full", "passkey", 4096), hits(loss, "full", "passkey", 4096, "total"),
               hits(grid, "greedy-kl@8", "passkey", 4096), hits(grid, "greedy-kl@8", "passkey", 4096, "total"),
               hits(grid, "greedy-kl@8", "needle", 4096), hits(grid, "greedy-kl@8", "needle", 4096, "total"),
               hits(loss, "greedy-loss@16", "passkey", 4096), hits(loss, "greedy-loss@16", "passkey", 4096, "total")),
        figure("keeps every pass key at 8 sublayers ({} / {} at 2k\n  and 4k, below) but not at 16: {} / {} at 4k and {} / {} "
               "at 8k against the full model's {} / {}\n  and {} / {}",
               hits(qr("passkey", 2048), "greedy-loss@8", "passkey", 2048), hits(qr("passkey", 2048), "greedy-loss@8", "passkey", 2048, "total"),
               hits(q4, "greedy-loss@16", "passkey", 4096), hits(q4, "greedy-loss@16", "passkey", 4096, "total"),
               hits(q8, "greedy-loss@16", "passkey", 8192), hits(q8, "greedy-loss@16", "passkey", 8192, "total"),
               hits(q4, "full", "passkey", 4096), hits(q4, "full", "passkey", 4096, "total"),
               hits(q8, "full", "passkey", 8192), hits(q8, "full", "passkey", 8192, "total")),
    ]


def _figures_targets():
    t = "eval-smollm2-targets-cpu-2026-12-06/"
    short, keys4 = t + "2k/eval.json", t + "4k-passkey/eval.json"
    lost = lambda rel, task, n, sel: calc("d", lambda f, x: f - x, hits(rel, "full", task, n), hits(rel, sel, task, n))  # noqa: E731
    return [
        figure("The {} streaming groups that cost what `greedy-kl` 8 saves (predicted {}x against {}x)",
               J(short, "rows:groups@0", "streaming_groups", fmt="d"),
               predicted(J(short, "rows:groups@0", "predicted_speedup", fmt=".3f")),
               predicted(J(short, "rows:greedy-kl@8", "predicted_speedup", fmt=".3f"))),
        figure("perplexity with them\n  ({} against {}); `greedy-kl` 8 loses {} needles at 2k",
               ppl(short, "groups@0"), ppl(short, "full"), lost(short, "needle", 2048, "greedy-kl@8")),
        figure("chose {} groups, the\n  only group count its calibration validated; they lose {} pass keys at 4k",
               J(short, "rows:greedy-kl@0", "streaming_groups", fmt="d"), lost(keys4, "passkey", 4096, "greedy-kl@0")),
    ]


def _figures_streaming():
    kv, costs, pilot, tt = KV + "eval.json", KV + "costs.json", KV + "pilot/eval.json", KV + "ttft/ttft.json"
    full6k = KV + "6k-full/eval.json"  # the full model on the 6k prompts grid16's grid6k/ did not score
    k6 = "eval-smollm2-kv-head-groups-6k-cpu-2026-12-06-02772de/eval.json"  # groups ranked on 6000-token probes
    both = lambda a, b: calc("d", lambda x, y: x + y, a, b)  # noqa: E731
    grid, g6, ess = G16 + "grid/eval.json", G16 + "grid6k/eval.json", G16 + "ppl-essays/eval.json"
    # the full model on all 24 prompts of a 6k task: samples 0-3 of a depth in grid6k/, 4-7 in 6k-full/
    full_6k = {task: both(hits(g6, "full", task, 6144), kv_run(full6k, "full", task, 6144)) for task in ("passkey", "needle")}
    p = lambda n: ("predicted", f"prefill@{n}", "speedup")
    cells = []
    for task in ("passkey", "needle"):
        for n in (2048, 4096):
            cells += [hits(grid, "full", task, n), hits(grid, "greedy-kl@8", task, n), kv_run(kv, "stream36", task, n)]
    return [
        figure("{} of the {} groups save what `greedy-kl` 8 saves at a\n4k prompt (predicted prefill {}x against {}x)",
               kv_row(kv, "stream36", "streaming_summary", "groups", fmt="d"), kv_row(kv, "stream36", "streaming_summary", "of", fmt="d"),
               predicted(kv_row(kv, "stream36", *p(4096), fmt=".3f")), predicted(costs_row(costs, 4096, 256, "kl8_speedup"))),
        figure("perplexity on held-out essays {} / {} / {}; pass keys 2k {} / {} / {}, 4k {} / {} / {} of\n{}; "
               "needles 2k {} / {} / {}, 4k {} / {} / {} of {}",
               ppl(ess, "full"), ppl(ess, "greedy-kl@8"), kv_row(kv, "stream36", "metrics", "perplexity"), *cells[:6],
               kv_run(kv, "stream36", "passkey", 4096, "total"), *cells[6:], kv_run(kv, "stream36", "needle", 4096, "total")),
        figure("at 6k (all 8 prompts a depth, {} of each task)\nstreaming found {} of {} pass keys and {} of {} needles, "
               "the full model {} and {}",
               kv_run(kv, "stream36", "passkey", 6144, "total"), kv_run(kv, "stream36", "passkey", 6144),
               kv_run(kv, "stream36", "passkey", 6144, "total"), kv_run(kv, "stream36", "needle", 6144),
               kv_run(kv, "stream36", "needle", 6144, "total"),
               full_6k["passkey"], full_6k["needle"]),
        figure("the 29 groups that cost what `greedy-kl` 8 saves at 6k (predicted prefill\n{}x) found {} of {} pass keys "
               "and {} of {} needles at 6k, against the full model's {} and {}",
               predicted(kv_row(k6, "stream29", *p(6144), fmt=".3f")), kv_run(k6, "stream29", "passkey", 6144),
               kv_run(k6, "stream29", "passkey", 6144, "total"), kv_run(k6, "stream29", "needle", 6144),
               kv_run(k6, "stream29", "needle", 6144, "total"),
               full_6k["passkey"], full_6k["needle"]),
        figure("ranked on 4k probes, 29 groups\nfound {})", kv_run(KV + "6k-29/eval.json", "stream29", "passkey", 6144)),
        figure("keeps the text (+{} % perplexity against +{} %)",
               calc(".1f", lambda x, f: 100 * (x / f - 1), kv_row(kv, "stream36", "metrics", "perplexity"), ppl(ess, "full")),
               excess(ppl(ess, "greedy-kl@8"), ppl(ess, "full"))),
        figure("(at 4k the\npass keys tie, {} and {}", hits(grid, "greedy-kl@8", "passkey", 4096), kv_run(kv, "stream36", "passkey", 4096)),
        figure("({} groups\npredict {}x against `greedy-kl` 8's {}x), at 6k more ({}x against {}x)",
               kv_row(kv, "stream36", "streaming_summary", "groups", fmt="d"),
               *[predicted(x) for x in (kv_row(kv, "stream36", *p(2048), fmt=".3f"), costs_row(costs, 2048, 256, "kl8_speedup"),
                                        kv_row(kv, "stream36", *p(6144), fmt=".3f"), costs_row(costs, 6144, 256, "kl8_speedup"))]),
        figure("time to\nfirst token {}x / {}x / {}x at 2k / 4k / 6k with the {} groups, against `greedy-kl` 8's\n"
               "{}x / {}x / {}x",
               *[ttft_row(tt, "stream36", n, "measured_cpu_speedup") for n in (2048, 4096, 6144)],
               kv_row(kv, "stream36", "streaming_summary", "groups", fmt="d"),
               *[ttft_row(tt, "kl8", n, "measured_cpu_speedup") for n in (2048, 4096, 6144)]),
        figure("price ({} groups) perplexity holds ({}) but retrieval does not ({} of {} on a pilot)",
               kv_row(pilot, "stream72", "streaming_summary", "groups", fmt="d"), kv_row(pilot, "stream72", "metrics", "perplexity"),
               calc("d", lambda a, b: a + b, kv_run(pilot, "stream72", "passkey", 4096), kv_run(pilot, "stream72", "needle", 4096)),
               calc("d", lambda a, b: a + b, kv_run(pilot, "stream72", "passkey", 4096, "total"),
                    kv_run(pilot, "stream72", "needle", 4096, "total"))),
    ]


def _figures_standins():
    rel, loss, ret = SI + "eval.json", SI + "greedy-loss/eval.json", SI + "retrieval/eval.json"
    lower = [excess_lower(ppl(rel, f"greedy-kl@{b}/linear"), ppl(rel, f"blockpruner@{b}"), ppl(rel, "full"))
             for b in (4, 8, 12, 16)]
    search = lambda f, method, key: J(f, "search", method, key, fmt="d")
    return _standins_table() + [
        figure("(held-out essays, 4 windows of 2048 tokens, full model {};", ppl(rel, "full")),
        figure("perplexity over the full model is {} / {} / {} / {} % lower than BlockPruner's", *lower),
        figure("and {} % lower than `greedy-loss`'s at 8",
               excess_lower(ppl(rel, "greedy-kl@8/linear"), ppl(loss, "greedy-loss@8"), ppl(rel, "full"))),
        figure("It costs {} forward passes of 1k tokens for budgets up to 16 (BlockPruner with the\n"
               "same 6-candidate shortlist: {}; `greedy-loss` with its 4: {})",
               search(SI + "profile.json", "kl", "forward_passes"), search(SI + "profile.json", "blockpruner", "forward_passes"),
               search(SI + "greedy-loss/profile-loss.json", "loss", "forward_passes")),
        # a linear stand-in costs 2 * rank * hidden multiply-adds a token, and its rank is hidden / 8
        figure("Its stand-ins cost {} % of an FFN's\n  multiply-adds each",
               calc(".0f", lambda rank, ffn: 100 * 2 * rank * 8 * rank / ffn, J(SI + "profile.json", "search", "kl", "notes", "rank"),
                    J(SI + "profile.json", "search", "kl", "notes", "ffn_multiply_adds"))),
        figure("break passkey retrieval ({} of {}\n  against the full model's {} of {} at 2k-8k; needle {} of {} against {})",
               total_hits(ret, "greedy-kl@8/linear", "passkey"), total_hits(ret, "greedy-kl@8/linear", "passkey", "total"),
               total_hits(ret, "full", "passkey"), total_hits(ret, "full", "passkey", "total"),
               total_hits(ret, "greedy-kl@8/linear", "needle"), total_hits(ret, "greedy-kl@8/linear", "needle", "total"),
               total_hits(ret, "full", "needle")),
        figure("at 8 sublayers it was {} against `greedy-loss`'s {} on the\n  earlier windows",
               ppl(ESSAYS, "adaskip@8", ".1f"), ppl(ESSAYS, "greedy-loss@8", ".1f")),
    ]


def _figures_generation():
    qa, ql = QS + "generation/eval.json", QS + "greedy-loss/generation/eval.json"
    smol = [gen(GEN, n, "rouge_l") for n in ("full/bfloat16", "greedy-kl@4", "greedy-kl@8", "adaskip@4", "adaskip@8",
                                               "shortgpt@4", "shortgpt@8")]
    qwen = [gen(qa, "full/bfloat16", "rouge_l"), gen(ql, "greedy-loss@4", "rouge_l"), gen(ql, "greedy-loss@8", "rouge_l")] + \
        [gen(qa, n, "rouge_l") for n in ("adaskip@4", "adaskip@8", "shortgpt@4", "shortgpt@8")]
    g, g6 = GRID, GRID + "6k/eval.json"
    pk = lambda rel, sel, task, n, key="correct": hits(rel, sel, task, n, key)
    needle24 = GRID + "needle-2k-4k/eval.json"
    qr = lambda task, n: QR + f"{task}-{n // 1024}k/eval.json"
    tenth = lambda task: calc("d", lambda acc, total: round(acc * total / 3),
                              J(g6, "rows:greedy-kl@4", "details", task, "by_cell", "6144", "0.9", fmt="str"),
                              hits(g6, "greedy-kl@4", task, 6144, "total"))
    return [
        figure("| SmolLM2-135M, essays, 1k + 4k tokens, 64 new | {} | {} / {} | – | {} / {} | {} / {} |", *smol),
        figure("| Qwen2.5-Coder-0.5B, stdlib, 2k tokens, 32 new | {} | – | {} / {} | {} / {} | {} / {} |",
               qwen[0], qwen[1], qwen[2], *qwen[3:]),
        figure("| full | {} / {} / {} of {} | {} / {} / {} of {} |",
               pk(g + "eval.json", "full", "passkey", 2048), pk(g + "eval.json", "full", "passkey", 4096),
               pk(g6, "full", "passkey", 6144), pk(g6, "full", "passkey", 6144, "total"),
               pk(needle24, "full", "needle", 2048), pk(needle24, "full", "needle", 4096),
               pk(g6, "full", "needle", 6144), pk(g6, "full", "needle", 6144, "total")),
        figure("| `greedy-kl` 4 (the earlier demo's plan, text-only search) | {} / {} / {} of {} | {} / {} / {} of {} |",
               pk(g + "eval.json", "greedy-kl@4", "passkey", 2048), pk(g + "eval.json", "greedy-kl@4", "passkey", 4096),
               pk(g6, "greedy-kl@4", "passkey", 6144), pk(g6, "greedy-kl@4", "passkey", 6144, "total"),
               pk(needle24, "greedy-kl@4", "needle", 2048), pk(needle24, "greedy-kl@4", "needle", 4096),
               pk(g6, "greedy-kl@4", "needle", 6144), pk(g6, "greedy-kl@4", "needle", 6144, "total")),
        figure("At 6k the plan finds {} of {} facts in the last tenth", tenth("passkey"),
               calc("d", lambda t: t // 3, hits(g6, "greedy-kl@4", "passkey", 6144, "total"))),
        figure("At\n{} tokens the full model itself finds {} of {} passkeys and {} of {} needles",
               J(GRID + "8k-full/eval.json", "settings", "retrieval_lengths", 0, fmt="d"),
               pk(GRID + "8k-full/eval.json", "full", "passkey", 8176), pk(GRID + "8k-full/eval.json", "full", "passkey", 8176, "total"),
               pk(GRID + "needle-8k-full/eval.json", "full", "needle", 8176),
               pk(GRID + "needle-8k-full/eval.json", "full", "needle", 8176, "total")),
        figure("| full | {} / {} of {} | {} of {} |", pk(qr("passkey", 2048), "full", "passkey", 2048),
               pk(qr("passkey", 4096), "full", "passkey", 4096), pk(qr("passkey", 4096), "full", "passkey", 4096, "total"),
               pk(qr("needle", 2048), "full", "needle", 2048), pk(qr("needle", 2048), "full", "needle", 2048, "total")),
        figure("| `greedy-loss` 8 | {} / {} of {} | {} of {} |", pk(qr("passkey", 2048), "greedy-loss@8", "passkey", 2048),
               pk(qr("passkey", 4096), "greedy-loss@8", "passkey", 4096), pk(qr("passkey", 4096), "greedy-loss@8", "passkey", 4096, "total"),
               pk(qr("needle", 2048), "greedy-loss@8", "needle", 2048), pk(qr("needle", 2048), "greedy-loss@8", "needle", 2048, "total")),
    ]


def _figures_qwen_and_bullets():
    loss, ada = QS + "greedy-loss/eval.json", QS + "eval.json"
    b = (4, 8, 12, 16)
    grid, g6 = G16 + "grid/eval.json", G16 + "grid6k/eval.json"
    return [
        figure("(held-out stdlib code, full model {}), perplexity at 4 / 8 / 12 / 16\nsublayers: `greedy-loss` {} / {} / {} / {}, "
               "`adaskip` {} / {} / {} / {},\n`shortgpt` {} / {} / {} / {}.", ppl(ada, "full"),
               *[ppl(loss, f"greedy-loss@{x}") for x in b], *[ppl(ada, f"adaskip@{x}") for x in b],
               *[ppl(ada, f"shortgpt@{x}") for x in b]),
        figure("the code model keeps about {} tokens at 4", gen(QS + "generation/eval.json", "adaskip@4", "common_prefix", ".0f")),
        figure("still loses a few needles ({} / {} at 4k, {} / {} at 6k)", hits(grid, "greedy-kl@8", "needle", 4096),
               hits(grid, "greedy-kl@8", "needle", 4096, "total"), hits(g6, "greedy-kl@8", "needle", 6144),
               hits(g6, "greedy-kl@8", "needle", 6144, "total")),
    ]


def _figures_commands():
    """'Commands': how long a fresh `make demo` calibrates, summed from the progress bars of the
    Makefile's calibration run from nothing (the demo folder's calibrate.log)."""
    cal = DEMO_GROUPS + "calibrate.log"
    return [figure("the first `make demo` spends about\n{} minutes calibrating",
                   calc(".0f", lambda *m: sum(m), tqdm_total(cal, "calibrating", "8/8"),
                        tqdm_total(cal, "search (kl, scalar stand-ins)", "8/8"),
                        tqdm_total(cal, "scoring KV-head groups", "12/12"), tqdm_total(cal, "validating", "45/45"),
                        tqdm_total(cal, "validating retrieval", "48/48")))]


def _figures_gpu():
    """GPU figures outside the marked sections, each with the commit and date it was measured on."""
    ffn = "ffn-gated-h100-80gb-hbm3-2026-11-22-c9f1ae9.json"

    def row(op, key, fmt):
        def get(results):
            for r in results.json(ffn)["ffn_rows"]:
                if r["op"] == op and r["hidden"] == 4096 and r["tokens"] == 1:
                    return r[key]
            raise ValueError(f"adaskip: {ffn} has no 1-token row {op!r} of the 8B FFN")
        return Source(ffn, get, fmt)
    return [figure("(H100, 8B FFN: {} us, {} % of copy bandwidth, against {} us; {};\n"
                   "  `bench/results/ffn-gated-h100-80gb-hbm3-2026-11-22-c9f1ae9.json`)",
                   row("ffn gated on", "time_us", ".0f"), row("ffn gated on", "pct_copy_bw", ".1f"),
                   row("ffn cuBLAS", "time_us", ".0f"), measured(ffn)),
            figure("gated-off sublayer ({} us for the whole FFN", row("ffn gated off", "time_us", ".1f"))]


def figures() -> list:
    """Every registered figure of the README, in the order the README has them."""
    return (_figures_commands() + _figures_gpu() + _figures_targets() + _figures_retrieval_kl() + _figures_demo() + _figures_demo_groups() + _figures_refit() + _figures_grid16() + _figures_streaming()
            + _figures_standins() + _figures_generation() + _figures_qwen_and_bullets())


def unscoped_measurements(text: str) -> list:
    """(line number, number, line) of each number with a unit of measurement (_RESULT_UNIT) outside
    the result prose and outside code: a measured figure there would escape unsourced(), so the rule of
    the module docstring requires that there is none (cite its result file, and it is in scope)."""
    scope = {no for no, _ in result_prose(text)}
    exempt = [m.span() for pattern in LIMITS for m in _spaced(pattern).finditer(text)]
    unfenced = _unfenced(text)
    exempt += _inline_code(text)
    out, base = [], 0
    for no, line in enumerate(unfenced.split("\n"), 1):
        if no not in scope:
            for m in _PROSE_NUMBER.finditer(line):
                a, b = base + m.start(), base + m.end()
                if _RESULT_UNIT.match(text, b) and not any(s <= a and b <= e for s, e in exempt):
                    out.append((no, m.group(), line.strip()))
        base += len(line) + 1
    return out
