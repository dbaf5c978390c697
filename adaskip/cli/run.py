"""`adaskip run`: answer a prompt with the full model and with a skip plan, timed side by side
(also what `adaskip demo` prints)."""
from __future__ import annotations

import json

from .common import add_model_options, at_least, check_common, check_in_file, dtype_of, load_profile
from .planning import add_planning_options, build_plan, check_plan_args


def register(subparsers) -> None:
    r = subparsers.add_parser("run", help="answer a prompt with the full model and with a skip plan, timed side "
                              "by side")
    add_model_options(r)
    add_planning_options(r)
    prompt = r.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to answer")
    prompt.add_argument("--prompt-file", help="a file with the text to answer")
    r.add_argument("--question", help="appended after the prompt")
    r.add_argument("--lossless", action="store_true",
                   help="self-speculative decoding: the plan drafts, the full model verifies (greedy: the full "
                   "model's own answer)")
    r.add_argument("--draft-tokens", type=int, default=4, help="with --lossless: tokens drafted per round")
    r.add_argument("--online-draft", action="store_true",
                   help="with --lossless: the drafter's online learning gates FFNs off for this request")
    r.set_defaults(func=cmd_run)


def cmd_run(a) -> None:
    from ..runtime.loading import load_model

    check_common(a, needs_tokenizer=True)
    if a.online_draft and not a.lossless:
        raise SystemExit("adaskip: --online-draft is for the drafter of --lossless; add --lossless")
    at_least(a, draft_tokens=1, repeats=1)
    if a.lossless and a.repeats > 1:
        raise SystemExit("adaskip: --repeats times the plan's own prefill; with --lossless the full model prefills "
                         "(its answers are the full model's): drop one of them")
    profile = load_profile(a)
    check_plan_args(a, profile)
    text = _prompt_text(a)
    model, tokenizer = load_model(a.model, dtype=dtype_of(a.dtype), device=a.device)
    report = compare(a, model, tokenizer, text, profile)
    if a.json:
        print(json.dumps(report))
    else:
        print_report(report)


def _prompt_text(a) -> str:
    """--prompt or the text of --prompt-file, with --question after it."""
    if a.prompt is not None:
        text = a.prompt
    else:
        from ..data import read_text

        try:
            text = read_text(check_in_file("--prompt-file", a.prompt_file), "--prompt-file")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        except OSError as e:
            raise SystemExit(f"adaskip: --prompt-file {a.prompt_file}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise SystemExit(f"adaskip: {'--prompt' if a.prompt is not None else '--prompt-file ' + a.prompt_file} "
                         "is empty; give the text to answer")
    return f"{text}\n\n{a.question}" if a.question else text


def _prompt_ids(a, tokenizer, text: str):
    from ..runtime.chat import chat_prompt

    if tokenizer is None:
        raise SystemExit("adaskip: this model has no tokenizer; give a model directory with tokenizer files")
    if getattr(tokenizer, "chat_template", None) and not a.no_chat:
        return chat_prompt(tokenizer, text)
    return tokenizer(text)["input_ids"]


def _answer(a, model, tokenizer, ids, plan) -> dict:
    """One generation of the prompt (plan None: the full model; with --lossless the plan drafts
    and the full model verifies), as the report shows it."""
    from ..runtime.generation import generate

    if plan is not None and getattr(a, "lossless", False):
        from ..runtime.speculative import SpeculativeConfig

        out = generate(model, [ids], max_new_tokens=a.max_new_tokens, cuda_graph=a.cuda_graph,
                       speculative=SpeculativeConfig(plan, draft_tokens=a.draft_tokens, online=a.online_draft))
    else:
        out = generate(model, [ids], max_new_tokens=a.max_new_tokens, plan=plan, cuda_graph=a.cuda_graph)
    return {"answer": tokenizer.decode(out.tokens[0], skip_special_tokens=True),
            "ttft_s": out.prefill_s, "tpot_s": out.time_per_output_token_s,
            "new_tokens": len(out.tokens[0]), "kv_cache_bytes": out.kv_cache_bytes,
            "online_skipped": out.online_skipped[0] if out.online_skipped else [],
            "graph_capture_s": out.graph_capture_s, "speculative": out.speculative}


def compare(a, model, tokenizer, text: str, profile) -> dict:
    """Generates for one prompt with the full model and with the plan, timed in the same run."""
    from ..runtime.generation import generate

    skip_plan = build_plan(a, model, profile)
    ids = _prompt_ids(a, tokenizer, text)
    if len(ids) + a.max_new_tokens > model.args.max_position_embeddings:
        raise SystemExit(f"adaskip: the prompt has {len(ids)} tokens; with {a.max_new_tokens} new tokens that "
                         f"exceeds the model's context of {model.args.max_position_embeddings}")
    if model.lm_head.weight.device.type == "cuda":  # warm-up: kernels load, allocator fills
        generate(model, [ids[:256]], max_new_tokens=4)
    f = _answer(a, model, tokenizer, ids, None)
    p = _answer(a, model, tokenizer, ids, skip_plan)
    _repeat_prefill(a, model, ids, skip_plan, f, p)
    return {"model": a.model, "prompt_tokens": len(ids), "device": str(model.lm_head.weight.device),
            "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""), "plan": skip_plan.to_dict(),
            "plan_text": skip_plan.describe(), "full": f, "adaskip": p,
            "ttft_speedup": f["ttft_s"] / p["ttft_s"], "tpot_speedup": f["tpot_s"] / p["tpot_s"]}


def _repeat_prefill(a, model, ids, skip_plan, full: dict, plan: dict) -> None:
    """Time to first token as the median of --repeats runs each, the full model and the plan in
    alternating order (one timing of each is the answer's own; CPU timings here drift by +-20 %
    from run to run, so one pair says little)."""
    from statistics import median

    from ..runtime.generation import generate

    repeats = getattr(a, "repeats", 1)
    times = {"full": [full["ttft_s"]], "plan": [plan["ttft_s"]]}
    for i in range(1, repeats):
        order = (("plan", skip_plan), ("full", None)) if i % 2 else (("full", None), ("plan", skip_plan))
        for name, p in order:
            times[name].append(generate(model, [ids], max_new_tokens=1, plan=p, cuda_graph=a.cuda_graph).prefill_s)
    for run, name in ((full, "full"), (plan, "plan")):
        run["ttft_runs_s"] = times[name]
        run["ttft_s"] = median(times[name])


def print_report(r: dict) -> None:
    f, p = r["full"], r["adaskip"]
    print(f"\nprompt: {r['prompt_tokens']} tokens, {r['model']} on {r['device']} ({r['dtype']})")
    print("\n" + r["plan_text"])
    if p["online_skipped"]:
        print(f"  online learning also skipped the FFN sublayers {p['online_skipped']} after the window")
    spec = p.get("speculative")
    label = "with the plan" if spec is None else "lossless: the plan drafts, the full model verifies"
    print(f"\n--- full model ---\n{f['answer'].strip()}\n\n--- {label} ---\n{p['answer'].strip()}\n")
    if spec is not None:
        print(f"drafted {spec['drafted']} tokens in {spec['rounds']} rounds of {spec['draft_tokens']}: "
              f"{spec['acceptance_rate']:.0%} accepted, {spec['tokens_per_round']:.2f} tokens a round\n")
    print(f"{'':22}{'full':>12}{'plan':>12}{'speedup':>10}")
    runs = len(f.get("ttft_runs_s", [None]))
    if runs > 1:
        print(f"(time to first token: median of {runs} runs each, full and plan alternating)")
    print(f"{'time to first token':22}{f['ttft_s'] * 1e3:>10.1f}ms{p['ttft_s'] * 1e3:>10.1f}ms{r['ttft_speedup']:>10.3f}")
    print(f"{'time per output token':22}{f['tpot_s'] * 1e3:>10.1f}ms{p['tpot_s'] * 1e3:>10.1f}ms{r['tpot_speedup']:>10.3f}")
    print(f"{'KV cache':22}{f['kv_cache_bytes'] / 2**20:>10.1f}MB{p['kv_cache_bytes'] / 2**20:>10.1f}MB")
