"""Choosing the drafter of lossless self-speculative decoding (adaskip.runtime.speculative): the
static plan and the draft length k predicted to decode fastest, from acceptance measured on the
caller's prompts and the roofline cost of a draft step.

What a drafter needs is acceptance, not per-token fidelity: the full model corrects every token.
So the candidates reach budgets far beyond what a lossy plan can afford, by default up to half
of the sublayers. A round of k draft steps (each 1 / draft_speedup of a full step) and one verify
pass (one full step when memory-bound: the weights are read once for the k + 1 positions) emits
1 + (kept drafts) tokens per sequence; the kept drafts come from one measured run per budget at
the longest k, whose per-round counts give the tokens a round would emit at every shorter k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..runtime.generation import _check_prompts, generate
from ..runtime.speculative import SpeculativeConfig
from .costs import L20_SPEC, sublayer_costs
from .strategies import plan, stand_in_cost

DRAFT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)  # default budgets: these shares of the sublayers


def predicted_speedup(tokens_per_round: float, draft_tokens: int, draft_speedup: float,
                      verify_cost: float = 1.0) -> float:
    """Decode speedup of a round that costs `draft_tokens` draft steps (each 1 / draft_speedup of
    a full decode step) plus one verify pass (`verify_cost` full steps) and emits
    `tokens_per_round` tokens."""
    return tokens_per_round / (draft_tokens / draft_speedup + verify_cost)


def tokens_per_round(kept_counts: Sequence[int], draft_tokens: int) -> float:
    """Mean tokens a round of `draft_tokens` drafts emits per sequence, from the counts of rounds
    that kept j drafts (j = 0..K, measured with K >= draft_tokens): a round that kept j of K would
    have kept min(j, k) of k (the drafts are the same tokens up to k)."""
    if draft_tokens > len(kept_counts) - 1:
        raise ValueError(f"adaskip: counts measured with {len(kept_counts) - 1} drafts say nothing about "
                         f"{draft_tokens}")
    rounds = sum(kept_counts)
    if rounds == 0:
        return float("nan")
    return 1.0 + sum(min(j, draft_tokens) * n for j, n in enumerate(kept_counts)) / rounds


@dataclass
class DrafterChoice:
    """The drafter predicted fastest (`config`), its predicted decode speedup, whether that beats
    plain decoding (`pays`), and every candidate measured (`rows`: budget, k, acceptance rate,
    tokens per round, draft speedup, predicted speedup; a budget the strategy cannot plan has
    `unavailable` with the reason)."""

    config: SpeculativeConfig
    predicted_speedup: float
    pays: bool
    rows: list = field(default_factory=list)


@torch.inference_mode()
def plan_drafter(model, profile, prompts: Sequence[Sequence[int]], *, strategy: str = "adaskip",
                 budgets: Optional[Sequence[int]] = None, draft_tokens: Sequence[int] = (1, 2, 3, 4, 6),
                 max_new_tokens: int = 32, context_len: Optional[int] = None, spec=None,
                 verify_cost: float = 1.0) -> DrafterChoice:
    """The drafter (a plan of `strategy` at one of `budgets` sublayers, and k from `draft_tokens`)
    with the highest predicted decode speedup.

    prompts: token-id lists the acceptance is measured on (greedy, `max_new_tokens` each; keep
    them apart from the text you evaluate on). budgets: default DRAFT_FRACTIONS of the sublayers.
    context_len: the KV length the roofline cost of a draft step is taken at (default: the
    prompts' mean length); spec: the device of the roofline (default the L20)."""
    args = model.args
    total = 2 * args.num_layers
    prompts = _check_prompts(prompts, args.vocab_size)  # a batch of in-vocabulary token-id lists
    ks = sorted(set(draft_tokens))
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"adaskip: draft lengths must be integers >= 1, got {list(draft_tokens)}")
    if budgets is None:
        budgets = sorted({max(1, round(f * total)) for f in DRAFT_FRACTIONS})
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < total]
    if not budgets or bad:
        raise ValueError(f"adaskip: drafter budgets must be integers in [1, {total - 1}] (the model has {total} "
                         f"sublayers), got {list(budgets)}")
    if max_new_tokens < 2:
        raise ValueError(f"adaskip: max_new_tokens must be >= 2 to measure a round, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens + ks[-1] + 1 > args.max_position_embeddings:
        raise ValueError(f"adaskip: a prompt of {longest} tokens plus {max_new_tokens} new tokens and "
                         f"{ks[-1] + 1} positions of drafting exceeds the model's context of "
                         f"{args.max_position_embeddings} tokens")
    length = context_len or round(sum(len(p) for p in prompts) / len(prompts))
    costs = sublayer_costs(args, length, "decode", spec=spec or L20_SPEC)

    rows, best = [], None
    for budget in sorted(set(budgets)):
        try:
            drafter = plan(profile, strategy=strategy, num_sublayers=budget, online=False)
        except ValueError as e:  # e.g. a greedy search that stopped short of this budget
            rows.append({"budget": budget, "unavailable": str(e)})
            continue
        # One batch of every prompt: the counts are per sequence and round, as one prompt at a time.
        counts = generate(model, [list(p) for p in prompts], max_new_tokens=max_new_tokens, eos_token_ids=[],
                          speculative=SpeculativeConfig(drafter, draft_tokens=ks[-1])).speculative["kept_counts"]
        draft_speedup = costs.speedup(drafter.phase("decode").skip_scales, stand_in_cost(drafter, profile, costs))
        rounds = sum(counts)
        for k in ks:
            tpr = tokens_per_round(counts, k)
            row = {"budget": budget, "draft_tokens": k, "strategy": strategy,
                   "acceptance_rate": (tpr - 1) / k if rounds else float("nan"), "tokens_per_round": tpr,
                   "draft_speedup": draft_speedup,
                   "predicted_speedup": predicted_speedup(tpr, k, draft_speedup, verify_cost), "rounds": rounds}
            rows.append(row)
            if not math.isnan(row["predicted_speedup"]) and (best is None or
                                                            row["predicted_speedup"] > best[0]["predicted_speedup"]):
                best = (row, drafter)
    if best is None:
        reasons = "; ".join(f"{r['budget']}: {r['unavailable']}" for r in rows if "unavailable" in r)
        raise ValueError(f"adaskip: no drafter could be measured ({reasons or 'no rounds ran'})")
    row, drafter = best
    return DrafterChoice(SpeculativeConfig(drafter, draft_tokens=row["draft_tokens"]), row["predicted_speedup"],
                         row["predicted_speedup"] > 1.0, rows)
