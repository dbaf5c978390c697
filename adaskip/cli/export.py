"""`adaskip export`: a static plan written as a checkpoint vLLM serves (scales folded in; fitted
stand-ins with --format adaskip and the adaskip[vllm] plugin)."""
from __future__ import annotations

from pathlib import Path

from .common import check_common, dtype_of, load_profile, make_folder
from .planning import add_budget_options, build_plan, check_plan_args


def register(subparsers) -> None:
    from ..exporting import EXPORT_FORMATS
    from ..runtime.stand_in import KINDS as STAND_IN_KINDS
    from ..skipping.strategies import STRATEGIES

    x = subparsers.add_parser("export", help="write a static plan as a checkpoint vLLM serves natively (scales "
                              "folded in)")
    x.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, 'smollm2' (default) or "
                   "'qwen2.5-coder'")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="of the written weights (default: fp32)")
    x.add_argument("--device", help="where the folding runs (default: cpu)")
    add_budget_options(x)
    x.add_argument("--min-agreement", type=float, help="instead of a budget: the fastest validated plan with at "
                   "least this top-1 agreement")
    x.add_argument("--max-kl", type=float, help="instead of a budget: the fastest validated plan with at most this KL")
    x.add_argument("--strategy", default="adaskip", choices=list(STRATEGIES))
    x.add_argument("--stand-in", choices=list(STAND_IN_KINDS),
                   help="greedy-kl: what replaces each skipped sublayer (default: the kind its search scored with); "
                   "channel / linear need --format adaskip")
    x.add_argument("--planner", choices=["paper", "cost"], default="paper")
    x.add_argument("--context-len", type=int, help="context length the cost planner plans for")
    x.add_argument("--format", choices=list(EXPORT_FORMATS), default="decilm",
                   help="; ".join(f"{f.name}: {f.help}" for f in EXPORT_FORMATS.values()))
    x.add_argument("--out", required=True, help="folder to write (must be empty or new)")
    x.add_argument("--force", action="store_true", help="replace a folder that is not empty")
    x.set_defaults(func=cmd_export, mode="e2e", window=20)


def cmd_export(a) -> None:
    from ..exporting import check_out_dir, export, export_format
    from ..runtime.loading import load_model
    from ..skipping.strategies import strategy_of

    check_out_dir(a.out, a.force)  # before anything loads
    fmt = export_format(a.format)
    if a.stand_in not in (None, "scalar") and not fmt.stand_ins:
        raise SystemExit(f"adaskip: --format {fmt.name} carries scalar compensation only; {a.stand_in} stand-ins "
                         "need --format adaskip (served by vLLM with the adaskip[vllm] plugin)")
    check_common(a)
    if not strategy_of(a.strategy).skips:
        raise SystemExit("adaskip: the full model needs no export; choose a strategy that skips sublayers")
    profile = load_profile(a)
    check_plan_args(a, profile)
    make_folder("--out", a.out, Path(a.out).expanduser().parent)  # last; export writes beside it, then renames
    model, tokenizer = load_model(a.model, dtype=dtype_of(a.dtype), device=a.device or "cpu")
    plan = build_plan(a, model, profile)
    if plan.stand_ins and not fmt.stand_ins:
        kinds = "/".join(sorted({v.kind for v in plan.stand_ins.values()}))
        raise SystemExit(f"adaskip: this plan's {kinds} stand-ins need --format adaskip (served by vLLM with the "
                         f"adaskip[vllm] plugin); --format {fmt.name} carries scalar compensation only "
                         "(--stand-in scalar)")
    out = export(model, plan, a.out, tokenizer=tokenizer, profile=profile, format=fmt, force=a.force,
                 source=a.model)
    print(plan.describe())
    if plan.online:
        print("online decode learning is not exported: it runs only in adaskip's runtime")
    print(f"wrote {out} ({fmt.name})")
    for line in serve_instructions(fmt, out):
        print(line)


def serve_instructions(fmt, out) -> list:
    """What a user runs to serve the export: the plugin's install (adaskip format) and the command."""
    import shlex

    from ..exporting import plugin_install_command

    lines = []
    if fmt.stand_ins:
        lines.append("install the adaskip vLLM plugin once, with the python of vLLM's environment (it keeps its torch): "
                     + plugin_install_command())
    lines.append(f"serve it with: vllm serve {shlex.quote(str(out))}{fmt.serve_flags}")
    return lines
