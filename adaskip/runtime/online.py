"""Per-request state of online decode learning, kept on the device."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops


@dataclass
class OnlineGates:
    """gates / scales: [2 * num_layers, batch]; stats: [2 * num_layers, batch, 3]; running: bool
    [2 * num_layers], whether any sequence still runs each sublayer (kept by update_gates).

    learning: FFN sublayers that run and are gated per sequence from `gates` (their similarity
    accumulates in `stats` until update_gates decides them). skipped: sublayers gated off for
    every sequence, which are no longer run at all.
    conditional: while a CUDA graph is captured, put each learning FFN that the gated GEMVs do
    not serve (batch > 2, fp32, biases) in a conditional node on `running`, so that replays skip
    its cuBLAS GEMMs once every sequence has gated it off.
    """

    gates: torch.Tensor
    scales: torch.Tensor
    stats: torch.Tensor
    running: torch.Tensor
    learning: set = field(default_factory=set)
    skipped: set = field(default_factory=set)
    conditional: bool = False

    @classmethod
    def start(cls, num_layers: int, batch: int, candidates, device, conditional: bool = False) -> "OnlineGates":
        n = 2 * num_layers
        online = cls(ops.new_gates(n, batch, device), ops.new_scales(n, batch, device), ops.new_stats(n, batch, device),
                     torch.ones(n, dtype=torch.bool, device=device))
        online.restart(candidates, conditional)
        return online

    def restart(self, candidates, conditional: bool = False) -> None:
        """Fills the buffers in place for a new request (captured graphs read them): the
        candidates undecided, every other sublayer run, scales 1, statistics zero."""
        self.gates.fill_(ops.GATE_RUN)
        for s in candidates:
            self.gates[s] = ops.GATE_UNDECIDED
        self.scales.fill_(1.0)
        self.stats.zero_()
        self.running.fill_(True)
        self.learning, self.skipped, self.conditional = set(candidates), set(), conditional

    def update(self, window: int, beta: float) -> None:
        ops.update_gates(self.stats, self.gates, self.scales, window, beta, self.running)

    def skipped_per_sequence(self) -> list:
        """Per sequence, the sublayers its gates switched off (reads the gates back from the device)."""
        g = self.gates.cpu()
        return [[s for s in range(g.shape[0]) if g[s, b] == ops.GATE_SKIP] for b in range(g.shape[1])]

    def settle(self, host_gates: torch.Tensor) -> None:
        """With a host copy of the gates: stop paying for sublayers decided alike everywhere:
        skipped by every sequence -> not run; run by every sequence -> no gating."""
        for s in sorted(self.learning):
            column = host_gates[s]
            if bool((column == ops.GATE_SKIP).all()):
                self.learning.discard(s)
                self.skipped.add(s)
            elif bool((column == ops.GATE_RUN).all()):
                self.learning.discard(s)
