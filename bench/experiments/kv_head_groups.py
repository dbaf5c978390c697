"""Issue 29's finer unit: streaming KV-head groups (DuoAttention's sink + recent window for the
groups that do not need the full context) on SmolLM2, against greedy-kl at equal predicted
prefill saving (L20 roofline, adaskip.skipping.costs.streaming_plan_costs: a prediction; the ttft
stage measures what the runtime's band-only attention saves on this machine). The groups run as
plans (SkipPlan.streaming).

Stages (each appends to the same output folder; the JSON is rewritten by this script only):
  score   rank every (layer, KV group) on calibration text and retrieval probes of our own
          (adaskip.skipping.head_groups.score_groups) -> scores.json
  ttft    measured time to first token of the configurations at --ttft-lengths (alternating,
          --repeats rounds, medians) -> ttft.json
  eval    retrieval (the eval's own passkey / needle tasks: adaskip.evaluation.retrieval.make_tasks
          with `adaskip eval`'s seed 0, depths 0.1 / 0.5 / 0.9, batch 2; --samples 8 is its 24
          prompts a cell, fewer is the first of them) and held-out essay perplexity (4 x 2048)
          of the named configurations -> eval.json, eval.md (merged with earlier eval runs)

Configurations (--configs): full; kl<k> (greedy-kl's first k sublayers, the profile's plan);
stream<n> (the n cheapest groups of the ranking); kl<k>+stream<n> (both; groups in layers whose
attention the plan skips are not counted). --window / --sink set the band.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from adaskip.benchmarks.common import device_info, now_iso, provenance
from adaskip.data import essay_paths
from adaskip.evaluation.harness import document_windows, held_out
from adaskip.evaluation.quality import perplexity
from adaskip.evaluation.retrieval import evaluate_retrieval, make_tasks
from adaskip.runtime.generation import generate
from adaskip.runtime.loading import load_model
from adaskip.runtime.skip_plan import SkipPlan
from adaskip.skipping.calibration import calibration_requests
from adaskip.skipping.costs import streaming_plan_costs
from adaskip.skipping.greedy import requests_digest
from adaskip.skipping.head_groups import (GroupScores, choose, default_probe_seed, probe_haystacks, score_groups,
                                          streaming_summary)
from adaskip.skipping.probes import make_probes
from adaskip.skipping.profile import ImportanceProfile
from adaskip.skipping.strategies import plan as make_plan

PROFILE = "bench/results/eval-smollm2-retrieval-grid16-cpu-2026-12-06-bf5049d/smollm2-essays-search16-profile.json"
COST_LENGTHS = (2048, 4096, 6144)


def log(msg: str, out: Path) -> None:
    line = f"[{now_iso()}] {msg}"
    print(line, flush=True)
    with open(out / "run.log", "a") as f:
        f.write(line + "\n")


def header(a) -> dict:
    """What each run records of itself: the provenance every adaskip writer records (command as run,
    commit and dirty state with untracked files, date, versions), the device, threads, profile."""
    return {**provenance(), "device": device_info(), "torch_threads": torch.get_num_threads(),
            "profile": a.profile}


def stage_score(a, model, tokenizer, profile, out: Path) -> None:
    texts = [p.read_text(encoding="utf-8") for p in essay_paths()]
    windows = calibration_requests(texts, tokenizer, num_requests=profile.num_requests, prompt_len=profile.prompt_len)
    digest = requests_digest(windows)
    if digest != profile.requests_sha256:
        raise SystemExit(f"calibration windows {digest} are not the profile's {profile.requests_sha256}")
    probes = make_probes(tokenizer, probe_haystacks(windows, a.probe_len), a.probes, length=a.probe_len,
                         seed=default_probe_seed())
    log(f"score: {len(probes)} probes of <= {a.probe_len} tokens ({', '.join(p.kind for p in probes)}), "
        f"{len(windows[:a.texts])} text windows, sink {a.sink}, window {a.window}", out)
    start = time.perf_counter()
    scores = score_groups(model, probes, windows[:a.texts], sink=a.sink, window=a.window)
    took = time.perf_counter() - start
    log(f"score: {took:.0f} s", out)
    result = {**header(a), "stage": "score", "seconds": took, "calibration_requests_sha256": digest,
              "probe_seed": default_probe_seed(), "probe_len": a.probe_len,
              "probe_depths": [p.depth for p in probes], "scores": scores.to_dict()}
    (out / f"scores-w{a.window}.json").write_text(json.dumps(result, indent=1))


def load_scores(path: Path) -> GroupScores:
    """The score stage's JSON, or a profile whose calibration ranked the groups
    (`adaskip calibrate --streaming-probes`: its group_scores)."""
    d = json.loads(path.read_text())
    return GroupScores.from_dict(d["group_scores"] if "group_scores" in d else d["scores"])


def configuration(name: str, profile, scores: GroupScores, args, text_weight: float, sink: int,
                  window: int) -> tuple:
    """(SkipPlan or None, {layer: [groups]}) of a configuration name: the greedy-kl plan with the
    streaming groups added (SkipPlan.streaming)."""
    m = re.fullmatch(r"(?:kl(\d+))?\+?(?:stream(\d+))?|full", name)
    if not m or name in ("", "+"):
        raise SystemExit(f"unknown configuration {name!r}")
    if name == "full":
        return None, {}
    k, n = int(m.group(1) or 0), int(m.group(2) or 0)
    plan = make_plan(profile, num_layers=args.num_layers, strategy="greedy-kl", num_sublayers=k) if k else None
    skipped_attention = sorted(plan.skipped_attention_layers) if plan is not None else []
    layers = choose(scores.ranking(text_weight, exclude_layers=skipped_attention), n) if n else {}
    if layers:
        base = plan if plan is not None else SkipPlan(args.num_layers, {}, strategy="streaming")
        plan = dataclasses.replace(base, streaming=layers, streaming_sink=sink, streaming_window=window)
    return plan, layers


def predicted(args, plan, layers, sink, window) -> dict:
    skipped = sorted(plan.skip_scales) if plan is not None else []
    counts = {i: len(g) for i, g in layers.items()}
    out = {}
    for n in COST_LENGTHS:
        for mode in ("prefill", "decode"):
            c = streaming_plan_costs(args, n, mode, skipped, counts, sink=sink, window=window)
            out[f"{mode}@{n}"] = {"speedup": c["speedup"], "saving_s": c["saving_s"],
                                  "kv_entries_ratio": c["kv_entries_plan"] / c["kv_entries_full"]}
    return out


def stage_eval(a, model, tokenizer, profile, out: Path) -> None:
    args = model.args
    scores = load_scores(Path(a.scores) if a.scores else out / f"scores-w{a.window}.json")
    path = out / "eval.json"
    result = json.loads(path.read_text()) if path.exists() else {"runs": []}
    tasks = {kind: make_tasks(tokenizer, kind, a.lengths, a.depths, samples_per_cell=a.samples, seed=0,
                              max_context=args.max_position_embeddings) for kind in a.kinds}
    # make_tasks orders each cell's samples 0..samples-1: --skip-samples drops the first ones (run before)
    tasks = {kind: [t for i, t in enumerate(ts) if i % a.samples >= a.skip_samples] for kind, ts in tasks.items()}
    documents = None
    if a.ppl:
        documents = held_out(essay_paths(), profile)
        docs = [p.read_text(encoding="utf-8") for p in documents]
        windows = document_windows(docs, tokenizer, 2048, 4)
    run = {**header(a), "stage": "eval", "scores": a.scores or f"scores-w{a.window}.json",
           "skip_samples": a.skip_samples, "lengths": a.lengths, "depths": a.depths, "samples": a.samples,
           "sink": a.sink, "window": a.window, "text_weight": a.text_weight, "rows": []}
    for name in a.configs:
        plan, layers = configuration(name, profile, scores, args, a.text_weight, a.sink, a.window)
        row = {"config": name, "skipped": sorted(plan.skip_scales) if plan is not None else [],
               "streaming": {str(k): v for k, v in layers.items()},
               "streaming_summary": streaming_summary(layers, args.num_layers, args.num_kv_heads),
               "predicted": predicted(args, plan, layers, a.sink, a.window), "metrics": {}, "seconds": {}}
        log(f"eval {name}: skipped {row['skipped']}, {row['streaming_summary']['groups']} streaming groups "
            f"{layers}; predicted prefill speedup "
            + ", ".join(f"{n}: {row['predicted'][f'prefill@{n}']['speedup']:.3f}" for n in COST_LENGTHS), out)
        if a.ppl:
            start = time.perf_counter()
            row["metrics"]["perplexity"] = perplexity(model, windows, plan=plan)
            row["seconds"]["ppl"] = time.perf_counter() - start
            log(f"  ppl {row['metrics']['perplexity']:.2f} ({row['seconds']['ppl']:.0f} s)", out)
        for kind, ts in tasks.items():
            start = time.perf_counter()
            res = evaluate_retrieval(model, tokenizer, ts, {name: plan}, batch_size=a.batch, progress=False)[name]
            row["seconds"][kind] = time.perf_counter() - start
            row["metrics"][kind] = {"correct": res["correct"], "total": res["total"],
                                    "by_length": {str(n): v for n, v in res["by_length"].items()},
                                    "by_cell": {str(n): {str(d): acc for d, acc in cells.items()}
                                                for n, cells in res["by_cell"].items()},
                                    "generations": res["generations"]}
            log(f"  {kind}: " + ", ".join(f"{n}: {v['correct']}/{v['total']}" for n, v in res["by_length"].items())
                + f" ({row['seconds'][kind]:.0f} s)", out)
        run["rows"].append(row)
        result["runs"] = [r for r in result["runs"] if r.get("date") != run["date"]] + [run]
        path.write_text(json.dumps(result, indent=1))
        write_markdown(result, out)


def write_markdown(result: dict, out: Path) -> None:
    lines = ["# Streaming KV-head groups on SmolLM2 (CPU fp32)", "",
             "Written by bench/experiments/kv_head_groups.py from eval.json. Predicted speedups: L20 roofline "
             "(adaskip.skipping.costs.streaming_plan_costs), prefill unless marked; no kernel exists for "
             "streaming groups, so these are predictions only.", ""]
    for run in result["runs"]:
        lines += [f"## {run['date']} (commit {run['git_commit']}): sink {run['sink']}, window {run['window']}, "
                  f"{run['samples']} prompts per depth, depths {run['depths']}", "", f"`{run['command']}`", "",
                  "| config | skipped | streaming groups | pred. prefill 2k / 4k / 6k | pred. decode 4k | ppl "
                  "| passkey | needle |", "|---|---|---|---|---|---|---|---|"]
        for row in run["rows"]:
            p = row["predicted"]
            pre = " / ".join(f"{p[f'prefill@{n}']['speedup']:.3f}" for n in COST_LENGTHS)
            cells = []
            for kind in ("passkey", "needle"):
                m = row["metrics"].get(kind)
                cells.append(" / ".join(f"{v['correct']}/{v['total']}" for v in m["by_length"].values()) if m else "")
            ppl = row["metrics"].get("perplexity")
            lines.append(f"| {row['config']} | {len(row['skipped'])} | {row['streaming_summary']['groups']} | {pre} | "
                         f"{p['decode@4096']['speedup']:.3f} | {'' if ppl is None else f'{ppl:.2f}'} | "
                         f"{cells[0]} | {cells[1]} |")
        lines += ["", "Retrieval cells are correct/total at each length in order " + str(run["lengths"]) + ".", ""]
    (out / "eval.md").write_text("\n".join(lines) + "\n")


def stage_ttft(a, model, tokenizer, profile, out: Path) -> None:
    """Measured time to first token (adaskip.generate's prefill_s, one new token) of each
    configuration on one held-out essay prompt of each --ttft-lengths, the configurations in
    turn, --repeats rounds; medians of the wall time and of the process's CPU time (with one
    thread, the work done: other jobs on the same cores stretch the wall time, not that). The
    streaming groups read only their band (block-wise prefill), so this is what they save on
    this machine, beside the roofline's prediction."""
    args = model.args
    scores = load_scores(Path(a.scores) if a.scores else out / f"scores-w{a.window}.json")
    docs = [p.read_text(encoding="utf-8") for p in held_out(essay_paths(), profile)]
    run = {**header(a), "stage": "ttft", "scores": a.scores or f"scores-w{a.window}.json", "repeats": a.repeats,
           "sink": a.sink, "window": a.window, "text_weight": a.text_weight, "rows": []}
    for n in a.ttft_lengths:
        prompt = document_windows(docs, tokenizer, n, 1)[0]
        plans = {name: configuration(name, profile, scores, args, a.text_weight, a.sink, a.window)
                 for name in a.configs}
        times = {name: [] for name in a.configs}
        cpu = {name: [] for name in a.configs}  # the process's CPU seconds: what other jobs on the cores do not move
        generate(model, [prompt[:256]], max_new_tokens=1, eos_token_ids=[])  # warm-up
        for r in range(a.repeats):
            for name in a.configs:
                start = time.process_time()
                times[name].append(generate(model, [prompt], max_new_tokens=1, eos_token_ids=[],
                                            plan=plans[name][0]).prefill_s)
                cpu[name].append(time.process_time() - start)
            log(f"ttft {n} tokens, round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s ({cpu[k][-1]:.2f} s CPU)"
                                                               for k, v in times.items()), out)
        full = statistics.median(times["full"]) if "full" in times else None
        full_cpu = statistics.median(cpu["full"]) if "full" in cpu else None
        for name in a.configs:
            plan, layers = plans[name]
            med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
            run["rows"].append({"config": name, "prompt_tokens": len(prompt),
                                "skipped": sorted(plan.skip_scales) if plan is not None else [],
                                "streaming_groups": sum(len(g) for g in layers.values()),
                                "ttft_runs_s": times[name], "ttft_s": med,
                                "cpu_runs_s": cpu[name], "cpu_s": med_cpu,
                                "measured_speedup": full / med if full else None,
                                "measured_cpu_speedup": full_cpu / med_cpu if full_cpu else None,
                                "predicted_prefill_speedup": predicted(args, plan, layers, a.sink, a.window).get(
                                    f"prefill@{n}", {}).get("speedup")})
    path = out / "ttft.json"
    result = json.loads(path.read_text()) if path.exists() else {"runs": []}
    result["runs"].append(run)
    path.write_text(json.dumps(result, indent=1))
    for row in run["rows"]:
        log(f"ttft {row['prompt_tokens']} tokens {row['config']}: median {row['ttft_s']:.2f} s, measured "
            f"{row['measured_speedup'] or float('nan'):.3f}x (CPU time {row['measured_cpu_speedup'] or float('nan'):.3f}x), "
            "predicted (L20) "
            f"{row['predicted_prefill_speedup'] or float('nan'):.3f}x", out)


def stage_costs(a, profile, out: Path) -> None:
    """How many streaming groups save what greedy-kl's first 4 / 8 / 16 sublayers save (L20
    roofline, prefill and decode), per window and length: no model is loaded."""
    from adaskip.benchmarks.models import model_args
    from adaskip.skipping.costs import sublayer_costs

    args = model_args("smollm2")
    order = profile.search["kl"]["order"]
    rows = []
    for n in COST_LENGTHS:
        for mode in ("prefill", "decode"):
            c = sublayer_costs(args, n, mode)
            for w in (128, 256, 512):
                one = streaming_plan_costs(args, n, mode, [], {0: 1}, sink=a.sink, window=w)["saving_s"]
                row = {"context_len": n, "mode": mode, "window": w, "sink": a.sink, "one_group_saving_s": one,
                       "attention_sublayer_s": c.per_sublayer[0], "ffn_sublayer_s": c.per_sublayer[1],
                       "total_s": c.total}
                for k in (4, 8, 16):
                    row[f"kl{k}_saving_s"] = c.saving(order[:k])
                    row[f"kl{k}_speedup"] = c.speedup(order[:k])
                    row[f"groups_for_kl{k}"] = c.saving(order[:k]) / one
                row["groups_for_kl8_minus_kl4"] = (c.saving(order[:8]) - c.saving(order[:4])) / one
                rows.append(row)
    (out / "costs.json").write_text(json.dumps({**header(a), "stage": "costs", "spec": "L20 roofline",
                                                "greedy_kl_order": order, "rows": rows}, indent=1))
    lines = ["| length | mode | W | one group saves (us) | attention / FFN sublayer (us) | groups = kl4 | "
             "groups = kl8 | groups = kl8 - kl4 | groups = kl16 | kl8 speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context_len']} | {r['mode']} | {r['window']} | {1e6 * r['one_group_saving_s']:.1f} | "
                     f"{1e6 * r['attention_sublayer_s']:.1f} / {1e6 * r['ffn_sublayer_s']:.1f} | "
                     f"{r['groups_for_kl4']:.1f} | {r['groups_for_kl8']:.1f} | {r['groups_for_kl8_minus_kl4']:.1f} | "
                     f"{r['groups_for_kl16']:.1f} | {r['kl8_speedup']:.3f} |")
    (out / "costs.md").write_text("# Streaming groups priced against greedy-kl's sublayers (L20 roofline, "
                                  "predictions)\n\n" + "\n".join(lines) + "\n")
    log("costs: wrote costs.json, costs.md", out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["score", "eval", "costs", "ttft"])
    p.add_argument("--out", default="bench/results/eval-smollm2-kv-head-groups-cpu-2026-12-06-bf5049d")
    p.add_argument("--profile", default=PROFILE)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    # score
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--probe-len", type=int, default=4096)
    p.add_argument("--texts", type=int, default=4)
    # eval
    p.add_argument("--configs", nargs="+", default=["full"])
    p.add_argument("--scores", help="the score stage's JSON, or a profile with group scores (default: "
                   "scores-w<window>.json in --out)")
    p.add_argument("--text-weight", type=float, default=1.0)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--skip-samples", type=int, default=0, help="leave out the first samples of each cell")
    p.add_argument("--kinds", nargs="+", default=["passkey", "needle"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ppl", action="store_true")
    # ttft
    p.add_argument("--ttft-lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"start: {' '.join(sys.argv)}", out)
    profile = ImportanceProfile.load(a.profile)
    if a.stage == "costs":
        stage_costs(a, profile, out)
        return
    model, tokenizer = load_model("smollm2")
    model.eval()
    if a.stage == "score":
        stage_score(a, model, tokenizer, profile, out)
    elif a.stage == "ttft":
        stage_ttft(a, model, tokenizer, profile, out)
    else:
        stage_eval(a, model, tokenizer, profile, out)
    log("done", out)


if __name__ == "__main__":
    main()
