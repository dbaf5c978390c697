"""Lossless decoding with a skip plan as the drafter (self-speculative decoding: Draft & Verify,
SWIFT). The plan drafts `draft_tokens` tokens one by one on the model's own weights and KV
cache; the full model then verifies them in one forward over draft_tokens + 1 positions; the
longest prefix the full model agrees with is kept, plus the full model's own next token. Greedy
output is the full model's own (the tokens of `generate` without a plan); sampled output follows
the full model's distribution (speculative rejection sampling).

The cache is shared: the draft writes K/V only for the attention layers it runs, the verify
pass writes every layer's K/V at all the drafted positions, and whatever a rejected draft left
behind lies beyond the sequence's position, where attention does not look, until it is
overwritten.

Acceptance is decided on the device: each round reads and writes fixed buffers
(`SpeculativeState`: the current token, positions, the tokens emitted so far, end of sequence,
counters), so the host only launches rounds and learns that every sequence has ended through a
non-blocking copy, a round or two late (such rounds change nothing). On a GPU with
`cuda_graph=True` a whole round (k draft steps, the verify pass and the acceptance) is one
CUDA-graph replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .decode import HostFlag, KeptState, StepGraphs, kept_state
from .driver import DecodeRun, DecodeStep, OnlineLearning, drive
from .generation import GenerationResult, ensure_caches, eos_tensor, first_tokens
from .online import OnlineGates
from .request_plan import DRAFT, VERIFY, RequestPlan, check_prompts, resolve_speculative
from .sampling import SamplingParams, greedy_tokens, probabilities
from .skip_plan import SkipPlan


@dataclass
class SpeculativeConfig:
    """plan: the drafter (its decode-phase skips); draft_tokens: tokens drafted per round (k).
    online: the drafter also gates FFNs off per sequence by online learning (AdaSkip's decode
    learning, the plan's window and beta, on the draft steps: close to SWIFT's on-the-fly choice
    of what to skip); the full model still verifies every token, so the output does not change."""

    plan: SkipPlan
    draft_tokens: int = 4
    online: bool = False

    def __post_init__(self):
        if not isinstance(self.plan, SkipPlan):
            raise TypeError(f"adaskip: the drafter must be a SkipPlan, got {type(self.plan).__name__}")
        if isinstance(self.draft_tokens, bool) or not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ValueError(f"adaskip: draft_tokens must be an int >= 1, got {self.draft_tokens!r}")
        if self.plan.ramp:
            raise ValueError("adaskip: a drafter with SkipDecode's ramp is not supported; use a static plan")
        if self.online and not self.plan.online:
            raise ValueError("adaskip: online drafting needs a plan with online learning (a beta and a window, "
                             "mode decode or e2e)")

    def generate(self, model, prompts, **kwargs) -> GenerationResult:
        """generate_speculative with this configuration (what generate(speculative=self) calls)."""
        return generate_speculative(model, prompts, config=self, **kwargs)


class SpeculativeState(KeptState):
    """What a speculative round reads and writes, in fixed device buffers (CUDA graphs of rounds
    are captured on them): the token not yet in the cache and its position per sequence, the
    tokens emitted so far, end of sequence and the acceptance counters. Refilled in place per call."""

    def __init__(self, batch: int, draft_tokens: int, width: int, num_eos: int, device: torch.device):
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, **long)
        self.pos = torch.zeros(batch, **long)
        self.zero = torch.zeros(batch, **long)
        # A round writes k + 1 candidates after each sequence's last token (those past what it
        # keeps are overwritten later): room for max_new_tokens + k + 1.
        self.out_tokens = torch.zeros(batch, width, **long)
        self.emitted = torch.zeros(batch, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.limit = torch.zeros((), **long)  # max_new_tokens of the call
        self.eos = torch.zeros(num_eos, **long)
        self.rounds = torch.zeros((), **long)  # rounds in which some sequence was still running
        self.kept_counts = torch.zeros(draft_tokens + 1, **long)  # [j]: sequence rounds that kept j drafts
        self.offsets = torch.arange(draft_tokens + 1, device=device)
        self.graphs = StepGraphs() if device.type == "cuda" else None
        self.seeded = None
        self.online_gates = None  # OnlineGates of an online drafter, created on first use

    def start(self, token: torch.Tensor, lens: torch.Tensor, max_new_tokens: int, eos: torch.Tensor) -> None:
        self.token.copy_(token)
        self.pos.copy_(lens)
        self.out_tokens.zero_()
        self.out_tokens[:, 0] = token
        self.emitted.fill_(1)
        self.limit.fill_(max_new_tokens)
        self.eos.copy_(eos)
        self.finished.copy_(self._is_eos(token) | (self.emitted >= self.limit))
        for counter in (self.rounds, self.kept_counts):
            counter.zero_()

    def _is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[..., None] == self.eos).any(-1)

    def keep(self, draft: torch.Tensor, agree: torch.Tensor, nxt: torch.Tensor) -> None:
        """Appends, for every running sequence, its `agree` kept drafted tokens and the full model's
        `nxt`, cut at the first end-of-sequence token and at max_new_tokens; moves its position
        past them. draft [B, k]; agree, nxt [B]."""
        active = ~self.finished
        candidates = torch.cat([draft, draft[:, :1]], 1).scatter(1, agree[:, None], nxt[:, None])  # [B, k + 1]
        offered = agree + 1
        eos_at = torch.where(self._is_eos(candidates) & (self.offsets <= agree[:, None]), self.offsets,
                             self.offsets.numel()).amin(1)
        kept = torch.minimum(torch.minimum(offered, eos_at + 1), self.limit - self.emitted)
        kept = torch.where(active, kept, 0)
        self.out_tokens.scatter_(1, self.emitted[:, None] + self.offsets, candidates)
        self.emitted += kept
        self.finished |= active & ((eos_at < kept) | (self.emitted >= self.limit))
        self.pos += torch.where(active, offered, 0)  # the cache holds the token and the kept drafts
        self.token.copy_(torch.where(active, nxt, self.token))
        self.rounds += active.any()
        self.kept_counts += ((agree[:, None] == self.offsets) & active[:, None]).sum(0)


@torch.inference_mode()
def generate_speculative(model, prompts: Sequence[Sequence[int]], *, config: SpeculativeConfig,
                         max_new_tokens: int = 64, eos_token_ids: Optional[Sequence[int]] = None,
                         prefill_chunk: int = 8192, sampling: Optional[SamplingParams] = None,
                         cuda_graph: bool = False, forbid_host_sync: bool = False) -> GenerationResult:
    """Generation of up to max_new_tokens per prompt, drafted by config.plan and verified by the
    full model. Greedy (default): the same tokens as generate(model, prompts) without a plan.
    Sampled (`sampling` with temperature > 0): speculative rejection sampling, a drafted token d
    kept with probability min(1, p(d) / q(d)) (p the full model's distribution, q the draft's,
    both after temperature / top-k / top-p), the first rejected position resampled from
    max(0, p - q) normalised, and a token from p after a fully kept draft: every token is
    distributed exactly as the full model's sampling would draw it. The result's `speculative`
    holds rounds, drafted and accepted tokens, the acceptance rate, the mean number of tokens
    each round emits per sequence and `kept_counts` ([j]: rounds of a sequence that kept j drafts).
    cuda_graph: on a GPU, each round is a CUDA-graph replay (captured on the first round of its
    shape, kept for later calls of the same batch, draft length and cache); attention then reads
    the whole cache under masks built from the device positions.
    forbid_host_sync: on a GPU, any host synchronisation inside the loop of rounds is an error."""
    sampling = sampling or SamplingParams()
    prompts = check_prompts(prompts, model.args.vocab_size)
    k = config.draft_tokens
    request = resolve_speculative(model, [len(p) for p in prompts], config.plan, draft_tokens=k, online=config.online,
                                  max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk)
    ensure_caches(model, len(prompts), request.needed, request.kv_layers)
    device = model.lm_head.weight.device
    eos = eos_tensor(model.args, eos_token_ids, device)
    state = _state(model, len(prompts), k, eos.numel(), device)
    online = OnlineLearning.start(request, len(prompts), device, kept=state)
    generator = state.generator_for(sampling.seed)
    token, lens, prefill_s = first_tokens(model, request, prompts, sampling, generator)  # not in the cache yet
    state.start(token, lens, max_new_tokens, eos)
    step = SpeculativeRound(model, request, state, sampling, generator, online, max(len(p) for p in prompts),
                            graphs=state.graphs if cuda_graph else None)
    # Every round adds a token to each running sequence: max_new_tokens - 1 rounds finish all.
    run = drive(step, max_new_tokens - 1, device=device, online=online, forbid_host_sync=forbid_host_sync)
    return _result(model, state, k, eos, online, prefill_s, run)


class SpeculativeRound(DecodeStep):
    """A round as a decode step: k draft steps in the request's draft phase, the verify pass over
    k + 1 positions in its verify phase, the acceptance (_round)."""

    def __init__(self, model, request: RequestPlan, state: SpeculativeState, sampling: SamplingParams, generator,
                 online: Optional[OnlineLearning], longest: int, graphs):
        self.model, self.request, self.state, self.sampling, self.graphs = model, request, state, sampling, graphs
        self.finished, self.generator = state.finished, generator
        self.gates = online.gates if online is not None else None
        self.k = state.kept_counts.numel() - 1
        # The furthest any sequence had got at the start of round known[0] (eager rounds read no
        # more of the cache than that plus k + 1 slots a round since): read back without waiting.
        self.filled, self.known, self.posted = HostFlag(state.token.device), (0, longest), 0

    def schedules(self, index: int, capturing: bool) -> tuple:
        batch, phases = self.state.token.shape[0], self.request.phases
        return (self.request.schedule(phases[DRAFT], batch=batch, tokens=1, online=self.gates, capturing=capturing),
                self.request.schedule(phases[VERIFY], batch=batch, tokens=self.k + 1, capturing=capturing))

    def graph_key(self, schedules: tuple) -> tuple:
        sp = self.sampling
        return (*schedules, self.model.cache_id, (sp.temperature, sp.top_k, sp.top_p, self.generator is not None))

    def launch(self, index: int, schedules: tuple, captured: bool) -> None:
        if not captured and self.filled.ready():
            self.known, self.filled.host = (self.posted, int(self.filled.host)), None
        kv_lens = _kv_lens(self.model, self.known[1], index - self.known[0], self.k, captured)
        _round(self.model, self.state, self.k, *schedules, self.sampling, self.generator, kv_lens, self.gates)
        if not captured:
            self.filled.post(self.state.pos.max())
            self.posted = index + 1

    def tokens_learned(self, steps: int) -> int:
        return steps * self.k  # the drafter learns from its k draft steps a round


def _result(model, state: SpeculativeState, k: int, eos: torch.Tensor, online: Optional[OnlineLearning],
            prefill_s: float, run: DecodeRun) -> GenerationResult:
    counts = state.emitted.tolist()
    out = [row[:n] for row, n in zip(state.out_tokens.tolist(), counts)]
    rounds, kept_counts = int(state.rounds), state.kept_counts.tolist()
    sequence_rounds = sum(kept_counts)  # rounds x sequences that were still running
    accepted = sum(j * n for j, n in enumerate(kept_counts))
    drafted = k * sequence_rounds
    emitted = sum(n - 1 for n in counts)
    stats = {"draft_tokens": k, "rounds": rounds, "drafted": drafted, "accepted": accepted,
             "acceptance_rate": accepted / drafted if drafted else float("nan"),
             "tokens_per_round": emitted / sequence_rounds if sequence_rounds else float("nan"),
             "kept_counts": kept_counts,
             "rounds_launched": run.steps}  # rounds the host ran: a round or two more than `rounds` on a GPU
    eos_ids = set(eos.tolist())
    finished = [bool(f) and o[-1] in eos_ids for f, o in zip(state.finished.tolist(), out)]  # at EOS, not the limit
    return GenerationResult(tokens=out, prefill_s=prefill_s, decode_s=run.seconds, decode_steps=rounds,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=finished, speculative=stats,
                            decode_tokens=max(counts) - 1, graphs_captured=run.captured, graphs_reused=run.reused,
                            graph_capture_s=run.capture_s,
                            online_skipped=online.gates.skipped_per_sequence() if online is not None else None)


def _kv_lens(model, filled: int, rounds: int, k: int, captured: bool) -> list:
    """Slots attention reads in each draft step of a round and (last) in its verify pass. A
    captured round reads the whole cache under masks from the device positions (its shapes are
    baked in); an eager one only what a sequence can have filled by then: `filled`, the furthest
    position known `rounds` rounds ago, plus k + 1 for each (a round moves a sequence at most
    that far)."""
    if captured:
        return [model.cache_len] * (k + 1)
    bound = filled + rounds * (k + 1)
    return [min(model.cache_len, bound + j + 1) for j in range(k + 1)]


def _round(model, state: SpeculativeState, k: int, draft_schedule, verify_schedule, sampling: SamplingParams,
           generator, kv_lens: list, online: Optional[OnlineGates] = None) -> None:
    """One round on the state's buffers: k draft steps, the verify pass over k + 1 positions and
    the acceptance, with nothing read back. kv_lens[j]: slots attention reads in draft step j
    (and, for j = k, in the verify pass). online: the drafter's gates (learning from the draft
    steps of running sequences, decided on the device once the window is full)."""
    greedy = sampling.temperature == 0
    alive = (~state.finished).to(torch.int32) if online is not None else None
    current, drafts, draft_probs = state.token, [], []
    for j in range(k):
        logits = model(current[:, None], state.pos + j, kv_len=kv_lens[j], logits_index=state.zero,
                       schedule=draft_schedule, online=online, seq_lens=alive)
        if draft_schedule.online_update is not None:
            online.update(*draft_schedule.online_update)
        if greedy:
            current = greedy_tokens(logits)
        else:
            q = probabilities(logits, sampling)
            current = _draw(q, generator)
            draft_probs.append(q)
        drafts.append(current)
    draft = torch.stack(drafts, 1)  # [B, k]
    logits = model(torch.cat([state.token[:, None], draft], 1), state.pos, kv_len=kv_lens[k],
                   schedule=verify_schedule)  # [B, k + 1, V]
    if greedy:
        verify = greedy_tokens(logits)
        agree = (draft == verify[:, :k]).long().cumprod(1).sum(1)  # [B]: drafted tokens the full model keeps
        nxt = verify.gather(1, agree[:, None]).squeeze(1)
    else:
        agree, nxt = _accept(probabilities(logits, sampling), torch.stack(draft_probs, 1), draft, generator)
    state.keep(draft, agree, nxt)


def _state(model, batch: int, k: int, num_eos: int, device: torch.device) -> SpeculativeState:
    """The kept speculative state for this model, batch, draft length and KV cache (its graphs hold
    the addresses of the weights, the caches and its buffers)."""
    return kept_state(model, (batch, num_eos, device, "speculative", k),
                      lambda: SpeculativeState(batch, k, model.cache_len + k + 1, num_eos, device))


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator) -> tuple:
    """Speculative rejection sampling. p [B, k + 1, V]: the full model's distributions at the
    verified positions; q [B, k, V]: the draft's; draft [B, k]. Returns (kept drafted tokens [B],
    the next token [B])."""
    b, k = draft.shape
    p_d = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    q_d = q.gather(-1, draft[..., None]).squeeze(-1)
    u = torch.rand(b, k, device=p.device, generator=generator)
    kept = (u * q_d <= p_d).long().cumprod(1).sum(1)  # u < p / q, without dividing by a zero q
    rows = torch.arange(b, device=p.device)
    target = p[rows, kept]  # [B, V]: p at the first rejected position (or after the last draft)
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # after a fully kept draft: nothing to subtract
    residual = (target - q_pad[rows, kept]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target)
    return kept, _draw(residual, generator)

