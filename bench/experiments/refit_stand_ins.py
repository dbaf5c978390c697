"""Does refitting a plan's stand-ins under the plan itself (Prune&Comp's compensation) help?

For the greedy-kl plans of a profile at the given budgets, with scalar and with linear stand-ins,
as the search fitted them and refitted by adaskip.skipping.refit.refit_plan on the search's own
requests (and retrieval probes, for the linear maps): perplexity on held-out documents, and
passkey / needle retrieval with the eval's own tasks. Writes refit.json (command, commit, device,
date: written here, never by hand) and refit.md into --out.

  python bench/experiments/refit_stand_ins.py --profile P --budgets 8,16 --out DIR
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch


def _plans(model, profile, budgets, kinds, requests, probes):
    from adaskip.skipping.refit import refit_plan
    from adaskip.skipping.strategies import plan

    plans, refit_s = {}, {}
    for k in budgets:
        for kind in kinds:
            searched = plan(profile, strategy="greedy-kl", num_sublayers=k, stand_in=kind, online=False)
            plans[f"greedy-kl {k} {kind}"] = searched
            start = time.perf_counter()
            plans[f"greedy-kl {k} {kind} refit"] = refit_plan(
                model, searched, requests, kind=kind,
                fit_requests=[p.ids for p in probes] if kind != "scalar" else ())
            refit_s[f"greedy-kl {k} {kind} refit"] = time.perf_counter() - start
            print(f"refitted greedy-kl {k} {kind} in {refit_s[f'greedy-kl {k} {kind} refit']:.0f} s", flush=True)
    return plans, refit_s


def _search_inputs(model, tokenizer, profile, data):
    """The kl search's requests and retrieval probes, rebuilt as calibrate built them (checked
    against the hashes the search recorded)."""
    from adaskip.cli.common import text_paths
    from adaskip.skipping import greedy
    from adaskip.skipping.calibration import _read, calibration_requests
    from adaskip.skipping.probes import make_probes

    kl = profile.search_result("kl")
    requests = calibration_requests((_read(p) for p in text_paths(data)), tokenizer,
                                    num_requests=profile.num_requests, prompt_len=profile.prompt_len)
    if greedy.requests_digest(requests) != profile.requests_sha256:
        raise SystemExit("the calibration requests rebuilt here are not the profile's; pass its --data")
    search = requests[:kl.requests]
    n = kl.notes.get("retrieval_probes", 0)
    probes = make_probes(tokenizer, requests[kl.requests:] or requests, n, length=profile.prompt_len,
                         seed="search") if n else []
    if probes and greedy.requests_digest([p.ids for p in probes]) != kl.notes["probes_sha256"]:
        raise SystemExit("the retrieval probes rebuilt here are not the search's")
    return search, probes


def main() -> None:
    from adaskip.benchmarks.common import device_info, git_commit, now_iso
    from adaskip.cli.common import text_paths
    from adaskip.evaluation.harness import document_windows, held_out
    from adaskip.evaluation.quality import perplexity
    from adaskip.evaluation.retrieval import evaluate_retrieval, make_tasks
    from adaskip.runtime.loading import load_model
    from adaskip.skipping.profile import ImportanceProfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--profile", required=True)
    p.add_argument("--data", nargs="+", default=["essays"], help="the profile's calibration data")
    p.add_argument("--budgets", default="8,16")
    p.add_argument("--stand-ins", default="scalar,linear")
    p.add_argument("--documents", nargs="+", action="append",
                   help="perplexity documents (repeat for several sets; default: essays, stdlib)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-len", type=int, default=2048)
    p.add_argument("--retrieval-budgets", default="8", help="budgets whose plans the retrieval tasks run")
    p.add_argument("--retrieval-lengths", default="4096")
    p.add_argument("--retrieval-samples", type=int, default=8)
    p.add_argument("--retrieval-batch", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    command = " ".join(shlex.quote(x) for x in [sys.executable.rsplit("/", 1)[-1], *sys.argv])
    commit, date, started = git_commit(), now_iso(), time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(x) for x in a.budgets.split(",")]
    kinds = a.stand_ins.split(",")
    model, tokenizer = load_model(a.model, dtype=torch.float32, device="cpu")
    profile = ImportanceProfile.load(a.profile)
    requests, probes = _search_inputs(model, tokenizer, profile, a.data)
    plans, refit_s = _plans(model, profile, budgets, kinds, requests, probes)

    ppl = {}
    for docs in a.documents or [["essays"], ["stdlib"]]:
        name = " ".join(docs)
        kept = held_out(text_paths(docs, "documents"), profile)
        windows = document_windows([f.read_text() for f in kept], tokenizer, a.window_len, a.windows)
        ppl[name] = {"full": perplexity(model, windows)}
        for key, pl in plans.items():
            ppl[name][key] = perplexity(model, windows, pl)
        print(name, {k: round(v, 2) for k, v in ppl[name].items()}, flush=True)

    retrieval = {}
    named = {"full": None, **{k: v for k, v in plans.items()
                              if int(k.split()[1]) in {int(x) for x in a.retrieval_budgets.split(",")}}}
    for kind in ("passkey", "needle"):
        tasks = make_tasks(tokenizer, kind, [int(x) for x in a.retrieval_lengths.split(",")], [0.1, 0.5, 0.9],
                           samples_per_cell=a.retrieval_samples, seed=0,
                           max_context=model.args.max_position_embeddings)
        res = evaluate_retrieval(model, tokenizer, tasks, named, batch_size=a.retrieval_batch)
        retrieval[kind] = {k: {"correct": v["correct"], "total": v["total"], "by_length": v["by_length"]}
                           for k, v in res.items()}
        print(kind, {k: f"{v['correct']}/{v['total']}" for k, v in res.items()}, flush=True)

    result = {"command": command, "date": date, "git_commit": commit, **device_info(), "profile": a.profile,
              "search_requests": len(requests), "search_probes": len(probes), "refit_s": refit_s,
              "perplexity": ppl, "perplexity_windows": [a.windows, a.window_len], "retrieval": retrieval,
              "wall_s": time.time() - started}
    (out / "refit.json").write_text(json.dumps(result, indent=1))
    lines = [f"`{command}` ({commit}, {date})", "", "| plan | " + " | ".join(ppl) + " | "
             + " | ".join(f"{k} {a.retrieval_lengths}" for k in retrieval) + " |",
             "|---" * (1 + len(ppl) + len(retrieval)) + "|"]
    for key in ["full", *plans]:
        cells = [f"{ppl[n][key]:.2f}" for n in ppl]
        for kind in retrieval:
            r = retrieval[kind].get(key)
            cells.append(f"{r['correct']}/{r['total']}" if r else "")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    (out / "refit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
