"""The measurements behind `adaskip bench e2e`: one plan's TTFT and TPOT through
adaskip.generate (and transformers' in the same rounds), its ideal speedup from the measured
sublayer times, and the rows of the result. Kept apart from the setup in e2e.py so that what is
timed, and how, reads in one place."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .common import Clock, median, ratio

DEFINITIONS = {
    "ttft": "time to first token: the whole prompt in one prefill pass plus the first greedy token",
    "tpot": "decode time per output token (eager; tpot_graph: with the CUDA-graph decode step, capture excluded)",
    "speedup": "our full model's time over the plan's, same prompt length, same run",
    "ideal": "full time / (full time - measured time of the skipped sublayers, each timed alone, eagerly); "
             "decode: the mean over the decode steps' skip sets (with online learning: plus the FFNs it gated "
             "off, from the step after the window)",
    "of_ideal": "measured speedup / ideal speedup",
    "ideal_tpot_graph": "the ideal of CUDA-graph decode: full graph TPOT against the skipped sublayers' time inside "
                        "a CUDA graph (attention over the whole cache under a position mask, as the graph step runs it)",
    "paper_alpha": "M / (M - k/2): the paper's equal-cost speedup of skipping k sublayers of M layers",
    "tpot_before/after_window": "online plans: median step time during the learning window and after it "
                                "(graph decode on a GPU); online_drop_predicted: measured time of the FFNs gated off",
    "drop_vs_offline": "online plans: the same plan without online learning (offline_tpot) minus the steps after "
                       "the window; window_overhead: the steps in the window minus offline_tpot",
    "kv_cache_bytes": "our static KV cache for prompt + output tokens (HF: its DynamicCache at the end of the run)",
}


def _generate(model, prompts, plan, decode_tokens: int, graph: bool, conditional: bool = False):
    from adaskip.runtime.generation import generate

    # eos none: every run decodes the same number of tokens; one prefill pass, as HF does it.
    return generate(model, prompts, max_new_tokens=decode_tokens + 1, eos_token_ids=[], plan=plan,
                    prefill_chunk=len(prompts[0]), cuda_graph=graph, graph_conditionals=graph and conditional,
                    step_timing=True)


@torch.inference_mode()
def _hf_run(hf, cfg, ids, decode_tokens: int, device) -> tuple:
    """(TTFT s, TPOT s, KV-cache bytes at the end) of transformers with its DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    with Clock(device) as prefill:
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
    with Clock(device) as decode:
        for _ in range(decode_tokens):
            out = hf(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1)
    return prefill.seconds, decode.seconds / decode_tokens, _cache_bytes(cache)


def _cache_bytes(cache) -> Optional[int]:
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total or None


def measure(model, prompts, plan, args, graph: bool, hf=None, conditional: bool = False) -> dict:
    """Medians of TTFT and TPOT (eager, and graph decode when `graph`) of a batch of prompts of one
    length over args.repeats runs after args.warmup untimed ones; with `hf` = (model, config,
    ids), transformers is run in the same rounds, interleaved, so that drifts of the machine hit
    both alike. conditional: graph decode with CUDA-graph conditional FFNs (graph_conditionals)."""
    ttft, tpot, tpot_graph, hf_samples = [], [], [], []
    steps = []  # per repeat: each decode step's time (graph decode when `graph`, else eager)
    last = None
    for rnd in range(args.warmup + args.repeats):
        runs = [_generate(model, prompts, plan, args.decode_tokens, False)]
        if graph:
            runs.append(_generate(model, prompts, plan, args.decode_tokens, True, conditional))
        h = _hf_run(hf[0], hf[1], hf[2], args.decode_tokens, hf[2].device) if hf is not None else None
        if rnd < args.warmup:
            continue
        ttft += [r.prefill_s for r in runs]  # prefill is the same code with or without graphs
        tpot.append(runs[0].time_per_output_token_s)
        if graph:
            tpot_graph.append(runs[1].time_per_output_token_s)
        steps.append(runs[-1].step_times_s)
        if h is not None:
            hf_samples.append(h)
        last = runs[0]
    out = {"ttft_s": median(ttft), "tpot_s": median(tpot), "tpot_graph_s": median(tpot_graph) if graph else None,
           "kv_cache_bytes": last.kv_cache_bytes,
           # FFNs gated off for every sequence: only those save work in a batch.
           "online_skipped": sorted(set.intersection(*map(set, last.online_skipped))) if last.online_skipped else [],
           "step_times_s": [median(column) for column in zip(*steps)] if steps else []}
    if hf_samples:
        out["hf"] = {"ttft_s": median(s[0] for s in hf_samples), "tpot_s": median(s[1] for s in hf_samples),
                     "kv_cache_bytes": hf_samples[-1][2]}
    return out


def ideal_speedup(full_s: float, costs, skip_sets: list) -> Optional[float]:
    """full / (full - the mean over `skip_sets` of the skipped sublayers' measured time): one set
    for prefill; one per decode step (SkipDecode's ramp changes the set as it goes)."""
    if not skip_sets or not math.isfinite(full_s):
        return None
    saving = sum(costs.saving(s) for s in skip_sets) / len(skip_sets)
    left = full_s - saving
    return round(full_s / left, 4) if left > 0 else None


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None or not math.isfinite(seconds) else round(seconds * 1e3, 4)


def plan_row(length: int, strategy: str, k: int, plan, m: dict, full: dict, costs: dict, args,
             num_layers: int) -> dict:
    from adaskip.skipping.costs import paper_speedup

    if plan is None:
        prefill_sets, decode_sets, attn, ffn, skipped = [], [], 0, 0, []
    else:
        steps = args.decode_tokens
        prefill_sets = [set(plan.phase("prefill").skip_scales)]
        decode_sets = [set(plan.phase("decode", i, steps).skip_scales) for i in range(steps)]
        if plan.online and m.get("online_skipped"):
            # Online learning: after the window, the FFNs it gated off are skipped too.
            decode_sets = [s | set(m["online_skipped"]) if i >= plan.window else s for i, s in enumerate(decode_sets)]
        attn, ffn, skipped = len(plan.skipped_attention_layers), len(plan.skipped_ffn_layers), sorted(plan.skip_scales)
    ttft_x, tpot_x = ratio(full["ttft_s"], m["ttft_s"]), ratio(full["tpot_s"], m["tpot_s"])
    ideal_ttft = ideal_speedup(full["ttft_s"], costs["prefill"], prefill_sets) if plan is not None else 1.0
    ideal_tpot = ideal_speedup(full["tpot_s"], costs["decode"], decode_sets) if plan is not None else 1.0
    row = {"prompt_len": length, "strategy": strategy, "num_sublayers": k,
           "paper_alpha": round(paper_speedup(num_layers, k), 4), "skipped_attention": attn, "skipped_ffn": ffn,
           "skipped_sublayers": skipped,
           "ttft_ms": _ms(m["ttft_s"]), "ttft_speedup": ttft_x, "ideal_ttft_speedup": ideal_ttft,
           "ttft_of_ideal": ratio(ttft_x, ideal_ttft),
           "tpot_ms": _ms(m["tpot_s"]), "tpot_speedup": tpot_x, "ideal_tpot_speedup": ideal_tpot,
           "tpot_of_ideal": ratio(tpot_x, ideal_tpot),
           "kv_cache_bytes": m["kv_cache_bytes"], "kv_cache_ratio": ratio(m["kv_cache_bytes"], full["kv_cache_bytes"])}
    if m.get("tpot_graph_s") is not None:
        row["tpot_graph_ms"] = _ms(m["tpot_graph_s"])
        row["tpot_graph_speedup"] = ratio(full["tpot_graph_s"], m["tpot_graph_s"])
        if "decode_graph" in costs:
            ideal = ideal_speedup(full["tpot_graph_s"], costs["decode_graph"], decode_sets) if plan is not None else 1.0
            row["ideal_tpot_graph_speedup"] = ideal
            row["tpot_graph_of_ideal"] = ratio(row["tpot_graph_speedup"], ideal)
    if m.get("online_skipped"):
        row["online_skipped"] = m["online_skipped"]
    if plan is not None and plan.online:
        # The step times are graph decode when it ran: predict with the costs timed the same way.
        row.update(online_window_effect(plan, m, costs.get("decode_graph", costs["decode"])))
    return row


def online_window_effect(plan, m: dict, decode_costs) -> dict:
    """Time per token before the online window closes and after it (medians over steps, each
    step's time the median over repeats), against the drop predicted from the measured time of
    the FFNs it gated off. Steps right after the window are left out: the host sees the gates a
    step or two late (a non-blocking read), and a CUDA-graph run captures its settled step then."""
    times = m.get("step_times_s") or []
    before = times[1:plan.window]  # step 0 also warms up (and runs eagerly under graphs)
    after = times[plan.window + 3:]
    if not before or not after:
        return {"online_note": f"too few decode steps to compare before / after a window of {plan.window}"}
    measured = median(before) - median(after)
    predicted = decode_costs.saving(m.get("online_skipped") or [])
    return {"tpot_before_window_ms": _ms(median(before)), "tpot_after_window_ms": _ms(median(after)),
            "online_drop_ms": _ms(measured), "online_drop_predicted_ms": _ms(predicted),
            "online_drop_of_predicted": ratio(measured, predicted) if predicted > 0 else None}


def compare_with_offline(rows: list) -> None:
    """Online rows ("<strategy>+online...") against the same plan without online learning, timed in
    the same run: the offline plan's time per token (graph decode when measured, as the step
    times are) minus the steps after the window is what the gated-off FFNs saved; the steps in
    the window minus it is what learning costs while it runs."""
    for r in rows:
        if "+online" not in r["strategy"] or "tpot_after_window_ms" not in r:
            continue
        name = r["strategy"].split("+online")[0]
        twin = next((o for o in rows if o["strategy"] == name and o["prompt_len"] == r["prompt_len"]
                     and o["num_sublayers"] == r["num_sublayers"]), None)
        if twin is None:
            continue
        offline = twin.get("tpot_graph_ms") or twin["tpot_ms"]
        if offline is None:
            continue
        drop = round(offline - r["tpot_after_window_ms"], 4)
        predicted = r.get("online_drop_predicted_ms")
        r.update({"offline_tpot_ms": offline, "drop_vs_offline_ms": drop,
                  "drop_vs_offline_of_predicted": ratio(drop, predicted) if predicted else None,
                  "window_overhead_ms": round(r["tpot_before_window_ms"] - offline, 4)})


def cost_summary(length: int, costs) -> dict:
    per = costs.per_sublayer
    attn, ffn = per[0::2], per[1::2]
    return {"prompt_len": length, "mode": costs.mode, "source": costs.source,
            "attention_ms_mean": round(1e3 * sum(attn) / len(attn), 4),
            "ffn_ms_mean": round(1e3 * sum(ffn) / len(ffn), 4), "fixed_ms": round(1e3 * costs.fixed, 4),
            "sum_ms": round(1e3 * costs.total, 4), "per_sublayer_ms": [round(1e3 * c, 5) for c in per]}


def baseline_row(length: int, full: dict, args) -> dict:
    """Our full model against transformers' at one prompt length."""
    row = {"prompt_len": length, "decode_tokens": args.decode_tokens,
           "ttft_ms": {"ours": _ms(full["ttft_s"])}, "tpot_ms": {"ours": _ms(full["tpot_s"])},
           "kv_cache_bytes": {"ours": full["kv_cache_bytes"]}}
    if full.get("tpot_graph_s") is not None:
        row["tpot_ms"]["ours_graph"] = _ms(full["tpot_graph_s"])
    hf = full.get("hf")
    if hf is not None:
        row["ttft_ms"]["hf"], row["tpot_ms"]["hf"] = _ms(hf["ttft_s"]), _ms(hf["tpot_s"])
        row["kv_cache_bytes"]["hf"] = hf["kv_cache_bytes"]
        row["ttft_ratio_ours_over_hf"] = ratio(full["ttft_s"], hf["ttft_s"])
        row["tpot_ratio_ours_over_hf"] = ratio(full["tpot_s"], hf["tpot_s"])
        if full.get("tpot_graph_s") is not None:
            row["tpot_ratio_ours_graph_over_hf"] = ratio(full["tpot_graph_s"], hf["tpot_s"])
    return row
