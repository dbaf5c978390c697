"""From a profile and a budget to a SkipPlan: AdaSkip (paper or cost-aware planner) and the
whole-layer baselines, all at equal budgets (n whole layers <-> 2n sublayers)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Optional

from .costs import paper_num_skipped, paper_speedup
from ..runtime.skip_plan import MODES, SkipPlan
from ..runtime.stand_in import KINDS
from .greedy import SEARCH_METHODS, search_method
from .profile import ImportanceProfile


@dataclass(frozen=True)
class Budget:
    """What plan() resolved from its arguments, handed to a strategy's planner."""

    profile: Optional[ImportanceProfile]
    num_layers: int
    k: int  # sublayers to skip
    alpha: Optional[float]
    adaskip_planner: str  # "paper" or "cost" (plan()'s planner=)
    context_len: Optional[int]
    mode: str
    window: int
    online: bool
    costs: object
    model_args: object
    fingerprint: Optional[str]
    stand_in: Optional[str]


@dataclass(frozen=True)
class Strategy:
    """One skipping strategy: what a new strategy declares, beside its planner."""

    name: str
    planner: Callable  # planner(strategy, budget: Budget) -> SkipPlan
    # Skips anything at all (the full model does not: it takes no budget and no tolerance).
    skips: bool = True
    needs_profile: bool = True
    # Plans any number of sublayers (else whole layers only: even budgets, n layers = 2n sublayers).
    sublayers: bool = False
    # The greedy search (adaskip.search method) whose stored result its plans take.
    search: Optional[str] = None
    # Its plans learn online in decode (beta / window) when asked to.
    online: bool = False
    # Its planner reaches a target speedup under a cost model itself (planner="cost"); the
    # others reach one in plan_at_speedup by growing their budget.
    cost_planner: bool = False
    # One of the paper's comparison (AdaSkip and its baselines): the default set of eval and bench.
    paper_comparison: bool = False

    @property
    def fitted_stand_ins(self) -> bool:
        """Its plans may replace skipped sublayers with the stand-ins its search fitted."""
        return self.search is not None and search_method(self.search).fits_stand_ins


def _full(strategy: Strategy, b: Budget) -> SkipPlan:
    return SkipPlan(b.num_layers, {}, mode=b.mode, strategy=strategy.name, predicted_speedup=1.0,
                    model_fingerprint=b.fingerprint)


def _early_exit_layers(m: int, n: int, profile) -> list:
    return list(range(m - n, m))


def _skipdecode_layers(m: int, n: int, profile) -> list:
    return list(range(1, n + 1))


def _unified_layers(m: int, n: int, profile) -> list:
    step = max(m // n, 1)
    return [i for i in range(m) if i % step == 1 % step][:n]


def _shortgpt_layers(m: int, n: int, profile) -> list:
    # The layers whose output is most similar to their input matter least.
    order = sorted(range(m), key=lambda i: (-profile.block_similarity[i], i))
    return sorted(order[:n])


def _whole_layers(choose: Callable, ramp: bool = False) -> Callable:
    """The planner of a whole-layer baseline that skips the layers choose(m, n, profile) picks,
    with identity pass-through (ramp: SkipDecode's decode ramp)."""
    def planner(strategy: Strategy, b: Budget) -> SkipPlan:
        if b.k % 2:
            raise ValueError(f"adaskip: whole-layer strategy {strategy.name!r} needs an even number of sublayers "
                             f"(n layers = 2n sublayers), got {b.k}")
        n = b.k // 2
        layers = choose(b.num_layers, n, b.profile) if n else []
        skip = {s: 1.0 for i in layers for s in (2 * i, 2 * i + 1)}
        return SkipPlan(b.num_layers, skip, mode=b.mode, strategy=strategy.name, ramp=ramp,
                        predicted_speedup=paper_speedup(b.num_layers, len(skip)), model_fingerprint=b.fingerprint,
                        explanation=f"{n} whole layers skipped, identity pass-through")
    return planner


def _searched(strategy: Strategy, b: Budget) -> SkipPlan:
    return _greedy(b.profile, strategy, b.k, b.mode, b.window, b.online, b.fingerprint, b.stand_in)


def _adaskip_planner(strategy: Strategy, b: Budget) -> SkipPlan:
    return _adaskip(b.profile, b.k, b.alpha, b.adaskip_planner, b.context_len, b.mode, b.window, b.online, b.costs,
                    b.model_args, b.fingerprint)


STRATEGY_TABLE = {s.name: s for s in (
    Strategy("full", _full, skips=False, needs_profile=False),
    Strategy("adaskip", _adaskip_planner, sublayers=True, online=True, cost_planner=True, paper_comparison=True),
    Strategy("greedy-similarity", _searched, sublayers=True, search="similarity", online=True),
    Strategy("greedy-loss", _searched, sublayers=True, search="loss", online=True),
    Strategy("early-exit", _whole_layers(_early_exit_layers), needs_profile=False, paper_comparison=True),
    Strategy("skipdecode", _whole_layers(_skipdecode_layers, ramp=True), needs_profile=False,
             paper_comparison=True),
    Strategy("unified", _whole_layers(_unified_layers), needs_profile=False, paper_comparison=True),
    Strategy("shortgpt", _whole_layers(_shortgpt_layers), paper_comparison=True),
    # A static pruning baseline: its plans never learn online.
    Strategy("blockpruner", _searched, sublayers=True, search="blockpruner"),
    Strategy("greedy-kl", _searched, sublayers=True, search="kl", online=True),
)}
STRATEGIES = tuple(STRATEGY_TABLE)
# The strategies that skip something: those a budget, a validation or an export is for.
SKIPPING_STRATEGIES = tuple(s.name for s in STRATEGY_TABLE.values() if s.skips)
# The default set of eval and bench: AdaSkip and the paper's baselines.
PAPER_COMPARISON = tuple(s.name for s in STRATEGY_TABLE.values() if s.paper_comparison)
PLANNERS = ("paper", "cost")


def strategy_of(name: str) -> Strategy:
    """The record of strategy `name`, or the error naming the known ones."""
    if name not in STRATEGY_TABLE:
        raise ValueError(f"adaskip: unknown strategy {name!r}; choose from {STRATEGIES}")
    return STRATEGY_TABLE[name]


def searches_needed(strategies) -> list:
    """The search methods that plans of `strategies` read from the profile, sorted."""
    return sorted({STRATEGY_TABLE[s].search for s in strategies
                   if s in STRATEGY_TABLE and STRATEGY_TABLE[s].search is not None})


def max_alpha(num_layers: int) -> float:
    """The acceleration ratio of skipping everything but one layer."""
    return float(num_layers)


def sublayers_for_alpha(num_layers: int, alpha: float) -> int:
    """The paper's rule: alpha = M / (M - m) with a sublayer counted as half a layer."""
    if not 1.0 <= alpha <= max_alpha(num_layers):
        raise ValueError(f"adaskip: alpha must be in [1, {max_alpha(num_layers):g}] for a model with "
                         f"{num_layers} layers (1: nothing skipped; {num_layers}: all but one layer), got {alpha}")
    return paper_num_skipped(num_layers, alpha)


def plan(profile: Optional[ImportanceProfile] = None, *, num_layers: Optional[int] = None,
         alpha: Optional[float] = None, num_sublayers: Optional[int] = None, strategy: str = "adaskip",
         planner: str = "paper", context_len: Optional[int] = None, mode: str = "e2e", window: int = 20,
         online: bool = True, costs=None, model_args=None, min_agreement: Optional[float] = None,
         max_kl: Optional[float] = None, stand_in: Optional[str] = None,
         min_retrieval: Optional[float] = None, streaming_groups: int = 0) -> SkipPlan:
    """A SkipPlan for `strategy` at a budget given as alpha or as a number of sublayers, or chosen
    by a quality tolerance.

    adaskip: the top sublayers by offline similarity, compensated with their mean norm ratio;
      with mode decode / e2e and online=True, beta = the lowest similarity among them drives the
      online extra-FFN skipping over the first `window` decoded tokens.
    planner="cost": instead of counting sublayers, reach the speedup alpha (or the paper speedup of
      num_sublayers) under a per-sublayer cost model at `context_len` (adaskip.skipping.costs, from
      `model_args`; or pass `costs=` measured ones) while losing the least similarity.
    greedy-similarity / greedy-loss: the first k choices of the profile's greedy search
      (adaskip.search: re-measured similarities; loss-aware among the most similar), with the
      compensation scales measured during the search; online learning as for adaskip.
    blockpruner: the first k choices of the profile's "blockpruner" search (BlockPruner: each step
      removes the sublayer whose removal raises the calibration loss least), identity
      pass-through, no online learning (a static pruning baseline).
    greedy-kl: the first k choices of the profile's "kl" search (each candidate scored by KL to the
      full model with its stand-in fitted under the earlier choices), with the stand-ins it fitted.
    stand_in: what replaces each skipped sublayer: "scalar" (the compensation scale), "channel"
      (per-channel scales) or "linear" (a low-rank map); the non-scalar ones come fitted from a "kl"
      search. Default: the kind the greedy-kl search scored with, "scalar" for every other strategy.
    Baselines skip whole layers (n = budget / 2) with identity pass-through: early-exit (the last
      n), skipdecode (layers 1..n; in decode ramping up from 1 layer to n), unified (layers with
      index % (M // n) == 1), shortgpt (the n layers of highest block similarity in the profile).
    min_agreement / max_kl (instead of alpha / num_sublayers): among the budgets of the profile's
      validation of `strategy` (calibration.validate) whose validated top-1 agreement is >= min_agreement
      and KL(full || plan) per token <= max_kl (every one given), and budget 0 (the full model, which
      always qualifies), the plan predicted fastest: under the cost model when `costs` or context_len
      and model_args are given, else by the paper's equal-cost speedup; ties go to fewer sublayers.
      The plans are those validated (adaskip: the paper planner's).
    min_retrieval (alone or with the two above): the plan must also find at least this fraction of
      the held-out retrieval probes the full model found in the validation (calibrate
      --validate-budgets with a tokenizer measures them at the calibration's prompt length).
    streaming_groups: also make this many KV-head groups streaming (SkipPlan.streaming), those
      the profile's group scores rank cheapest (calibrate with streaming_probes) outside layers
      whose attention the plan skips; with context_len and model_args the predicted speedup prices
      them (L20 roofline), else it is left out.
    """
    p = _plan(profile, num_layers, alpha, num_sublayers, strategy, planner, context_len, mode, window, online,
              costs, model_args, min_agreement, max_kl, stand_in, min_retrieval)
    if not streaming_groups:
        return p
    if profile is None:
        raise ValueError("adaskip: streaming_groups takes its groups from a profile's group scores; pass the profile")
    from .head_groups import add_streaming

    phase, added = _phase(mode), 0.0
    if context_len is not None and model_args is not None:
        from .costs import sublayer_costs
        added = stand_in_cost(p, profile, sublayer_costs(model_args, context_len, phase))
    return add_streaming(p, profile.group_scores_of(), streaming_groups, context_len=context_len,
                         model_args=model_args, phase=phase, added_s=added)


def _phase(mode: str) -> str:
    """The phase a plan of `mode` is priced in: decode plans by a decode step, the others by prefill."""
    return "decode" if mode == "decode" else "prefill"


def _plan(profile, num_layers, alpha, num_sublayers, strategy, planner, context_len, mode, window, online, costs,
          model_args, min_agreement, max_kl, stand_in, min_retrieval) -> SkipPlan:
    record = strategy_of(strategy)
    if planner not in PLANNERS:
        raise ValueError(f"adaskip: unknown planner {planner!r}; choose from {PLANNERS}")
    if mode not in MODES:
        raise ValueError(f"adaskip: mode must be one of {MODES}, got {mode!r}")
    if profile is not None:
        num_layers = profile.num_layers
    if num_layers is None:
        raise ValueError("adaskip: pass a profile or num_layers")
    fingerprint = profile.fingerprint.get("config_hash") if profile is not None else None
    if min_agreement is not None or max_kl is not None or min_retrieval is not None:
        _check_tolerance(alpha, num_sublayers, min_agreement, max_kl, min_retrieval)
        if record.skips:
            return _by_tolerance(profile, strategy, min_agreement, max_kl, planner, context_len, mode, window,
                                 online, costs, model_args, stand_in, min_retrieval)
    if stand_in is not None and stand_in not in KINDS:
        raise ValueError(f"adaskip: unknown stand-in kind {stand_in!r}; choose from {KINDS}")
    if stand_in not in (None, "scalar") and not record.fitted_stand_ins:
        raise ValueError(f"adaskip: {stand_in} stand-ins are fitted by the kl search; strategy {strategy!r} "
                         "skips with scalar compensation (or identity) only: use strategy 'greedy-kl'")
    k = 0 if not record.skips else _budget_sublayers(num_layers, alpha, num_sublayers)
    if record.needs_profile and profile is None:
        raise ValueError(f"adaskip: strategy {strategy!r} needs an importance profile (adaskip calibrate)")
    return record.planner(record, Budget(profile, num_layers, k, alpha, planner, context_len, mode, window, online,
                                         costs, model_args, fingerprint, stand_in))


def _check_tolerance(alpha, num_sublayers, min_agreement, max_kl, min_retrieval) -> None:
    if alpha is not None or num_sublayers is not None:
        raise ValueError("adaskip: give either a tolerance (min_agreement / max_kl / min_retrieval) or a budget "
                         "(alpha / num_sublayers), not both")
    if min_retrieval is not None and (isinstance(min_retrieval, bool) or not 0.0 <= min_retrieval <= 1.0):
        raise ValueError(f"adaskip: min_retrieval must be in [0, 1], got {min_retrieval}")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"adaskip: min_agreement must be in [0, 1], got {min_agreement}")
    if max_kl is not None and not max_kl >= 0.0:
        raise ValueError(f"adaskip: max_kl must be >= 0, got {max_kl}")


def _budget_sublayers(num_layers: int, alpha, num_sublayers) -> int:
    """The number of sublayers a budget given as alpha or as a count asks for, checked."""
    if (alpha is None) == (num_sublayers is None):
        raise ValueError("adaskip: give exactly one budget: alpha or num_sublayers")
    if num_sublayers is not None and (isinstance(num_sublayers, bool)
                                      or not isinstance(num_sublayers, numbers.Integral)):
        raise ValueError(f"adaskip: num_sublayers must be an integer, got {num_sublayers!r}")
    if num_sublayers is not None and not 0 <= num_sublayers <= 2 * num_layers - 2:
        raise ValueError(f"adaskip: num_sublayers must be in [0, {2 * num_layers - 2}] "
                         f"(all but one layer), got {num_sublayers}")
    return num_sublayers if num_sublayers is not None else sublayers_for_alpha(num_layers, alpha)


@dataclass
class _Validated:
    """One validated plan a tolerance may choose: `k` sublayers of the strategy plus `groups`
    streaming KV-head groups, with what the validation measured of it."""
    k: int
    groups: int
    plan: SkipPlan
    kl: float
    agree: float
    hits: Optional[int] = None


def _meets(c: _Validated, entry: dict, min_agreement, max_kl, min_retrieval) -> bool:
    """The validated plan `c` meets every tolerance given; retrieval as a fraction of the full
    model's hits on the same probes."""
    return ((min_agreement is None or c.agree >= min_agreement) and (max_kl is None or c.kl <= max_kl)
            and (min_retrieval is None or c.hits >= min_retrieval * entry["retrieval_full_hits"] - 1e-9))


def _validated_plans(profile, strategy, entry, mode, window, online, costs, model_args) -> list:
    """The plans the profile's validation of `strategy` measured, built again (stand-ins of the
    validated kind), each checked to be the plan that was measured: the budgets, and the
    budget + streaming-group rows (validate(streaming=)) when the validation has them, priced by
    the roofline when `costs` are the cost model's (a group plan is priced no other way)."""
    roofline = costs is not None and costs.source == "model" and model_args is not None
    at = dict(context_len=costs.context_len, model_args=model_args) if roofline else {}
    validated = entry.get("stand_in", "scalar")
    stand_in = validated if strategy_of(strategy).fitted_stand_ins else None
    hits = entry.get("retrieval_hits")
    base = {0: [], **{int(k): sorted(chosen) for k, chosen in zip(entry["budgets"], entry["sublayers"])}}
    out = []
    for i, k in enumerate(entry["budgets"]):
        p = plan(profile, strategy=strategy, num_sublayers=int(k), mode=mode, window=window, online=online,
                 stand_in=stand_in)
        if sorted(p.skip_scales) != sorted(entry["sublayers"][i]):
            raise ValueError(f"adaskip: the profile's validation of {strategy!r} at {k} sublayers measured another "
                             "plan than the profile gives now; validate again")
        out.append(_Validated(int(k), 0, p, entry["kl"][i], entry["top1_agreement"][i], hits[i] if hits else None))
    for row in entry.get("streaming", ()):
        p = plan(profile, strategy=strategy, num_sublayers=row["budget"], mode=mode, window=window, online=online,
                 stand_in=stand_in, streaming_groups=row["groups"], **at)
        # A row's budget is one the validation measured (or 0): its sublayers are that budget's.
        if streaming_layers(p) != row["layers"] or sorted(p.skip_scales) != base.get(row["budget"]):
            raise ValueError(f"adaskip: the profile's validation of {strategy!r} at {row['budget']} sublayers and "
                             f"{row['groups']} streaming groups measured another plan than the profile gives now; "
                             "validate again")
        out.append(_Validated(row["budget"], row["groups"], p, row["kl"], row["top1_agreement"],
                              row.get("retrieval_hits")))
    return out


def streaming_layers(p: SkipPlan) -> list:
    """A plan's streaming groups as [[layer, [groups]], ...] (how a validation records them: JSON
    keeps no integer keys)."""
    return [[int(i), sorted(int(g) for g in gs)] for i, gs in sorted(p.streaming.items())]


def _tolerance_costs(profile, context_len, mode, costs, model_args):
    """The costs that rank validated plans: given, or the cost model's at context_len, checked."""
    if costs is None and context_len is not None and model_args is None:
        raise ValueError("adaskip: ranking validated plans by the cost model at context_len needs model_args "
                         "(or measured costs=)")
    if costs is None and context_len is not None:
        from .costs import sublayer_costs
        costs = sublayer_costs(model_args, context_len, _phase(mode))
    if costs is not None and costs.num_layers != profile.num_layers:
        raise ValueError(f"adaskip: the costs are for {costs.num_layers} layers, the model has {profile.num_layers}")
    return costs


def _by_tolerance(profile, strategy, min_agreement, max_kl, planner, context_len, mode, window, online, costs,
                  model_args, stand_in, min_retrieval=None) -> SkipPlan:
    if profile is None:
        raise ValueError("adaskip: planning by tolerance needs a profile with a validation (adaskip calibrate "
                         "--validate-budgets)")
    if planner != "paper":
        raise ValueError("adaskip: a tolerance picks among the validated plans (the paper planner's); to rank them "
                         "by the cost model, give context_len and model_args (or costs=) with planner='paper'")
    entry = profile.validation_of(strategy)
    if min_retrieval is not None and "retrieval_hits" not in entry:
        raise ValueError(f"adaskip: the profile's validation of {strategy!r} measured no retrieval; calibrate again "
                         "with --validate-budgets and a tokenizer (validation probes > 0) to plan by min_retrieval")
    validated = entry.get("stand_in", "scalar")
    if stand_in is not None and stand_in != validated:
        raise ValueError(f"adaskip: the profile validated {strategy!r} with {validated} stand-ins, not {stand_in}; "
                         "validate that stand-in or plan without a tolerance")
    costs = _tolerance_costs(profile, context_len, mode, costs, model_args)
    # Budget 0 is the full model: nothing to lose, so it always qualifies.
    full = _Validated(0, 0, plan(profile, strategy=strategy, num_sublayers=0, mode=mode, window=window, online=online,
                                 stand_in=validated if strategy_of(strategy).fitted_stand_ins else None), 0.0, 1.0)
    qualifying = [full] + [c for c in _validated_plans(profile, strategy, entry, mode, window, online, costs,
                                                       model_args)
                           if (c.k or c.groups) and _meets(c, entry, min_agreement, max_kl, min_retrieval)]
    unpriced, best = 0, None
    for c in qualifying:
        # A group plan carries the roofline's price (plan(streaming_groups=) at the costs' context) or none.
        speed = c.plan.predicted_speedup if c.groups else plan_speedup(c.plan, profile, costs)
        if speed is None:
            unpriced += 1
            continue
        # Rounded so that float noise in the sums does not break a tie the smaller plan should win.
        key = (round(speed, 12), -c.k, -c.groups)
        if best is None or key > best[0]:
            best = (key, c, speed)
    _, chosen, speed = best
    p = chosen.plan
    p.predicted_speedup = speed
    head = _tolerance_line(chosen, entry, qualifying, costs, min_agreement, max_kl, min_retrieval)
    if unpriced:
        head += (f"; {unpriced} qualifying plans with streaming groups were not ranked: pricing a group's band needs "
                 "the cost model (context_len and model_args)")
    p.explanation = head + ("\n" + p.explanation if p.explanation else "")
    return p


def _tolerance_line(chosen: _Validated, entry: dict, qualifying: list, costs, min_agreement, max_kl,
                    min_retrieval) -> str:
    """The explanation's first line: the tolerance, what it chose among which, and what the
    validation measured of the choice."""
    wanted = " and ".join(f"{n} {op} {v:g}" for n, op, v in (("top-1 agreement", ">=", min_agreement),
                                                           ("KL per token", "<=", max_kl),
                                                           ("retrieval (of the full model's hits)", ">=",
                                                            min_retrieval)) if v is not None)
    if not chosen.k and not chosen.groups:
        return f"tolerance {wanted}: no validated budget of {entry['budgets']} meets it; the full model (0 sublayers)"
    by = (f"cost model ({costs.source}, {costs.mode} at {costs.context_len} tokens)" if costs is not None
          else "equal-cost (paper) speedup")
    what = f"{chosen.k} sublayers" + (f" and {chosen.groups} streaming KV-head groups" if chosen.groups else "")
    if entry.get("streaming"):
        names = ", ".join(f"{c.k}" + (f" + {c.groups} groups" if c.groups else "")
                          for c in sorted(qualifying, key=lambda c: (c.groups, c.k)))
        among = (f"the qualifying plans [{names}] (validated: budgets {entry['budgets']}, and "
                 f"{len(entry['streaming'])} plans with streaming groups)")
    else:
        among = f"the qualifying budgets {sorted(c.k for c in qualifying)} (validated: {entry['budgets']})"
    head = (f"tolerance {wanted}: {what}, the fastest by {by} of {among}; on {entry['requests']} validation "
            f"requests ({entry['tokens']} tokens): KL per token {chosen.kl:.4g}, top-1 agreement {chosen.agree:.4f}")
    if chosen.hits is not None:
        head += (f"; retrieval probes found {chosen.hits} of {entry['retrieval_probes']} (full model "
                 f"{entry['retrieval_full_hits']}) at {entry['retrieval_length']} tokens")
    return head


def _adaskip(profile, k, alpha, planner, context_len, mode, window, online, costs, model_args,
             fingerprint) -> SkipPlan:
    sim = profile.similarity
    m = profile.num_layers
    if planner == "paper":
        chosen = profile.ranking()[:k]
        predicted = paper_speedup(m, len(chosen))
        explanation = f"paper planner: the {k} sublayers of highest similarity (equal-cost assumption)"
        lost = sum(1 - sim[s] for s in chosen)
    else:
        from .costs import select_by_cost, sublayer_costs
        if costs is None:
            if context_len is None or model_args is None:
                raise ValueError("adaskip: the cost planner needs context_len and model_args (or measured costs=)")
            costs = sublayer_costs(model_args, context_len, _phase(mode))
        target = alpha if alpha is not None else paper_speedup(m, k)
        sel = select_by_cost([max(1 - s, 0.0) for s in sim], costs, target)
        chosen, predicted, lost, explanation = sel.sublayers, sel.predicted_speedup, sel.importance_lost, sel.explanation
    beta = min(sim[s] for s in chosen) if chosen and online and mode != "prefill" else None
    return SkipPlan(m, {s: profile.scale[s] for s in chosen}, mode=mode, strategy="adaskip", beta=beta,
                    window=window, predicted_speedup=predicted, importance_lost=lost, explanation=explanation,
                    model_fingerprint=fingerprint)


def _greedy(profile, strategy: Strategy, k, mode, window, online, fingerprint, stand_in) -> SkipPlan:
    result = profile.search_result(strategy.search)
    skip = result.skip_scales(k)
    kind = stand_in or (result.stand_in if strategy.fitted_stand_ins else "scalar")
    stand_ins = result.stand_ins(k, kind)
    m = profile.num_layers
    static = not strategy.online
    beta = min(result.similarity[:k]) if k and online and mode != "prefill" and not static else None
    loss = result.loss[k] if k < len(result.loss) and result.loss[k] is not None else None
    note = f"; calibration loss {result.loss[0]:.4f} -> {loss:.4f}" if loss is not None and result.loss[0] else ""
    if static:
        tried = result.notes.get("candidates", f"up to {result.candidates} candidates per step")
        explanation = f"{result.method} search ({tried}): its first {k} choices, identity pass-through{note}"
    elif strategy.fitted_stand_ins:
        kl = result.objective[k] if k < len(result.objective) else None
        scored = f"; {result.notes.get('objective', 'KL')} {kl:.4f}" if kl is not None else ""
        explanation = (f"greedy kl search ({result.stand_in} stand-ins scored): its first {k} choices with {kind} "
                       f"stand-ins{scored}{note}")
    else:
        explanation = f"greedy {result.method} search: its first {k} choices{note}"
    if not k:  # the search chose nothing for this plan: its line would only list zeros
        explanation = f"{result.method} search: no sublayer skipped"
    p = SkipPlan(m, skip, mode=mode, strategy=strategy.name, beta=beta, window=window, stand_ins=stand_ins,
                 model_fingerprint=fingerprint, explanation=explanation)
    p.predicted_speedup = plan_speedup(p, profile)
    return p


def stand_in_cost(plan: SkipPlan, profile: Optional[ImportanceProfile], costs=None) -> float:
    """What the plan's linear stand-ins cost: in layers (the paper's equal-cost unit) without
    `costs`, else in seconds, each taken as its layer's FFN time scaled by multiply-adds (both are
    matmuls over the same tokens)."""
    linear = [(s, v) for s, v in plan.stand_ins.items() if v.kind == "linear"]
    if not linear:
        return 0.0
    notes = _stand_in_search_notes(plan, profile)
    attn, ffn = notes.get("attention_multiply_adds"), notes.get("ffn_multiply_adds")
    if not attn or not ffn:
        raise ValueError("adaskip: the cost of linear stand-ins needs the layer sizes the kl search records; "
                         "run the search again")
    if costs is None:
        return sum(v.multiply_adds_per_token() for _, v in linear) / (attn + ffn)
    return sum(costs.per_sublayer[2 * (s // 2) + 1] * v.multiply_adds_per_token() / ffn for s, v in linear)


def _stand_in_search_notes(plan: SkipPlan, profile: Optional[ImportanceProfile]) -> dict:
    """The notes of the search that fitted the plan's stand-ins, where the layer sizes they are
    weighed against are recorded: its strategy's search where that one fits stand-ins, else the
    profile's first search whose record (greedy.SEARCH_METHODS) says it fits them; {} if none ran."""
    if profile is None:
        return {}
    record = STRATEGY_TABLE.get(plan.strategy)
    own = [record.search] if record is not None and record.fitted_stand_ins else []
    fitting = own + [m.name for m in SEARCH_METHODS.values() if m.fits_stand_ins]
    return next((profile.search_result(name).notes for name in fitting if name in profile.search), {})


def plan_speedup(plan: SkipPlan, profile: Optional[ImportanceProfile], costs=None,
                 model_args=None) -> Optional[float]:
    """The plan's predicted speedup: under `costs` (adaskip.skipping.costs.SublayerCosts) or by the
    paper's equal-cost count, net of what its linear stand-ins cost. A plan with streaming KV-head
    groups is priced only by the roofline the cost model was computed on (costs.streaming_plan_costs,
    which needs `model_args`); None where that is not at hand: no count prices a group's band."""
    extra = stand_in_cost(plan, profile, costs)
    if plan.streaming:
        if costs is None or costs.spec is None or model_args is None:
            return None
        from .costs import streaming_plan_costs
        return streaming_plan_costs(model_args, costs.context_len, costs.mode, sorted(plan.skip_scales),
                                    {i: len(g) for i, g in plan.streaming.items()}, sink=plan.streaming_sink,
                                    window=plan.streaming_window, batch=costs.batch, spec=costs.spec,
                                    added_s=extra)["speedup"]
    if costs is None:
        return paper_speedup(plan.num_layers, len(plan.skip_scales), extra)
    return costs.speedup(plan.skip_scales, extra)


def plan_at_speedup(profile: Optional[ImportanceProfile], strategy: str, target: float, costs, *,
                    num_layers: Optional[int] = None, mode: str = "e2e", window: int = 20,
                    online: bool = True, stand_in: Optional[str] = None) -> SkipPlan:
    """Equal-time planning: the plan of `strategy` that reaches `target` speedup under `costs`
    (adaskip.skipping.costs.SublayerCosts: attention and FFN sublayers do not cost the same) with the
    fewest skipped sublayers. adaskip uses its cost planner (the least similarity lost for the
    target); every other strategy grows its own budget until the target is reached."""
    if target < 1.0:
        raise ValueError(f"adaskip: a target speedup must be >= 1, got {target}")
    m = profile.num_layers if profile is not None else num_layers
    if m is None:
        raise ValueError("adaskip: pass a profile or num_layers")
    if costs.num_layers != m:
        raise ValueError(f"adaskip: the costs are for {costs.num_layers} layers, the model has {m}")
    common = dict(num_layers=m, mode=mode, window=window, online=online)
    record = strategy_of(strategy)
    if record.cost_planner:
        p = plan(profile, strategy=strategy, planner="cost", alpha=target, costs=costs, **common)
        p.predicted_speedup = costs.speedup(p.skip_scales)
        return p
    step = 1 if record.sublayers else 2
    limit = 2 * m - 2
    if record.search is not None and profile is not None:
        limit = min(limit, len(profile.search_result(record.search).order))
    for k in range(0, limit + 1, step):
        p = plan(profile, strategy=strategy, num_sublayers=k, stand_in=stand_in, **common)
        speed = plan_speedup(p, profile, costs)
        if speed >= target - 1e-9:
            p.predicted_speedup = speed
            return p
    raise ValueError(f"adaskip: strategy {strategy!r} cannot reach a predicted speedup of {target} "
                     f"(within {limit} sublayers)")
