"""Generation fidelity: what a plan does to the text a user reads back.

Perplexity is measured with every position's input taken from the document; in decoding the
model reads its own tokens back, so a plan's small errors compound, and online learning (which
gates more FFNs off after a window of decoded tokens) only acts there. This task generates
greedily from held-out prompts (a window of a document followed by an instruction, through the
chat template when the model has one) with the full model and with each plan, and compares every
plan's text with the full model's own: Rouge-L, token-level F1, the length of the common prefix.

The first row is the full model against itself in another dtype: the floor that any numeric
change already causes (greedy decoding amplifies a rounding difference into a different text).
A plan with online learning is run twice, as it says and with learning off, so what learning
costs is read off two adjacent rows.
"""
from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._util import check_room, progress_bar

INSTRUCTIONS = {
    "summarize": "Summarize the text above.",
    "continue": "Continue:",
}
# A prompt may fall short of the length asked for by this fraction (it never goes over).
LENGTH_TOLERANCE = 0.03


@dataclass
class GenerationPrompt:
    ids: list  # prompt token ids, ending where the model's answer begins
    length: int  # the length asked for; len(ids) is at most this
    document: int  # index of the document the window was cut from
    start: int  # the window's first token in that document


def _encode(tokenizer, text: str, instruction: str) -> list:
    message = f"{text.strip()}\n\n{instruction}"
    if getattr(tokenizer, "chat_template", None) is not None:
        from ..runtime.chat import chat_prompt
        return chat_prompt(tokenizer, message)
    return tokenizer(message, add_special_tokens=True)["input_ids"]


def make_prompts(tokenizer, documents: Sequence[str], lengths: Sequence[int], per_length: int,
                 instruction: str = "summarize", seed: int = 0) -> list:
    """`per_length` prompts of at most each length in `lengths` (tokens, instruction and chat
    template included), each a window of one document at a seeded position, reproducible from
    `seed`. Documents too short for a length are not used for it; none long enough is an error."""
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"adaskip: the generation instruction must be one of {tuple(INSTRUCTIONS)}, "
                         f"got {instruction!r}")
    if per_length < 1:
        raise ValueError(f"adaskip: prompts per length must be >= 1, got {per_length}")
    if not documents:
        raise ValueError("adaskip: the generation task needs documents")
    text = INSTRUCTIONS[instruction]
    overhead = len(_encode(tokenizer, "", text))
    doc_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    prompts = []
    for n in lengths:
        if n <= overhead + 16:
            raise ValueError(f"adaskip: a generation prompt of {n} tokens leaves no room for text after the "
                             f"{overhead}-token instruction")
        room = n - overhead
        usable = [i for i, ids in enumerate(doc_ids) if len(ids) >= room]
        if not usable:
            raise ValueError(f"adaskip: no evaluation document has the {room} tokens a {n}-token generation "
                             f"prompt needs (the longest has {max(len(i) for i in doc_ids)})")
        for k in range(per_length):
            # A string seed: Random hashes it (sha512), stable across runs and Python versions.
            rng = random.Random(f"adaskip-generation/{seed}/{n}/{k}")
            doc = usable[(k + rng.randrange(len(usable))) % len(usable)] if len(usable) > 1 else usable[0]
            start = rng.randrange(len(doc_ids[doc]) - room + 1)
            take = room
            while True:  # decoding and re-encoding a window can merge or split a few tokens
                ids = _encode(tokenizer, tokenizer.decode(doc_ids[doc][start:start + take]), text)
                if len(ids) <= n:
                    break
                take -= len(ids) - n
            if len(ids) < (1 - LENGTH_TOLERANCE) * n:
                raise ValueError(f"adaskip: could only fill {len(ids)} of {n} tokens of a generation prompt")
            prompts.append(GenerationPrompt(ids, int(n), doc, start))
    return prompts


# -- metrics ------------------------------------------------------------------------------------


def token_f1(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """F1 of the two token multisets (bag of token ids); two empty outputs agree."""
    if not prediction and not reference:
        return 1.0
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens the two outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def text_rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F of the plan's text against the full model's; two empty texts agree."""
    from .longbench import rouge_l

    if not prediction.strip() and not reference.strip():
        return 1.0
    return rouge_l(prediction, reference)


def kv_bytes(args, attention_layers, tokens: int, element_size: int) -> int:
    """Bytes of K and V one request keeps for `tokens` tokens in the layers that keep a cache."""
    return len(attention_layers) * 2 * args.num_kv_heads * args.head_dim * tokens * element_size


def decode_speedup(costs, plan, online_skipped: Sequence[int], steps: int, window: int, added: float) -> float:
    """Predicted speedup of `steps` decode steps under `costs` (one step's sublayer times at the
    prompt's length): the plan's skips throughout, plus the FFNs online learning gated off after
    its window; `added`: seconds per step of the plan's linear stand-ins."""
    before = min(window, steps) if online_skipped else steps
    # Step times in units of the full model's step: 1 / speedup.
    static = 1.0 / costs.speedup(plan.skip_scales, added)
    learned = 1.0 / costs.speedup(set(plan.skip_scales) | set(online_skipped), added)
    spent = before * static + (steps - before) * learned
    return steps / spent if spent > 0 else float("inf")


# -- the task ------------------------------------------------------------------------------------


def _generate(model, prompts, plan, max_new_tokens, batch_size, bar):
    from ..runtime.generation import generate

    tokens, online = [], []
    eos = set(model.args.eos_token_ids)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        out = generate(model, [p.ids for p in batch], max_new_tokens=max_new_tokens, plan=plan)
        tokens += [[t for t in ids if t not in eos] for ids in out.tokens]
        online += out.online_skipped if out.online_skipped is not None else [[] for _ in batch]
        bar.update(len(batch))
    return tokens, online


def _row(name, plan, online_on, tokens, texts, online, ref_tokens, ref_texts, prompts, model, cost_for,
         element_size):
    args = model.args
    layers = plan.attention_layers if plan is not None else set(range(args.num_layers))
    speedups = []
    for p, toks, extra in zip(prompts, tokens, online):
        if plan is None:
            speedups.append(1.0)
            continue
        costs, added = cost_for(plan, len(p.ids))
        speedups.append(decode_speedup(costs, plan, extra, max(len(toks), 1), plan.window, added))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "name": name,
        "strategy": plan.strategy if plan is not None else "full",
        "budget": len(plan.skip_scales) if plan is not None else 0,
        "online": online_on,
        "window": plan.window if online_on else None,
        "beta": plan.beta if online_on else None,
        "rouge_l": mean([text_rouge_l(t, r) for t, r in zip(texts, ref_texts)]),
        "token_f1": mean([token_f1(t, r) for t, r in zip(tokens, ref_tokens)]),
        "common_prefix": mean([common_prefix(t, r) for t, r in zip(tokens, ref_tokens)]),
        "identical": mean([float(t == r) for t, r in zip(tokens, ref_tokens)]),
        "extra_ffns_gated": mean([len(e) for e in online]),
        "predicted_decode_speedup": mean(speedups),
        "kv_bytes": mean([kv_bytes(args, layers, len(p.ids) + len(t), element_size) for p, t in zip(prompts, tokens)]),
        "generations": texts,
    }


def _in_dtype(model, dtype):
    """A copy of the model in `dtype`, without the original's KV caches and decode buffers (their
    dtype is the original's; generate allocates new ones)."""
    from ..runtime.decode import drop_decode_states

    other = copy.deepcopy(model)
    drop_decode_states(other)
    for layer in other.model.layers:
        layer.self_attn.kv_cache = None
    other.cache_batch = other.cache_len = 0
    return other.to(dtype)


@torch.inference_mode()
def evaluate_generation(model, tokenizer, prompts: Sequence[GenerationPrompt], plans: dict, *,
                        max_new_tokens: int = 64, floor_dtype: Optional[torch.dtype] = torch.bfloat16,
                        batch_size: int = 1, profile=None, spec=None, progress: bool = True,
                        online_betas: Sequence[float] = ()) -> dict:
    """Greedy generations of the full model and of every plan, scored against the full model's.

    plans: {name: SkipPlan}; a plan with online learning is also run with learning off (row
    online False) and with each beta of `online_betas` (rows "<name>/beta=<b>": a lower beta gates
    FFNs off at lower similarity, which shows what online learning costs when it acts). floor_dtype: also run the full model in this dtype (a copy of the model) and
    score it as the first row; None leaves it out. The predicted decode speedup is the roofline
    cost model (adaskip.skipping.costs.sublayer_costs, default device the L20) at each prompt's
    length, over the tokens generated, with the FFNs online learning gated off after its window;
    linear stand-ins' work is counted (their layer sizes come from the profile's kl search).
    Returns {"reference": {"dtype", "generations"}, "rows": [...], "prompts": [...]}.
    """
    from ..skipping.costs import L20_SPEC, sublayer_costs
    from ..skipping.strategies import stand_in_cost

    if not prompts:
        raise ValueError("adaskip: no generation prompts to evaluate")
    if max_new_tokens < 1:
        raise ValueError(f"adaskip: max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"adaskip: batch_size must be >= 1, got {batch_size}")
    check_room([len(p.ids) for p in prompts], max_new_tokens, model.args.max_position_embeddings,
               "generation prompts")
    dtype = model.lm_head.weight.dtype
    element_size = torch.empty((), dtype=dtype).element_size()
    spec = spec or L20_SPEC
    cached = {}

    def cost_for(plan, length):
        if length not in cached:
            cached[length] = sublayer_costs(model.args, length, "decode", spec=spec)
        costs = cached[length]
        return costs, stand_in_cost(plan, profile, costs)

    runs = [("full", None, None)]
    if floor_dtype is not None and floor_dtype != dtype:
        runs.append((f"full/{str(floor_dtype).replace('torch.', '')}", None, None))
    for name, plan in plans.items():
        if plan is None:
            continue
        runs.append((name, plan, True if plan.online else None))
        if plan.online:
            runs.extend((f"{name}/beta={b:g}", dataclasses.replace(plan, beta=float(b)), True) for b in online_betas)
            runs.append((f"{name}/no-online", dataclasses.replace(plan, beta=None), False))
    bar = progress_bar(len(runs) * len(prompts), progress, "generation", "prompt")

    decode = lambda toks: [tokenizer.decode(t, skip_special_tokens=True) for t in toks]  # noqa: E731
    ref_tokens, _ = _generate(model, prompts, None, max_new_tokens, batch_size, bar)
    ref_texts = decode(ref_tokens)
    rows = []
    for name, plan, online_on in runs[1:]:
        if plan is None:  # the dtype floor: the full model in another dtype
            other = _in_dtype(model, floor_dtype)
            tokens, online = _generate(other, prompts, None, max_new_tokens, batch_size, bar)
            del other
        else:
            tokens, online = _generate(model, prompts, plan, max_new_tokens, batch_size, bar)
        size = element_size if plan is not None else torch.empty((), dtype=floor_dtype).element_size()
        rows.append(_row(name, plan, online_on, tokens, decode(tokens), online, ref_tokens, ref_texts, prompts,
                         model, cost_for, size))
        if plan is None:
            rows[-1]["dtype"] = str(floor_dtype).replace("torch.", "")
    bar.close()
    return {"reference": {"dtype": str(dtype).replace("torch.", ""), "generations": ref_texts,
                          "kv_bytes": sum(kv_bytes(model.args, range(model.args.num_layers), len(p.ids) + len(t),
                                                   element_size) for p, t in zip(prompts, ref_tokens)) / len(prompts)},
            "rows": rows,
            "prompts": [{"length": p.length, "tokens": len(p.ids), "document": p.document, "start": p.start}
                        for p in prompts]}


_COLUMNS = ("rouge_l", "token_f1", "common_prefix", "identical", "extra_ffns_gated", "predicted_decode_speedup",
            "kv_bytes")


def generation_table(result: dict) -> str:
    """Markdown: one line per run against the full model's own text, the dtype floor first."""
    head = ["run", "online (window, beta)", "Rouge-L", "token F1", "common prefix (tokens)", "identical",
            "extra FFNs gated", "predicted decode speedup", "KV MiB / request"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if r["online"] is None:
            online = "–"
        elif r["online"]:
            online = f"on ({r['window']}, {r['beta']:.3f})"
        else:
            online = "off"
        cells = [r["name"], online, f"{r['rouge_l']:.3f}", f"{r['token_f1']:.3f}", f"{r['common_prefix']:.1f}",
                 f"{r['identical']:.2f}", f"{r['extra_ffns_gated']:.1f}", f"{r['predicted_decode_speedup']:.3f}",
                 f"{r['kv_bytes'] / 2**20:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ref = result["reference"]
    lines.append(f"\nReference: the full model in {ref['dtype']} ({ref['kv_bytes'] / 2**20:.1f} KV MiB / request).")
    return "\n".join(lines)
