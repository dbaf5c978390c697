"""What one request needs from a SkipPlan, resolved and checked once, before its first forward.

A request is one adaskip.generate call, one speculative run, the requests of one
adaskip.hf.apply block, or one cache-less forward given a plan. `RequestPlan` holds, for it:

- its phases: the skips of every kind of step (prefill chunks, each decode step, a speculative
  round's draft steps and verify pass, a cache-less forward), as data: `Phase` records, the
  prefill chunks that run each one, and the phase of every decode step (SkipDecode's ramp gives
  each step its own). The drivers look a step's phase up here and ask `schedule()` what every
  sublayer does in it; a new kind of step is a new record built by a resolve function below,
  not a branch in generate, Transformer.forward or the decode loop;
- the attention layers that keep a KV cache, and the cache positions the request needs, checked
  against the model's context (check_context_fit: the one place that rule lives);
- online learning: the candidate FFNs and (window, beta);
- the stand-ins' device copies, made here so that no step (nor a CUDA-graph capture) makes them.

The plan is validated against the model once, here; steps then run resolved schedules.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .schedule import StepSchedule, schedule_step
from .skip_plan import PhaseSkips, SkipPlan

# The kinds of step a request has.
PREFILL, DECODE, DRAFT, VERIFY, FORWARD = "prefill", "decode", "draft", "verify", "forward"
MAX_KEPT_SCHEDULES = 256  # an adaskip.hf block sees prompts of any length: forget the oldest beyond this


@dataclass(frozen=True, eq=False)
class Phase:
    """One kind of step of a request. skips: what the plan skips in it (None: the full model);
    online: whether online learning gates its steps (decode steps, a drafter's steps)."""

    name: str
    skips: Optional[PhaseSkips] = None
    online: bool = False


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, end) run in one forward, in `phase`."""

    start: int
    end: int
    phase: Phase


def check_prompts(prompts, vocab_size: int) -> list:
    """A batch of token-id lists, checked on the host before anything reaches a kernel: an id
    outside the vocabulary would otherwise be a device-side assert on a GPU, which ends the
    process."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError("adaskip: prompts must be a batch of token-id lists; got a string (tokenize it first, "
                         "e.g. [tokenizer(text)['input_ids']])")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"adaskip: prompts given as a tensor must be [batch, tokens], got shape "
                             f"{tuple(prompts.shape)}")
        prompts = prompts.tolist()
    try:
        prompts = list(prompts)
    except TypeError:
        raise ValueError(f"adaskip: prompts must be a batch of token-id lists, got {type(prompts).__name__}") from None
    if not prompts:
        raise ValueError("adaskip: every prompt needs at least one token (no prompts were given)")
    batch = []
    for i, p in enumerate(prompts):
        if isinstance(p, numbers.Integral) or (isinstance(p, torch.Tensor) and p.dim() == 0):
            raise ValueError("adaskip: prompts is a flat list of token ids; pass a batch of lists (e.g. [ids] for one "
                             "prompt)")
        if isinstance(p, (str, bytes)):
            raise ValueError(f"adaskip: prompt {i} is a string; prompts must be token-id lists (tokenize it first)")
        ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not ids:
            raise ValueError(f"adaskip: every prompt needs at least one token; prompt {i} is empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"adaskip: prompt {i} holds token ids outside the vocabulary [0, {vocab_size}): "
                             f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
        batch.append([int(t) for t in ids])
    return batch


def check_context_fit(args, positions: int, what: str) -> None:
    """Refuses `positions` cache positions beyond the model's context; `what` names them."""
    if positions > args.max_position_embeddings:
        raise ValueError(f"adaskip: {what} exceeds the model's context of {args.max_position_embeddings} tokens")


class RequestPlan:
    """A SkipPlan resolved for one request on one model (built by the resolve functions below)."""

    def __init__(self, model, *, phases: dict, prefill: tuple = (), decode: tuple = (), kv_layers=frozenset(),
                 needed: int = 0, online_candidates: Optional[list] = None, online_update: Optional[tuple] = None,
                 stats: bool = False, block_stats: bool = False, conditional: bool = False):
        self.model = model
        self.phases = phases  # name -> Phase
        self.prefill = prefill  # PrefillChunk per forward of the prompt
        self.decode = decode  # Phase of every decode step (index: step)
        self.kv_layers = kv_layers  # attention layers that keep a KV cache
        self.needed = needed  # cache positions the request fills
        self.online_candidates = online_candidates  # FFN sublayers online learning decides; None: off
        self.online_update = online_update  # (window, beta)
        self.stats, self.block_stats = stats, block_stats  # IO-similarity statistics collected
        self.conditional = conditional  # gated FFNs in CUDA-graph conditional nodes
        self._schedules: dict = {}

    @property
    def online(self) -> bool:
        return self.online_candidates is not None

    @property
    def online_window(self) -> int:
        return self.online_update[0]

    def decode_phase(self, step: int) -> Phase:
        # A request resolved without a decode length (adaskip.hf) holds one decode phase for all.
        return self.decode[min(step, len(self.decode) - 1)]

    def schedule(self, phase: Phase, *, batch: int, tokens: int, online=None, capturing: bool = False) -> StepSchedule:
        """What every sublayer does in a step of `phase` over batch x tokens tokens. online: the
        request's OnlineGates (their settled state is part of the answer); a step of an online
        phase closes with the gates' update while some FFN is still learning. Resolved once per
        distinct step, then looked up."""
        learning = online is not None and bool(online.learning)
        update = self.online_update if phase.online and learning else None
        gates = None if online is None else (frozenset(online.learning), frozenset(online.skipped), online.conditional)
        key = (phase, batch, tokens, gates, capturing, update, torch.is_grad_enabled())
        found = self._schedules.get(key)
        if found is None:
            if len(self._schedules) >= MAX_KEPT_SCHEDULES:
                del self._schedules[next(iter(self._schedules))]
            found = self._schedules[key] = schedule_step(
                self.model, batch=batch, tokens=tokens, plan=phase.skips, online=online, capturing=capturing,
                stats=self.stats, block_stats=self.block_stats, online_update=update)
        return found


def kv_layers(args, plan: Optional[SkipPlan]) -> set:
    """The attention layers that keep a KV cache under `plan` (None: the full model)."""
    layers = plan.attention_layers if plan is not None else set(range(args.num_layers))
    return layers - args.absent_attention_layers


def check_plan(model, plan) -> None:
    """A plan fits the model (layer count, the stand-ins' hidden size, the streaming groups' KV
    heads), checked once per request."""
    if not isinstance(plan, SkipPlan):
        raise ValueError(f"adaskip: plan must be an adaskip SkipPlan (adaskip.plan(...)), got {type(plan).__name__}")
    plan.check_model(model.args.num_layers)
    plan.check_hidden(model.args.hidden_size)
    plan.check_kv_heads(model.args.num_kv_heads)
    absent = sorted(set(plan.streaming) & model.args.absent_attention_layers)
    if absent:
        raise ValueError(f"adaskip: the plan streams KV-head groups of layers {absent}, whose attention this model "
                         "does not have")
    weight = model.lm_head.weight
    for stand_in in plan.stand_ins.values():
        stand_in.prepare(weight.device, weight.dtype)


def check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"adaskip: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def resolve_forward(model, plan=None, *, stats: bool = False, block_stats: bool = False) -> RequestPlan:
    """A cache-less forward (or one step run outside a driver) given a plan: every skip of the
    plan holds, whatever its mode."""
    if plan is not None:
        check_plan(model, plan)
    phase = Phase(FORWARD, plan.as_skips() if plan is not None else None)
    return RequestPlan(model, phases={FORWARD: phase}, stats=stats, block_stats=block_stats)


def resolve_prefill(model, longest: int, plan: Optional[SkipPlan], *, prefill_chunk: int,
                    stats: bool = False) -> RequestPlan:
    """A prefill alone (of prompts up to `longest` tokens, in chunks of prefill_chunk), e.g. to time it."""
    prefill_chunk = check_count("prefill_chunk", prefill_chunk)
    if plan is not None:
        check_plan(model, plan)
    prefill = Phase(PREFILL, plan.skips_in("prefill") if plan is not None else None)
    return RequestPlan(model, phases={PREFILL: prefill}, prefill=_chunks(longest, prefill_chunk, prefill),
                       kv_layers=kv_layers(model.args, plan), needed=longest, stats=stats)


def resolve_generation(model, lengths: list, plan: Optional[SkipPlan], *, max_new_tokens: int, prefill_chunk: int,
                       stats: bool = False, conditional: bool = False) -> RequestPlan:
    """adaskip.generate: prompts of `lengths` tokens prefilled in chunks of prefill_chunk, then
    max_new_tokens - 1 decode steps (the first new token comes from the prefill)."""
    max_new_tokens, prefill_chunk = check_count("max_new_tokens", max_new_tokens), check_count("prefill_chunk",
                                                                                             prefill_chunk)
    if plan is not None:
        check_plan(model, plan)
    longest = max(lengths)
    needed = longest + max_new_tokens
    check_context_fit(model.args, needed, f"a prompt of {longest} tokens plus {max_new_tokens} new tokens")
    online = plan is not None and plan.online
    prefill = Phase(PREFILL, plan.skips_in("prefill") if plan is not None else None)
    decode = _decode_phases(plan, max_new_tokens - 1, online)
    phases = {PREFILL: prefill, DECODE: decode[0] if decode else _decode_phases(plan, 1, online)[0]}
    return RequestPlan(model, phases=phases, prefill=_chunks(longest, prefill_chunk, prefill), decode=decode,
                       kv_layers=kv_layers(model.args, plan), needed=needed,
                       online_candidates=_online_candidates(model, plan) if online else None,
                       online_update=(plan.window, plan.beta) if online else None, stats=stats,
                       conditional=conditional)


def resolve_speculative(model, lengths: list, drafter: SkipPlan, *, draft_tokens: int, online: bool,
                        max_new_tokens: int, prefill_chunk: int) -> RequestPlan:
    """Speculative decoding: the full model prefills and verifies draft_tokens + 1 positions a
    round; the drafter's decode skips draft (with online learning when `online`)."""
    max_new_tokens, prefill_chunk = check_count("max_new_tokens", max_new_tokens), check_count("prefill_chunk",
                                                                                             prefill_chunk)
    check_plan(model, drafter)
    longest = max(lengths)
    needed = longest + max_new_tokens + draft_tokens + 1  # a round may write k + 1 positions past the last kept one
    check_context_fit(model.args, needed, f"a prompt of {longest} tokens plus {max_new_tokens} new tokens and "
                                          f"{draft_tokens + 1} positions of drafting")
    prefill = Phase(PREFILL)
    draft = Phase(DRAFT, drafter.skips_in("decode"), online=online)
    return RequestPlan(model, phases={PREFILL: prefill, DRAFT: draft, VERIFY: Phase(VERIFY)},
                       prefill=_chunks(longest, prefill_chunk, prefill), decode=(draft,),
                       kv_layers=kv_layers(model.args, None),  # the verifier runs every attention layer
                       needed=needed, online_candidates=_online_candidates(model, drafter) if online else None,
                       online_update=(drafter.window, drafter.beta) if online else None)


def resolve_applied(model, plan: SkipPlan) -> RequestPlan:
    """The requests of an adaskip.hf.apply block (transformers' generate drives them): a prefill
    forward, then decode steps of one token per sequence; the decode length is not known."""
    check_plan(model, plan)
    phases = {PREFILL: Phase(PREFILL, plan.skips_in("prefill")), DECODE: _decode_phases(plan, 1, plan.online)[0]}
    return RequestPlan(model, phases=phases, decode=(phases[DECODE],), kv_layers=kv_layers(model.args, plan),
                       online_candidates=_online_candidates(model, plan) if plan.online else None,
                       online_update=(plan.window, plan.beta) if plan.online else None)


def _chunks(longest: int, chunk: int, phase: Phase) -> tuple:
    return tuple(PrefillChunk(start, min(start + chunk, longest), phase) for start in range(0, longest, chunk))


def _decode_phases(plan: Optional[SkipPlan], steps: int, online: bool) -> tuple:
    """The phase of each of `steps` decode steps; steps with the same skips share one Phase
    (and so their resolved schedules)."""
    phases = []
    for step in range(steps):
        skips = plan.skips_in("decode", step, steps) if plan is not None else None
        last = phases[-1] if phases else None
        same = last is not None and (skips is None or last.skips.same_as(skips))
        phases.append(last if same else Phase(DECODE, skips, online=online))
    return tuple(phases)


def _online_candidates(model, plan: SkipPlan) -> list:
    """The FFNs online learning decides: those the plan does not skip in decode."""
    decode_skips = plan.skips_in("decode").skip_scales
    return [2 * i + 1 for i in range(model.args.num_layers) if 2 * i + 1 not in decode_skips]
