#!/usr/bin/env python3
"""Quality of AdaSkip and the whole-layer baselines on the embedded SmolLM2 and the essays.

Calibrates on the first essays (in sorted order), evaluates on held-out essays never used for
calibration: perplexity, top-1 agreement with the full model and KL(full || plan) per token, at
equal sublayer budgets. Prints a markdown table and writes JSON.

    python bench/quality.py [--budgets 4,8,12,16] [--windows 4] [--window-len 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import adaskip  # noqa: E402
from adaskip.calibrate import calibrate, calibration_requests  # noqa: E402
from adaskip.data import essay_paths  # noqa: E402
from adaskip.evaluate import compare_with_full  # noqa: E402
from adaskip.policy import plan  # noqa: E402
from common import device_info, git_commit, now_iso, write_json  # noqa: E402

STRATEGIES = ["adaskip", "shortgpt", "early-exit", "skipdecode", "unified"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="4,8,12,16")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=4, help="held-out evaluation windows")
    p.add_argument("--window-len", type=int, default=2048)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    model, tok = adaskip.load_model("smollm2")
    paths = essay_paths()
    texts = [q.read_text() for q in paths]
    requests = calibration_requests(texts, tok, num_requests=a.num_requests, prompt_len=a.prompt_len)
    # Which essays calibration touched: the windows are taken in order, essay by essay.
    used, count = 0, 0
    for t in texts:
        n = len(tok(t, add_special_tokens=False)["input_ids"])
        count += sum(1 for s in range(0, n, a.prompt_len) if n - s >= a.prompt_len // 2)
        used += 1
        if count >= a.num_requests:
            break
    profile = calibrate(model, requests, num_requests=a.num_requests, prompt_len=a.prompt_len,
                        description=f"essays {paths[0].name}..{paths[used - 1].name}")
    held_out = tok("\n\n".join(texts[used:]), add_special_tokens=False)["input_ids"]
    windows = [held_out[i * a.window_len:(i + 1) * a.window_len] for i in range(a.windows)]
    windows = [w for w in windows if len(w) == a.window_len]
    print(f"calibration: {len(requests)} requests from {used} essays; evaluation: {len(windows)} windows x "
          f"{a.window_len} tokens from the other {len(texts) - used} essays")

    budgets = [int(b) for b in a.budgets.split(",")]
    plans = {(s, k): plan(profile, num_sublayers=k, strategy=s, mode="e2e", online=False)
             for s in a.strategies.split(",") for k in budgets}
    metrics = compare_with_full(model, windows, {f"{s}@{k}": v for (s, k), v in plans.items()})
    full = metrics["full"]
    rows = [{"strategy": "full", "budget": 0, **full}]
    for (s, k), pl in plans.items():
        rows.append({"strategy": s, "budget": k, **metrics[f"{s}@{k}"],
                     "skipped_attention": len(pl.skipped_attention_layers), "skipped_ffn": len(pl.skipped_ffn_layers)})

    print("\n| strategy | " + " | ".join(f"ppl @{k}" for k in budgets) + " | " + " | ".join(f"top-1 @{k}" for k in budgets) + " |")
    print("|---|" + "---|" * (2 * len(budgets)))
    print("| full | " + " | ".join(f"{full['perplexity']:.2f}" for _ in budgets) + " | " +
          " | ".join("1.000" for _ in budgets) + " |")
    for s in a.strategies.split(","):
        r = {k: metrics[f"{s}@{k}"] for k in budgets}
        print(f"| {s} | " + " | ".join(f"{r[k]['perplexity']:.2f}" for k in budgets) + " | " +
              " | ".join(f"{r[k]['top1_agreement']:.3f}" for k in budgets) + " |")
    info = device_info()
    result = {"benchmark": "quality on SmolLM2 / essays", "date": now_iso(), "git_commit": git_commit(), **info,
              "calibration": {"requests": len(requests), "prompt_len": a.prompt_len, "essays": used},
              "evaluation": {"windows": len(windows), "window_len": a.window_len},
              "profile_similarity": profile.similarity, "rows": rows}
    if a.out:
        write_json(a.out, result)


if __name__ == "__main__":
    main()
