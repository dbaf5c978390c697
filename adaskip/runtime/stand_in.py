"""What stands in for a skipped sublayer.

A skipped sublayer s maps the residual stream h to h + f(norm(h)); its stand-in replaces that by:
  scalar   h * c               (AdaSkip's compensation: c the mean norm ratio |after| / |before|)
  channel  h * d               (d [hidden]: one scale per channel, LinearPatch-style)
  linear   h + U (D x + e)     (x = norm(h), the sublayer's own input; D [rank, hidden], e [rank],
                                U [hidden, rank]: a low-rank map fitted by ridge regression)
scalar and channel cost one fused launch (the scale and the next norm) and no FLOPs; linear costs
two thin matmuls (2 * rank * hidden multiply-adds per token) and the usual add+norm.

The fitting is in adaskip.skipping.stand_ins; here is what the runtime carries and applies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

KINDS = ("scalar", "channel", "linear")
_TENSORS = {"scalar": (), "channel": ("channel",), "linear": ("down", "down_bias", "up")}  # what each kind reads


class StandIn:
    """A fitted stand-in for one sublayer. Compared by identity: a captured CUDA-graph step is
    keyed by the stand-ins it holds (their device copies are made once and kept, so their
    addresses stay valid for replays)."""

    def __init__(self, kind: str, *, scale: float = 1.0, channel: Optional[torch.Tensor] = None,
                 down: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None,
                 up: Optional[torch.Tensor] = None):
        if kind not in KINDS:
            raise ValueError(f"adaskip: unknown stand-in kind {kind!r}; choose from {KINDS}")
        self.kind = kind
        self.scale = float(scale)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"adaskip: a stand-in's scale must be finite and positive, got {scale}")
        self.channel = self.down = self.down_bias = self.up = None
        # Tensors of another kind would be ignored: a StandIn("scalar", channel=...) would then be
        # compensated by its scale alone, what was fitted dropped without a word.
        given = [name for name, t in (("channel", channel), ("down", down), ("down_bias", down_bias), ("up", up))
                 if t is not None and name not in _TENSORS[kind]]
        if given:
            raise ValueError(f"adaskip: a {kind} stand-in takes {' / '.join(_TENSORS[kind]) or 'only a scale'}; "
                             f"got {', '.join(given)} too (is it another kind?)")
        if kind == "channel":
            if channel is None or channel.dim() != 1:
                raise ValueError("adaskip: a channel stand-in needs a 1-D channel scale vector")
            self.channel = _finite("channel", channel)
        elif kind == "linear":
            if down is None or up is None or down.dim() != 2 or up.dim() != 2:
                raise ValueError("adaskip: a linear stand-in needs 2-D 'down' [rank, hidden] and 'up' [hidden, rank]")
            rank, hidden = down.shape
            if tuple(up.shape) != (hidden, rank):
                raise ValueError(f"adaskip: a linear stand-in's 'up' must be [{hidden}, {rank}], got {tuple(up.shape)}")
            if down_bias is None:
                down_bias = torch.zeros(rank)
            if tuple(down_bias.shape) != (rank,):
                raise ValueError(f"adaskip: a linear stand-in's 'down_bias' must be [{rank}], got "
                                 f"{tuple(down_bias.shape)}")
            self.down, self.down_bias, self.up = (_finite("down", down), _finite("down_bias", down_bias),
                                                  _finite("up", up))
        self._copies: dict = {}

    @property
    def hidden(self) -> Optional[int]:
        if self.channel is not None:
            return self.channel.shape[0]
        return self.down.shape[1] if self.down is not None else None

    @property
    def rank(self) -> int:
        return self.down.shape[0] if self.down is not None else 0

    def multiply_adds_per_token(self) -> int:
        """The stand-in's own work per token (the scale and the norm aside)."""
        return 2 * self.rank * self.down.shape[1] if self.kind == "linear" else 0

    def check_hidden(self, hidden: int, sublayer: int) -> None:
        if self.hidden is not None and self.hidden != hidden:
            raise ValueError(f"adaskip: the {self.kind} stand-in of sublayer {sublayer} is for hidden size "
                             f"{self.hidden}, the model's is {hidden}")

    def prepare(self, device, dtype) -> None:
        """Makes the device copies a forward on `device` in `dtype` reads, ahead of its first step
        (a request resolves them once: none is made while a CUDA graph is captured)."""
        if self.kind == "channel":
            self.channel_on(device)
        elif self.kind == "linear":
            self._linear_on(device, dtype)

    def channel_on(self, device, dtype=torch.float32) -> torch.Tensor:
        """The channel scales times the scalar, float32 on `device` (made once per device)."""
        key = ("channel", str(device))
        if key not in self._copies:
            self._copies[key] = (self.channel.float() * self.scale).to(device).contiguous()
        return self._copies[key]

    def apply_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear stand-in's output for the sublayer's normed input x [..., hidden]."""
        down, bias, up = self._linear_on(x.device, x.dtype)
        return F.linear(F.linear(x, down, bias), up)

    def _linear_on(self, device, dtype) -> tuple:
        key = ("linear", str(device), dtype)
        if key not in self._copies:
            self._copies[key] = tuple(t.to(device=device, dtype=dtype).contiguous()
                                      for t in (self.down, self.down_bias, self.up))
        return self._copies[key]

    def tensors(self) -> dict:
        """Name -> float32 CPU tensor, for storage."""
        named = {"channel": self.channel, "down": self.down, "down_bias": self.down_bias, "up": self.up}
        return {k: v.float().cpu().contiguous() for k, v in named.items() if v is not None}

    def describe(self) -> str:
        if self.kind == "scalar":
            return f"scalar {self.scale:.4f}"
        if self.kind == "channel":
            c = self.channel.float() * self.scale
            return f"channel (scales {c.min().item():.3f}..{c.max().item():.3f}, mean {c.mean().item():.3f})"
        return f"linear (rank {self.rank})"

    def __repr__(self) -> str:
        return f"StandIn({self.describe()})"


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t).detach().float().cpu()
    if not torch.isfinite(t).all():
        raise ValueError(f"adaskip: a stand-in's {name!r} holds values that are not finite")
    return t
