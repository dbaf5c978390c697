"""Which KV-head groups can stream (adaskip.runtime.streaming; SkipPlan.streaming).

A streaming group's query heads see only `sink` + `window` keys. What that costs a layer at a query
position is the change it makes to the layer's output there: the group's heads' outputs under the
band, against their full-context outputs, through the group's columns of o_proj. This module
measures that change for every (layer, KV group) in one full-model pass per request, with the
layer's inputs held at the full model's, and relative to the residual stream's norm at the
position, so that layers compare:

    score(layer, g, i) = || W_o[:, heads of g] (o_full(i) - o_band(i)) || / || h(i) ||

averaged over the scored positions: on retrieval probes (adaskip.skipping.probes: a fact hidden
in calibration text and asked for at the end), the positions that predict the answer tokens; on
text, positions late in a calibration window (past sink + window, where the band cuts anything).
It is a first-order stand-in for the KL each group's streaming would cost on its own (one pass per
request instead of one per group), and it sees what the attention mass outside the band does not:
mass on keys whose values barely move the output costs nothing. The mass is recorded as well.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..runtime.rope import apply_rotary
from ..runtime.skip_plan import SkipPlan
from ..runtime.streaming import band_mask


@dataclass
class GroupScores:
    """Per (layer, KV group) [num_layers, num_kv_heads]: the mean relative output change
    (`change`) and the mean attention mass outside the band (`mass`, over the group's query
    heads), on retrieval probes' answer positions and on late text positions."""

    sink: int
    window: int
    retrieval_change: torch.Tensor
    retrieval_mass: torch.Tensor
    text_change: torch.Tensor
    text_mass: torch.Tensor
    probes: int = 0
    texts: int = 0
    notes: list = field(default_factory=list)
    probe_len: int = 0  # tokens per retrieval probe the ranking saw (0: not recorded)

    def score(self, text_weight: float = 1.0) -> torch.Tensor:
        """What the ranking sorts by (higher: keep the full context)."""
        return self.retrieval_change + text_weight * self.text_change

    def ranking(self, text_weight: float = 1.0, exclude_layers: Sequence[int] = ()) -> list:
        """(layer, group) units, the cheapest to make streaming first."""
        s = self.score(text_weight).clone()
        for i in exclude_layers:
            s[i] = math.inf
        order = torch.argsort(s.flatten(), stable=True).tolist()
        kv = s.shape[1]
        return [(i // kv, i % kv) for i in order if math.isfinite(s.flatten()[i].item())]

    def to_dict(self) -> dict:
        return {"sink": self.sink, "window": self.window, "probes": self.probes, "texts": self.texts,
                "retrieval_change": self.retrieval_change.tolist(), "retrieval_mass": self.retrieval_mass.tolist(),
                "text_change": self.text_change.tolist(), "text_mass": self.text_mass.tolist(), "notes": self.notes,
                "probe_len": self.probe_len}

    @classmethod
    def from_dict(cls, d: dict, num_layers: Optional[int] = None) -> "GroupScores":
        """The scores to_dict wrote (a profile's group_scores), checked: every table the same
        [layers, KV heads] shape of finite values >= 0, a band that is one."""
        if not isinstance(d, dict):
            raise ValueError(f"adaskip: group scores must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _TABLES + ("sink", "window") if k not in d]
        if missing:
            raise ValueError(f"adaskip: the group scores lack {missing}")
        tables = {}
        for k in _TABLES:
            try:
                t = torch.tensor(d[k], dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError(f"adaskip: group scores {k!r} must be a table of numbers") from None
            if t.dim() != 2 or not torch.isfinite(t).all() or (t < 0).any():
                raise ValueError(f"adaskip: group scores {k!r} must be a [layers, KV heads] table of finite values "
                                 ">= 0")
            tables[k] = t
        shapes = {tuple(t.shape) for t in tables.values()}
        if len(shapes) != 1 or (num_layers is not None and next(iter(shapes))[0] != num_layers):
            raise ValueError(f"adaskip: the group scores' tables have shapes {sorted(shapes)}, not one "
                             f"[{num_layers if num_layers is not None else 'layers'}, KV heads] shape")
        for k in ("sink", "window", "probes", "texts", "probe_len"):
            v = d.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "window" else 0):
                raise ValueError(f"adaskip: group scores {k!r} must be an integer >= {1 if k == 'window' else 0}, "
                                 f"got {v!r}")
        return cls(d["sink"], d["window"], **tables, probes=d.get("probes", 0), texts=d.get("texts", 0),
                   notes=list(d.get("notes", [])), probe_len=d.get("probe_len", 0))


_TABLES = ("retrieval_change", "retrieval_mass", "text_change", "text_mass")


# A plan for prompts this many times longer than the ranking's probes says so in its explanation.
LONGER_THAN_RANKED = 1.25


def add_streaming(plan: SkipPlan, scores: GroupScores, count: int, *, text_weight: float = 1.0,
                  context_len: Optional[int] = None, model_args=None, phase: str = "prefill",
                  added_s: float = 0.0) -> SkipPlan:
    """`plan` with the `count` KV-head groups `scores` ranks cheapest made streaming (groups of
    layers whose attention the plan skips are passed over). With context_len and model_args the
    predicted speedup is the L20 roofline's of skips and groups together
    (costs.streaming_plan_costs, `phase`, plus `added_s` seconds of the plan's own work: its linear
    stand-ins), else None: the plan's own figure priced no groups."""
    from .costs import streaming_plan_costs

    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"adaskip: streaming_groups must be an integer >= 0, got {count!r}")
    if count == 0:
        return plan
    if plan.streaming:
        raise ValueError("adaskip: the plan already streams KV-head groups (a tolerance chose a validated group "
                         "count); ask for streaming groups or a tolerance over validated ones, not both")
    layers = choose(scores.ranking(text_weight, exclude_layers=sorted(plan.skipped_attention_layers)), count)
    speedup, how = None, "no cost model given (context_len and model_args): the prediction is left out"
    if context_len is not None and model_args is not None:
        c = streaming_plan_costs(model_args, context_len, phase, sorted(plan.skip_scales),
                                 {i: len(g) for i, g in layers.items()}, sink=scores.sink, window=scores.window,
                                 added_s=added_s)
        speedup, how = c["speedup"], f"predicted {c['speedup']:.3f}x ({phase} at {context_len} tokens, L20 roofline)"
    line = (f"{count} streaming KV-head groups (sink {scores.sink}, window {scores.window}), the cheapest by their "
            f"scores on {scores.probes} retrieval probes and {scores.texts} text windows; {how}")
    if context_len is not None and scores.probe_len and context_len > LONGER_THAN_RANKED * scores.probe_len:
        # Which groups a fact needs depends on how far back it lies: a ranking on short probes
        # misjudges the groups that long prompts need (SmolLM2 at 6k: bench/results/README.md).
        line += (f"; note: the groups were ranked on probes of {scores.probe_len} tokens, and this plan is for "
                 f"{context_len}: rank them on probes as long as the prompts (calibrate --streaming-probes with "
                 "--validation-len that long)")
    return dataclasses.replace(plan, streaming=layers, streaming_sink=scores.sink, streaming_window=scores.window,
                               predicted_speedup=speedup,
                               explanation=(plan.explanation + "\n" if plan.explanation else "") + line)


def choose(ranking: Sequence[tuple], count: int) -> dict:
    """The first `count` units of a ranking as {layer: [KV groups]} (what SkipPlan.streaming takes)."""
    if count > len(ranking):
        raise ValueError(f"adaskip: {count} streaming groups asked for, only {len(ranking)} ranked")
    out: dict = {}
    for layer, g in ranking[:count]:
        out.setdefault(int(layer), []).append(int(g))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _layer_change(model, layer: int, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, sink: int,
                  window: int) -> tuple:
    """(change [KV], mass [KV]) of one attention layer, summed over `positions` (batch 1)."""
    attn = model.model.layers[layer].self_attn
    t = x.shape[1]
    nh, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rep = nh // kvh
    pos_all = torch.arange(t, device=x.device)[None]
    cos, sin = model.rotary(pos_all, t, x.dtype)
    k = apply_rotary(attn.k_proj(x).view(1, t, kvh, d).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(1, t, kvh, d).transpose(1, 2)
    xq = x[:, positions]
    q = apply_rotary(attn.q_proj(xq).view(1, -1, nh, d).transpose(1, 2), cos[:, positions], sin[:, positions])
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # [1, H, P, T]
    causal = pos_all[0][None, :] <= positions[:, None]  # [P, T]
    band = band_mask(positions[None], t, sink, window)[0]
    full = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    banded = torch.softmax(scores.masked_fill(~band, float("-inf")), -1)
    mass = (full * (~band)).sum(-1)[0]  # [H, P]
    delta = ((full - banded) @ v)[0]  # [H, P, D]
    w = attn.o_proj.weight.view(attn.o_proj.out_features, nh, d)  # [hidden, H, D]
    per_group = torch.einsum("ohd,hpd->hpo", w, delta).view(kvh, rep, -1, w.shape[0]).sum(1)  # [KV, P, hidden]
    rel = per_group.norm(dim=-1) / h[0, positions].norm(dim=-1).clamp_min(1e-12)  # [KV, P]
    return rel.sum(-1), mass.view(kvh, rep, -1).mean(1).sum(-1)


@torch.inference_mode()
def score_groups(model, probes: Sequence, texts: Sequence[Sequence[int]], *, sink: int = 4, window: int = 256,
                 text_positions: int = 128, progress: bool = True) -> GroupScores:
    """GroupScores over retrieval `probes` (their answer positions) and calibration `texts` (token
    lists; `text_positions` positions spread over the last half of each, past sink + window),
    each one cache-less full-model forward."""
    args = model.args
    shape = (args.num_layers, args.num_kv_heads)
    sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("rc", "rm", "tc", "tm")}
    requests = [(list(p.ids), p.answer_positions, "r") for p in probes]
    notes = []
    for ids in texts:
        ids = list(ids)
        lo = max(len(ids) // 2, sink + window)
        if lo >= len(ids):
            notes.append(f"a text of {len(ids)} tokens is too short to score past sink + window; left out")
            continue
        step = max(1, (len(ids) - lo) // text_positions)
        requests.append((ids, list(range(lo, len(ids), step))[:text_positions], "t"))
    counts = {"r": 0, "t": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(requests), desc="scoring KV-head groups", unit="request")
    device = model.lm_head.weight.device
    for ids, positions, kind in requests:
        pos = torch.tensor(positions, device=device)

        def tap(s, x, h, out, pos=pos, kind=kind):
            if s % 2:
                return
            change, mass = _layer_change(model, s // 2, x, h, pos, sink, window)
            sums[kind + "c"][s // 2] += change.double().cpu() / len(pos)
            sums[kind + "m"][s // 2] += mass.double().cpu() / len(pos)

        model(torch.tensor([ids], device=device), taps=tap)
        counts[kind] += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    r, t = max(counts["r"], 1), max(counts["t"], 1)
    return GroupScores(sink, window, (sums["rc"] / r).float(), (sums["rm"] / r).float(), (sums["tc"] / t).float(),
                       (sums["tm"] / t).float(), probes=counts["r"], texts=counts["t"], notes=notes)


def probe_haystacks(windows: Sequence[Sequence[int]], length: int) -> list:
    """Calibration windows joined end to end and cut into pieces of `length` tokens (haystacks of
    probes longer than a window)."""
    stream = [t for w in windows for t in w]
    pieces = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
    if not pieces:
        raise ValueError(f"adaskip: {len(stream)} calibration tokens are too few for a {length}-token haystack")
    return pieces


def streaming_summary(layers: dict, num_layers: int, num_kv_heads: int) -> dict:
    """{"groups": total, "per_layer": [count per layer]} of a {layer: [groups]} choice."""
    per = [len(layers.get(i, ())) for i in range(num_layers)]
    return {"groups": sum(per), "per_layer": per, "of": num_layers * num_kv_heads}


def default_probe_seed(extra: Optional[str] = None) -> str:
    """The probes' seed name: our own (never the eval's, nor the kl search's "search")."""
    return "kv-head-groups" + (f"/{extra}" if extra else "")
