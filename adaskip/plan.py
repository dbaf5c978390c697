"""Which sublayers a forward pass skips, and the compensation scale of each."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SkipPlan:
    """Sublayer s = 2 * layer (attention) or 2 * layer + 1 (FFN) -> compensation scale: a
    skipped sublayer is not run and the residual stream is multiplied by its scale instead."""

    num_layers: int
    skip_scales: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = [s for s in self.skip_scales if not 0 <= int(s) < 2 * self.num_layers]
        if bad:
            raise ValueError(f"adaskip: sublayers {bad} are out of range for a model with "
                             f"{self.num_layers} layers ({2 * self.num_layers} sublayers)")
        self.skip_scales = {int(s): float(v) for s, v in self.skip_scales.items()}

    @property
    def skipped_attention_layers(self) -> set:
        return {s // 2 for s in self.skip_scales if s % 2 == 0}

    @property
    def skipped_ffn_layers(self) -> set:
        return {s // 2 for s in self.skip_scales if s % 2 == 1}

    @property
    def attention_layers(self) -> set:
        """Layers whose attention runs, and so need a KV cache."""
        return set(range(self.num_layers)) - self.skipped_attention_layers

    def check_model(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(f"adaskip: this plan is for a model with {self.num_layers} layers, "
                             f"the model has {num_layers}")
