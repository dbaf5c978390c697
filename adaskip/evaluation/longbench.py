"""LongBench-format evaluation: data loading, prompts, generation and the standard metrics.

LongBench (Bai et al., 2023) stores each dataset as jsonl records with `context`, `input`,
`answers`, `all_classes` and `length`; a prediction is scored against every answer with the
dataset's metric and the best score counts. This module reads that format, builds prompts the
way LongBench's prediction script does (dataset template, chat template for instruction tasks,
middle truncation of over-long prompts), generates greedily with the adaskip runtime under each
skip plan, and scores with token F1, Rouge-L or classification accuracy.

No copy of LongBench ships here. The built-in prompt templates are written for this project with
the same structure as LongBench's (instruction, context, question and answer cue) but not its
wording; the generation lengths and metrics are LongBench's. For the exact official prompts,
point `load_config` (or `evaluate_longbench`) at a LongBench checkout: its
`config/dataset2prompt.json` and `config/dataset2maxlen.json` then replace the built-in ones.
"""
from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..runtime.chat import chat_prompt
from ..runtime.generation import generate

PathLike = Union[str, Path]
METRIC_NAMES = ("qa_f1", "rouge", "classification")


# -- datasets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """How one LongBench dataset is prompted and scored.

    few_shot: the context holds worked examples and the prompt is continued as plain text (no
      chat template); the model's answer is its first line, as in LongBench, since a base-style
      continuation tends to run on into a made-up next example.
    template: a str.format template filled with the record's fields ({context}, {input}).
    """

    name: str
    metric: str
    max_new_tokens: int
    few_shot: bool
    template: str

    def __post_init__(self):
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"adaskip: dataset {self.name!r} has unknown metric {self.metric!r}; "
                             f"choose from {METRIC_NAMES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"adaskip: dataset {self.name!r} needs max_new_tokens >= 1, got {self.max_new_tokens}")


_SHORT = "Give the answer alone, with no other words."
_MULTI_DOC = ("Reply to the question using the passages below. " + _SHORT + "\n\nPassages:\n{context}\n\n"
              "Using the passages above, reply to the question. " + _SHORT + "\n\nQuestion: {input}\nAnswer:")

_TEMPLATES = {
    "narrativeqa": ("Read the story below (a novel or a screenplay) and then reply to the question that follows "
                    "it. Keep the reply to a short phrase; no explanation.\n\nStory:\n{context}\n\n"
                    "Reply to this question about the story with a short phrase only.\n\n"
                    "Question: {input}\n\nAnswer:"),
    "qasper": ("Below is a scientific article and a question about it. Reply with a single phrase or sentence "
               "where possible. Write \"unanswerable\" if the article does not hold the answer; for a yes/no "
               "question write \"yes\", \"no\" or \"unanswerable\". Do not explain.\n\nArticle:\n{context}\n\n"
               "Using the article, reply to the question below in the same way: a short phrase or sentence, or "
               "\"yes\", \"no\" or \"unanswerable\". No explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": ("Read the text below and then reply briefly.\n\n{context}\n\n"
                        "Using only the text above, reply to the question below. " + _SHORT +
                        "\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": _MULTI_DOC,
    "2wikimqa": _MULTI_DOC,
    "musique": _MULTI_DOC,
    "gov_report": ("Below is a report from a government agency. Summarise it in a single passage.\n\n"
                   "Report:\n{context}\n\nNow write a one-passage summary of the report.\n\nSummary:"),
    "qmsum": ("Below is a transcript of a meeting, followed by a query about it. Reply to the query in a few "
              "sentences.\n\nTranscript:\n{context}\n\nNow reply to the query about the transcript in a few "
              "sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("Below are several news articles about the same event. Summarise them together in one "
                   "passage.\n\nArticles:\n{context}\n\nNow write one passage that summarises all of the "
                   "articles.\n\nSummary:"),
    "trec": ("Decide which type of question the last one is. Examples of questions with their types come "
             "first.\n\n{context}\n{input}"),
    "triviaqa": ("Reply to the question using its passage. " + _SHORT + " Worked examples come first.\n\n"
                 "{context}\n\n{input}"),
    "samsum": "Summarise the dialogue in the same way as the examples below.\n\n{context}\n\n{input}",
}

# name: (metric, max new tokens, few-shot); metrics and lengths are LongBench's.
_FACTS = {
    "narrativeqa": ("qa_f1", 128, False),
    "qasper": ("qa_f1", 128, False),
    "multifieldqa_en": ("qa_f1", 64, False),
    "hotpotqa": ("qa_f1", 32, False),
    "2wikimqa": ("qa_f1", 32, False),
    "musique": ("qa_f1", 32, False),
    "gov_report": ("rouge", 512, False),
    "qmsum": ("rouge", 512, False),
    "multi_news": ("rouge", 512, False),
    "trec": ("classification", 64, True),
    "triviaqa": ("qa_f1", 32, True),
    "samsum": ("rouge", 128, True),
}

DATASETS: dict[str, DatasetSpec] = {
    name: DatasetSpec(name, metric, max_new, few_shot, _TEMPLATES[name])
    for name, (metric, max_new, few_shot) in _FACTS.items()
}


_CONFIG_FILES = ("dataset2prompt.json", "dataset2maxlen.json")


def _config_dir(root: Path) -> Optional[Path]:
    """Where a LongBench checkout keeps its config: config/ (LongBench v1 repositories),
    LongBench/config/ (the v1 folder of the current repository) or the folder itself."""
    for d in (root / "config", root / "LongBench" / "config", root):
        if any((d / f).is_file() for f in _CONFIG_FILES):
            return d
    return None


def load_config(path: PathLike) -> dict[str, DatasetSpec]:
    """DATASETS with the official prompts and generation lengths of a LongBench checkout.

    `path` is the checkout (holding config/ or LongBench/config/) or the config directory
    itself. Whichever of dataset2prompt.json and dataset2maxlen.json is there overrides the
    built-in template or length of every dataset it names; the rest keep the built-in values.
    Datasets that only the official config names are ignored: their metric is not implemented
    here.
    """
    root = Path(path)
    cfg_dir = _config_dir(root)
    if cfg_dir is None:
        raise FileNotFoundError(f"adaskip: no {' or '.join(_CONFIG_FILES)} in {root / 'config'}, "
                                f"{root / 'LongBench' / 'config'} or {root}")
    prompts, maxlens = cfg_dir / _CONFIG_FILES[0], cfg_dir / _CONFIG_FILES[1]
    specs = dict(DATASETS)
    if prompts.is_file():
        for name, template in _read_json_map(prompts, str, "a string").items():
            if name in specs:
                specs[name] = replace(specs[name], template=template)
    if maxlens.is_file():
        for name, n in _read_json_map(maxlens, int, "an integer").items():
            if name in specs:
                specs[name] = replace(specs[name], max_new_tokens=n)
    return specs


def _read_json_map(path: Path, kind: type, want: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"adaskip: {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"adaskip: {path} must hold a JSON object of dataset name -> {want}")
    for name, value in data.items():
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"adaskip: {path}: the value for {name!r} must be {want}, "
                             f"got {type(value).__name__}")
    return data


def _spec(dataset: str, specs: Optional[Mapping[str, DatasetSpec]]) -> DatasetSpec:
    specs = DATASETS if specs is None else specs
    if dataset not in specs:
        raise ValueError(f"adaskip: unknown LongBench dataset {dataset!r}; known: {', '.join(sorted(specs))}")
    return specs[dataset]


# -- data ---------------------------------------------------------------------------------------

@dataclass
class Example:
    """One LongBench record (the fields scoring and prompting need)."""

    context: str
    input: str
    answers: list
    all_classes: Optional[list]
    length: int
    extra: Optional[dict] = None  # any other fields of the record (_id, language, dataset, ...)

    def fields(self) -> dict:
        """Every field of the record, for filling a template."""
        return {**(self.extra or {}), "context": self.context, "input": self.input, "answers": self.answers,
                "all_classes": self.all_classes, "length": self.length}


# field -> (accepted types, how to say it)
_FIELDS = {"context": (str, "a string"), "input": (str, "a string"), "answers": (list, "a list"),
           "all_classes": ((list, type(None)), "a list or null"), "length": (int, "an integer")}


def load_jsonl(path: PathLike, limit: Optional[int] = None) -> list[Example]:
    """Reads LongBench records from a jsonl file (blank lines skipped), checking each field's
    type so that a malformed file fails at load time with its file and line, not mid-run."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"adaskip: limit must be >= 0, got {limit}")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"adaskip: {where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"adaskip: {where}: a record must be a JSON object, got {type(rec).__name__}")
            examples.append(_example(rec, where))
    return examples


def _example(rec: dict, where: str) -> Example:
    for name, (kind, want) in _FIELDS.items():
        if name not in rec:
            raise ValueError(f"adaskip: {where}: missing field {name!r}")
        if not isinstance(rec[name], kind) or isinstance(rec[name], bool):
            raise ValueError(f"adaskip: {where}: field {name!r} must be {want}, got {type(rec[name]).__name__}")
    for name in ("answers", "all_classes"):
        if rec[name] is not None and not all(isinstance(a, str) for a in rec[name]):
            raise ValueError(f"adaskip: {where}: field {name!r} must hold strings only")
    if not rec["answers"]:
        raise ValueError(f"adaskip: {where}: field 'answers' is empty; nothing to score against")
    extra = {k: v for k, v in rec.items() if k not in _FIELDS}
    return Example(rec["context"], rec["input"], rec["answers"], rec["all_classes"], rec["length"], extra or None)


def dataset_path(data_dir: PathLike, dataset: str) -> Path:
    """{data_dir}/data/{dataset}.jsonl (the layout of LongBench's data archive) or
    {data_dir}/{dataset}.jsonl, whichever exists first."""
    candidates = _candidates(data_dir, dataset)
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(f"adaskip: no data for LongBench dataset {dataset!r}; looked for "
                            + " and ".join(str(p) for p in candidates))


def _candidates(data_dir: PathLike, dataset: str) -> list[Path]:
    root = Path(data_dir)
    return [root / "data" / f"{dataset}.jsonl", root / f"{dataset}.jsonl"]


def load_dataset(data_dir: PathLike, dataset: str, limit: Optional[int] = None) -> list[Example]:
    return load_jsonl(dataset_path(data_dir, dataset), limit)


# -- prompts ------------------------------------------------------------------------------------

def fill_template(example: Example, dataset: str, specs: Optional[Mapping[str, DatasetSpec]] = None) -> str:
    """The dataset's template filled with the record's fields (str.format, as LongBench does)."""
    spec = _spec(dataset, specs)
    try:
        return spec.template.format(**example.fields())
    except (KeyError, IndexError) as e:
        raise ValueError(f"adaskip: the prompt template of {dataset!r} has a placeholder {e} that LongBench "
                         "records do not have") from None


def truncate_middle(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keeps the first max_tokens // 2 and the last (max_tokens - max_tokens // 2) tokens.

    LongBench cuts long prompts in the middle because the instruction sits at the start and the
    question at the end; losing part of the context costs less than losing either."""
    if max_tokens < 1:
        raise ValueError(f"adaskip: the prompt budget must be >= 1 token, got {max_tokens}")
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head):]


def build_prompt_ids(example: Example, dataset: str, tokenizer, max_prompt_tokens: int,
                     specs: Optional[Mapping[str, DatasetSpec]] = None) -> list[int]:
    """Token ids of the prompt for one record, at most max_prompt_tokens long.

    Instruction datasets go through the tokenizer's chat template when it has one (as LongBench
    does for chat models); few-shot datasets are plain text continued by the model. Over-long
    prompts lose their middle. Unlike LongBench, which cuts the raw text's tokens, decodes them
    and then applies the chat template, the cut is made on the final token list: the chat
    markers at both ends survive and the prompt is guaranteed to fit the budget exactly.
    specs: dataset specs (default DATASETS; pass load_config(...) for the official prompts).
    """
    return truncate_middle(_full_prompt_ids(example, dataset, tokenizer, specs), max_prompt_tokens)


def _full_prompt_ids(example: Example, dataset: str, tokenizer, specs) -> list[int]:
    spec = _spec(dataset, specs)
    text = fill_template(example, dataset, specs)
    if not spec.few_shot and getattr(tokenizer, "chat_template", None) is not None:
        return chat_prompt(tokenizer, text)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


# -- metrics ------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def qa_f1(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Token-level F1 between the normalised prediction and answer (bag of words)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Rouge-L F from the `rouge` package, which LongBench uses (summary-level LCS over
    sentences split at '.', distinct words, case-sensitive), so that scores are comparable.
    An empty prediction scores 0 (the package refuses it)."""
    from rouge import Rouge

    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    # The package finds the LCS recursively: a long sentence without a '.' can need a deeper stack.
    limit = sys.getrecursionlimit()
    needed = 2 * (len(prediction.split()) + len(ground_truth.split())) + 1000
    try:
        if needed > limit:
            sys.setrecursionlimit(needed)
        return float(Rouge(metrics=["rouge-l"]).get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except ValueError:  # nothing left after sentence splitting (e.g. a prediction of only '.')
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


def classification(prediction: str, ground_truth: str, all_classes) -> float:
    """LongBench's classification score: the classes named in the prediction (as substrings)
    are the matches; a match that is part of the ground truth but not the ground truth itself
    is dropped (naming "Color scheme" also names "Color"). 1/len(matches) if the ground truth is
    among them, else 0. (LongBench removes items from the list it is iterating, which can skip a
    second such sub-match; here every one is dropped.)"""
    if all_classes is None:
        raise ValueError("adaskip: classification needs the record's all_classes, which is null")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


METRICS = {"qa_f1": qa_f1, "rouge": rouge_l, "classification": classification}


def first_line(prediction: str) -> str:
    """The first line after any leading newlines, as LongBench scores few-shot datasets."""
    return prediction.lstrip("\n").split("\n")[0]


def score_example(dataset: str, prediction: str, example: Example,
                  specs: Optional[Mapping[str, DatasetSpec]] = None) -> float:
    """The best score of the prediction over the record's answers, in [0, 1]."""
    spec = _spec(dataset, specs)
    if spec.few_shot:
        prediction = first_line(prediction)
    metric = METRICS[spec.metric]
    return max(metric(prediction, answer, all_classes=example.all_classes) for answer in example.answers)


def score_dataset(dataset: str, predictions: Sequence[str], examples: Sequence[Example],
                  specs: Optional[Mapping[str, DatasetSpec]] = None) -> float:
    """Mean example score x 100 (LongBench's scale)."""
    if len(predictions) != len(examples):
        raise ValueError(f"adaskip: {len(predictions)} predictions for {len(examples)} examples of {dataset!r}")
    if not examples:
        raise ValueError(f"adaskip: no examples of {dataset!r} to score")
    return 100.0 * sum(score_example(dataset, p, e, specs) for p, e in zip(predictions, examples)) / len(examples)


# -- evaluation ---------------------------------------------------------------------------------

@dataclass
class ExampleResult:
    """One generation, for writing out predictions next to the scores."""

    plan: str
    dataset: str
    index: int
    prediction: str
    answers: list
    score: float  # in [0, 1]
    prompt_tokens: int
    truncated: bool  # the prompt lost its middle to fit the budget
    id: Optional[str] = None  # the record's _id, when it has one


def evaluate_longbench(model, tokenizer, data_dir: PathLike, datasets: Optional[Sequence[str]],
                       plans: Mapping[str, object], limit: Optional[int] = None,
                       max_prompt_tokens: Optional[int] = None, progress: bool = True,
                       specs: Optional[Mapping[str, DatasetSpec]] = None,
                       records: Optional[list] = None) -> dict:
    """Scores each plan on each dataset: {plan_name: {dataset: score in [0, 100]}}.

    plans: name -> SkipPlan, or None for the full model (e.g. {"full": None, "adaskip": plan}).
    datasets: names to run; None runs every known dataset that has a file in data_dir.
    max_prompt_tokens: prompt budget; default the model's context minus the dataset's max new
      tokens (LongBench sets it per model; a prompt over it loses its middle).
    specs: prompts and lengths; default load_config(data_dir) when data_dir holds LongBench's
      config files (a checkout), else the built-in DATASETS.
    records: a list to append one ExampleResult per generation to.
    Generation is greedy, one prompt at a time, stopping at the model's EOS tokens. Prompts are
    built once per dataset and shared by all plans.
    """
    from tqdm.auto import tqdm

    if not plans:
        raise ValueError("adaskip: no plans to evaluate; pass e.g. {'full': None}")
    data_dir = Path(data_dir)
    if specs is None:
        specs = load_config(data_dir) if _config_dir(data_dir) is not None else DATASETS
    if datasets is None:
        datasets = [d for d in specs if any(p.is_file() for p in _candidates(data_dir, d))]
        if not datasets:
            raise FileNotFoundError(f"adaskip: no LongBench dataset files (name.jsonl) in {data_dir} or "
                                    f"{data_dir / 'data'}; known datasets: {', '.join(sorted(specs))}")
    context = model.args.max_position_embeddings
    budgets = {}
    for name in datasets:
        spec = _spec(name, specs)
        budget = context - spec.max_new_tokens if max_prompt_tokens is None else max_prompt_tokens
        if budget < 1 or budget + spec.max_new_tokens > context:
            raise ValueError(f"adaskip: {name!r} generates up to {spec.max_new_tokens} tokens; with a prompt "
                             f"budget of {budget} tokens that does not fit the model's context of {context} tokens")
        budgets[name] = budget

    # Every file is read and checked before the first (slow) generation.
    data = {name: load_dataset(data_dir, name, limit) for name in datasets}
    for name, examples in data.items():
        if not examples:
            raise ValueError(f"adaskip: {dataset_path(data_dir, name)} holds no records")

    scores = {plan_name: {} for plan_name in plans}
    for name, examples in data.items():
        spec = specs[name]
        prompts, truncated = [], []
        for ex in examples:
            full = _full_prompt_ids(ex, name, tokenizer, specs)
            prompts.append(truncate_middle(full, budgets[name]))
            truncated.append(len(full) > budgets[name])
        for plan_name, plan in plans.items():
            total = 0.0
            for i, (ex, ids) in enumerate(tqdm(list(zip(examples, prompts)), desc=f"{plan_name} {name}",
                                               disable=not progress)):
                out = generate(model, [ids], max_new_tokens=spec.max_new_tokens, plan=plan)
                prediction = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
                s = score_example(name, prediction, ex, specs)
                total += s
                if records is not None:
                    records.append(ExampleResult(plan_name, name, i, prediction, list(ex.answers), s,
                                                 len(ids), truncated[i], (ex.extra or {}).get("_id")))
            scores[plan_name][name] = 100.0 * total / len(examples)
    return scores
