"""`adaskip eval`: quality of skipping strategies at equal budgets (sublayer counts) or at equal
predicted speedups, on one model, with the full model measured alongside.

Tasks:
  ppl        long-document perplexity, top-1 next-token agreement with the full model and
             KL(full || plan) per token, over windows of held-out documents;
  passkey,   retrieval of a fact inserted into the essays at several context lengths and depths
  needle     (adaskip.retrieval), generated with each plan;
  generation greedy continuations of held-out prompts with the full model and each plan (with and
             without online learning), scored against the full model's own text
             (adaskip.evaluation.generation), the full model in another dtype first;
  longbench  LongBench-format jsonl datasets (adaskip.longbench), generated with each plan.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .quality import compare_with_full
from ..skipping.calibration import source_id
from ..runtime.stand_in import KINDS
from ..skipping.strategies import (PAPER_COMPARISON, STRATEGY_TABLE, plan, plan_at_speedup, plan_speedup, strategy_of,
                                   streaming_layers)

TASKS = ("ppl", "passkey", "needle", "generation", "speculative", "longbench")


@dataclass
class EvalSettings:
    strategies: Sequence[str] = PAPER_COMPARISON
    budgets: Sequence[int] = (4, 8, 12, 16)
    speedups: Sequence[float] = ()  # equal-time comparison: predicted speedups under `costs`
    # greedy-kl rows once per stand-in kind (default: the kind its search scored with)
    stand_ins: Sequence[str] = ()
    # plans chosen by tolerance: the fastest validated plan with at least this top-1 agreement,
    # and / or keeping at least this fraction of the full model's hits on the validation's
    # retrieval probes (every agreement x every retrieval fraction); validated plans with
    # streaming KV-head groups compete when the cost model prices them
    min_agreements: Sequence[float] = ()
    min_retrievals: Sequence[float] = ()
    # streaming KV-head groups (the profile's group scores, adaskip.skipping.head_groups): plans of
    # this many groups alone, and on top of each strategy's plans at `streaming_budgets`
    streaming_groups: Sequence[int] = ()
    streaming_budgets: Sequence[int] = ()
    tasks: Sequence[str] = ("ppl",)
    # ppl
    window_len: int = 2048
    max_windows: int = 4
    # passkey / needle
    retrieval_lengths: Sequence[int] = (1024, 2048, 4096)
    retrieval_depths: Sequence[float] = (0.1, 0.5, 0.9)
    retrieval_samples: int = 2
    retrieval_batch: int = 1  # prompts generated together (faster on CPU; 1 = one request at a time)
    seed: int = 0
    # generation
    generation_lengths: Sequence[int] = (1024, 2048)
    generation_prompts: int = 4  # per length
    generation_tokens: int = 64
    generation_instruction: str = "summarize"
    generation_floor_dtype: Optional[str] = "bfloat16"  # None: no dtype-floor row
    generation_batch: int = 1
    generation_online_betas: Sequence[float] = ()  # also run online plans at these (looser) betas
    # speculative (on the generation prompts): draft lengths k
    speculative_draft_tokens: Sequence[int] = (2, 4)
    speculative_online: bool = False  # also draft with online learning (plans that have it)
    speculative_cuda_graph: bool = False  # (GPU) plain steps and speculative rounds as graph replays
    # longbench
    longbench_dir: Optional[str] = None
    longbench_datasets: Sequence[str] = ("multifieldqa_en", "triviaqa", "trec", "gov_report", "multi_news")
    longbench_limit: Optional[int] = None
    notes: list = field(default_factory=list)

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"adaskip: unknown eval tasks {bad}; choose from {TASKS}")
        if any(b < 0 for b in self.budgets):
            raise ValueError(f"adaskip: budgets are numbers of sublayers >= 0, got {list(self.budgets)}")
        if any(s < 1 for s in self.speedups):
            raise ValueError(f"adaskip: target speedups must be >= 1, got {list(self.speedups)}")
        bad = [k for k in self.stand_ins if k not in KINDS]
        if bad:
            raise ValueError(f"adaskip: unknown stand-in kinds {bad}; choose from {KINDS}")
        if self.stand_ins and not any(s in STRATEGY_TABLE and STRATEGY_TABLE[s].fitted_stand_ins
                                      for s in self.strategies):
            raise ValueError("adaskip: stand-ins are compared on the greedy-kl strategy; add it to the strategies")
        if any(not 0.0 <= a <= 1.0 for a in self.min_agreements):
            raise ValueError(f"adaskip: minimum agreements must be in [0, 1], got {list(self.min_agreements)}")
        if any(not 0.0 <= r <= 1.0 for r in self.min_retrievals):
            raise ValueError(f"adaskip: minimum retrieval fractions must be in [0, 1], got {list(self.min_retrievals)}")
        self._check_streaming()
        if {"generation", "speculative"} & set(self.tasks):  # the speculative task uses the generation prompts
            from .generation import INSTRUCTIONS

            if self.generation_instruction not in INSTRUCTIONS:
                raise ValueError(f"adaskip: the generation instruction must be one of {tuple(INSTRUCTIONS)}, "
                                 f"got {self.generation_instruction!r}")
            if self.generation_prompts < 1 or self.generation_tokens < 1 or self.generation_batch < 1:
                raise ValueError("adaskip: generation prompts, tokens and batch must be >= 1")
            if any(not -1.0 <= b <= 1.0 for b in self.generation_online_betas):
                raise ValueError(f"adaskip: online betas are cosine similarities in [-1, 1], got "
                                 f"{list(self.generation_online_betas)}")
            if not self.generation_lengths or min(self.generation_lengths) < 1:
                raise ValueError(f"adaskip: generation lengths must be positive, got {list(self.generation_lengths)}")
            if self.generation_floor_dtype not in (None, "float32", "bfloat16", "float16"):
                raise ValueError(f"adaskip: the generation floor dtype must be float32, bfloat16 or float16, got "
                                 f"{self.generation_floor_dtype!r}")
        if "speculative" in self.tasks and (not self.speculative_draft_tokens
                                            or min(self.speculative_draft_tokens) < 1):
            raise ValueError(f"adaskip: draft lengths must be >= 1, got {list(self.speculative_draft_tokens)}")
        if "longbench" in self.tasks and not self.longbench_dir:
            raise ValueError("adaskip: the longbench task needs the folder of a LongBench copy (--longbench-dir)")


    def _check_streaming(self) -> None:
        groups, budgets = list(self.streaming_groups), list(self.streaming_budgets)
        if any(isinstance(n, bool) or int(n) != n or n < 1 for n in groups) or len(set(groups)) < len(groups):
            raise ValueError(f"adaskip: streaming group counts must be distinct integers >= 1, got {groups}")
        if budgets and not groups:
            raise ValueError("adaskip: streaming budgets put the streaming groups on those plans; give the group "
                             "counts too (streaming_groups / --streaming-groups)")
        missing = sorted(set(budgets) - set(self.budgets))
        if missing:
            raise ValueError(f"adaskip: streaming budgets {missing} are not among the budgets {list(self.budgets)}")

    def check_model(self, args) -> None:
        """Fails before any work (the calibration included) when a budget does not fit the model's
        layers or a length its context."""
        context = args.max_position_embeddings
        if "ppl" in self.tasks and self.window_len > context:
            raise ValueError(f"adaskip: ppl windows of {self.window_len} tokens exceed the model's context of "
                             f"{context} tokens")
        if {"passkey", "needle"} & set(self.tasks) and max(self.retrieval_lengths, default=0) > context:
            raise ValueError(f"adaskip: a retrieval length of {max(self.retrieval_lengths)} tokens exceeds the "
                             f"model's context of {context} tokens")
        if "speculative" in self.tasks:
            room = self.generation_tokens + max(self.speculative_draft_tokens) + 1
            if max(self.generation_lengths) + room > context:
                raise ValueError(f"adaskip: speculative prompts of {max(self.generation_lengths)} tokens plus {room} "
                                 f"positions exceed the model's context of {context} tokens")
        if "generation" in self.tasks and max(self.generation_lengths) + self.generation_tokens > context:
            raise ValueError(f"adaskip: generation prompts of {max(self.generation_lengths)} tokens plus "
                             f"{self.generation_tokens} new tokens exceed the model's context of {context} tokens")
        most = 2 * args.num_layers - 2  # all but one layer
        if any(b > most for b in self.budgets):
            raise ValueError(f"adaskip: budgets of {max(self.budgets)} sublayers exceed what a model of "
                             f"{args.num_layers} layers can skip ({most}: all but one layer)")
        groups = args.num_layers * args.num_kv_heads
        if any(n > groups for n in self.streaming_groups):
            raise ValueError(f"adaskip: {max(self.streaming_groups)} streaming groups asked for; the model has "
                             f"{groups} KV-head groups ({args.num_layers} layers x {args.num_kv_heads})")


def document_windows(texts: Sequence[str], tokenizer, window_len: int, max_windows: int) -> list:
    """Consecutive windows of `window_len` tokens over the concatenated documents (a window
    never straddles two documents' boundary without the separator the model would see)."""
    if window_len < 2:
        raise ValueError(f"adaskip: window_len must be >= 2, got {window_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + window_len] for i in range(0, len(ids) - window_len + 1, window_len)][:max_windows]
    if not windows:
        raise ValueError(f"adaskip: the evaluation documents have {len(ids)} tokens, fewer than one window "
                         f"of {window_len}")
    return windows


def build_plans(profile, num_layers: int, settings: EvalSettings, costs=None, model_args=None) -> list:
    """(row description, SkipPlan or None) for the full model and every strategy x budget (and
    x target speedup when `costs` are given, and x tolerance, and with streaming groups), then the
    streaming groups alone. Odd budgets are not offered to whole-layer strategies; a target a
    strategy cannot reach is noted and left out. With `costs` every plan is priced by them (a plan
    with streaming groups only by the cost model's roofline, with `model_args`)."""
    out = [({"strategy": "full", "budget": 0, "target_speedup": None}, None)]
    for s in settings.strategies:
        if s == "full":  # always the first row
            continue
        kinds = tuple(settings.stand_ins) or (None,) if strategy_of(s).fitted_stand_ins else (None,)
        for kind in kinds:
            out += _budget_plans(profile, num_layers, settings, costs, model_args, s, kind)
        out += _tolerance_plans(profile, settings, costs, model_args, s)
    for n in settings.streaming_groups:
        p = plan(profile, strategy="full", num_sublayers=0, streaming_groups=n)
        p.predicted_speedup = plan_speedup(p, profile, costs, model_args)
        out.append(({"strategy": "groups", "budget": 0, "target_speedup": None, "streaming_groups": n}, p))
    return out


def _budget_plans(profile, num_layers, settings: EvalSettings, costs, model_args, s: str, kind) -> list:
    """A strategy's rows at each budget (with the streaming groups where asked) and target speedup."""
    name = s if kind is None else f"{s}/{kind}"
    out = []
    for k in settings.budgets:
        if k % 2 and not strategy_of(s).sublayers:
            settings.notes.append(f"{s} skips whole layers: budget {k} (odd) left out")
            continue
        for n in (0, *settings.streaming_groups) if k in settings.streaming_budgets else (0,):
            p = plan(profile, num_layers=num_layers, strategy=s, num_sublayers=k, stand_in=kind, streaming_groups=n)
            if costs is not None:
                p.predicted_speedup = plan_speedup(p, profile, costs, model_args)
            out.append(({"strategy": name, "budget": k, "target_speedup": None, **({"streaming_groups": n} if n else {})},
                        p))
    for target in settings.speedups:
        if costs is None:
            raise ValueError("adaskip: equal-speedup plans need a cost model (costs=)")
        try:
            p = plan_at_speedup(profile, s, target, costs, num_layers=num_layers, stand_in=kind)
        except ValueError as e:
            settings.notes.append(str(e))
            continue
        out.append(({"strategy": name, "budget": len(p.skip_scales), "target_speedup": target}, p))
    return out


def _tolerance_plans(profile, settings: EvalSettings, costs, model_args, s: str) -> list:
    """A strategy's rows chosen by tolerance: every minimum agreement x every retrieval fraction."""
    agreements, retrievals = tuple(settings.min_agreements) or (None,), tuple(settings.min_retrievals) or (None,)
    tolerances = [(a, r) for a in agreements for r in retrievals if (a, r) != (None, None)]
    if tolerances and (profile is None or s not in profile.validation):
        settings.notes.append(f"{s}: no validation in the profile, so no plan by tolerance")
        return []
    out = []
    for a, r in tolerances:
        p = plan(profile, strategy=s, min_agreement=a, min_retrieval=r, costs=costs, model_args=model_args)
        desc = {"strategy": s, "budget": len(p.skip_scales), "target_speedup": None}
        desc.update({k: v for k, v in (("min_agreement", a), ("min_retrieval", r)) if v is not None})
        out.append((desc, p))
    return out


def _key(desc: dict) -> str:
    if desc["strategy"] == "full":
        return "full"
    if desc["target_speedup"] is not None:
        return f"{desc['strategy']}@x{desc['target_speedup']:g}"
    if desc.get("min_agreement") is not None or desc.get("min_retrieval") is not None:
        wanted = [f"{n}>={desc[k]:g}" for n, k in (("agreement", "min_agreement"), ("retrieval", "min_retrieval"))
                  if desc.get(k) is not None]
        return f"{desc['strategy']}@{','.join(wanted)}"
    groups = f"+{desc['streaming_groups']}g" if desc.get("streaming_groups") else ""
    return f"{desc['strategy']}@{desc['budget']}{groups}"


def run_eval(model, tokenizer, profile, settings: EvalSettings, *, documents: Sequence[str] = (),
             costs=None, progress: bool = True) -> dict:
    """Every task for every plan. Returns {"rows": [...], "timings_s": {...}, "notes": [...]};
    each row has strategy, budget, target_speedup, predicted_speedup, the skipped attention /
    FFN counts, the skipped sublayers and a metrics dict. The generation task adds
    "generation": its own rows (a plan with online learning twice: learning on and off; see
    adaskip.evaluation.generation.evaluate_generation)."""
    settings.check_model(model.args)
    plans = build_plans(profile, model.args.num_layers, settings, costs, model.args)
    named = {_key(d): p for d, p in plans}
    metrics = {k: {} for k in named}
    details: dict = {}
    timings = {}
    if "ppl" in settings.tasks:
        timings["ppl"] = _ppl_task(model, tokenizer, settings, documents, named, metrics, progress)
    for kind in ("passkey", "needle"):
        if kind in settings.tasks:
            timings[kind] = _retrieval_task(kind, model, tokenizer, settings, named, metrics, details, progress)
    extra = {}
    if "generation" in settings.tasks:
        extra["generation"], timings["generation"] = _generation_task(model, tokenizer, profile, settings, documents,
                                                                      named, progress)
    if "speculative" in settings.tasks:
        extra["speculative"], timings["speculative"] = _speculative_task(model, tokenizer, profile, settings,
                                                                         documents, named, progress)
    if "longbench" in settings.tasks:
        timings["longbench"] = _longbench_task(model, tokenizer, settings, named, metrics, progress)
    extra = {k: v for k, v in extra.items() if v is not None}
    return {"rows": _rows(plans, metrics, details), "timings_s": timings, "notes": list(settings.notes), **extra}


def _ppl_task(model, tokenizer, settings: EvalSettings, documents, named: dict, metrics: dict,
              progress: bool) -> float:
    """Perplexity and agreement with the full model on document windows, into `metrics`; its seconds."""
    if not documents:
        raise ValueError("adaskip: the ppl task needs documents")
    start = time.perf_counter()
    windows = document_windows(documents, tokenizer, settings.window_len, settings.max_windows)
    res = compare_with_full(model, windows, {k: p for k, p in named.items() if p is not None}, progress=progress)
    for k, v in res.items():
        metrics[k].update(v)
    seconds = time.perf_counter() - start
    settings.notes.append(f"ppl: {len(windows)} windows x {settings.window_len} tokens")
    return seconds


def _retrieval_task(kind: str, model, tokenizer, settings: EvalSettings, named: dict, metrics: dict, details: dict,
                    progress: bool) -> float:
    """The passkey or needle task's accuracy into `metrics`, its cells into `details`; its seconds."""
    from .retrieval import evaluate_retrieval, make_tasks

    start = time.perf_counter()
    tasks = make_tasks(tokenizer, kind, settings.retrieval_lengths, settings.retrieval_depths,
                       samples_per_cell=settings.retrieval_samples, seed=settings.seed,
                       max_context=model.args.max_position_embeddings)
    res = evaluate_retrieval(model, tokenizer, tasks, named, progress=progress, batch_size=settings.retrieval_batch)
    for k, v in res.items():
        metrics[k][f"{kind}_accuracy"] = v["accuracy"]
        details.setdefault(k, {})[kind] = {"by_cell": v["by_cell"], "by_length": v["by_length"],
                                           "correct": v["correct"], "total": v["total"]}
    return time.perf_counter() - start


def _generation_task(model, tokenizer, profile, settings: EvalSettings, documents, named: dict,
                     progress: bool) -> tuple:
    """(the generation task's rows, its seconds)."""
    import torch

    from .generation import evaluate_generation

    start = time.perf_counter()
    prompts = _generation_prompts("generation", tokenizer, documents, settings)
    floor = getattr(torch, settings.generation_floor_dtype) if settings.generation_floor_dtype else None
    generation = evaluate_generation(model, tokenizer, prompts, {k: p for k, p in named.items() if p is not None},
                                     max_new_tokens=settings.generation_tokens, floor_dtype=floor,
                                     batch_size=settings.generation_batch, profile=profile, progress=progress,
                                     online_betas=settings.generation_online_betas)
    return generation, time.perf_counter() - start


def _speculative_task(model, tokenizer, profile, settings: EvalSettings, documents, named: dict,
                      progress: bool) -> tuple:
    """(the speculative task's rows, its seconds)."""
    from .speculative import evaluate_speculative

    start = time.perf_counter()
    prompts = _generation_prompts("speculative", tokenizer, documents, settings)
    speculative = evaluate_speculative(model, prompts, named, draft_tokens=settings.speculative_draft_tokens,
                                       max_new_tokens=settings.generation_tokens, profile=profile,
                                       progress=progress, online=settings.speculative_online,
                                       cuda_graph=settings.speculative_cuda_graph)
    return speculative, time.perf_counter() - start


def _longbench_task(model, tokenizer, settings: EvalSettings, named: dict, metrics: dict, progress: bool) -> float:
    """LongBench scores per dataset into `metrics`; its seconds."""
    from .longbench import evaluate_longbench

    start = time.perf_counter()
    res = evaluate_longbench(model, tokenizer, settings.longbench_dir, list(settings.longbench_datasets) or None,
                             named, limit=settings.longbench_limit, progress=progress)
    for k, per_dataset in res.items():
        for name, value in per_dataset.items():
            metrics[k][f"longbench/{name}"] = value
    return time.perf_counter() - start


def _rows(plans: list, metrics: dict, details: dict) -> list:
    """A row per plan: its description, what it skips, its metrics (and task details)."""
    rows = []
    for desc, p in plans:
        row = dict(desc)
        if p is None:
            row.update(predicted_speedup=1.0, skipped_attention=0, skipped_ffn=0, skipped=[])
        else:
            row.update(predicted_speedup=p.predicted_speedup, skipped_attention=len(p.skipped_attention_layers),
                       skipped_ffn=len(p.skipped_ffn_layers), skipped=sorted(p.skip_scales), stand_in=p.stand_in)
            if p.streaming:  # a tolerance may have chosen groups too: the row says what the plan holds
                row.update(streaming_groups=sum(len(g) for g in p.streaming.values()),
                           streaming=streaming_layers(p), streaming_sink=p.streaming_sink,
                           streaming_window=p.streaming_window)
        row["metrics"] = metrics[_key(desc)]
        if _key(desc) in details:
            row["details"] = details[_key(desc)]
        rows.append(row)
    return rows


def _generation_prompts(task: str, tokenizer, documents, settings: EvalSettings) -> list:
    """The generation and speculative tasks' prompts: seeded windows of the documents."""
    from .generation import make_prompts

    if not documents:
        raise ValueError(f"adaskip: the {task} task needs documents")
    return make_prompts(tokenizer, documents, settings.generation_lengths, settings.generation_prompts,
                        settings.generation_instruction, seed=settings.seed)


def held_out(documents: Sequence[Union[str, os.PathLike]], profile) -> list:
    """The documents a profile's calibration did not read: files (pathlib.Path) whose name, and
    texts (str) whose content id, is not among the profile's sources (calibration.source_id)."""
    used = set(getattr(profile, "sources", []) or [])
    return [d for d in documents if source_id(d) not in used]
