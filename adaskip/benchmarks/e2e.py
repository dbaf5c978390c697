"""End-to-end speed (`adaskip bench e2e`): the full model, every skipping strategy at every
budget, the ideal each plan could reach, and HF transformers' full model on the same weights,
side by side in one run.

For each prompt length: time to first token (TTFT: the whole prompt in one prefill pass and the
first greedy token) and time per output token (TPOT) through adaskip.generate, eagerly and, on a
GPU, with the CUDA-graph decode step; medians over repeats after warm-up rounds. The ideal
speedup of a plan is the full model's measured time over that time minus the measured time of
the sublayers the plan skips (adaskip.skipping.costs.measure_sublayer_costs, each sublayer timed alone):
what skipping would give if nothing but those sublayers' work went away. Graph decode has an
ideal of its own: its full time against the sublayers timed inside a CUDA graph, as the graph
step runs them (eager timings include launch costs that the graph does not pay). The paper's alpha
(M / (M - k/2)) counts every sublayer as half a layer; attention and FFN do not cost the same,
which is why the measured and ideal columns are reported next to it.

Random weights stand in for a checkpoint of the same geometry (speed does not depend on weight
values); then the plans of strategies that rank sublayers by importance come from a calibration
on random token ids, labelled so in the result: right for speed (which sublayers, how many
attention vs FFN), meaningless for quality.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from adaskip.skipping import strategies as planning

from .common import DTYPES, device_info, git_commit, now_iso, run_device
from .measure import DEFINITIONS, baseline_row, compare_with_offline, cost_summary, measure, plan_row
from .models import CONFIGS, BenchModel, hf_twin, model_args, random_model, real_model

GPU_PROMPT_LENS = (2048, 8192, 32768)
CPU_PROMPT_LENS = (64, 256)
RANDOM_PROFILE_LABEL = "calibrated on random tokens (speed only)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=list(CONFIGS),
                     help="random weights of this geometry (default: llama-3.1-8b on a GPU, tiny on a CPU)")
    src.add_argument("--model", help="real weights: an HF model directory, a .gguf file, 'smollm2' or "
                     "'qwen2.5-coder'")
    p.add_argument("--layers", type=int, help="shrink a random-weight config to N layers (small GPUs, CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--prompt-lens", "--contexts", dest="prompt_lens",
                   help="comma-separated prompt lengths in tokens (default: 2048,8192,32768 on a GPU, capped "
                        "at the model's context; 64,256 on a CPU)")
    p.add_argument("--decode-tokens", type=int, help="timed output tokens per run (default 32 on a GPU, 8 on a CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    # The default set is the paper's comparison; any other strategy of adaskip.STRATEGIES can be
    # asked for by name, and what each needs (a profile, even budgets) is in its strategy record.
    p.add_argument("--strategies", default=",".join(planning.PAPER_COMPARISON),
                   help="comma-separated strategies of adaskip.STRATEGIES (default: %(default)s); empty: the "
                        "full model only")
    p.add_argument("--budgets", help="comma-separated numbers of skipped sublayers (default 8,16; 2,4 for models "
                   "of fewer than 16 layers); whole-layer strategies take even numbers only")
    p.add_argument("--profile", help="importance profile of this model (adaskip calibrate) for adaskip and "
                   "shortgpt; without one they are calibrated on random token ids, for speed only")
    p.add_argument("--calib-requests", type=int, default=2, help="random-token calibration requests")
    p.add_argument("--calib-len", type=int, default=1024, help="random-token calibration prompt length")
    p.add_argument("--online", action="store_true", help="also each AdaSkip plan with online decode learning "
                   "(strategy 'adaskip+online'), timed in the same run as the plan without it")
    p.add_argument("--graph-conditionals", action="store_true", help="with --online, on a GPU: also each online "
                   "plan with its learning FFNs in CUDA-graph conditional nodes (strategy '...+online+cond'; what "
                   "skips their GEMMs beyond 2 sequences, see --batch)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (random prompts of one length)")
    p.add_argument("--online-beta", type=float, help="with --online: this similarity threshold instead of the "
                   "plan's; -1 gates every remaining FFN off after the window (times the gated path when "
                   "random weights would gate nothing)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="do not time HF transformers")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="no CUDA-graph decode (GPU)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="GPU: no per-kernel breakdown of the graph decode step and its roofline")
    p.add_argument("--decode-paths", default=DEFAULT_DECODE_PATHS,
                   help="GPU, with the breakdown: the full model's graph decode step timed with each of these "
                        "decode paths, comma-separated attention/projections/lm_head (attention: kernel|sdpa, "
                        f"the others gemv|cublas; default {DEFAULT_DECODE_PATHS})")
    p.add_argument("--out", type=Path, help="write the JSON here (the plot next to it, .png)")
    p.add_argument("--out-dir", type=Path, help="write DIR/e2e-<model>-<device>-<date>.json and .png")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG")


DEFAULT_DECODE_PATHS = "sdpa/gemv/gemv,kernel/gemv/gemv,sdpa/cublas/cublas,kernel/cublas/cublas"


def decode_path_variants(spec: str) -> list:
    """'kernel/cublas/cublas,...' -> [DecodePaths, ...] (a clear error naming a bad entry)."""
    from adaskip.runtime.schedule import DecodePaths

    out = []
    for entry in [e.strip() for e in str(spec).split(",") if e.strip()]:
        parts = entry.split("/")
        if len(parts) != 3:
            raise ValueError(f"--decode-paths: {entry!r} is not attention/projections/lm_head "
                             "(e.g. kernel/gemv/cublas)")
        try:
            out.append(DecodePaths(*parts))
        except ValueError as e:
            raise ValueError(f"--decode-paths: {entry!r}: {e}") from None
    if not out:
        raise ValueError("--decode-paths names no paths")
    return out


def result_prefix(result: dict) -> str:
    name = result["model"] if result["weights"] == "random" else Path(str(result["model"])).stem
    return f"e2e-{name}" + (f"-{result['num_layers']}l" if result.get("layers_override") else "")


# -- argument checks (before anything heavy runs) --------------------------------------------------


def _csv_ints(spec: str, what: str) -> list:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {spec!r}") from None


def prompt_lengths(spec: Optional[str], context: int, decode_tokens: int, on_gpu: bool) -> list:
    """Explicit lengths must fit the context with the decoded tokens; the defaults are capped."""
    if spec is None:
        cap = context - decode_tokens
        lengths = sorted({min(n, cap) for n in (GPU_PROMPT_LENS if on_gpu else CPU_PROMPT_LENS)})
        lengths = [n for n in lengths if n >= 2]
        if not lengths:
            raise ValueError(f"the model's context of {context} tokens leaves no room for a prompt and "
                             f"{decode_tokens} output tokens")
        return lengths
    lengths = _csv_ints(spec, "--prompt-lens")
    if not lengths:
        raise ValueError("--prompt-lens is empty")
    for n in lengths:
        if n < 2:
            raise ValueError(f"a prompt length must be >= 2 tokens, got {n}")
        if n + decode_tokens > context:
            raise ValueError(f"prompt length {n} plus {decode_tokens} output tokens exceeds the model's context "
                             f"of {context} tokens")
    return sorted(set(lengths))


def budgets(spec: Optional[str], num_layers: int) -> list:
    most = 2 * num_layers - 2  # all but one layer
    if spec is None:
        return [k for k in ((8, 16) if num_layers >= 16 else (2, 4)) if k <= most]
    ks = sorted(set(_csv_ints(spec, "--budgets")))
    bad = [k for k in ks if not 1 <= k <= most]
    if bad:
        raise ValueError(f"budgets {bad} are out of range: a model of {num_layers} layers can skip 1 to {most} "
                         "sublayers")
    return ks


def needs_profile(strategy: str) -> bool:
    return planning.strategy_of(strategy).needs_profile


def strategies(spec: str) -> list:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = planning.SKIPPING_STRATEGIES
    bad = [s for s in names if s not in known]
    if bad:
        raise ValueError(f"unknown strategies {bad}; choose from {', '.join(known)} (the full model is "
                         "always timed)")
    return list(dict.fromkeys(names))


# -- setup -----------------------------------------------------------------------------------------


def _profile(args, model, weights: str, names: list, ks: list, notes: list):
    """(profile, label) for the strategies that rank sublayers; (None, None) when none runs."""
    from adaskip.skipping.calibration import calibrate
    from adaskip.skipping.profile import ImportanceProfile

    if not ks or not any(needs_profile(s) for s in names):
        return None, None
    if args.profile:
        profile = ImportanceProfile.load(args.profile)
        _check_profile(profile, model, weights)  # another model's profile: a clear error, not a silent plan
        return profile, f"{args.profile}" + (f" ({profile.data})" if profile.data else "")
    length = min(args.calib_len, model.args.max_position_embeddings)
    if args.calib_requests < 1 or length < 2:
        raise ValueError("random-token calibration needs --calib-requests >= 1 and --calib-len >= 2")
    g = torch.Generator().manual_seed(7)
    requests = [torch.randint(0, model.args.vocab_size, (length,), generator=g).tolist()
                for _ in range(args.calib_requests)]
    if weights == "real":
        notes.append("real weights without --profile: adaskip / shortgpt plans come from random token ids; "
                     "their speed is right, their choice is not the one a calibration on text would make")
    profile = calibrate(model, requests, num_requests=len(requests), prompt_len=length, progress=False,
                        description=RANDOM_PROFILE_LABEL)
    return profile, RANDOM_PROFILE_LABEL


def _check_profile(profile, model, weights: str) -> None:
    """Real weights: the profile must be of this very model. Random weights of a named geometry:
    a profile of the real checkpoint of that geometry is what one wants to time, so only the
    geometry is compared (the config hash also covers token ids a random config does not set)."""
    from adaskip.skipping.profile import model_fingerprint

    if weights == "real":
        profile.check_model(model)
        return
    fp, theirs = model_fingerprint(model), profile.fingerprint
    keys = ("architecture", "num_layers", "hidden_size", "weights_hash")
    diff = {k: (theirs.get(k), fp[k]) for k in keys if theirs.get(k) != fp[k]}
    if diff:
        raise ValueError(f"this profile was made for another model (profile vs model: {diff})")


def _plans(profile, names: list, ks: list, num_layers: int, online: bool, notes: list,
           online_beta: Optional[float] = None, conditional: bool = False) -> list:
    """(label, budget, plan, conditional) per plan to time: each strategy at each budget; with
    `online`, also its online-learning twin ("+online"), and with `conditional` a third run of
    that twin with CUDA-graph conditional FFNs ("+online+cond")."""
    from adaskip.skipping.strategies import plan as make_plan

    plans = []
    for k in ks:
        for s in names:
            if k % 2 and not planning.strategy_of(s).sublayers:
                notes.append(f"{s} skips whole layers: budget {k} (odd) not run for it")
                continue
            for learn in (False, True) if online else (False,):
                p = make_plan(profile if needs_profile(s) else None, num_layers=num_layers, strategy=s,
                              num_sublayers=k, mode="e2e", online=learn)
                if not learn:
                    plans.append((s, k, p, False))
                elif p.online:  # the same offline skips plus online learning, side by side
                    if online_beta is not None:
                        p = dataclasses.replace(p, beta=online_beta)
                    plans.append((f"{s}+online", k, p, False))
                    if conditional:
                        plans.append((f"{s}+online+cond", k, p, True))
    return plans


def _hf_pair(bench: BenchModel, device, dtype, notes: list):
    """(hf model, hf config, logits parity) or (None, None, None) with a note saying why."""
    if bench.hf_config is None and bench.hf_source is None:
        return None, None, None  # not an HF model: real_model has said so
    try:
        hf, cfg = hf_twin(bench, device)
    except (ImportError, ValueError, OSError, KeyError) as e:
        notes.append(f"HF transformers side by side skipped: {e}")
        return None, None, None
    model = bench.model
    n = min(64, model.args.max_position_embeddings)
    with torch.inference_mode():
        probe = torch.randint(0, model.args.vocab_size, (1, n), device=device,
                              generator=torch.Generator(device=device).manual_seed(3))
        a, b = model(probe).float(), hf(input_ids=probe).logits.float()
        parity = ((a - b).norm() / b.norm()).item()
    tol = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    if not parity <= tol:
        raise ValueError(f"the runtime does not match transformers on these weights (|ours - hf| / |hf| = "
                         f"{parity:.2e} > {tol:g} on a {n}-token probe); not timing it")
    return hf, cfg, parity


def run(args) -> dict:
    """Builds the model, measures, returns the result (printing progress and nothing else)."""
    device, on_gpu, dtype = run_device(args.device, args.dtype)
    decode_tokens = _checked_decode_tokens(args, on_gpu)
    names = strategies(args.strategies)
    path_variants = decode_path_variants(args.decode_paths)
    bench = _bench_model(args, on_gpu, dtype, device, decode_tokens)
    model, notes = bench.model, list(bench.notes)
    margs = model.args
    lengths = prompt_lengths(args.prompt_lens, margs.max_position_embeddings, decode_tokens, on_gpu)
    ks = budgets(args.budgets, margs.num_layers)
    profile, profile_label = _profile(args, model, bench.weights, names, ks, notes)
    graph = on_gpu and args.graph
    if args.graph_conditionals and not graph:
        notes.append("--graph-conditionals needs CUDA-graph decode (a GPU, no --no-graph): no '+cond' plans")
    plans = _plans(profile, names, ks, margs.num_layers, args.online, notes, args.online_beta,
                   conditional=args.graph_conditionals and graph)
    if args.online_beta is not None:
        notes.append(f"online learning with beta = {args.online_beta} instead of the plans' own")
    hf, hf_cfg, parity = _hf_pair(bench, device, dtype, notes) if args.hf else (None, None, None)
    info = device_info(device)
    _print_header(bench, info, dtype, on_gpu, parity, notes)
    measured = {"baseline": [], "rows": [], "sublayer_costs": [], "decode_breakdown": []}
    copy_bw = None
    if on_gpu and graph and args.breakdown:
        from .kernels import copy_bandwidth

        copy_bw = copy_bandwidth("cuda")
        print(f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    gen = torch.Generator().manual_seed(11)
    for length in lengths:
        _measure_length(model, length, args, plans, graph, hf, hf_cfg, gen, device, path_variants, copy_bw,
                        breakdown=on_gpu and graph and args.breakdown, out=measured)
        if on_gpu:
            torch.cuda.empty_cache()
    compare_with_offline(measured["rows"])
    transformers_version = None
    if hf is not None:
        import transformers
        transformers_version = transformers.__version__
    return {"benchmark": "adaskip bench e2e", "model": bench.name, "weights": bench.weights,
            "num_layers": margs.num_layers, "layers_override": args.layers, "model_args": asdict(margs),
            "dtype": str(dtype)[6:], "date": now_iso(), "git_commit": git_commit(), **info,
            "transformers": transformers_version, "profile": profile_label, "online": args.online,
            "online_beta": args.online_beta, "batch": args.batch, "graph_conditionals": args.graph_conditionals,
            "prompt_lens": lengths, "decode_tokens": decode_tokens, "budgets": ks, "strategies": names,
            "warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
            "timing": "perf_counter around CUDA synchronisations" if on_gpu else "perf_counter",
            "cuda_graph_decode": graph, "smoke_run": not on_gpu, "logits_parity_rel_err": parity,
            "notes": notes, "definitions": DEFINITIONS, "baseline": measured["baseline"],
            "sublayer_costs": measured["sublayer_costs"], "rows": measured["rows"],
            "copy_gbps": round(copy_bw / 1e9, 1) if copy_bw else None,
            "decode_breakdown": measured["decode_breakdown"]}


def _checked_decode_tokens(args, on_gpu: bool) -> int:
    """The decode tokens per measurement (default 32 on a GPU, 8 elsewhere; set in args), once
    the options that need no model are checked."""
    decode_tokens = args.decode_tokens if args.decode_tokens is not None else (32 if on_gpu else 8)
    if decode_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("need --decode-tokens >= 1, --repeats >= 1 and --warmup >= 0")
    args.decode_tokens = decode_tokens
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.graph_conditionals and not args.online:
        raise ValueError("--graph-conditionals gates the FFNs online learning decides: it needs --online")
    if args.online_beta is not None:
        if not args.online:
            raise ValueError("--online-beta sets online learning's threshold: it needs --online")
        if not -1.0 <= args.online_beta <= 1.0:
            raise ValueError(f"--online-beta is a cosine similarity in [-1, 1], got {args.online_beta}")
    return decode_tokens


def _bench_model(args, on_gpu: bool, dtype, device, decode_tokens: int):
    """The model to measure: a random-weight config (checked before its weights are built) or --model."""
    if args.model is not None and args.layers is not None:
        raise ValueError("--layers shrinks a random-weight config (--config); it does not apply to --model")
    name = args.config or ("llama-3.1-8b" if on_gpu else "tiny")
    if args.model is not None:
        return real_model(args.model, dtype, device)
    margs = model_args(name, args.layers)  # check what can be checked before building the weights
    prompt_lengths(args.prompt_lens, margs.max_position_embeddings, decode_tokens, on_gpu)
    budgets(args.budgets, margs.num_layers)
    return random_model(name, args.layers, dtype, device)


def _print_header(bench, info: dict, dtype, on_gpu: bool, parity, notes: list) -> None:
    margs = bench.model.args
    print(f"adaskip e2e benchmark: {info['device']} | {bench.name} ({margs.num_layers} layers), {str(dtype)[6:]}, "
          f"{bench.weights} weights | torch {info['torch']}"
          + ("" if on_gpu else " | CPU smoke run, not a performance figure"))
    if parity is not None:
        print(f"logits parity with transformers on a probe: |ours - hf| / |hf| = {parity:.2e}")
    for note in notes:
        print(f"note: {note}")


def _measure_length(model, length: int, args, plans: list, graph: bool, hf, hf_cfg, gen, device, path_variants,
                    copy_bw, *, breakdown: bool, out: dict) -> None:
    """At one prompt length: the sublayer costs, the full model (and transformers), every plan,
    and the decode breakdowns, appended to `out`'s lists."""
    from adaskip.skipping.costs import measure_sublayer_costs

    margs = model.args
    print(f"prompt {length}: sublayer costs, full model{', transformers' if hf is not None else ''}, "
          f"{len(plans)} plans")
    prompts = torch.randint(0, margs.vocab_size, (args.batch, length), generator=gen).tolist()
    costs = {mode: measure_sublayer_costs(model, length, mode, batch=args.batch) for mode in ("prefill", "decode")}
    if graph:  # the ideal of graph decode: each sublayer timed inside a graph, as the step runs it
        costs["decode_graph"] = measure_sublayer_costs(model, length, "decode", graphs=True, batch=args.batch,
                                                       cache_len=length + args.decode_tokens + 1)
    out["sublayer_costs"] += [cost_summary(length, c) for c in costs.values()]
    ids = torch.tensor(prompts, device=device)
    full = measure(model, prompts, None, args, graph, hf=(hf, hf_cfg, ids) if hf is not None else None)
    out["baseline"].append(baseline_row(length, full, args))
    out["rows"].append(plan_row(length, "full", 0, None, full, full, costs, args, margs.num_layers))
    for s, k, p, conditional in plans:
        m = measure(model, prompts, p, args, graph, conditional=conditional)
        out["rows"].append(plan_row(length, s, k, p, m, full, costs, args, margs.num_layers))
    if breakdown:
        out["decode_breakdown"] += _breakdowns(model, length, args.batch, path_variants, plans, copy_bw)


def _breakdowns(model, length: int, batch: int, variants: list, plans: list, copy_bw: float) -> list:
    """The graph decode step of the full model with each decode-path variant (the first with
    its per-kernel breakdown), then of each offline plan with the model's own paths."""
    from .breakdown import graph_decode_breakdown, prefill_breakdown, print_breakdown, print_prefill_breakdown

    out = []
    for i, paths in enumerate(variants):
        r = graph_decode_breakdown(model, length, batch=batch, paths=paths, copy_bw=copy_bw, profile=i == 0)
        r["plan"] = "full"
        if i == 0:
            r["prefill"] = prefill_breakdown(model, length, batch=batch)
            print_prefill_breakdown(r["prefill"], "full")
        print_breakdown(r)
        out.append(r)
    for s, k, p, conditional in plans:
        if p.online or conditional or p.ramp:
            continue  # their step changes from token to token
        r = graph_decode_breakdown(model, length, batch=batch, plan=p, copy_bw=copy_bw, profile=False)
        r.update(plan=s, num_sublayers=k, prefill=prefill_breakdown(model, length, batch=batch, plan=p))
        print_prefill_breakdown(r["prefill"], f"{s} {k}")
        print(f"  {s} {k}:", end="")
        print_breakdown(r)
        out.append(r)
    return out
