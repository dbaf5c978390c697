"""`adaskip demo`: the README's demo on the embedded SmolLM2, a long essay answered by the full
model and with skipping."""
from __future__ import annotations

from .common import add_model_options, at_least, check_common, dtype_of, load_profile
from .planning import add_planning_options, check_plan_args
from .run import compare, print_report

DEMO_QUESTION = "Summarize the main argument of the essay above in three sentences."

INTRODUCTION = """\
adaskip demo: AdaSkip makes long-prompt inference cheaper by not running what barely matters.
A transformer layer has two sublayers, attention and a feed-forward network (FFN), each adding
its output to a running "residual stream". Some of them barely change that stream. A search on
calibration text picks the sublayers whose removal changes the model's predictions least, on
running text and on facts hidden in long prompts, each replaced by a rescaling of the stream.
Calibration can also rank a finer unit: one attention layer's KV-head group that needs only the
first tokens and the recent ones, which a "streaming" group then reads alone. Given a tolerance,
the demo runs the fastest plan validated on held-out prompts as long as this one that keeps it;
the plan's lines below say what it chose and why.
"""
# Printed when the plan learns online (--window > 0).
ONLINE = """\
While answering, it also watches the FFNs over the first generated tokens and skips those that
turn out just as unimportant for this request.
"""
CLOSING = "Below, the same question about a long essay is answered by the full model and with skipping.\n"


def register(subparsers) -> None:
    d = subparsers.add_parser("demo", help="the README's demo on the embedded SmolLM2")
    add_model_options(d)
    add_planning_options(d)
    d.add_argument("--prompt-tokens", type=int, default=6000)
    d.add_argument("--question")
    d.set_defaults(func=cmd_demo, repeats=3)


def _essay_ids(tokenizer, prompt_tokens: int) -> list:
    """The last `prompt_tokens` tokens of the last essays, which calibration did not see (it
    reads the essays from the first on)."""
    from ..data import essay_paths

    text = ""
    for p in reversed(essay_paths()):
        text = (p.read_text() + "\n\n" + text) if text else p.read_text()
        if len(tokenizer(text)["input_ids"]) >= prompt_tokens:
            break
    return tokenizer(text)["input_ids"][-prompt_tokens:]


def cmd_demo(a) -> None:
    from ..runtime.loading import load_model

    check_common(a, needs_tokenizer=True)
    at_least(a, prompt_tokens=1, repeats=1)
    profile = load_profile(a)
    check_plan_args(a, profile)
    print(INTRODUCTION + (ONLINE if a.window > 0 else "") + CLOSING)
    model, tokenizer = load_model(a.model, dtype=dtype_of(a.dtype), device=a.device)
    ids = _essay_ids(tokenizer, a.prompt_tokens)
    a.question = a.question or DEMO_QUESTION
    if a.context_len is None:  # a tolerance picks the plan predicted fastest at the demo's own prompt length
        a.context_len = len(ids)
    report = compare(a, model, tokenizer, tokenizer.decode(ids) + "\n\n" + a.question, profile)
    print(f"question: {a.question}")
    print_report(report)
