"""`adaskip eval --tasks speculative`: each plan as the drafter of lossless self-speculative
decoding (adaskip.runtime.speculative), per draft length k, on held-out prompts (the generation
task's): how many drafted tokens the full model keeps, the tokens each round emits, whether the
output is the full model's (it must be), the decode speedup measured on this device, and the
speedup predicted for a memory-bound GPU decode step."""
from __future__ import annotations

from typing import Sequence

import torch

from .._util import check_room, progress_bar
from ..skipping.drafting import predicted_speedup


@torch.inference_mode()
def evaluate_speculative(model, prompts: Sequence, plans: dict, *, draft_tokens: Sequence[int] = (2, 4),
                         max_new_tokens: int = 64, profile=None, spec=None, progress: bool = True,
                         online: bool = False, cuda_graph: bool = False) -> dict:
    """prompts: adaskip.evaluation.generation.GenerationPrompt (their .ids); plans: {name:
    SkipPlan} (None entries are skipped). One row per plan x k: acceptance rate, tokens per round,
    the fraction of outputs identical to plain greedy decoding, the measured decode speedup
    (plain decode time / speculative decode time, summed over the prompts, this device) and the
    predicted one (predicted_speedup with the draft's decode speedup from the roofline cost model
    at each prompt's length, default device the L20).
    online: plans with online learning also draft with it (rows "<name>/online": the drafter's
    own gates switch FFNs off per request; their draft speedup counts those FFNs as skipped for
    the whole request, an upper bound, since they run during the window).
    cuda_graph: (GPU) plain decode steps and speculative rounds both as CUDA-graph replays, so that
    the measured speedup compares the device's time rather than the host's; each is captured by a
    first, untimed run on the first prompt, and capture time never counts."""
    from ..runtime.generation import generate
    from ..skipping.costs import L20_SPEC, device_name, sublayer_costs

    if not prompts:
        raise ValueError("adaskip: no prompts to evaluate speculative decoding on")
    ks = [int(k) for k in draft_tokens]
    if not ks or min(ks) < 1:
        raise ValueError(f"adaskip: draft lengths must be >= 1, got {list(draft_tokens)}")
    check_room([len(p.ids) for p in prompts], max_new_tokens + max(ks) + 1, model.args.max_position_embeddings,
               "speculative prompts")
    if cuda_graph and model.lm_head.weight.device.type != "cuda":
        raise ValueError("adaskip: cuda_graph needs the model on a GPU")
    spec = spec or L20_SPEC
    runs = [(n, p, False) for n, p in plans.items() if p is not None]
    if online:
        runs += [(f"{n}/online", p, True) for n, p, _ in list(runs) if p.online]
    bar = progress_bar(len(prompts) * (1 + len(runs) * len(ks)), progress, "speculative", "prompt")
    reference = []
    if cuda_graph:  # capture (and first replays) off the clock
        generate(model, [prompts[0].ids], max_new_tokens=max_new_tokens, eos_token_ids=[], cuda_graph=cuda_graph)
    for p in prompts:
        out = generate(model, [p.ids], max_new_tokens=max_new_tokens, eos_token_ids=[], cuda_graph=cuda_graph)
        reference.append((out.tokens[0], out.decode_s))
        bar.update(1)
    rows = []
    for name, plan, online_drafts in runs:
        costs = [sublayer_costs(model.args, len(p.ids), "decode", spec=spec) for p in prompts]
        skips = set(plan.phase("decode").skip_scales)
        for k in ks:
            rows.append(_draft_row(model, prompts, reference, costs, name, plan, k, online_drafts, skips, profile,
                                   max_new_tokens, cuda_graph, bar))
    bar.close()
    return {"rows": rows, "prompts": [{"length": p.length, "tokens": len(p.ids)} for p in prompts],
            "max_new_tokens": max_new_tokens, "device": device_name(model.lm_head.weight.device),
            "cuda_graph": cuda_graph,
            "roofline": getattr(spec, "name", str(spec))}


def _draft_row(model, prompts: Sequence, reference: list, costs: list, name: str, plan, k: int, online_drafts: bool,
               skips: set, profile, max_new_tokens: int, cuda_graph: bool, bar) -> dict:
    """The row of `plan` drafting k tokens a round, over every prompt (`reference`: the plain
    decode's tokens and seconds per prompt; `costs`: the cost model at each prompt's length)."""
    from ..runtime.generation import generate
    from ..runtime.speculative import SpeculativeConfig
    from ..skipping.strategies import stand_in_cost

    drafted = accepted = rounds = emitted = identical = 0
    plain_s = spec_s = 0.0
    predicted, draft_speedups, extra = [], [], 0
    config = SpeculativeConfig(plan, draft_tokens=k, online=online_drafts)
    if cuda_graph:
        generate(model, [prompts[0].ids], max_new_tokens=max_new_tokens, eos_token_ids=[],
                 speculative=config, cuda_graph=cuda_graph)
    for p, (ref_tokens, ref_s), c in zip(prompts, reference, costs):
        out = generate(model, [p.ids], max_new_tokens=max_new_tokens, eos_token_ids=[],
                       speculative=config, cuda_graph=cuda_graph)
        gated = set(out.online_skipped[0]) if out.online_skipped else set()
        extra += len(gated)
        s = c.speedup(skips | gated, stand_in_cost(plan, profile, c))
        draft_speedups.append(s)
        st = out.speculative
        drafted, accepted, rounds = drafted + st["drafted"], accepted + st["accepted"], rounds + st["rounds"]
        emitted += len(out.tokens[0]) - 1
        identical += int(out.tokens[0] == ref_tokens)
        plain_s, spec_s = plain_s + ref_s, spec_s + out.decode_s
        predicted.append(predicted_speedup(st["tokens_per_round"], k, s))
        bar.update(1)
    return {"name": name, "strategy": plan.strategy, "budget": len(plan.skip_scales), "draft_tokens": k,
            "acceptance_rate": accepted / drafted if drafted else float("nan"),
            "tokens_per_round": emitted / rounds if rounds else float("nan"),
            "identical": identical / len(prompts),
            "draft_decode_speedup": sum(draft_speedups) / len(draft_speedups),
            "predicted_speedup": sum(predicted) / len(predicted),
            "measured_decode_speedup": plain_s / spec_s if spec_s > 0 else float("nan"),
            "drafted": drafted, "accepted": accepted, "rounds": rounds,
            "online": online_drafts, "extra_ffns_gated": extra / len(prompts)}


def speculative_table(result: dict) -> str:
    """Markdown: one line per drafter x k (with online drafting: the FFNs its gates switched off)."""
    online = any(r.get("online") for r in result["rows"])
    head = ["drafter", "k", "accepted", "tokens / round", "identical to greedy", "draft speedup (roofline)",
            "predicted speedup (roofline)", f"measured decode speedup ({result['device']})"]
    if online:
        head.insert(2, "FFNs gated by the drafter")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["name"], str(r["draft_tokens"]), f"{r['acceptance_rate']:.2f}", f"{r['tokens_per_round']:.2f}",
                 f"{r['identical']:.2f}", f"{r['draft_decode_speedup']:.3f}", f"{r['predicted_speedup']:.3f}",
                 f"{r['measured_decode_speedup']:.3f}"]
        if online:
            cells.insert(2, f"{r.get('extra_ffns_gated', 0):.1f}" if r.get("online") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
