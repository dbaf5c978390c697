"""`adaskip calibrate`: learn per-sublayer importance from calibration texts, with the greedy
searches and the validation asked for, saving each finished step as it goes."""
from __future__ import annotations

import sys

from .common import (add_model_options, add_search_options, at_least, calibrate_texts, check_budgets_and_strategies,
                     check_common, check_names, check_out_file, dtype_of, remove_profile, split, stamped, text_paths)


def register(subparsers) -> None:
    from ..skipping.greedy import METHODS

    c = subparsers.add_parser("calibrate", help="learn per-sublayer importance from calibration texts")
    add_model_options(c)
    c.add_argument("--data", nargs="+", required=True, help="text files, folders (*.txt, *.md, *.py), "
                   "'essays' or 'stdlib'")
    c.add_argument("--num-requests", type=int, default=20)
    c.add_argument("--prompt-len", type=int, default=4096)
    c.add_argument("--out", required=True)
    add_search_options(c)
    c.add_argument("--search", help=f"also run greedy searches: {', '.join(METHODS)} (comma-separated)")
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
    c.add_argument("--streaming-probes", type=int, default=0,
                   help="also rank every KV-head group for streaming (plans' --streaming-groups) on this many "
                   "retrieval probes of --validation-len tokens and 4 calibration windows, one full-model pass "
                   "each (0: not ranked)")
    c.add_argument("--streaming-window", type=int, default=256,
                   help="the recent keys a streaming group sees (besides 4 sink tokens)")
    c.add_argument("--validate-streaming",
                   help="also validate these numbers of streaming KV-head groups (comma-separated), alone and on "
                   "each --validate-budgets plan, so that --min-retrieval / --min-agreement / --max-kl choose among "
                   "sublayer and group plans alike (needs --validate-budgets and --streaming-probes)")
    c.add_argument("--resume", action="store_true",
                   help="go on from the <out>.partial.json an interrupted calibrate left (same model, data and "
                   "settings): its statistics and search choices are kept")
    c.set_defaults(func=cmd_calibrate)


def _check_options(a) -> tuple:
    """(searches, budgets, strategies), checked before the model loads: a search that the
    validation needs must run in this calibration."""
    from ..skipping.greedy import METHODS
    from ..skipping.strategies import searches_needed

    check_common(a, needs_tokenizer=True)
    at_least(a, num_requests=1, prompt_len=2, search_max=1, search_candidates=1, search_requests=1,
             validation_requests=1, search_retrieval_weight=0.0, search_probes=0, validation_probes=0,
             validation_len=64, streaming_probes=0, streaming_window=1)
    if a.streaming_probes and (a.validation_len or a.prompt_len) < 256:
        raise SystemExit("adaskip: --streaming-probes builds retrieval probes of --validation-len tokens, which need "
                         "at least 256")
    if (a.search_retrieval_weight or 0) > 0 and a.search_probes == 0:
        raise SystemExit("adaskip: --search-retrieval-weight > 0 needs --search-probes >= 1 (or give weight 0)")
    searches, budgets = split(a.search, str), split(a.validate_budgets, int)
    strategies = split(a.validate_strategies, str)
    check_names("--search", searches, METHODS)
    check_budgets_and_strategies(budgets, strategies, "--validate-budgets", "--validate-strategies")
    missing = [m for m in searches_needed(strategies) if m not in searches]
    if budgets and missing:
        raise SystemExit(f"adaskip: validating {','.join(strategies)} needs the {','.join(missing)} search; "
                         f"add --search {','.join(sorted(set(searches) | set(missing)))}")
    if not budgets and (a.validate_strategies != "adaskip" or a.validation_requests is not None):
        raise SystemExit("adaskip: --validate-strategies and --validation-requests need --validate-budgets")
    streaming = split(a.validate_streaming, int)
    if streaming and not (budgets and a.streaming_probes):
        raise SystemExit("adaskip: --validate-streaming validates group plans next to --validate-budgets, with the "
                         "groups --streaming-probes ranks: give both")
    if any(g < 1 for g in streaming) or len(set(streaming)) != len(streaming):
        raise SystemExit(f"adaskip: --validate-streaming takes distinct numbers of groups >= 1, got "
                         f"{a.validate_streaming}")
    return searches, budgets, strategies, streaming


def _resume_from(a, partial):
    """The partial profile --resume goes on from, validated before the model loads (None without --resume)."""
    from ..skipping.profile import ImportanceProfile

    if not a.resume:
        return None
    if not partial.is_file():
        raise SystemExit(f"adaskip: --resume: there is no {partial} to resume (an interrupted calibrate with "
                         "this --out leaves one)")
    return ImportanceProfile.load(partial)


def cmd_calibrate(a) -> None:
    from ..benchmarks.common import provenance
    from ..runtime.loading import load_model

    run = provenance(getattr(a, "argv", None))  # the code that runs, before this run writes a file
    searches, budgets, strategies, streaming = _check_options(a)
    paths = text_paths(a.data)
    out = check_out_file("--out", a.out)  # last: the checks above create nothing
    # Each step's result is written as soon as it exists (atomically) to a partial profile beside
    # --out: a later step that fails or is interrupted leaves the steps before it there, and --out
    # itself only ever holds a finished profile (what `make demo` takes an existing file for).
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    resume = _resume_from(a, partial)
    model, tokenizer = load_model(a.model, dtype=dtype_of(a.dtype), device=a.device)
    saved = []

    def checkpoint(profile, step, done):
        stamped(profile, run, resume).save(partial)
        saved.append(step if done else f"{step}: {len(profile.search[step.split()[0]]['order'])} choices so far")
        if done:
            print(f"saved {partial} ({step})", flush=True)

    try:
        profile = calibrate_texts(
            model, tokenizer, a.data, paths, a.num_requests, a.prompt_len, search=searches,
            search_max_sublayers=a.search_max, search_candidates=a.search_candidates,
            search_requests=a.search_requests, progress=True, validate_budgets=budgets,
            validate_strategies=strategies,
            validation_requests=4 if a.validation_requests is None else a.validation_requests,
            search_stand_in=a.search_stand_in, search_weighting=a.search_weighting, checkpoint=checkpoint,
            resume=resume, search_retrieval_weight=a.search_retrieval_weight, search_probes=a.search_probes,
            validation_probes=a.validation_probes, validation_len=a.validation_len,
            streaming_probes=a.streaming_probes, streaming_window=a.streaming_window, validate_streaming=streaming)
    except BaseException:
        if saved:
            print(f"adaskip: {partial} keeps the steps finished before this one (up to {saved[-1]}); it loads as a "
                  "profile like any other, and the same command with --resume goes on from it", file=sys.stderr)
        raise
    stamped(profile, run, resume).save(out)
    remove_profile(partial)
    _print_summary(a.out, profile)


def _print_summary(out, profile) -> None:
    print(f"wrote {out}: {profile.num_requests} requests, {profile.tokens} tokens")
    for method, r in profile.search.items():
        print(f"  {method} search: {len(r['order'])} sublayers, {r['forward_passes']} forward passes, "
              f"{r['wall_s']:.0f} s")
    if profile.group_scores:
        g = profile.group_scores
        print(f"  KV-head groups ranked for streaming (sink {g['sink']}, window {g['window']}) on {g['probes']} "
              f"probes of {g['probe_len']} tokens and {g['texts']} text windows: {g['forward_passes']} forward "
              f"passes, {g['wall_s']:.0f} s")
    for strategy, v in profile.validation.items():
        print(f"  {strategy} validated on {v['requests']} requests ({v['tokens']} tokens): "
              + ", ".join(f"{k} sublayers KL {kl:.4g} agreement {ag:.3f}"
                          for k, kl, ag in zip(v["budgets"], v["kl"], v["top1_agreement"])))
        if "retrieval_hits" in v:
            print(f"    retrieval probes found at {v['retrieval_length']} tokens (of {v['retrieval_probes']}): full "
                  f"model {v['retrieval_full_hits']}, " + ", ".join(
                      f"{k} sublayers {h}" for k, h in zip(v["budgets"], v["retrieval_hits"])))
        for row in v.get("streaming", []):
            found = f", retrieval {row['retrieval_hits']}" if "retrieval_hits" in row else ""
            print(f"    {row['budget']} sublayers + {row['groups']} streaming groups: KL {row['kl']:.4g} agreement "
                  f"{row['top1_agreement']:.3f}{found}")
