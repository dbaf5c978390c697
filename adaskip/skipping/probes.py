"""Synthetic retrieval probes built from calibration text: what the search and the validation use
to see whether a plan still finds a fact in a long prompt.

IO similarity and the KL on ordinary text cannot see retrieval: attention that copies a fact from
far back barely moves the next-token distribution of running prose, so a search scored on text
alone takes exactly the sublayers retrieval needs. A probe hides one seeded fact at a random depth
of a calibration window, asks for it at the end, and appends the answer; the search scores a plan
by KL(full || plan) on the answer tokens only (`answer_positions`), the validation by whether the
plan's greedy answer contains the fact.

The wording, the seeds and the facts here are our own and differ from those of
adaskip.evaluation.retrieval (the eval's passkey / needle tasks), so that a plan chosen with these
probes is judged on tasks it never saw.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

PROBE_KINDS = ("passkey", "word")
# Shortest probe worth building (tokens): the question and answer alone take about 80 with a chat
# template, and a fact needs some text to hide in.
MIN_PROBE_LEN = 256
# Longest answer a probe has (tokens): the numbers and words below are all short.
_OVERHEAD_SLACK = 16

_WORDS = ("harbor", "violin", "glacier", "pepper", "lantern", "meadow", "copper", "falcon", "orchid", "canyon",
          "marble", "walrus", "compass", "thimble", "pelican", "quartz", "saddle", "tulip", "anchor", "beetle",
          "cobalt", "dolphin", "ember", "fiddle", "garnet", "hammock", "igloo", "jasmine", "kettle", "lobster")
_NAMES = ("Professor Lind", "Doctor Okafor", "Agent Moreau", "Sister Ilse", "Mayor Quint", "Judge Harlow")


@dataclass
class Probe:
    kind: str  # "passkey" | "word"
    ids: list  # prompt ids followed by the answer's ids
    answer_start: int  # index in ids of the first answer token
    answer: str  # the fact's value ("48213", "violin")
    depth: float  # where the fact sits in the haystack (0: first, 1: last)

    @property
    def prompt(self) -> list:
        """The ids up to where the answer begins (what a generation is given)."""
        return self.ids[:self.answer_start]

    @property
    def answer_positions(self) -> list:
        """Positions whose next-token prediction is an answer token."""
        return list(range(self.answer_start - 1, len(self.ids) - 1))


def _fact(kind: str, rng: random.Random) -> tuple:
    """(intro, fact sentence, question, answer prefix, answer) of one probe."""
    if kind == "passkey":
        digits = rng.choice((5, 6))
        number = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        return ("The document below contains an access number. Keep it in mind: you will be asked for it.",
                f"The access number is {number}. Note it down: the access number is {number}.",
                "Which access number was given in the document? Reply with the number only.",
                "The access number is", number)
    name, word = rng.choice(_NAMES), rng.choice(_WORDS)
    return (f"Somewhere in the document below, {name} tells a secret word. You will be asked for it.",
            f"{name} said that the secret word is {word}. The secret word is {word}.",
            f"Which secret word did {name} tell?",
            "The secret word is", word)


def _sentence_ends(text: str) -> list:
    """Character offsets just after each sentence end (and 0 and len(text)): where a fact may go."""
    ends = [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+", text)]
    return ends + ([len(text)] if ends[-1] != len(text) else [])


def _encode(tokenizer, intro: str, haystack: str, question: str, prefix: str) -> list:
    message = f"{intro}\n\n{haystack.strip()}\n\n{question}"
    if getattr(tokenizer, "chat_template", None) is not None:
        from ..runtime.chat import chat_prompt
        return chat_prompt(tokenizer, message) + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{message}\n\n{prefix}", add_special_tokens=False)["input_ids"]


def make_probe(tokenizer, haystack_ids: Sequence[int], length: int, kind: str, rng: random.Random) -> Probe:
    """One probe of at most `length` tokens (answer included) over the text of `haystack_ids`."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"adaskip: probe kind must be one of {PROBE_KINDS}, got {kind!r}")
    intro, fact, question, prefix, answer = _fact(kind, rng)
    depth = rng.uniform(0.05, 0.95)
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(list(haystack_ids), skip_special_tokens=True)
    # Fit by dropping whole sentences from the end: the fact goes at the sentence end nearest
    # `depth` of what is kept, so it never lands inside a sentence.
    ends = _sentence_ends(text)
    fixed = len(_encode(tokenizer, intro, fact, question, prefix)) + len(answer_ids)
    if fixed + _OVERHEAD_SLACK > length:
        raise ValueError(f"adaskip: a {kind} probe needs more than {length} tokens for its question alone")
    keep = len(ends) - 1
    while keep >= 1:
        kept = text[:ends[keep]]
        cuts = [e for e in ends if e <= ends[keep]]
        at = min(cuts, key=lambda e: abs(e - depth * len(kept)))
        haystack = f"{kept[:at]}{'' if at == 0 or kept[at - 1].isspace() else ' '}{fact} {kept[at:]}"
        prompt = _encode(tokenizer, intro, haystack, question, prefix)
        if len(prompt) + len(answer_ids) <= length:
            return Probe(kind, prompt + answer_ids, len(prompt), answer, at / max(len(kept), 1))
        # Drop about as many sentences as the excess asks for (at least one).
        excess = len(prompt) + len(answer_ids) - length
        drop = max(1, int(excess / max(len(prompt), 1) * keep))
        keep -= drop
    raise ValueError(f"adaskip: the calibration text has no sentence end to build a {length}-token {kind} probe on")


def make_probes(tokenizer, windows: Sequence[Sequence[int]], count: int, *, length: int, seed: str,
                kinds: Sequence[str] = PROBE_KINDS) -> list:
    """`count` probes of at most `length` tokens, kinds in turn, each over the text of one of
    `windows` (token-id lists of calibration text, used in turn). `seed` names the draw (the search
    and the validation use different ones)."""
    if count < 1:
        raise ValueError(f"adaskip: the number of retrieval probes must be >= 1, got {count}")
    if not windows:
        raise ValueError("adaskip: retrieval probes need calibration text to hide their facts in")
    bad = [k for k in kinds if k not in PROBE_KINDS]
    if bad or not kinds:
        raise ValueError(f"adaskip: probe kinds must be among {PROBE_KINDS}, got {list(kinds)}")
    probes = []
    for i in range(count):
        rng = random.Random(f"adaskip-probe/{seed}/{i}")
        window = windows[i % len(windows)]
        probes.append(make_probe(tokenizer, window, length, kinds[i % len(kinds)], rng))
    return probes


def contains_answer(answer: str, text: str, *, number: bool) -> bool:
    """`answer` appears in a generated `text`: a number as the exact digits (not inside a longer
    number), a word as the whole word in any case. (The eval's retrieval tasks score the same way.)"""
    if number:
        return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", text) is not None
    return re.search(rf"\b{re.escape(answer)}\b", text, re.IGNORECASE) is not None


def answer_found(probe: Probe, text: str) -> bool:
    """The probe's answer appears in a generated `text` (contains_answer)."""
    return contains_answer(probe.answer, text, number=probe.kind == "passkey")
