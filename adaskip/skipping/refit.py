"""Refitting a plan's stand-ins under the plan itself (Prune&Comp's compensation step).

A greedy search fits each chosen sublayer's stand-in once, when it is chosen: on the activations of
the model with the sublayers chosen *before* it skipped. A later choice upstream of it changes what
flows into it, so at the final budget its stand-in was fitted on inputs the plan no longer produces.
`refit_plan` fits every skipped sublayer's stand-in again on the plan's own activations: lowest
sublayer first, each with every other skip of the plan in place (the ones below it already
refitted), the sublayer itself run so its real output can be read. A sublayer's input depends only
on what is upstream of it, so one sweep upward gives each stand-in the inputs it sees at inference.
It costs one pass over the requests per skipped sublayer.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from ..runtime.skip_plan import SkipPlan
from ..runtime.stand_in import KINDS
from .measurement import measure_requests
from .stand_ins import StandInFit


def refit_plan(model, plan: SkipPlan, requests: Sequence[Sequence[int]], *, kind: Optional[str] = None,
               fit_requests: Sequence[Sequence[int]] = (), rank: Optional[int] = None) -> SkipPlan:
    """`plan` with the stand-in of every skipped sublayer fitted again under the plan's other skips.

    kind: the stand-in kind to fit ("scalar", "channel", "linear"); None keeps each sublayer's own
      (scalar where the plan has no StandIn for it).
    requests: token lists whose norm ratios give the scalar compensation (as the searches measure
      it: on text).
    fit_requests: more token lists the channel / linear maps are also fitted on (e.g. the search's
      retrieval probes), beside `requests`.
    rank: of linear stand-ins (default: the one each had, else adaskip's default).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"adaskip: unknown stand-in kind {kind!r}; choose from {KINDS}")
    if plan.num_layers != model.args.num_layers:
        raise ValueError(f"adaskip: the plan is for {plan.num_layers} layers, the model has {model.args.num_layers}")
    if not requests:
        raise ValueError("adaskip: refitting stand-ins needs at least one request")
    hidden = model.args.hidden_size
    scales = dict(plan.skip_scales)
    stand_ins = dict(plan.stand_ins)
    texts = list(requests)
    for s in sorted(scales):
        want = kind or (stand_ins[s].kind if s in stand_ins else "scalar")
        others = {t: v for t, v in scales.items() if t != s}
        around = replace(plan, skip_scales=others, stand_ins={t: v for t, v in stand_ins.items() if t != s},
                         beta=None) if others else None
        fit = StandInFit([s], hidden, linear=want == "linear")
        measured = measure_requests(model, texts + list(fit_requests), plan=around, stats=True, taps=fit)
        scale = measured.scale[:len(texts), s].mean().item()  # on the text requests, as the searches measure it
        scales[s] = scale
        if want == "scalar":
            stand_ins.pop(s, None)
        else:
            old_rank = stand_ins[s].rank if s in stand_ins and stand_ins[s].kind == "linear" else None
            stand_ins[s] = fit.fit(s, want, scale=scale, rank=rank or old_rank)
    note = f"stand-ins refitted under the plan ({kind or 'own kinds'})"
    return replace(plan, skip_scales=scales, stand_ins=stand_ins,
                   explanation=f"{plan.explanation}; {note}" if plan.explanation else note)

