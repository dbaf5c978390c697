"""`adaskip eval`: quality of skipping strategies against the full model (tables, JSON, plots)."""
from __future__ import annotations

import time
from pathlib import Path

from .common import (add_model_options, add_search_options, at_least, calibrate_texts, check_common, check_names,
                     check_out_dir, dtype_of, load_profile, remove_profile, split, stamped, text_paths)


def register(subparsers) -> None:
    from ..skipping.strategies import PAPER_COMPARISON, SKIPPING_STRATEGIES

    e = subparsers.add_parser("eval", help="quality of skipping strategies vs the full model (tables, JSON, plots)")
    add_model_options(e)
    e.add_argument("--profile", help="importance profile (default: calibrate here on --calibration-data)")
    e.add_argument("--calibration-data", nargs="+", default=["essays"],
                   help="text files, folders, 'essays' or 'stdlib' (default: essays)")
    e.add_argument("--num-requests", type=int, default=20)
    e.add_argument("--prompt-len", type=int, default=1024)
    add_search_options(e)
    e.add_argument("--strategies", default=",".join(PAPER_COMPARISON),
                   help=f"comma-separated, from {', '.join(SKIPPING_STRATEGIES)}")
    e.add_argument("--budgets", default="4,8,12,16", help="numbers of skipped sublayers")
    e.add_argument("--stand-ins", default="", help="greedy-kl: compare these stand-ins (comma-separated: scalar, "
                   "channel, linear) on the same search's choices")
    e.add_argument("--min-agreement", default="", help="also the fastest validated plan of each strategy with at "
                   "least these top-1 agreements (comma-separated; profile validated with calibrate "
                   "--validate-budgets)")
    e.add_argument("--min-retrieval", default="", help="also the fastest validated plan of each strategy that keeps "
                   "at least these fractions of the full model's hits on the validation's retrieval probes "
                   "(comma-separated; with --min-agreement, every pair; validated plans with streaming groups "
                   "compete, priced by the cost model at --context-len)")
    e.add_argument("--streaming-groups", default="", help="also plans of this many streaming KV-head groups "
                   "(comma-separated counts; the cheapest by the profile's group scores: calibrate with "
                   "--streaming-probes), alone and on the plans of --streaming-budgets")
    e.add_argument("--streaming-budgets", default="", help="put the --streaming-groups on each strategy's plans "
                   "at these budgets too (comma-separated, among --budgets)")
    e.add_argument("--speedups", default="", help="also compare at these predicted speedups (equal time)")
    e.add_argument("--context-len", type=int, default=8192, help="context the cost model is for: it prices the equal-time plans, the tolerance rows and the "
                   "plans with streaming groups (default 8192)")
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
    _add_generation_options(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--longbench-dir", help="a LongBench copy: data/<name>.jsonl (+ config/ for its prompts)")
    e.add_argument("--longbench-datasets", default="multifieldqa_en,triviaqa,trec,gov_report,multi_news")
    e.add_argument("--limit", type=int, help="longbench: examples per dataset")
    e.add_argument("--out", default="eval-out", help="folder for eval.json, eval.md and the plots")
    e.set_defaults(func=cmd_eval)


def _add_generation_options(e) -> None:
    """The generation and speculative tasks' options."""
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


def _settings(a):
    """The EvalSettings the options ask for."""
    from ..evaluation.harness import EvalSettings

    return EvalSettings(strategies=split(a.strategies, str), budgets=split(a.budgets, int),
                        speedups=split(a.speedups, float), stand_ins=split(a.stand_ins, str),
                        min_agreements=split(a.min_agreement, float), min_retrievals=split(a.min_retrieval, float),
                        streaming_groups=split(a.streaming_groups, int),
                        streaming_budgets=split(a.streaming_budgets, int), tasks=split(a.tasks, str),
                        window_len=a.window_len, max_windows=a.windows,
                        retrieval_lengths=split(a.retrieval_lengths, int),
                        retrieval_depths=split(a.retrieval_depths, float),
                        retrieval_samples=a.retrieval_samples, retrieval_batch=a.retrieval_batch, seed=a.seed,
                        generation_lengths=split(a.generation_lengths, int),
                        generation_prompts=a.generation_prompts, generation_tokens=a.generation_tokens,
                        generation_instruction=a.generation_instruction,
                        generation_floor_dtype=None if a.generation_floor == "none" else a.generation_floor,
                        generation_batch=a.generation_batch,
                        generation_online_betas=split(a.generation_online_betas, float),
                        speculative_draft_tokens=split(a.speculative_draft_tokens, int),
                        speculative_online=a.speculative_online,
                        speculative_cuda_graph=a.speculative_cuda_graph,
                        longbench_dir=a.longbench_dir,
                        longbench_datasets=split(a.longbench_datasets, str), longbench_limit=a.limit)


def _check_options(a):
    """The settings, checked before anything loads."""
    from ..skipping.strategies import STRATEGIES

    check_common(a, needs_tokenizer=True)
    at_least(a, num_requests=1, prompt_len=2, search_candidates=1, search_requests=1, window_len=2, windows=1,
             retrieval_samples=1, retrieval_batch=1, limit=1, context_len=1, search_retrieval_weight=0.0,
             search_probes=0)
    check_names("--strategies", split(a.strategies, str), STRATEGIES)
    settings = _settings(a)
    if settings.speculative_cuda_graph:
        from ..runtime.loading import resolve_device

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
    if "longbench" in settings.tasks:
        _check_longbench_text(Path(a.longbench_dir), settings.longbench_datasets)
    return settings


def _check_longbench_text(root: Path, datasets) -> None:
    """The LongBench files the eval would read are UTF-8 text (adaskip.data.text_problem)."""
    from ..data import text_problem

    for f in sorted(root.glob("*.jsonl")) + sorted(root.glob("data/*.jsonl")):
        if datasets and f.stem not in datasets:
            continue
        problem = text_problem(f)
        if problem:
            raise SystemExit(f"adaskip: --longbench-dir {f}: {problem}")


def _cost_model(a, model):
    from ..skipping.costs import H100_SPEC, L20_SPEC, sublayer_costs

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


def _calibrated_here(a, model, tokenizer, settings, searches, paths, out: Path, run: dict):
    """The profile of an eval without --profile: calibrated on --calibration-data, saved in --out."""
    print(f"calibrating on {' '.join(a.calibration_data)} ({a.num_requests} x {a.prompt_len} tokens)")
    most = max([*settings.budgets, _sublayers_for_targets(a, model, settings.speedups), 1])
    profile = calibrate_texts(
        model, tokenizer, a.calibration_data, paths, a.num_requests, a.prompt_len, search=searches,
        search_max_sublayers=most, search_candidates=a.search_candidates, search_requests=a.search_requests,
        progress=True, search_stand_in=a.search_stand_in, search_weighting=a.search_weighting,
        search_retrieval_weight=a.search_retrieval_weight, search_probes=a.search_probes,
        checkpoint=lambda p, step, done: stamped(p, run).save(out / "profile.partial.json"))
    stamped(profile, run).save(out / "profile.json")  # as calibrate does: the finished steps beside it until then
    remove_profile(out / "profile.partial.json")
    return profile


def _documents(paths, profile, settings) -> list:
    """The texts of the evaluation documents that calibration did not read."""
    from ..evaluation.harness import held_out

    if not paths:
        return []
    kept = held_out(paths, profile)
    if len(kept) < len(paths):
        settings.notes.append(f"ppl / generation / speculative: {len(paths) - len(kept)} documents left out because "
                              "calibration read them")
    if not kept:
        raise SystemExit("adaskip: every evaluation document was read by calibration; give others")
    return [p.read_text(encoding="utf-8") for p in kept]  # checked as text by text_paths


def cmd_eval(a) -> None:
    from ..benchmarks.common import provenance
    from ..runtime.loading import load_model
    from ..skipping.strategies import searches_needed

    started = provenance(getattr(a, "argv", None))  # the code that runs, before this run writes a file
    settings = _check_options(a)
    searches = searches_needed(settings.strategies)
    profile = load_profile(a)
    calibration_paths = []
    if settings.streaming_groups:
        if profile is None:
            raise SystemExit("adaskip: --streaming-groups takes the groups a profile ranks; give --profile (one "
                             "calibrated with --streaming-probes)")
        if not profile.group_scores:
            raise SystemExit(f"adaskip: --profile {a.profile} ranks no KV-head groups; calibrate with "
                             "--streaming-probes to plan streaming groups")
    if profile is not None:
        missing = [m for m in searches if m not in profile.search]
        if missing:
            raise SystemExit(f"adaskip: the profile has no {missing} search for the strategies that need it; "
                             f"calibrate with --search {','.join(missing)}")
    else:
        calibration_paths = text_paths(a.calibration_data, flag="--calibration-data")
    reads_documents = {"ppl", "generation", "speculative"} & set(settings.tasks)
    paths = text_paths(a.documents, "documents", "--documents") if reads_documents else []
    out = check_out_dir("--out", a.out)  # last: the checks above create nothing
    model, tokenizer = load_model(a.model, dtype=dtype_of(a.dtype), device=a.device)
    if tokenizer is None:
        raise SystemExit("adaskip: eval needs the model's tokenizer")
    settings.check_model(model.args)
    if profile is not None:
        profile.check_model(model)
    else:
        profile = _calibrated_here(a, model, tokenizer, settings, searches, calibration_paths, out, started)
    documents = _documents(paths, profile, settings)
    costs = None
    if settings.speedups or settings.min_agreements or settings.min_retrievals or settings.streaming_groups:
        # one cost model prices every row: a plan with streaming groups is priced no other way
        costs = _cost_model(a, model)
        settings.notes.append(f"predicted speedups: roofline model of {costs.device}, {a.phase} at {a.context_len} "
                              "tokens")
    _run_and_report(a, model, tokenizer, profile, settings, documents, costs, out, started)


def _tables(result, settings) -> str:
    """The markdown eval.md holds and the command prints."""
    from ..evaluation.report import markdown_table, retrieval_table

    table = markdown_table(result["rows"])
    for kind in ("passkey", "needle"):
        if kind in settings.tasks:
            table += f"\n\n{kind} (correct / tasks at each context length, every depth together):\n\n"
            table += retrieval_table(result["rows"], kind)
    if "generation" in result:
        from ..evaluation.generation import generation_table

        table += (f"\n\nGeneration ({settings.generation_tokens} greedy tokens after a "
                  f"'{settings.generation_instruction}' instruction), against the full model's own text:\n\n"
                  + generation_table(result["generation"]))
    if "speculative" in result:
        from ..evaluation.speculative import speculative_table

        table += (f"\n\nLossless self-speculative decoding ({settings.generation_tokens} greedy tokens; each plan "
                  "drafts, the full model verifies):\n\n" + speculative_table(result["speculative"]))
    return table


def _run_and_report(a, model, tokenizer, profile, settings, documents, costs, out: Path, provenance: dict) -> None:
    from .._util import write_json
    from ..benchmarks.common import device_info
    from ..evaluation.harness import run_eval
    from ..evaluation.report import plot_profile_heatmap, plot_quality, plot_retrieval, plot_retrieval_by_speedup

    started = time.time()
    result = run_eval(model, tokenizer, profile, settings, documents=documents, costs=costs)
    table = _tables(result, settings)
    print("\n" + table + "\n")
    for note in result["notes"]:
        print("note:", note)
    report = {**provenance, "model": a.model, **device_info(),
              "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
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
    written.append(plot_retrieval_by_speedup(result["rows"], out / "retrieval-speedup.png",
                                             title=f"{a.model}: retrieval vs predicted speedup"))
    written.append(plot_profile_heatmap(profile, out / "similarity-heatmap.png"))
    print("wrote " + ", ".join(str(p) for p in written if p is not None))

