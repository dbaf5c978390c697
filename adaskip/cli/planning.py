"""The plan options of run, demo and export: their arguments, their checks before any model
loads, and the plan they ask for (adaskip.plan)."""
from __future__ import annotations

from .common import at_least, load_profile


def add_budget_options(q) -> None:
    """--profile, and the budget: alpha or a number of sublayers, or a validated tolerance."""
    q.add_argument("--profile", help="importance profile from `adaskip calibrate`")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=float, help="acceleration ratio (the paper's alpha)")
    g.add_argument("--num-sublayers", type=int, help="sublayers to skip (default 8)")


def add_planning_options(q) -> None:
    """Everything run and demo take to build and time a plan."""
    from ..runtime.stand_in import KINDS as STAND_IN_KINDS
    from ..skipping.strategies import STRATEGIES

    add_budget_options(q)
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
    q.add_argument("--streaming-groups", type=int, default=0,
                   help="also make this many KV-head groups streaming (sink + recent window only): those the "
                   "profile ranks cheapest (calibrate --streaming-probes); with --strategy full, groups alone")
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


def check_plan_args(a, profile) -> None:
    """Everything about the plan that needs no model: ranges, the profile a strategy needs, and,
    with a profile, the plan itself built from it (a budget it cannot meet, a search it lacks)."""
    from ..skipping.strategies import strategy_of

    at_least(a, num_sublayers=0, context_len=1, window=0, max_new_tokens=1, alpha=1.0, streaming_groups=0)
    if getattr(a, "streaming_groups", 0) and profile is None:
        raise SystemExit("adaskip: --streaming-groups takes its groups from the profile's ranking; give --profile "
                         "(from adaskip calibrate --streaming-probes)")
    if a.min_agreement is not None and not 0.0 <= a.min_agreement <= 1.0:
        raise SystemExit(f"adaskip: --min-agreement must be in [0, 1], got {a.min_agreement}")
    at_least(a, max_kl=0.0)
    if getattr(a, "min_retrieval", None) is not None and not 0.0 <= a.min_retrieval <= 1.0:
        raise SystemExit(f"adaskip: --min-retrieval must be in [0, 1], got {a.min_retrieval}")
    check_tolerance(a)
    if profile is None:
        record = strategy_of(a.strategy)
        if record.needs_profile:
            raise SystemExit(f"adaskip: --strategy {a.strategy} needs an importance profile; give --profile (from "
                             "adaskip calibrate)")
        if not record.sublayers and a.num_sublayers is not None and a.num_sublayers % 2:
            raise SystemExit(f"adaskip: whole-layer strategy {a.strategy!r} needs an even --num-sublayers "
                             f"(n layers = 2n sublayers), got {a.num_sublayers}")
        return
    # The cost planner needs the model's geometry; the paper planner refuses the same bad budgets.
    plan_from_options(a, profile, profile.num_layers, planner="paper")


def check_tolerance(a) -> None:
    """Before any model loads: a tolerance replaces the budget, and picks from a profile's validation."""
    if a.min_agreement is None and a.max_kl is None and getattr(a, "min_retrieval", None) is None:
        return
    if a.alpha is not None or a.num_sublayers is not None:
        raise SystemExit("adaskip: --min-agreement / --max-kl / --min-retrieval choose the budget; give them or "
                         "--alpha / --num-sublayers, not both")
    from ..skipping.strategies import strategy_of

    if not a.profile and strategy_of(a.strategy).skips:
        raise SystemExit("adaskip: --min-agreement / --max-kl / --min-retrieval pick from the profile's validation; "
                         "give --profile (made with adaskip calibrate --validate-budgets)")


def plan_from_options(a, profile, num_layers: int, planner=None, model_args=None):
    """The plan the options ask for (adaskip.plan); the profile was checked against the model."""
    from ..skipping.strategies import plan, strategy_of

    budget = {}
    min_retrieval = getattr(a, "min_retrieval", None)
    if a.min_agreement is not None or a.max_kl is not None or min_retrieval is not None:
        check_tolerance(a)
        budget = {"min_agreement": a.min_agreement, "max_kl": a.max_kl, "min_retrieval": min_retrieval}
    elif strategy_of(a.strategy).skips:
        if a.alpha is None and a.num_sublayers is None:
            budget = {"num_sublayers": 8}
        else:
            budget = {"alpha": a.alpha} if a.alpha is not None else {"num_sublayers": a.num_sublayers}
    return plan(profile, num_layers=num_layers, strategy=a.strategy, planner=planner or a.planner,
                context_len=a.context_len, mode=a.mode, window=a.window, model_args=model_args,
                stand_in=a.stand_in, streaming_groups=getattr(a, "streaming_groups", 0), **budget)


def build_plan(a, model, profile=None):
    """The plan for `model`; `profile`: the --profile already loaded (else it is loaded here)."""
    profile = profile if profile is not None else load_profile(a)
    if profile is not None:
        profile.check_model(model)
    return plan_from_options(a, profile, model.args.num_layers, model_args=model.args)
