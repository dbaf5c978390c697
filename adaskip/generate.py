"""Generation on the static-cache runtime: chunked prefill, decode, greedy and sampled tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import conditional, ops
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
    graphs_captured: int = 0  # CUDA-graph decode: step graphs captured by this call
    graphs_reused: int = 0  # step graphs this call replayed that an earlier call had captured
    graph_capture_s: float = 0.0  # their capture time, not counted in decode_s
    # With step_timing=True: seconds of each decode step (a step that captured a graph includes it).
    step_times_s: Optional[list] = None

    @property
    def time_per_output_token_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")


class _HostFlag:
    """A device value read back without waiting: a non-blocking copy into pinned memory whose
    arrival is polled with an event, so the decode loop never stalls on the host."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.event = torch.cuda.Event() if self.cuda else None
        self.buffer = None  # pinned, allocated once and reused: copies into it are stream-ordered
        self.pending = False  # a posted copy has not been seen to land yet
        self.host = None  # the value once it has landed; the caller sets None when consumed

    def post(self, value: torch.Tensor) -> None:
        self.host = None
        if not self.cuda:
            self.host = value.clone()
            return
        if self.buffer is None:
            self.buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self.buffer.copy_(value, non_blocking=True)
        self.event.record()
        self.pending = True

    def ready(self) -> bool:
        if self.pending and self.event.query():
            self.host, self.pending = self.buffer, False
        return self.host is not None


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


class _DecodeState:
    """Everything a decode step reads and writes, in fixed device buffers: the current token,
    positions, a device step counter, the output tokens, EOS bookkeeping, the online-learning
    gates and the seeded generator. Kept on the model per batch size (model.decode_states) and
    refilled in place by each generate call, so that the CUDA graphs captured on these buffers
    stay valid from one call to the next."""

    def __init__(self, model, batch: int, num_eos: int, device: torch.device):
        self.model = model
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, **long)
        self.pos = torch.zeros(batch, **long)  # position of the token fed next
        self.step = torch.zeros((), **long)
        self.rows = torch.arange(batch, device=device)
        self.zero = torch.zeros(batch, **long)
        # Room for as many tokens as the cache holds: any call on this cache fits.
        self.out_tokens = torch.zeros(batch, model.cache_len, **long)
        self.generated = torch.zeros(batch, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.zeros(num_eos, **long)
        self.seeded = None  # a seeded generator, created on first use and re-seeded per call
        self.online_gates = None  # OnlineGates buffers, likewise
        self.graphs = _StepGraphs(self) if device.type == "cuda" else None
        # Per call (what the captured steps were captured with is part of their key).
        self.sampling, self.generator, self.stats, self.online, self.plan = SamplingParams(), None, None, None, None

    def generator_for(self, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        if self.seeded is None:
            self.seeded = torch.Generator(device=self.token.device)
        return self.seeded.manual_seed(seed)

    def online_for(self, num_layers: int, candidates, conditional: bool) -> OnlineGates:
        if self.online_gates is None:
            self.online_gates = OnlineGates.start(num_layers, self.token.shape[0], candidates, self.token.device,
                                                  conditional=conditional)
        else:
            self.online_gates.restart(candidates, conditional=conditional)
        return self.online_gates

    def start(self, token, lens, max_new_tokens, eos, sampling, generator, stats, online, plan) -> None:
        self.token.copy_(token)
        self.pos.copy_(lens)
        self.step.zero_()
        self.out_tokens.zero_()
        self.generated.fill_(max_new_tokens)
        self.finished.zero_()
        self.eos.copy_(eos)
        self.sampling, self.generator, self.stats, self.online, self.plan = sampling, generator, stats, online, plan

    def record(self) -> None:
        """Stores the current token at the current step and notes sequences that just ended."""
        self.out_tokens[self.rows, self.step.expand_as(self.rows)] = self.token
        newly = (self.token[:, None] == self.eos[None, :]).any(-1) & ~self.finished
        self.generated.copy_(torch.where(newly, self.step + 1, self.generated))
        self.finished |= newly

    def advance(self, step_plan, shared_pos=None, kv_len=None) -> None:
        """One decode step: the next token from the current one. With shared_pos / kv_len (host
        ints) attention reads only the filled part of the cache; without, it reads the whole
        cache under a mask from the device positions (what a captured graph needs)."""
        model = self.model
        alive = (~self.finished).to(torch.int32) if self.stats is not None else None
        logits = model(self.token[:, None], shared_pos if shared_pos is not None else self.pos,
                       kv_len=kv_len if kv_len is not None else model.cache_len, seq_lens=alive,
                       plan=step_plan, stats=self.stats, online=self.online, logits_index=self.zero)
        self.token.copy_(sample(logits, self.sampling, self.generator))
        if self.online is not None and self.online.learning:
            self.online.update(self.plan.window, self.plan.beta)
        self.pos += 1
        self.step += 1

    def step_key(self, step_plan) -> tuple:
        """What a captured step bakes in besides the buffers: the skips, the online-learning
        state, the update's window and beta, the sampling settings."""
        online, plan, sp = self.online, self.plan, self.sampling
        return ((tuple(sorted(step_plan.skip_scales.items())) if step_plan is not None else (),
                 tuple(sorted(getattr(step_plan, "kv_only_attention", ()) or ())),
                 None if online is None else (frozenset(online.learning), frozenset(online.skipped),
                                              online.conditional, plan.window, plan.beta),
                 (sp.temperature, sp.top_k, sp.top_p, self.generator is not None)))


class _StepGraphs:
    """CUDA graphs of `advance + record` on one _DecodeState, one per step key, captured on first
    use into one memory pool (every graph's temporaries are dead once its replay ends, and
    replays never overlap, so they can share it) and replayed by later calls too."""

    MAX_GRAPHS = 32  # beyond this many keys, the oldest graph is dropped

    def __init__(self, state: _DecodeState):
        self.state = state
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_s = 0.0
        self.captures = 0

    def replay(self, step_plan, key: tuple) -> None:
        """Replays the graph of `key` (state.step_key(step_plan)), capturing it first if new."""
        graph = self.graphs.get(key)
        if graph is None:
            # Capturing synchronises (once per key, not per token): allow it even when the
            # caller forbids host syncs in the decode loop, and keep its time apart.
            t0 = time.perf_counter()
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                graph = torch.cuda.CUDAGraph()
                if self.state.generator is not None:
                    # A seeded generator's Philox offset then advances on the device with every
                    # replay, as it does eagerly (the default generator is registered by torch).
                    graph.register_generator_state(self.state.generator)
                with torch.cuda.graph(graph, pool=self.pool):
                    self.state.advance(step_plan)
                    self.state.record()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            self.graphs[key] = graph
            if len(self.graphs) > self.MAX_GRAPHS:  # after the capture's device sync: no replay in flight
                del self.graphs[next(iter(self.graphs))]
            self.capture_s += time.perf_counter() - t0
            self.captures += 1
        graph.replay()


def _decode_state(model, batch: int, num_eos: int, device: torch.device, reuse: bool) -> _DecodeState:
    """The model's decode state for this batch size (new when the weights moved since: graphs
    hold their addresses). reuse False: a state of its own for this call."""
    if not reuse:
        return _DecodeState(model, batch, num_eos, device)
    weights = tuple(p.data_ptr() for p in model.parameters())
    states = model.decode_states
    for key in [k for k in states if k[0] != weights]:
        del states[key]
    key = (weights, batch, num_eos, device)
    if key not in states:
        states[key] = _DecodeState(model, batch, num_eos, device)
    return states[key]


class _StepMarks:
    """Time stamps between decode steps: CUDA events on a GPU (recorded without waiting, read
    once the loop is over), the host clock elsewhere (CPU ops finish before they return)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())

    def durations(self) -> list:
        pairs = zip(self.stamps, self.stamps[1:])
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]  # after the final synchronize
        return [b - a for a, b in pairs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Optional[SamplingParams] = None, eos_token_ids: Optional[Sequence[int]] = None,
             plan=None, stats: Optional[torch.Tensor] = None, prefill_chunk: int = 8192,
             forbid_host_sync: bool = False, cuda_graph: bool = False, graph_conditionals: bool = False,
             step_timing: bool = False) -> GenerationResult:
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
    CUDA >= 12.4 and a torch with conditional-node capture; see adaskip.conditional).
    step_timing: also time every decode step (CUDA events recorded between steps and read after
    the loop, so the loop still never waits), e.g. to see time per token drop once online
    learning has gated FFNs off.
    A graph is captured per distinct step (SkipDecode's ramp, online learning settling, sampling
    settings), each once per batch size and KV cache: the graphs and the buffers they were
    captured on are kept on the model (model.decode_states), so later calls of the same shape
    replay them; new caches (setup_caches), another attention backend or moved weights drop them.
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
    # Decode buffers (and the graphs captured on them) are kept for the next call of this batch
    # size, unless a statistics buffer of the caller's is written (its address would be baked in).
    state = _decode_state(model, batch, eos.numel(), device, reuse=stats is None)
    generator = state.generator_for(sampling.seed)

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
        online = state.online_for(args.num_layers, candidates, conditional=graph_conditionals and device.type == "cuda")
    state.start(token, lens, max_new_tokens, eos, sampling, generator, stats, online, plan)
    done_flag, gates_flag = _HostFlag(device), _HostFlag(device)
    graphs = state.graphs if cuda_graph else None
    captures_before, capture_s_before = (graphs.captures, graphs.capture_s) if graphs is not None else (0, 0.0)
    existing, reused = (set(graphs.graphs) if graphs is not None else set()), set()
    same_length = len(set(lengths)) == 1
    steps = 0
    strict = forbid_host_sync and device.type == "cuda"
    previous_mode = torch.cuda.get_sync_debug_mode() if strict else 0
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    marks = _StepMarks(device) if step_timing else None
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
            key = state.step_key(step_plan) if graphs is not None else None
            if graphs is not None and (step > 0 or key in graphs.graphs):
                # Without a graph yet, the first step runs eagerly: it is also the warm-up.
                if key in existing:
                    reused.add(key)
                graphs.replay(step_plan, key)
            else:
                shared = longest + step if same_length else None
                state.advance(step_plan, shared_pos=shared, kv_len=longest + step + 1)
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
    online_skipped = None
    if online is not None:
        g = online.gates.cpu()
        online_skipped = [[s for s in range(2 * args.num_layers) if g[s, b] == ops.GATE_SKIP] for b in range(batch)]
    return GenerationResult(tokens=token_lists, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=finished.tolist(),
                            online_skipped=online_skipped,
                            graphs_captured=graphs.captures - captures_before if graphs is not None else 0,
                            graphs_reused=len(reused), graph_capture_s=capture_s,
                            step_times_s=marks.durations() if marks else None)
