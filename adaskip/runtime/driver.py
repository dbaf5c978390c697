"""The decode driver: what every decode loop does around its steps, in one place.

adaskip.generate (a token a step), speculative decoding (a round a step) and adaskip.hf
(adaskip.hf.generate drives its steps here too; under apply(), transformers' own generate
calls each step and the hooks share OnlineLearning) share it:

- `OnlineLearning`: starting the request's gates, settling them once their host copy lands,
  and fetching them without waiting when the window fills;
- `drive()`: the loop itself, for the runtime's own steps: the host-sync guard, the timing,
  the end-of-sequence flag read without waiting, the graph key and replay (a step's first run
  is eager, its warm-up, unless an earlier call captured it), max_new_tokens;
- `padded_ids()`, `timed()`: the prompts as a device batch, and a step timed on the host.

A step supplies what it runs as a `DecodeStep`: its schedules (the graph key) and its launch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .decode import HostFlag, StepGraphs, StepMarks
from .online import OnlineGates


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable):
    """(run(), its seconds), the device's queue drained before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = run()
    synchronize(device)
    return out, time.perf_counter() - t0


def padded_ids(prompts: list, device, *, left: bool = False) -> tuple:
    """Right-padded ids [B, longest] (left-padded with `left`: what transformers' caches take)
    and the lengths [B] of token-id lists, on `device`."""
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        start = longest - len(p) if left else 0
        ids[i, start:start + len(p)] = torch.as_tensor(p, dtype=torch.long)
    return ids.to(device), torch.tensor(lengths, device=device)


@contextmanager
def host_syncs_forbidden(forbid: bool, device: torch.device):
    """On a GPU with `forbid`: any host synchronisation inside the block is an error."""
    strict = forbid and device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if strict else 0
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode(previous)


class OnlineLearning:
    """A request's online learning on the host side: its gates (decided on the device), and the
    flag that brings them back once the window is full, without waiting."""

    def __init__(self, gates: OnlineGates, window: int, device: torch.device):
        self.gates, self.window = gates, window
        self.flag = HostFlag(device)

    @classmethod
    def start(cls, request, batch: int, device: torch.device, kept=None) -> Optional["OnlineLearning"]:
        """The request's online learning for `batch` sequences (None when its plan has none), on
        the gates of `kept` (a KeptState: refilled in place, graphs captured on them stay valid)
        or on new ones."""
        if not request.online:
            return None
        num_layers = request.model.args.num_layers
        if kept is not None:
            gates = kept.online_for(num_layers, request.online_candidates, conditional=request.conditional)
        else:
            gates = OnlineGates.start(num_layers, batch, request.online_candidates, device,
                                      conditional=request.conditional)
        return cls(gates, request.online_window, device)

    def settle(self) -> None:
        """Before a step: once the gates' host copy has landed, stop paying for sublayers decided
        alike for every sequence (gated off everywhere: not run; run everywhere: no gating)."""
        if self.gates.learning and self.flag.ready():
            self.gates.settle(self.flag.host)
            self.flag.host = None

    def learned(self, before: int, after: int) -> None:
        """After a step that took the tokens learned from `before` to `after`: when that filled
        the window, every gate is decided; fetch them."""
        if self.gates.learning and before < self.window <= after:
            self.flag.post(self.gates.gates)


class DecodeStep:
    """What one kind of decode step tells the driver. Subclasses set `finished` ([B] bool on the
    device: sequences that have ended), `generator` (the seeded generator its graphs register,
    or None) and `graphs` (StepGraphs to capture it in, or None: eager)."""

    finished: torch.Tensor
    generator: Optional[torch.Generator] = None
    graphs: Optional[StepGraphs] = None

    def schedules(self, index: int, capturing: bool) -> tuple:
        """What step `index` runs (resolved by the request plan); part of its graph key."""
        raise NotImplementedError

    def graph_key(self, schedules: tuple) -> tuple:
        raise NotImplementedError

    def launch(self, index: int, schedules: tuple, captured: bool) -> None:
        """Runs step `index` on fixed buffers, nothing read back; captured: inside a graph capture
        (it then reads the whole cache under masks from the device positions)."""
        raise NotImplementedError

    def tokens_learned(self, steps: int) -> int:
        """Tokens online learning has seen after `steps` steps (for its window)."""
        return steps


@dataclass
class DecodeRun:
    """What drive() reports: steps launched, decode seconds (graph captures apart), captures."""

    steps: int = 0
    seconds: float = 0.0
    captured: int = 0
    reused: int = 0
    capture_s: float = 0.0
    step_times_s: Optional[list] = None


def drive(step: DecodeStep, max_steps: int, *, device: torch.device, online: Optional[OnlineLearning] = None,
          forbid_host_sync: bool = False, step_timing: bool = False) -> DecodeRun:
    """Runs up to max_steps steps, stopping a step or two after every sequence has finished
    (learnt without waiting). With graphs, each step is replayed from the graph of its key,
    captured on the step's second run (or its first, when an earlier call captured it)."""
    graphs = step.graphs
    before = (graphs.captures, graphs.capture_s, set(graphs.graphs)) if graphs is not None else (0, 0.0, set())
    reused, done = set(), HostFlag(device)
    marks = StepMarks(device) if step_timing else None
    run = DecodeRun()
    t0 = time.perf_counter()
    with host_syncs_forbidden(forbid_host_sync, device):
        if marks is not None:
            marks.mark()
        for index in range(max_steps):
            if done.ready() and bool(done.host):
                break  # every sequence had finished a step or two ago
            if online is not None:
                online.settle()
            schedules = step.schedules(index, capturing=graphs is not None)
            key = step.graph_key(schedules) if graphs is not None else None
            if graphs is not None and (index > 0 or key in graphs.graphs):
                if key in before[2]:
                    reused.add(key)
                graphs.replay(key, lambda: step.launch(index, schedules, captured=True), step.generator)
            else:  # eagerly: nothing is captured (so no conditional nodes either)
                step.launch(index, step.schedules(index, capturing=False) if graphs is not None else schedules,
                            captured=False)
            done.post(step.finished.all())
            if online is not None:
                online.learned(step.tokens_learned(index), step.tokens_learned(index + 1))
            if marks is not None:
                marks.mark()
            run.steps += 1
    synchronize(device)
    if graphs is not None:
        run.captured, run.capture_s, run.reused = graphs.captures - before[0], graphs.capture_s - before[1], len(reused)
    run.seconds = time.perf_counter() - t0 - run.capture_s
    run.step_times_s = marks.durations() if marks is not None else None
    return run
