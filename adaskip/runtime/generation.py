"""Generation on the static-cache runtime: chunked prefill, decode, greedy and sampled tokens."""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import conditional
from .decode import DecodeState, HostFlag, StepMarks, decode_one_token, decode_state, drop_decode_states
from .model import Transformer
from .sampling import SamplingParams, sample
from .schedule import schedule_step
from .skip_plan import SkipPlan


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
    graphs_captured: int = 0  # CUDA-graph decode: step graphs captured by this call
    graphs_reused: int = 0  # step graphs this call replayed that an earlier call had captured
    graph_capture_s: float = 0.0  # their capture time, not counted in decode_s
    # With step_timing=True: seconds of each decode step (a step that captured a graph includes it).
    step_times_s: Optional[list] = None
    # Speculative decoding (adaskip.runtime.speculative): rounds, drafted / accepted tokens, rates.
    speculative: Optional[dict] = None
    # Tokens the decode phase added to the longest sequence, when a step can add several (a
    # speculative round); None: one per step.
    decode_tokens: Optional[int] = None

    @property
    def time_per_output_token_s(self) -> float:
        tokens = self.decode_tokens if self.decode_tokens is not None else self.decode_steps
        return self.decode_s / tokens if tokens else float("nan")


def eos_tensor(args, eos_token_ids: Optional[Sequence[int]], device) -> torch.Tensor:
    """The ids that end a sequence (the model's own when none are given), on `device`."""
    ids = args.eos_token_ids if eos_token_ids is None else eos_token_ids
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)


def ensure_caches(model: Transformer, batch: int, needed: int, attention_layers) -> None:
    """KV caches for `batch` sequences of `needed` positions in `attention_layers`: the model's
    present ones when they serve, else new ones (the decode graphs that hold the old caches are
    dropped first, to free them)."""
    if (model.cache_batch < batch or model.cache_len < needed
            or model.cached_attention_layers() != attention_layers):
        drop_decode_states(model)
        model.setup_caches(batch, needed, attention_layers)


def _check_prompts(prompts, vocab_size: int) -> list:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Optional[SamplingParams] = None, eos_token_ids: Optional[Sequence[int]] = None,
             plan=None, stats: Optional[torch.Tensor] = None, prefill_chunk: int = 8192,
             forbid_host_sync: bool = False, cuda_graph: bool = False, graph_conditionals: bool = False,
             step_timing: bool = False, speculative=None) -> GenerationResult:
    """Generates up to max_new_tokens for each prompt (a batch of token-id lists of any lengths).

    Prefill runs in chunks of `prefill_chunk` tokens so long prompts fit; the KV cache is
    (re)allocated for this batch and length, only for the attention layers the plan needs. The
    decode loop does not wait on the device: end-of-sequence is tracked on the device and read
    back without blocking, so generation may run a step or two past the last EOS (those tokens
    are dropped). With a plan that has online learning, its gates are decided on the device.
    forbid_host_sync: on a GPU, make any host synchronisation inside the decode loop an error
    (torch.cuda.set_sync_debug_mode("error")), to check that the loop never waits.
    cuda_graph: on a GPU, capture the decode step (forward, token choice (greedy or sampled, the
    seeded generator's state registered with the graph), EOS bookkeeping, online-learning update)
    in a CUDA graph and replay it per token; attention then reads the
    whole cache under a mask built from device-side positions.
    graph_conditionals: with cuda_graph and online learning, FFNs that the gated GEMVs do not
    serve (more than two sequences, fp32, biases) are captured inside CUDA-graph conditional
    nodes, so that replays skip their cuBLAS GEMMs once every sequence has gated them off (needs
    CUDA >= 12.4 and a torch with conditional-node capture; see adaskip.runtime.conditional).
    step_timing: also time every decode step (CUDA events recorded between steps and read after
    the loop, so the loop still never waits), e.g. to see time per token drop once online
    learning has gated FFNs off.
    speculative: an adaskip.runtime.speculative.SpeculativeConfig: lossless decoding, its plan
    drafting and the full model verifying (`plan` must then be None; with cuda_graph a whole
    round is one graph replay): greedy output is the full model's, sampled output is distributed
    as the full model's (rejection sampling).
    A graph is captured per distinct step: its key is the step's schedule (adaskip.runtime.schedule:
    every sublayer's path, batch, dtype; SkipDecode's ramp and online learning settling change it),
    the KV cache and the sampling settings. Graphs and the buffers they were captured on are kept
    per model (adaskip.runtime.decode), so later calls of the same shape replay them; new caches
    or moved weights drop them.
    """
    if speculative is not None:  # a SpeculativeConfig runs its own loop (adaskip.runtime.speculative)
        if plan is not None:
            raise ValueError("adaskip: with speculative decoding the full model decides every token; give the "
                             "drafter's plan in SpeculativeConfig, not plan=")
        if stats is not None or step_timing or graph_conditionals:
            raise ValueError("adaskip: speculative decoding collects no statistics and times rounds, not steps "
                             "(no stats, step_timing or graph_conditionals)")
        return speculative.generate(model, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                                    prefill_chunk=prefill_chunk, sampling=sampling, cuda_graph=cuda_graph,
                                    forbid_host_sync=forbid_host_sync)
    sampling = sampling or SamplingParams()
    args = model.args
    prompts = _check_prompts(prompts, args.vocab_size)
    for name, value in (("max_new_tokens", max_new_tokens), ("prefill_chunk", prefill_chunk)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"adaskip: {name} must be an integer >= 1, got {value!r}")
    if plan is not None and not isinstance(plan, SkipPlan):
        raise ValueError(f"adaskip: plan must be an adaskip SkipPlan (adaskip.plan(...)), got {type(plan).__name__}")
    if plan is not None:
        plan.check_model(args.num_layers)
        plan.check_hidden(args.hidden_size)
    if graph_conditionals:
        if not cuda_graph:
            raise ValueError("adaskip: graph_conditionals puts sublayers in CUDA-graph conditional nodes; "
                             "it needs cuda_graph=True")
        conditional.check_supported()
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    needed = longest + max_new_tokens
    if needed > args.max_position_embeddings:
        raise ValueError(f"adaskip: a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"model's context of {args.max_position_embeddings} tokens")
    device = model.lm_head.weight.device
    eos = eos_tensor(args, eos_token_ids, device)
    batch = len(prompts)
    ensure_caches(model, batch, needed, model.attention_layers_for(plan))

    ids = torch.zeros(batch, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    ids = ids.to(device)
    lens = torch.tensor(lengths, device=device)
    # Decode buffers (and the graphs captured on them) are kept for the next call of this batch
    # size, unless a statistics buffer of the caller's is written (its address would be baked in).
    state = decode_state(model, batch, eos.numel(), device, reuse=stats is None)
    generator = state.generator_for(sampling.seed)

    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, lens, plan=plan, stats=stats, chunk=prefill_chunk)
    token = sample(logits, sampling, generator)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    online = None
    if plan is not None and plan.online:
        decode_skips = plan.phase("decode").skip_scales
        candidates = [2 * i + 1 for i in range(args.num_layers) if 2 * i + 1 not in decode_skips]
        online = state.online_for(args.num_layers, candidates, conditional=graph_conditionals and device.type == "cuda")
    state.start(token, lens, max_new_tokens, eos, sampling, generator, stats, online)
    done_flag, gates_flag = HostFlag(device), HostFlag(device)
    graphs = state.graphs if cuda_graph else None
    captures_before, capture_s_before = (graphs.captures, graphs.capture_s) if graphs is not None else (0, 0.0)
    existing, reused = (set(graphs.graphs) if graphs is not None else set()), set()
    same_length = len(set(lengths)) == 1
    steps = 0
    strict = forbid_host_sync and device.type == "cuda"
    previous_mode = torch.cuda.get_sync_debug_mode() if strict else 0
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    marks = StepMarks(device) if step_timing else None
    t1 = time.perf_counter()
    try:
        state.record()
        if marks is not None:
            marks.mark()
        for step in range(max_new_tokens - 1):
            if done_flag.ready() and bool(done_flag.host):
                break  # every sequence had finished a step or two ago
            done_flag.post(state.finished.all())
            if online is not None and online.learning and gates_flag.ready():
                online.settle(gates_flag.host)
                gates_flag.host = None
            step_plan = plan.phase("decode", step, max_new_tokens - 1) if plan is not None else None
            update = (plan.window, plan.beta) if online is not None and online.learning else None
            schedule = _decode_schedule(model, state, step_plan, update, capturing=graphs is not None)
            key = state.graph_key(model, schedule) if graphs is not None else None
            if graphs is not None and (step > 0 or key in graphs.graphs):
                # Without a graph yet, the first step runs eagerly: it is also the warm-up.
                if key in existing:
                    reused.add(key)
                graphs.replay(key, lambda: _step_and_record(model, state, schedule), state.generator)
            else:
                if graphs is not None:  # eagerly, nothing is captured: no conditional nodes
                    schedule = _decode_schedule(model, state, step_plan, update, capturing=False)
                shared = longest + step if same_length else None
                decode_one_token(model, state, schedule, shared_pos=shared, kv_len=longest + step + 1)
                state.record()
            if online is not None and online.learning and step + 1 == plan.window:
                gates_flag.post(online.gates)  # every gate is decided now: fetch them without waiting
            if marks is not None:
                marks.mark()
            steps += 1
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode(previous_mode)
    _sync(device)
    capture_s = graphs.capture_s - capture_s_before if graphs is not None else 0.0
    decode_s = time.perf_counter() - t1 - capture_s
    out_tokens, generated, finished = state.out_tokens, state.generated, state.finished

    counts = generated.tolist()
    token_lists = [row[:n] for row, n in zip(out_tokens[:, :max_new_tokens].tolist(), counts)]
    online_skipped = online.skipped_per_sequence() if online is not None else None
    return GenerationResult(tokens=token_lists, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=finished.tolist(),
                            online_skipped=online_skipped,
                            graphs_captured=graphs.captures - captures_before if graphs is not None else 0,
                            graphs_reused=len(reused), graph_capture_s=capture_s,
                            step_times_s=marks.durations() if marks else None)


def prefill(model: Transformer, ids: torch.Tensor, lens: torch.Tensor, *, plan=None,
            stats: Optional[torch.Tensor] = None, chunk: int = 8192) -> torch.Tensor:
    """Runs right-padded prompts ids [B, longest] (valid lengths `lens` [B]) through the model
    in chunks of `chunk` tokens, filling the KV caches, with the plan's prefill skips; returns
    each sequence's logits at its last prompt token, [B, vocab]."""
    longest = ids.shape[1]
    prefill_plan = plan.phase("prefill") if plan is not None else None
    logits = None
    for start in range(0, longest, chunk):
        end = min(start + chunk, longest)
        valid = (lens - start).clamp(0, end - start)
        last = (lens - 1 - start).clamp(0, end - start - 1)
        out = model(ids[:, start:end], start, kv_len=end,
                    seq_lens=valid, plan=prefill_plan, stats=stats, logits_index=last)
        # Keep each sequence's logits from the chunk that holds its last prompt token.
        in_chunk = ((lens - 1) >= start) & ((lens - 1) < end)
        logits = out if logits is None else torch.where(in_chunk[:, None], out, logits)
    return logits


def _step_and_record(model: Transformer, state: DecodeState, schedule) -> None:
    decode_one_token(model, state, schedule)
    state.record()


def _decode_schedule(model: Transformer, state: DecodeState, step_plan, update, capturing: bool):
    return schedule_step(model, batch=state.token.shape[0], tokens=1, plan=step_plan, online=state.online,
                         capturing=capturing, stats=state.stats is not None, online_update=update)
