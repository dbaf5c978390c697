"""The cost side of lossless self-speculative decoding (`adaskip bench speculative`): how long a
round of k draft steps, the verify pass over k + 1 positions and the acceptance takes, against
the full model's decode step, for drafters of several budgets, in one run.

Speed does not depend on the weights, acceptance does: so this runs on random weights of a
named geometry (a drafter's plan from a calibration on random token ids, labelled so) and
reports, per drafter and k, the break-even: the tokens a round must emit per sequence, and the
acceptance rate that gives them, for speculation to beat plain decoding. Acceptance measured on
real weights (`adaskip eval --tasks speculative`, `adaskip.plan_drafter`) above the break-even
means it pays; `--tokens-per-round` turns given values into predicted speedups.

Decode runs as the runtime runs it: on a GPU with CUDA graphs (a round is one replay; the full
model's step is one replay), medians over repeats after warm-up rounds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import DTYPES, device_info, git_commit, median, now_iso, run_device
from .e2e import RANDOM_PROFILE_LABEL, budgets, prompt_lengths
from .models import CONFIGS, model_args, random_model

DEFINITIONS = {
    "step_ms": "the full model's decode step (plain greedy decoding, graph replays on a GPU): decode time / steps",
    "draft_step_ms": "the drafter's own decode step (greedy decoding with the plan, same way)",
    "round_ms": "one speculative round: k draft steps, the verify pass over k + 1 positions and the acceptance "
                "(decode time / rounds run)",
    "verify_ms": "round_ms - k * draft_step_ms: the verify pass and the acceptance",
    "break_even_tokens_per_round": "round_ms / step_ms: the tokens a round must emit per sequence to match plain "
                                   "decoding",
    "break_even_acceptance": "(break_even_tokens_per_round - 1) / k: the share of drafted tokens the full model must "
                             "keep for that (above 1: no acceptance pays)",
    "predicted_speedup": "tokens_per_round * step_ms / round_ms, for each --tokens-per-round value",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=list(CONFIGS),
                   help="random weights of this geometry (default: llama-3.1-8b on a GPU, tiny on a CPU)")
    p.add_argument("--layers", type=int, help="shrink the config to N layers (small GPUs, CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--prompt-lens", "--contexts", dest="prompt_lens",
                   help="comma-separated context lengths (default: 8192,32768 on a GPU; 64,256 on a CPU)")
    p.add_argument("--strategy", default="adaskip", help="the drafters' strategy (default: adaskip)")
    p.add_argument("--budgets", help="comma-separated drafter budgets in sublayers (default: a quarter and half "
                   "of the sublayers)")
    p.add_argument("--draft-tokens", default="2,4", help="comma-separated draft lengths k (default: 2,4)")
    p.add_argument("--tokens-per-round", default="",
                   help="comma-separated tokens per round (e.g. measured on real weights) to predict speedups for")
    p.add_argument("--decode-tokens", type=int, help="output tokens per timed run (default 64 on a GPU, 12 on a CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--calib-requests", type=int, default=2, help="random-token calibration requests")
    p.add_argument("--calib-len", type=int, default=1024, help="random-token calibration prompt length")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--out-dir", type=Path, help="write DIR/speculative-<model>-<device>-<date>.json")


def _floats(spec: str, what: str) -> list:
    try:
        return [float(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {spec!r}") from None


def result_prefix(result: dict) -> str:
    return f"speculative-{result['model']}" + (f"-{result['num_layers']}l" if result.get("layers_override") else "")


def _timed(args, run) -> float:
    """Median over --repeats of run() (seconds per unit it returns), after --warmup runs."""
    for _ in range(args.warmup):
        run()
    return median([run() for _ in range(args.repeats)])


def run(args) -> dict:
    from adaskip.runtime.generation import generate
    from adaskip.runtime.speculative import SpeculativeConfig
    from adaskip.skipping.calibration import calibrate
    from adaskip.skipping.strategies import SKIPPING_STRATEGIES, plan

    device, on_gpu, dtype = run_device(args.device, args.dtype)
    decode_tokens = args.decode_tokens if args.decode_tokens is not None else (64 if on_gpu else 12)
    if decode_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("need --decode-tokens >= 2, --repeats >= 1 and --warmup >= 0")
    if args.strategy not in SKIPPING_STRATEGIES:
        raise ValueError(f"unknown drafter strategy {args.strategy!r}; choose from "
                         f"{', '.join(SKIPPING_STRATEGIES)}")
    ks = sorted(set(int(k) for k in _floats(args.draft_tokens, "--draft-tokens")))
    if not ks or ks[0] < 1:
        raise ValueError(f"--draft-tokens must be integers >= 1, got {args.draft_tokens!r}")
    tprs = _floats(args.tokens_per_round, "--tokens-per-round")
    if any(t < 1 for t in tprs):
        raise ValueError(f"--tokens-per-round values are >= 1 (a round emits at least one token), got {tprs}")
    name = args.config or ("llama-3.1-8b" if on_gpu else "tiny")
    margs = model_args(name, args.layers)
    room = decode_tokens + ks[-1] + 1
    spec = args.prompt_lens or (None if not on_gpu else "8192,32768")
    lengths = prompt_lengths(spec, margs.max_position_embeddings, room, on_gpu)
    total = 2 * margs.num_layers
    ks_budget = budgets(args.budgets, margs.num_layers) if args.budgets else sorted({total // 4, total // 2})
    if args.calib_requests < 1 or args.calib_len < 2:
        raise ValueError("random-token calibration needs --calib-requests >= 1 and --calib-len >= 2")
    bench = random_model(name, args.layers, dtype, device)
    model = bench.model
    g = torch.Generator().manual_seed(7)
    calib_len = min(args.calib_len, margs.max_position_embeddings)
    requests = [torch.randint(0, margs.vocab_size, (calib_len,), generator=g).tolist()
                for _ in range(args.calib_requests)]
    profile = calibrate(model, requests, num_requests=len(requests), prompt_len=calib_len, progress=False,
                        description=RANDOM_PROFILE_LABEL)
    drafters = {b: plan(profile, strategy=args.strategy, num_sublayers=b, online=False) for b in ks_budget}
    info = device_info(device)
    print(f"adaskip speculative benchmark: {info['device']} | {bench.name} ({margs.num_layers} layers), "
          f"{str(dtype)[6:]}, random weights | torch {info['torch']}"
          + ("" if on_gpu else " | CPU smoke run, not a performance figure"))

    def plain(prompt, p):
        out = generate(model, [prompt], max_new_tokens=decode_tokens, eos_token_ids=[], plan=p,
                       prefill_chunk=len(prompt), cuda_graph=on_gpu)
        return out.decode_s / out.decode_steps

    def speculative(prompt, p, k):
        out = generate(model, [prompt], max_new_tokens=decode_tokens, eos_token_ids=[], prefill_chunk=len(prompt),
                       cuda_graph=on_gpu, speculative=SpeculativeConfig(p, draft_tokens=k))
        return out.decode_s / out.speculative["rounds_launched"]  # the rounds after the end cost time too

    rows, gen = [], torch.Generator().manual_seed(11)
    for length in lengths:
        prompt = torch.randint(0, margs.vocab_size, (length,), generator=gen).tolist()
        step = _timed(args, lambda: plain(prompt, None))
        print(f"context {length}: full decode step {step * 1e3:.3f} ms")
        for budget, p in drafters.items():
            draft = _timed(args, lambda: plain(prompt, p))
            for k in ks:
                round_s = _timed(args, lambda: speculative(prompt, p, k))
                even = round_s / step
                row = {"context": length, "strategy": args.strategy, "budget": budget, "draft_tokens": k,
                       "attention_skipped": sum(1 for s in p.skip_scales if s % 2 == 0),
                       "ffn_skipped": sum(1 for s in p.skip_scales if s % 2 == 1),
                       "step_ms": step * 1e3, "draft_step_ms": draft * 1e3, "round_ms": round_s * 1e3,
                       "verify_ms": (round_s - k * draft) * 1e3, "draft_speedup": step / draft,
                       "break_even_tokens_per_round": even, "break_even_acceptance": (even - 1) / k,
                       "predicted_speedup": {f"{t:g}": t * step / round_s for t in tprs if t <= k + 1}}
                rows.append(row)
                print(f"  drafter {args.strategy}@{budget}, k {k}: round {row['round_ms']:.3f} ms (draft step "
                      f"{row['draft_step_ms']:.3f} ms), break-even {even:.2f} tokens a round "
                      f"(acceptance {row['break_even_acceptance']:.2f})")
    return {"benchmark": "adaskip bench speculative", "model": bench.name, "weights": "random",
            "num_layers": margs.num_layers, "layers_override": args.layers, "dtype": str(dtype)[6:],
            "date": now_iso(), "git_commit": git_commit(), **info, "profile": RANDOM_PROFILE_LABEL,
            "decode_tokens": decode_tokens, "warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
            "cuda_graph_decode": on_gpu, "smoke_run": not on_gpu, "contexts": lengths, "budgets": ks_budget,
            "draft_tokens": ks, "tokens_per_round": tprs, "definitions": DEFINITIONS, "rows": rows}


def markdown_table(result: dict) -> str:
    head = ["context", "drafter", "k", "step ms", "draft step ms", "round ms", "verify ms",
            "break-even tokens / round", "break-even acceptance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([str(r["context"]), f"{r['strategy']}@{r['budget']}", str(r["draft_tokens"]),
                                        f"{r['step_ms']:.3f}", f"{r['draft_step_ms']:.3f}", f"{r['round_ms']:.3f}",
                                        f"{r['verify_ms']:.3f}", f"{r['break_even_tokens_per_round']:.2f}",
                                        f"{r['break_even_acceptance']:.2f}"]) + " |")
    return "\n".join(lines)
