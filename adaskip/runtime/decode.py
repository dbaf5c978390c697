"""The decode side of generation: fixed device buffers a decode step reads and writes, the step
itself (`decode_one_token`), CUDA graphs of it keyed by its schedule, and the helpers that let
the loop run without waiting on the device.

Decode buffers and graphs belong to generation, not to the model: they are kept here per model
(weakly: they go with it) and per batch size, EOS count, device and KV cache, so that later
requests of the same shape replay graphs captured by earlier ones.
"""
from __future__ import annotations

import time
import weakref
from typing import Optional

import torch

from .online import OnlineGates
from .sampling import SamplingParams, sample
from .schedule import StepSchedule

_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: DecodeState}


class HostFlag:
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


class KeptState:
    """What the decode states kept between calls share: a seeded generator and online-learning
    gates, created on first use and refilled in place by later calls (graphs captured on them
    stay valid). Subclasses set `token` (a [batch] device tensor), `seeded` and `online_gates`."""

    token: torch.Tensor
    seeded: Optional[torch.Generator] = None
    online_gates: Optional[OnlineGates] = None

    def generator_for(self, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        if self.seeded is None:
            self.seeded = torch.Generator(device=self.token.device)
        return self.seeded.manual_seed(seed)

    def online_for(self, num_layers: int, candidates, conditional: bool = False) -> OnlineGates:
        if self.online_gates is None:
            self.online_gates = OnlineGates.start(num_layers, self.token.shape[0], candidates, self.token.device,
                                                  conditional=conditional)
        else:
            self.online_gates.restart(candidates, conditional=conditional)
        return self.online_gates


class DecodeState(KeptState):
    """Everything a decode step reads and writes, in fixed device buffers: the current token,
    positions, a device step counter, the output tokens, EOS bookkeeping, the online-learning
    gates and the seeded generator. Refilled in place by each generate call, so that the CUDA
    graphs captured on these buffers stay valid from one call to the next."""

    def __init__(self, batch: int, max_len: int, num_eos: int, device: torch.device):
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, **long)
        self.pos = torch.zeros(batch, **long)  # position of the token fed next
        self.step = torch.zeros((), **long)
        self.rows = torch.arange(batch, device=device)
        self.zero = torch.zeros(batch, **long)
        # Room for as many tokens as the cache holds: any call on this cache fits.
        self.out_tokens = torch.zeros(batch, max_len, **long)
        self.generated = torch.zeros(batch, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.zeros(num_eos, **long)
        self.seeded = None  # a seeded generator, created on first use and re-seeded per call
        self.online_gates = None  # OnlineGates buffers, likewise
        self.graphs = StepGraphs() if device.type == "cuda" else None
        # Per call.
        self.sampling, self.generator, self.stats, self.online = SamplingParams(), None, None, None

    def start(self, token, lens, max_new_tokens, eos, sampling, generator, stats, online) -> None:
        self.token.copy_(token)
        self.pos.copy_(lens)
        self.step.zero_()
        self.out_tokens.zero_()
        self.generated.fill_(max_new_tokens)
        self.finished.zero_()
        self.eos.copy_(eos)
        self.sampling, self.generator, self.stats, self.online = sampling, generator, stats, online

    def record(self) -> None:
        """Stores the current token at the current step and notes sequences that just ended."""
        self.out_tokens[self.rows, self.step.expand_as(self.rows)] = self.token
        newly = (self.token[:, None] == self.eos[None, :]).any(-1) & ~self.finished
        self.generated.copy_(torch.where(newly, self.step + 1, self.generated))
        self.finished |= newly

    def graph_key(self, model, schedule: StepSchedule) -> tuple:
        """What a captured step bakes in besides these buffers: the schedule (which holds the
        batch, dtype and every sublayer's path), the KV cache and the sampling settings."""
        sp = self.sampling
        return schedule, model.cache_id, (sp.temperature, sp.top_k, sp.top_p, self.generator is not None)


def decode_one_token(model, state: DecodeState, schedule: StepSchedule, shared_pos: Optional[int] = None,
                     kv_len: Optional[int] = None) -> None:
    """One decode step: the next token from the current one, then (online learning) the gates
    whose window is complete are decided. With shared_pos / kv_len (host ints) attention reads
    only the filled part of the cache; without, it reads the whole cache under a mask from the
    device positions (what a captured graph needs)."""
    alive = (~state.finished).to(torch.int32) if state.stats is not None else None
    logits = model(state.token[:, None], shared_pos if shared_pos is not None else state.pos,
                   kv_len=kv_len if kv_len is not None else model.cache_len, seq_lens=alive, stats=state.stats,
                   online=state.online, logits_index=state.zero, schedule=schedule)
    state.token.copy_(sample(logits, state.sampling, state.generator))
    if schedule.online_update is not None:
        state.online.update(*schedule.online_update)
    state.pos += 1
    state.step += 1


class StepGraphs:
    """CUDA graphs of decode steps on fixed buffers (`decode_one_token + record` on a DecodeState,
    or a speculative round), one per graph key, captured on first use into one memory pool
    (every graph's temporaries are dead once its replay ends, and replays never overlap, so they
    can share it) and replayed by later calls."""

    MAX_GRAPHS = 32  # beyond this many keys, the oldest graph is dropped

    def __init__(self):
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_s = 0.0
        self.captures = 0

    def replay(self, key: tuple, step, generator: Optional[torch.Generator] = None) -> None:
        """Replays the graph of `key`, capturing `step()` (a callable that reads and writes only
        fixed buffers) first if the key is new. generator: a seeded generator the step draws from."""
        graph = self.graphs.get(key)
        if graph is None:
            # Capturing synchronises (once per key, not per token): allow it even when the
            # caller forbids host syncs in the decode loop, and keep its time apart.
            t0 = time.perf_counter()
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                graph = torch.cuda.CUDAGraph()
                if generator is not None:
                    # A seeded generator's Philox offset then advances on the device with every
                    # replay, as it does eagerly (the default generator is registered by torch).
                    graph.register_generator_state(generator)
                with torch.cuda.graph(graph, pool=self.pool):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            self.graphs[key] = graph
            if len(self.graphs) > self.MAX_GRAPHS:  # after the capture's device sync: no replay in flight
                del self.graphs[next(iter(self.graphs))]
            self.capture_s += time.perf_counter() - t0
            self.captures += 1
        graph.replay()


def decode_states(model) -> dict:
    """The decode states kept for `model`, by (weights, batch, EOS count, device, KV cache)."""
    return _STATES.setdefault(model, {})


def drop_decode_states(model) -> None:
    """Frees the decode buffers and graphs kept for `model` (e.g. before new KV caches)."""
    _STATES.pop(model, None)


def decode_state(model, batch: int, num_eos: int, device: torch.device, reuse: bool) -> DecodeState:
    """The kept decode state for this model, batch size and KV cache (new when the weights moved
    or the caches changed since: graphs hold their addresses). reuse False: a state of its own."""
    if not reuse:
        return DecodeState(batch, model.cache_len, num_eos, device)
    return kept_state(model, (batch, num_eos, device), lambda: DecodeState(batch, model.cache_len, num_eos, device))


def kept_state(model, shape: tuple, make):
    """The state kept for `model` under (weights, *shape[:3], KV cache, *shape[3:]), made by
    make() when there is none; states of moved weights or replaced caches are dropped first
    (graphs captured on them hold the old addresses)."""
    weights = tuple(p.data_ptr() for p in model.parameters())
    states = decode_states(model)
    for key in [k for k in states if k[0] != weights or k[4] != model.cache_id]:
        del states[key]
    key = (weights, *shape[:3], model.cache_id, *shape[3:])
    if key not in states:
        states[key] = make()
    return states[key]


class StepMarks:
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
