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

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .decode import HostFlag, KeptState, StepGraphs, kept_state
from .generation import GenerationResult, _check_prompts, _sync, ensure_caches, eos_tensor, prefill
from .online import OnlineGates
from .sampling import SamplingParams, greedy_tokens, probabilities
from .schedule import schedule_step
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
    greedy = sampling.temperature == 0
    args = model.args
    prompts = _check_prompts(prompts, args.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"adaskip: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    config.plan.check_model(args.num_layers)
    config.plan.check_hidden(args.hidden_size)
    k = config.draft_tokens
    lengths = [len(p) for p in prompts]
    longest, batch = max(lengths), len(prompts)
    needed = longest + max_new_tokens + k + 1  # a round may write k + 1 positions past the last kept one
    if needed > args.max_position_embeddings:
        raise ValueError(f"adaskip: a prompt of {longest} tokens plus {max_new_tokens} new tokens and {k + 1} "
                         f"positions of drafting exceeds the model's context of {args.max_position_embeddings} tokens")
    device = model.lm_head.weight.device
    eos = eos_tensor(args, eos_token_ids, device)
    ensure_caches(model, batch, needed, model.attention_layers_for(None))  # the verifier runs every attention layer
    state = _state(model, batch, k, eos.numel(), device)
    graphs = state.graphs if cuda_graph else None
    draft_plan = config.plan.phase("decode")
    online = None
    if config.online:
        candidates = [2 * i + 1 for i in range(args.num_layers) if 2 * i + 1 not in draft_plan.skip_scales]
        online = state.online_for(args.num_layers, candidates)
    verify_schedule = schedule_step(model, batch=batch, tokens=k + 1, capturing=graphs is not None)

    ids = torch.zeros(batch, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    ids = ids.to(device)
    lens = torch.tensor(lengths, device=device)
    generator = state.generator_for(sampling.seed)
    _sync(device)
    t0 = time.perf_counter()
    first = prefill(model, ids, lens, chunk=prefill_chunk)
    token = greedy_tokens(first) if greedy else _draw(probabilities(first, sampling), generator)  # not in the cache yet
    _sync(device)
    prefill_s = time.perf_counter() - t0

    state.start(token, lens, max_new_tokens, eos)
    captures_before, capture_s_before = (graphs.captures, graphs.capture_s) if graphs is not None else (0, 0.0)
    existing, reused = (set(graphs.graphs) if graphs is not None else set()), set()
    done, gates_flag, filled = HostFlag(device), HostFlag(device), HostFlag(device)
    # The furthest any sequence had got at the start of round known[0] (eager rounds read no more
    # of the cache than that plus k + 1 slots a round since): read back without waiting.
    known, posted = (0, longest), 0
    strict = forbid_host_sync and device.type == "cuda"
    previous_mode = torch.cuda.get_sync_debug_mode() if strict else 0
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    launched = 0
    t1 = time.perf_counter()
    try:
        # Every round adds a token to each running sequence: max_new_tokens - 1 rounds finish all.
        for r in range(max_new_tokens - 1):
            if done.ready() and bool(done.host):
                break
            if online is not None and online.learning and gates_flag.ready():
                online.settle(gates_flag.host)  # decided alike for every sequence: run or skip outright
                gates_flag.host = None
            update = (config.plan.window, config.plan.beta) if online is not None and online.learning else None
            draft_schedule = schedule_step(model, batch=batch, tokens=1, plan=draft_plan, online=online,
                                           capturing=graphs is not None, online_update=update)
            key = (draft_schedule, verify_schedule, model.cache_id,
                   (sampling.temperature, sampling.top_k, sampling.top_p, generator is not None))
            replay = graphs is not None and r > 0  # the first round runs eagerly: it is also the warm-up
            if filled.ready():
                known, filled.host = (posted, int(filled.host)), None
            kv_lens = _kv_lens(model, known[1], r - known[0], k, replay)
            if replay:
                if key in existing:
                    reused.add(key)
                graphs.replay(key, lambda: _round(model, state, k, draft_schedule, verify_schedule, sampling,
                                                  generator, kv_lens, online), generator)
            else:
                _round(model, state, k, draft_schedule, verify_schedule, sampling, generator, kv_lens, online)
            launched += 1
            done.post(state.finished.all())
            if not replay:
                filled.post(state.pos.max())
                posted = r + 1
            if update is not None and (r + 1) * k >= config.plan.window > r * k:
                gates_flag.post(online.gates)  # every gate is decided now: fetch them without waiting
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode(previous_mode)
    _sync(device)
    capture_s = graphs.capture_s - capture_s_before if graphs is not None else 0.0
    decode_s = time.perf_counter() - t1 - capture_s

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
             "rounds_launched": launched}  # rounds the host ran: a round or two more than `rounds` on a GPU
    online_skipped = online.skipped_per_sequence() if online is not None else None
    eos_ids = set(eos.tolist())
    finished = [bool(f) and o[-1] in eos_ids for f, o in zip(state.finished.tolist(), out)]  # at EOS, not the limit
    return GenerationResult(tokens=out, prefill_s=prefill_s, decode_s=decode_s, decode_steps=rounds,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=finished, speculative=stats,
                            decode_tokens=max(counts) - 1,
                            graphs_captured=graphs.captures - captures_before if graphs is not None else 0,
                            graphs_reused=len(reused), graph_capture_s=capture_s, online_skipped=online_skipped)


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

