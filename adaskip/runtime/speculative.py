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

Each round reads the accepted lengths back on the host (one small copy per round); acceptance
kept on the device with CUDA-graph draft / verify steps is the next step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .decode import drop_decode_states
from .generation import GenerationResult, _check_prompts, _sync, prefill
from .sampling import SamplingParams, probabilities
from .skip_plan import SkipPlan


@dataclass
class SpeculativeConfig:
    """plan: the drafter (its decode-phase skips; online learning is not used for drafting);
    draft_tokens: tokens drafted per round (k)."""

    plan: SkipPlan
    draft_tokens: int = 4

    def __post_init__(self):
        if not isinstance(self.plan, SkipPlan):
            raise TypeError(f"adaskip: the drafter must be a SkipPlan, got {type(self.plan).__name__}")
        if isinstance(self.draft_tokens, bool) or not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ValueError(f"adaskip: draft_tokens must be an int >= 1, got {self.draft_tokens!r}")
        if self.plan.ramp:
            raise ValueError("adaskip: a drafter with SkipDecode's ramp is not supported; use a static plan")

    def generate(self, model, prompts, **kwargs) -> GenerationResult:
        """generate_speculative with this configuration (what generate(speculative=self) calls)."""
        return generate_speculative(model, prompts, config=self, **kwargs)


@torch.inference_mode()
def generate_speculative(model, prompts: Sequence[Sequence[int]], *, config: SpeculativeConfig,
                         max_new_tokens: int = 64, eos_token_ids: Optional[Sequence[int]] = None,
                         prefill_chunk: int = 8192, sampling: Optional[SamplingParams] = None) -> GenerationResult:
    """Generation of up to max_new_tokens per prompt, drafted by config.plan and verified by the
    full model. Greedy (default): the same tokens as generate(model, prompts) without a plan.
    Sampled (`sampling` with temperature > 0): speculative rejection sampling, a drafted token d
    kept with probability min(1, p(d) / q(d)) (p the full model's distribution, q the draft's,
    both after temperature / top-k / top-p), the first rejected position resampled from
    max(0, p - q) normalised, and a token from p after a fully kept draft: every token is
    distributed exactly as the full model's sampling would draw it. The result's `speculative`
    holds rounds, drafted and accepted tokens, the acceptance rate and the mean number of tokens
    each round emits per sequence."""
    sampling = sampling or SamplingParams()
    greedy = sampling.temperature == 0
    args = model.args
    prompts = _check_prompts(prompts, args.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"adaskip: max_new_tokens must be >= 1, got {max_new_tokens}")
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
    eos = set(args.eos_token_ids if eos_token_ids is None else eos_token_ids)
    every_layer = model.attention_layers_for(None)  # the verifier runs every attention layer
    if model.cache_batch < batch or model.cache_len < needed or model.cached_attention_layers() != every_layer:
        drop_decode_states(model)
        model.setup_caches(batch, needed, every_layer)
    draft_plan = config.plan.phase("decode")

    ids = torch.zeros(batch, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    ids = ids.to(device)
    lens = torch.tensor(lengths, device=device)
    _sync(device)
    t0 = time.perf_counter()
    generator = None
    if not greedy and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    first = prefill(model, ids, lens, chunk=prefill_chunk)
    token = first.argmax(-1) if greedy else _draw(probabilities(first, sampling), generator)  # not in the cache yet
    _sync(device)
    prefill_s = time.perf_counter() - t0

    out = [[t] for t in token.tolist()]
    finished = [o[0] in eos for o in out]
    pos = lens.clone()  # where `token` goes
    pos_host = list(lengths)  # the same on the host, kept from the accepted lengths read each round
    rows = torch.arange(batch, device=device)
    rounds = drafted = accepted = sequence_rounds = 0
    t1 = time.perf_counter()
    while not all(f or len(o) >= max_new_tokens for f, o in zip(finished, out)):
        active_host = [not f and len(o) < max_new_tokens for f, o in zip(finished, out)]
        active = torch.tensor(active_host, device=device)
        top = max(pos_host)  # no device read: attention's bound comes from the host copy
        current, drafts, draft_probs = token, [], []
        for j in range(k):
            logits = model(current[:, None], pos + j, kv_len=top + j + 1, plan=draft_plan)[:, 0]
            if greedy:
                current = logits.argmax(-1)
            else:
                q = probabilities(logits, sampling)
                current = _draw(q, generator)
                draft_probs.append(q)
            drafts.append(current)
        draft = torch.stack(drafts, 1)  # [B, k]
        verify_logits = model(torch.cat([token[:, None], draft], 1), pos, kv_len=top + k + 1)  # [B, k + 1, V]
        if greedy:
            verify = verify_logits.argmax(-1)
            agree = (draft == verify[:, :k]).long().cumprod(1).sum(1)  # [B]: drafted tokens the full model keeps
            nxt = verify[rows, agree]
        else:
            agree, nxt = _accept(probabilities(verify_logits, sampling), torch.stack(draft_probs, 1), draft, generator)
        agree_host, draft_host, nxt_host = agree.tolist(), draft.tolist(), nxt.tolist()
        for b in range(batch):
            if not active_host[b]:  # the host's own copy: no device read per sequence
                continue
            new = draft_host[b][:agree_host[b]] + [nxt_host[b]]
            for t in new:
                if len(out[b]) >= max_new_tokens:
                    break
                out[b].append(t)
                if t in eos:
                    finished[b] = True
                    break
            drafted += k
            accepted += agree_host[b]
            sequence_rounds += 1
            pos_host[b] += agree_host[b] + 1
        step = (agree + 1) * active.long()
        pos = pos + step  # finished sequences stay where they are
        token = torch.where(active, nxt, token)
        rounds += 1
    _sync(device)
    decode_s = time.perf_counter() - t1
    emitted = sum(len(o) - 1 for o in out)
    stats = {"draft_tokens": k, "rounds": rounds, "drafted": drafted, "accepted": accepted,
             "acceptance_rate": accepted / drafted if drafted else float("nan"),
             "tokens_per_round": emitted / sequence_rounds if sequence_rounds else float("nan")}
    return GenerationResult(tokens=out, prefill_s=prefill_s, decode_s=decode_s, decode_steps=rounds,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=finished, speculative=stats,
                            decode_tokens=max(len(o) - 1 for o in out))


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

