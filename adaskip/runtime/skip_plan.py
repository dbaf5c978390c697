"""Which sublayers a forward pass skips, when, and the compensation scale of each."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Optional

from .stand_in import StandIn
from .streaming import StreamingGroups

MODES = ("prefill", "decode", "e2e")


def _positive_number(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        v = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


@dataclass
class SkipPlan:
    """Sublayer s = 2 * layer (attention) or 2 * layer + 1 (FFN) -> compensation scale: a
    skipped sublayer is not run and the residual stream is multiplied by its scale instead.

    stand_ins: for some skipped sublayers, a fitted adaskip.runtime.stand_in.StandIn ("channel":
      per-channel scales, "linear": a low-rank map of the sublayer's input) that replaces the
      scalar compensation (its scale in skip_scales is then not applied); a skipped sublayer not
      listed here is compensated by its scale.

    mode: where the skips apply: "prefill" (prompt only), "decode" (generated tokens only) or
      "e2e" (both). A layer whose attention is skipped in e2e keeps no KV cache.
    beta / window: online decode learning (AdaSkip): during the first `window` decoded tokens of a
      request every FFN not skipped here runs and its IO similarity is measured; FFNs whose window
      similarity reaches beta are then gated off for that request. beta None: off.
    ramp: SkipDecode's schedule: in decode the skipped layers grow from the first to all of them.
    streaming: {layer: KV-head groups} whose query heads see only the first `streaming_sink`
      positions and the last `streaming_window` up to their own (adaskip.runtime.streaming), in
      every step whatever the mode; the layer's other groups keep the full context. A layer whose
      attention the plan skips has no groups to stream.
    """

    num_layers: int
    skip_scales: dict = field(default_factory=dict)
    mode: str = "e2e"
    strategy: str = "custom"
    beta: Optional[float] = None
    window: int = 20
    ramp: bool = False
    predicted_speedup: Optional[float] = None
    importance_lost: Optional[float] = None
    explanation: str = ""
    model_fingerprint: Optional[str] = None
    stand_ins: dict = field(default_factory=dict)
    streaming: dict = field(default_factory=dict)
    streaming_sink: int = 4
    streaming_window: int = 256
    # Filled in by phase(): attention layers whose K/V are stored although their attention is skipped.
    kv_only_attention: frozenset = frozenset()

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"adaskip: a plan's num_layers must be an integer >= 1, got {self.num_layers!r}")
        if not isinstance(self.skip_scales, dict):
            raise ValueError(f"adaskip: skip_scales must be a dict of sublayer -> compensation scale, got "
                             f"{type(self.skip_scales).__name__}")
        if not isinstance(self.stand_ins, dict):
            raise ValueError(f"adaskip: stand_ins must be a dict of sublayer -> StandIn, got "
                             f"{type(self.stand_ins).__name__}")
        # Sublayers are integers ('2' or 2.5 would be read as another sublayer, or none).
        bad = [s for s in self.skip_scales if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            raise ValueError(f"adaskip: sublayers must be integer indices, got {bad}")
        bad = [s for s in self.skip_scales if not 0 <= int(s) < 2 * self.num_layers]
        if bad:
            raise ValueError(f"adaskip: sublayers {bad} are out of range for a model with "
                             f"{self.num_layers} layers ({2 * self.num_layers} sublayers)")
        if self.mode not in MODES:
            raise ValueError(f"adaskip: plan mode must be one of {MODES}, got {self.mode!r}")
        if self.window < 0:
            raise ValueError(f"adaskip: the online window must be >= 0 tokens, got {self.window}")
        if self.beta is not None and not -1.0 <= self.beta <= 1.0:
            raise ValueError(f"adaskip: beta is a cosine similarity in [-1, 1], got {self.beta}")
        bad = {s: v for s, v in self.skip_scales.items() if not _positive_number(v)}
        if bad:
            raise ValueError(f"adaskip: compensation scales must be finite and positive; got {bad}")
        self.skip_scales = {int(s): float(v) for s, v in sorted(self.skip_scales.items())}
        # The stand-ins' sublayers as strictly as skip_scales': a key '3' or 3.5 would be read as
        # sublayer 3 (or a scalar one dropped into skip_scales' entry) without a word.
        bad = [s for s in self.stand_ins if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            raise ValueError(f"adaskip: stand-ins must be keyed by integer sublayer indices, got {bad}")
        stray = sorted(int(s) for s in self.stand_ins if int(s) not in self.skip_scales)
        if stray:
            raise ValueError(f"adaskip: stand-ins given for sublayers {stray} that the plan does not skip")
        wrong = [s for s, v in self.stand_ins.items() if not isinstance(v, StandIn)]
        if wrong:
            raise ValueError(f"adaskip: the stand-ins of sublayers {wrong} are not adaskip StandIn objects")
        # A scalar stand-in is the scale itself: it must not contradict skip_scales (float32
        # rounding aside, as a stand-in read from a file holds it).
        clash = {int(s): (v.scale, self.skip_scales[int(s)]) for s, v in self.stand_ins.items()
                 if v.kind == "scalar" and not math.isclose(v.scale, self.skip_scales[int(s)], rel_tol=1e-6)}
        if clash:
            raise ValueError("adaskip: scalar stand-ins whose scale is not the plan's compensation scale "
                             f"(sublayer: (stand-in, skip_scales)): {clash}; give the scale once")
        self.stand_ins = {int(s): v for s, v in sorted(self.stand_ins.items()) if v.kind != "scalar"}
        self._check_streaming()

    def _check_streaming(self) -> None:
        """Streaming groups as strictly as the skips: integer layers in range, integer groups,
        a sink and window that make a band, and no layer whose attention is skipped."""
        if not isinstance(self.streaming, dict):
            raise ValueError(f"adaskip: streaming must be a dict of layer -> KV-head groups, got "
                             f"{type(self.streaming).__name__}")
        for name in ("streaming_sink", "streaming_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"adaskip: {name} must be an integer, got {v!r}")
        if self.streaming_sink < 0 or self.streaming_window < 1:
            raise ValueError(f"adaskip: streaming groups need streaming_sink >= 0 and streaming_window >= 1, got "
                             f"{self.streaming_sink} and {self.streaming_window}")
        bad = [i for i in self.streaming if isinstance(i, bool) or not isinstance(i, numbers.Integral)
               or not 0 <= int(i) < self.num_layers]
        if bad:
            raise ValueError(f"adaskip: streaming layers must be integers in [0, {self.num_layers}), got {bad}")
        groups = {}
        for i, gs in self.streaming.items():
            try:
                gs = list(gs)
            except TypeError:
                raise ValueError(f"adaskip: the streaming groups of layer {i} must be a list of KV-head indices, "
                                 f"got {gs!r}") from None
            if not gs or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 0 for g in gs):
                raise ValueError(f"adaskip: the streaming groups of layer {i} must be KV-head indices >= 0, got {gs}")
            if len(set(gs)) != len(gs):
                raise ValueError(f"adaskip: layer {i} lists a streaming group twice: {gs}")
            groups[int(i)] = tuple(sorted(int(g) for g in gs))
        both = sorted(set(groups) & self.skipped_attention_layers)
        if both:
            raise ValueError(f"adaskip: layers {both} skip their attention, so none of their groups can stream")
        self.streaming = dict(sorted(groups.items()))
        self.streaming_sink, self.streaming_window = int(self.streaming_sink), int(self.streaming_window)

    @property
    def streaming_groups(self) -> dict:
        """{layer: StreamingGroups} of the plan's streaming groups (what a step's schedule carries)."""
        return {i: StreamingGroups(g, self.streaming_sink, self.streaming_window) for i, g in self.streaming.items()}

    def check_kv_heads(self, num_kv_heads: int) -> None:
        bad = {i: g for i, g in self.streaming.items() if g[-1] >= num_kv_heads}
        if bad:
            raise ValueError(f"adaskip: streaming groups {bad} out of range for a model with {num_kv_heads} KV heads")

    @property
    def stand_in(self) -> str:
        """The kind of stand-in of this plan's skipped sublayers ("mixed" when they differ)."""
        kinds = {self.stand_ins[s].kind if s in self.stand_ins else "scalar" for s in self.skip_scales}
        return kinds.pop() if len(kinds) == 1 else ("scalar" if not kinds else "mixed")

    def check_hidden(self, hidden: int) -> None:
        for s, v in self.stand_ins.items():
            v.check_hidden(hidden, s)

    @property
    def skipped_attention_layers(self) -> set:
        return {s // 2 for s in self.skip_scales if s % 2 == 0}

    @property
    def skipped_ffn_layers(self) -> set:
        return {s // 2 for s in self.skip_scales if s % 2 == 1}

    @property
    def attention_layers(self) -> set:
        """Layers that need a KV cache under this plan."""
        if self.mode != "e2e":
            return set(range(self.num_layers))  # prefill fills every layer's cache, or decode reads it
        return set(range(self.num_layers)) - self._attention_skipped_throughout()

    def _attention_skipped_throughout(self) -> set:
        """Attention layers skipped in prefill and in every decode step. SkipDecode's ramp starts
        decode with only its first layer skipped, so the others run attention over the prompt
        there: they keep a cache, filled in prefill although their attention is skipped."""
        layers = self.skipped_attention_layers
        if self.ramp and layers:
            first = min({s // 2 for s in self.skip_scales})
            return layers & {first}
        return layers

    @property
    def online(self) -> bool:
        return self.beta is not None and self.window > 0 and self.mode in ("decode", "e2e")

    def skips_in(self, phase: str, step: int = 0, total_steps: int = 1) -> "PhaseSkips":
        """The skips that apply in "prefill" or in decode step `step` of `total_steps` (what a
        request resolves once per phase: adaskip.runtime.request_plan)."""
        if phase == "prefill":
            active = self.skip_scales if self.mode in ("prefill", "e2e") else {}
            kv_only = self.skipped_attention_layers  # mode "prefill": decode runs every attention
            if self.mode == "e2e":
                kv_only = kv_only - self._attention_skipped_throughout()
            elif self.mode == "decode":
                kv_only = set()
        elif phase == "decode":
            active = self.skip_scales if self.mode in ("decode", "e2e") else {}
            if self.ramp and active:
                layers = sorted({s // 2 for s in active})
                n = 1 + (len(layers) - 1) * step // max(total_steps - 1, 1)
                keep = set(layers[:n])
                active = {s: v for s, v in active.items() if s // 2 in keep}
            kv_only = set()
        else:
            raise ValueError(f"adaskip: phase must be 'prefill' or 'decode', got {phase!r}")
        return PhaseSkips(dict(active), {s: v for s, v in self.stand_ins.items() if s in active}, frozenset(kv_only),
                          self.streaming_groups)

    def phase(self, phase: str, step: int = 0, total_steps: int = 1) -> "SkipPlan":
        """skips_in() as a plan of its own (mode e2e: its skips hold wherever it runs)."""
        skips = self.skips_in(phase, step, total_steps)
        return SkipPlan(self.num_layers, dict(skips.skip_scales), mode="e2e", strategy=self.strategy,
                        stand_ins=dict(skips.stand_ins), kv_only_attention=skips.kv_only_attention,
                        streaming=dict(self.streaming), streaming_sink=self.streaming_sink,
                        streaming_window=self.streaming_window)

    def as_skips(self) -> "PhaseSkips":
        """Every skip of this plan, whatever its mode (what a cache-less forward given the plan runs)."""
        return PhaseSkips(self.skip_scales, self.stand_ins, frozenset(self.kv_only_attention), self.streaming_groups)

    def check_model(self, num_layers: int, fingerprint: Optional[str] = None) -> None:
        if num_layers != self.num_layers:
            raise ValueError(f"adaskip: this plan is for a model with {self.num_layers} layers, "
                             f"the model has {num_layers}")
        if fingerprint is not None and self.model_fingerprint not in (None, fingerprint):
            raise ValueError("adaskip: this plan was made from a profile of another model "
                             f"(fingerprint {self.model_fingerprint}, the model's is {fingerprint})")

    def describe(self) -> str:
        attn = sorted(self.skipped_attention_layers)
        ffn = sorted(self.skipped_ffn_layers)
        lines = [f"strategy {self.strategy}, mode {self.mode}: {len(self.skip_scales)} of "
                 f"{2 * self.num_layers} sublayers skipped ({self.stand_in} stand-ins)",
                 f"  attention skipped in layers {attn}", f"  FFN skipped in layers {ffn}"]
        if self.streaming:
            lines.append(f"  streaming KV-head groups (sink {self.streaming_sink}, window {self.streaming_window}): "
                         f"{sum(len(g) for g in self.streaming.values())} in layers "
                         + ", ".join(f"{i}: {list(g)}" for i, g in self.streaming.items()))
        if self.online:
            lines.append(f"  online: the first {self.window} decoded tokens measure every other FFN; "
                         f"those with similarity >= beta = {self.beta:.4f} are then skipped too")
        if self.predicted_speedup is not None:
            lines.append(f"  predicted speedup {self.predicted_speedup:.3f}")
        if self.explanation:
            lines += ["  " + l for l in self.explanation.splitlines()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.pop("kv_only_attention")
        d["skip_scales"] = {str(k): v for k, v in self.skip_scales.items()}
        # Like the stand-ins: a plan without streaming groups writes none of their keys.
        if self.streaming:
            d["streaming"] = {str(k): list(v) for k, v in self.streaming.items()}
        else:
            for name in ("streaming", "streaming_sink", "streaming_window"):
                d.pop(name)
        # The fitted tensors stay with the profile that holds them; a plan's JSON names their kind.
        d.pop("stand_ins")
        if self.stand_ins:
            d["stand_ins"] = {str(k): v.describe() for k, v in self.stand_ins.items()}
            d["stand_in"] = self.stand_in
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@dataclass(frozen=True, eq=False)
class PhaseSkips:
    """What a plan skips in one phase of a request: sublayer -> compensation scale, the fitted
    stand-ins of those sublayers, the attention layers that still store their K/V, and the
    streaming KV-head groups. Made once
    per phase (SkipPlan.skips_in) and read by every step of it (adaskip.runtime.schedule)."""

    skip_scales: dict
    stand_ins: dict
    kv_only_attention: frozenset = frozenset()
    streaming_groups: dict = field(default_factory=dict)  # layer -> StreamingGroups

    def same_as(self, other: "PhaseSkips") -> bool:
        return (self.skip_scales == other.skip_scales and self.kv_only_attention == other.kv_only_attention
                and self.streaming_groups == other.streaming_groups
                and self.stand_ins.keys() == other.stand_ins.keys()
                and all(v is other.stand_ins[s] for s, v in self.stand_ins.items()))
