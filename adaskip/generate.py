"""Generation on the static-cache runtime: chunked prefill, decode, greedy and sampled tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import ops
from .model import Transformer
from .online import OnlineGates


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"adaskip: temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"adaskip: top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"adaskip: top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    tokens: list  # per sequence: the generated token ids (EOS included when it stopped there)
    prefill_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0
    decode_steps: int = 0
    kv_cache_bytes: int = 0
    finished: list = field(default_factory=list)  # per sequence: stopped at EOS
    # Online decode learning: per sequence, the FFN sublayers gated off after the window.
    online_skipped: Optional[list] = None

    @property
    def time_per_output_token_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")


class _HostFlag:
    """A device value read back without waiting: a non-blocking copy into pinned memory whose
    arrival is polled with an event, so the decode loop never stalls on the host."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.event = None
        self.host = None

    def post(self, value: torch.Tensor) -> None:
        if not self.cuda:
            self.host = value.clone()
            return
        self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self.host.copy_(value, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def ready(self) -> bool:
        return self.host is not None and (not self.cuda or self.event.query())


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Optional[SamplingParams] = None, eos_token_ids: Optional[Sequence[int]] = None,
             plan=None, stats: Optional[torch.Tensor] = None, prefill_chunk: int = 8192,
             forbid_host_sync: bool = False) -> GenerationResult:
    """Generates up to max_new_tokens for each prompt (a batch of token-id lists of any lengths).

    Prefill runs in chunks of `prefill_chunk` tokens so long prompts fit; the KV cache is
    (re)allocated for this batch and length, only for the attention layers the plan needs. The
    decode loop does not wait on the device: end-of-sequence is tracked on the device and read
    back without blocking, so generation may run a step or two past the last EOS (those tokens
    are dropped). With a plan that has online learning, its gates are decided on the device.
    forbid_host_sync: on a GPU, make any host synchronisation inside the decode loop an error
    (torch.cuda.set_sync_debug_mode("error")), to check that the loop never waits.
    """
    sampling = sampling or SamplingParams()
    args = model.args
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("adaskip: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"adaskip: max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk < 1:
        raise ValueError(f"adaskip: prefill_chunk must be >= 1, got {prefill_chunk}")
    if plan is not None:
        plan.check_model(args.num_layers)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    needed = longest + max_new_tokens
    if needed > args.max_position_embeddings:
        raise ValueError(f"adaskip: a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"model's context of {args.max_position_embeddings} tokens")
    device = model.lm_head.weight.device
    eos = torch.tensor(sorted(set(args.eos_token_ids if eos_token_ids is None else eos_token_ids)),
                       dtype=torch.long, device=device)
    batch = len(prompts)
    attention_layers = plan.attention_layers if plan is not None else set(range(args.num_layers))
    if (model.cache_batch < batch or model.cache_len < needed
            or model.cached_attention_layers() != attention_layers):
        model.setup_caches(batch, needed, attention_layers)

    ids = torch.zeros(batch, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    ids = ids.to(device)
    lens = torch.tensor(lengths, device=device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    _sync(device)
    t0 = time.perf_counter()
    prefill_plan = plan.phase("prefill") if plan is not None else None
    logits = None
    for start in range(0, longest, prefill_chunk):
        end = min(start + prefill_chunk, longest)
        valid = (lens - start).clamp(0, end - start)
        last = (lens - 1 - start).clamp(0, end - start - 1)
        out = model(ids[:, start:end], start, kv_len=end,
                    seq_lens=valid, plan=prefill_plan, stats=stats, logits_index=last)
        # Keep each sequence's logits from the chunk that holds its last prompt token.
        in_chunk = ((lens - 1) >= start) & ((lens - 1) < end)
        logits = out if logits is None else torch.where(in_chunk[:, None], out, logits)
    token = sample(logits, sampling, generator)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    online = None
    if plan is not None and plan.online:
        decode_skips = plan.phase("decode").skip_scales
        candidates = [2 * i + 1 for i in range(args.num_layers) if 2 * i + 1 not in decode_skips]
        online = OnlineGates.start(args.num_layers, batch, candidates, device)
    out_tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    generated = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    done_flag, gates_flag = _HostFlag(device), _HostFlag(device)
    # Per-sequence positions; one shared int when all prompts have the same length (lets
    # attention skip its mask).
    pos = lens.clone()
    same_length = len(set(lengths)) == 1
    steps = 0
    strict = forbid_host_sync and device.type == "cuda"
    previous_mode = torch.cuda.get_sync_debug_mode() if strict else 0
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    t1 = time.perf_counter()
    try:
        for step in range(max_new_tokens):
            out_tokens[:, step] = token
            newly = torch.isin(token, eos) & ~finished
            generated = torch.where(newly, step + 1, generated)
            finished |= newly
            if step == max_new_tokens - 1:
                break
            if done_flag.ready() and bool(done_flag.host):
                break  # every sequence had finished a step or two ago
            done_flag.post(finished.all())
            if online is not None and online.learning and gates_flag.ready():
                online.settle(gates_flag.host)
                gates_flag.host = None
            step_plan = plan.phase("decode", step, max_new_tokens - 1) if plan is not None else None
            alive = (~finished).to(torch.int32) if stats is not None else None
            logits = model(token[:, None], longest + step if same_length else pos, kv_len=longest + step + 1,
                           seq_lens=alive, plan=step_plan, stats=stats, online=online,
                           logits_index=torch.zeros(batch, dtype=torch.long, device=device))
            token = sample(logits, sampling, generator)
            if online is not None and online.learning:
                online.update(plan.window, plan.beta)
                if step + 1 == plan.window:  # every gate is decided now: fetch them without waiting
                    gates_flag.post(online.gates)
            pos += 1
            steps += 1
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode(previous_mode)
    _sync(device)
    decode_s = time.perf_counter() - t1

    counts = generated.tolist()
    token_lists = [row[:n] for row, n in zip(out_tokens.tolist(), counts)]
    online_skipped = None
    if online is not None:
        g = online.gates.cpu()
        online_skipped = [[s for s in range(2 * args.num_layers) if g[s, b] == ops.GATE_SKIP] for b in range(batch)]
    return GenerationResult(tokens=token_lists, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=finished.tolist(),
                            online_skipped=online_skipped)
