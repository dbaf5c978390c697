"""LongBench-format evaluation: loader, prompts, metrics (hand-checked values) and an end-to-end
run on a tiny random model. The fixtures under fixtures/longbench were written for these tests."""
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("rouge")

from adaskip import SkipPlan  # noqa: E402
from adaskip.evaluation import longbench as lb  # noqa: E402
from helpers import tiny_llama  # noqa: E402
from adaskip.runtime.generation import GenerationResult  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
CHECKOUT = FIXTURES / "checkout"
SPECIALS = ["[UNK]", "<s>", "</s>", "<user>", "<assistant>"]


# -- a tiny word-level tokenizer over the fixture words -------------------------------------------

def _words(text):
    return [w for w, _ in tokenizers.pre_tokenizers.Whitespace().pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def tok():
    texts = [spec.template for spec in lb.DATASETS.values()] + ["OFFICIAL {context} || {input}"]
    for path in sorted((FIXTURES / "data").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["context"], rec["input"], *rec["answers"]]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for text in texts:
        for w in _words(text):
            vocab.setdefault(w, len(vocab))
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>", additional_special_tokens=["<user>", "<assistant>"])


@pytest.fixture
def chat_tok(tok):
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, unk_token="[UNK]",
                                             bos_token="<s>", eos_token="</s>",
                                             additional_special_tokens=["<user>", "<assistant>"])
    t.chat_template = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}<assistant>"
    return t


def _tiny_model(vocab_size, context=160, eos=2):
    return tiny_llama(vocab_size, context=context, eos=eos)


# -- metrics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("The  Cat's   hat!", "cats hat"),          # lower, punctuation gone (apostrophe too), spaces collapsed
    ("an apple a day", "apple day"),            # articles dropped
    ("Theatre and Anatomy", "theatre and anatomy"),  # only whole-word articles
    ("A.B.C.", "abc"),                          # punctuation removed before the article rule
    ("  \n\t ", ""),
])
def test_normalize_answer(raw, expected):
    assert lb.normalize_answer(raw) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    # "eiffel tower in paris" (4 tokens) vs "paris": 1 shared; P = 1/4, R = 1, F1 = 2PR/(P+R) = 0.4
    ("the Eiffel Tower in Paris", "Paris", 0.4),
    # "barack obama" vs "obama barack h": 2 shared; P = 1, R = 2/3, F1 = (4/3)/(5/3) = 0.8
    ("Barack Obama", "Obama, Barack H.", 0.8),
    # bag of words: pred {new: 2, york: 1} & gold {new: 1, york: 1} = 2 shared; P = 2/3, R = 1 -> 0.8
    ("new new york", "New York", 0.8),
    ("The Paris!", "paris", 1.0),  # article, case and punctuation do not count
    ("London", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("the", "a", 0.0),  # both normalise to nothing: no overlap, 0
])
def test_qa_f1(pred, gold, expected):
    assert lb.qa_f1(pred, gold) == pytest.approx(expected)


@pytest.mark.parametrize("pred, gold, expected", [
    # One sentence each, no repeated words. LCS = "two men on friday" (4): P = 4/6, R = 4/8,
    # F = 2PR/(P+R) = (2/3)/(7/6) = 4/7.
    ("police arrested two men on friday", "two men were arrested by police on friday", 4 / 7),
    # The rouge package counts distinct words: LCS "the cat on the mat" is the set {the, cat, on,
    # mat} = 4 of 5 distinct words on each side, F = 0.8 (a per-token LCS would give 5/6).
    ("the cat sat on the mat", "the cat lay on the mat", 0.8),
    # Summary level: sentences split at '.', each reference sentence takes the union of its LCS
    # with every predicted sentence: {dogs, bark} + {cats, purr} = 4; P = 4/4, R = 4/6, F = 0.8.
    ("cats purr. dogs bark", "dogs bark loudly. cats purr softly", 0.8),
    ("storm closes road", "storm closes road", 1.0),
    ("Paris", "paris", 0.0),  # case-sensitive, as in LongBench
    ("", "a summary", 0.0),
    ("   \n", "a summary", 0.0),
    ("...", "a summary", 0.0),  # nothing left after the sentence split: the package raises, we score 0
])
def test_rouge_l(pred, gold, expected):
    assert lb.rouge_l(pred, gold) == pytest.approx(expected, abs=1e-6)


def test_rouge_l_survives_a_long_sentence_without_full_stops():
    # The package's LCS backtracking recurses once per step: ~1800 deep here, past Python's default.
    words = [f"w{i}" for i in range(600)]
    padded = [t for w in words for t in (w, "x")]
    # LCS = the 600 words; distinct words: 600 predicted, 601 in the reference -> P = 1,
    # R = 600/601, F = 2R/(1 + R) = 1200/1201.
    assert lb.rouge_l(" ".join(words), " ".join(padded)) == pytest.approx(1200 / 1201, abs=1e-6)


CLASSES = ["Location", "Other location", "Number", "Number of days", "Color", "Color scheme", "scheme", "Animal"]


@pytest.mark.parametrize("pred, gold, expected", [
    ("Color scheme", "Color scheme", 1.0),  # "Color" is part of the gold label: dropped
    ("Color scheme", "Color", 1 / 3),       # matches {Color, Color scheme, scheme}: none is part of "Color"
    ("Animal or Color", "Color", 0.5),
    ("Type: Color", "Color", 1.0),
    ("Animal", "Color", 0.0),
    ("Vehicle", "Color", 0.0),              # no class named
    ("", "Color", 0.0),
    ("Other location", "Other location", 1.0),  # case-sensitive: "Location" is not in it
    ("Location", "Other location", 0.0),
    ("Number of days", "Number", 0.5),
    # "Color" and "scheme" are both parts of the gold label: both dropped (LongBench's in-place
    # list removal would skip the second and score 0.5).
    ("the Color scheme", "Color scheme", 1.0),
])
def test_classification(pred, gold, expected):
    assert lb.classification(pred, gold, CLASSES) == pytest.approx(expected)


def test_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification("Color", "Color", None)


# -- data ---------------------------------------------------------------------------------------

def test_fixture_datasets_load():
    for name in ("multifieldqa_en", "triviaqa", "trec", "gov_report", "multi_news"):
        examples = lb.load_dataset(FIXTURES, name)
        assert len(examples) >= 2 and all(e.answers and e.length > 0 for e in examples)
    trec = lb.load_dataset(FIXTURES, "trec", limit=2)
    assert len(trec) == 2 and "Other location" in trec[0].all_classes and trec[0].extra["_id"] == "trec-1"
    assert lb.load_dataset(FIXTURES, "triviaqa")[0].all_classes is None


def _write(tmp_path, lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"context": "c", "input": "q", "answers": ["a"], "all_classes": None, "length": 1})


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:3: not valid JSON"),
    (json.dumps({"context": "c", "input": "q", "all_classes": None, "length": 1}),
     r"bad.jsonl:3: missing field 'answers'"),
    (json.dumps({"context": "c", "input": "q", "answers": "a", "all_classes": None, "length": 1}),
     r"bad.jsonl:3: field 'answers' must be a list, got str"),
    (json.dumps({"context": "c", "input": "q", "answers": ["a"], "all_classes": None, "length": "1"}),
     r"bad.jsonl:3: field 'length' must be an integer, got str"),
    (json.dumps({"context": "c", "input": "q", "answers": ["a"], "all_classes": "x", "length": 1}),
     r"field 'all_classes' must be a list or null"),
    (json.dumps({"context": "c", "input": "q", "answers": [1], "all_classes": None, "length": 1}),
     r"field 'answers' must hold strings only"),
    (json.dumps({"context": "c", "input": "q", "answers": [], "all_classes": None, "length": 1}),
     r"field 'answers' is empty"),
    ("[1, 2]", r"bad.jsonl:3: a record must be a JSON object"),
])
def test_loader_errors_name_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, [GOOD, "", line])  # the blank line 2 is skipped, the error is on line 3
    with pytest.raises(ValueError, match=message):
        lb.load_jsonl(path)
    assert len(lb.load_jsonl(path, limit=1)) == 1  # the limit stops before the bad record


def test_missing_dataset_lists_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lb.load_dataset(tmp_path, "qasper")
    assert str(tmp_path / "data" / "qasper.jsonl") in str(e.value) and str(tmp_path / "qasper.jsonl") in str(e.value)
    _write(tmp_path, [GOOD], "qasper.jsonl")  # the flat layout works too
    assert lb.dataset_path(tmp_path, "qasper") == tmp_path / "qasper.jsonl"
    with pytest.raises(ValueError, match="unknown LongBench dataset 'nope'"):
        lb.fill_template(lb.load_jsonl(tmp_path / "qasper.jsonl")[0], "nope")


# -- config -------------------------------------------------------------------------------------

def test_dataset_facts():
    d = lb.DATASETS
    assert {n: d[n].max_new_tokens for n in ("multifieldqa_en", "triviaqa", "trec", "gov_report", "multi_news")} == \
        {"multifieldqa_en": 64, "triviaqa": 32, "trec": 64, "gov_report": 512, "multi_news": 512}
    assert {n for n, s in d.items() if s.few_shot} == {"triviaqa", "trec", "samsum"}
    assert (d["trec"].metric, d["gov_report"].metric, d["triviaqa"].metric) == ("classification", "rouge", "qa_f1")
    for spec in d.values():
        assert "{context}" in spec.template


def test_official_config_overrides_builtin(tmp_path):
    shutil.copytree(CHECKOUT / "config", tmp_path / "repo" / "LongBench" / "config")  # the current repository's layout
    for where in (CHECKOUT, CHECKOUT / "config", tmp_path / "repo"):
        specs = lb.load_config(where)
        assert specs["triviaqa"].template == "OFFICIAL {context} || {input}"
        assert specs["trec"].max_new_tokens == 7 and specs["gov_report"].max_new_tokens == 500
        assert specs["multifieldqa_en"] == lb.DATASETS["multifieldqa_en"]  # not named: built-in kept
        assert "not_a_dataset_here" not in specs and "lsht" not in specs  # no metric here: ignored
    assert lb.DATASETS["trec"].max_new_tokens == 64  # the built-ins are untouched
    with pytest.raises(FileNotFoundError, match="dataset2prompt.json or dataset2maxlen.json"):
        lb.load_config(tmp_path)
    (tmp_path / "dataset2maxlen.json").write_text(json.dumps({"trec": "64"}))
    with pytest.raises(ValueError, match="'trec' must be an integer"):
        lb.load_config(tmp_path)


# -- prompts ------------------------------------------------------------------------------------

def test_truncate_middle():
    assert lb.truncate_middle(range(10), 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(range(10), 5) == [0, 1, 7, 8, 9]
    assert lb.truncate_middle(range(3), 5) == [0, 1, 2]
    with pytest.raises(ValueError, match=">= 1 token"):
        lb.truncate_middle(range(3), 0)


def test_prompt_is_filled_and_cut_in_the_middle(tok):
    ex = lb.load_dataset(FIXTURES, "trec")[0]
    full = lb.build_prompt_ids(ex, "trec", tok, 10 ** 6)
    text = tok.decode(full, skip_special_tokens=True)
    assert full[0] == tok.bos_token_id and text.startswith("Decide which type")
    assert text.endswith("France and Spain ? Type :")  # the question closes the prompt
    assert len(full) > 60
    cut = lb.build_prompt_ids(ex, "trec", tok, 41)
    assert len(cut) == 41 and cut[:20] == full[:20] and cut[20:] == full[-21:]
    official = lb.build_prompt_ids(lb.load_dataset(FIXTURES, "triviaqa")[0], "triviaqa", tok, 10 ** 6,
                                   lb.load_config(CHECKOUT))
    assert tok.decode(official, skip_special_tokens=True).startswith("OFFICIAL Passage")


def test_chat_template_for_instruction_tasks_only(chat_tok):
    user, assistant = chat_tok.convert_tokens_to_ids(["<user>", "<assistant>"])
    qa = lb.load_dataset(FIXTURES, "multifieldqa_en")[0]
    ids = lb.build_prompt_ids(qa, "multifieldqa_en", chat_tok, 10 ** 6)
    assert ids[0] == user and ids[-1] == assistant
    cut = lb.build_prompt_ids(qa, "multifieldqa_en", chat_tok, 12)  # the chat markers survive the cut
    assert len(cut) == 12 and cut[0] == user and cut[-1] == assistant
    few = lb.build_prompt_ids(lb.load_dataset(FIXTURES, "trec")[0], "trec", chat_tok, 10 ** 6)
    assert user not in few and assistant not in few and few[0] == chat_tok.bos_token_id


# -- scoring ------------------------------------------------------------------------------------

def test_few_shot_predictions_are_cut_to_their_first_line():
    tq = lb.load_dataset(FIXTURES, "triviaqa")[0]  # answers: Mercury, planet Mercury
    assert lb.score_example("triviaqa", "Mercury\nQuestion: What comes next?", tq) == 1.0
    assert lb.score_example("triviaqa", "\n\nMercury\nmore", tq) == 1.0
    assert lb.score_example("triviaqa", "\n", tq) == 0.0
    # best answer counts: "planet mercury is closest" vs "mercury" 0.4, vs "planet mercury" P = 2/4, R = 1 -> 2/3
    assert lb.score_example("triviaqa", "Planet Mercury is closest", tq) == pytest.approx(2 / 3)
    mf = lb.load_dataset(FIXTURES, "multifieldqa_en")[2]  # answers: Marren, at Marren; not few-shot
    # "marren second line" vs "marren": P = 1/3, R = 1 -> 0.5; vs "at marren" 0.4
    assert lb.score_example("multifieldqa_en", "Marren\nsecond line", mf) == pytest.approx(0.5)
    trec = lb.load_dataset(FIXTURES, "trec")[0]
    assert lb.score_example("trec", "Other location\nQuestion: Who?\nType: Person", trec) == 1.0


def test_score_dataset_is_the_mean_times_100():
    trec = lb.load_dataset(FIXTURES, "trec")  # gold: Other location, Person, Color
    # 1 (exact); "Person" and "Group of persons" both named: 1/2; "Color scheme" names Color too: 1/2
    preds = ["Other location", "Person or Group of persons", "Color scheme"]
    assert lb.score_dataset("trec", preds, trec) == pytest.approx(100 * 2 / 3)
    gov = lb.load_dataset(FIXTURES, "gov_report")
    assert lb.score_dataset("gov_report", [e.answers[0] for e in gov], gov) == pytest.approx(100, abs=1e-4)
    assert lb.score_dataset("gov_report", ["", "x"], gov) == 0.0
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        lb.score_dataset("gov_report", [""], gov)


# -- end to end ---------------------------------------------------------------------------------

def test_evaluate_on_a_tiny_model(tok):
    model = _tiny_model(len(tok), context=128, eos=tok.eos_token_id)
    plans = {"full": None, "skip": SkipPlan(num_layers=2, skip_scales={1: 1.0})}
    records = []
    datasets = ["multifieldqa_en", "triviaqa", "trec"]
    # Shorter answers than LongBench's keep the CPU run quick.
    specs = {**lb.DATASETS, **{n: replace(lb.DATASETS[n], max_new_tokens=8) for n in datasets}}
    scores = lb.evaluate_longbench(model, tok, FIXTURES, datasets, plans, limit=2, progress=False, records=records,
                                   specs=specs)
    assert set(scores) == {"full", "skip"} and all(set(s) == set(datasets) for s in scores.values())
    assert all(0.0 <= v <= 100.0 for s in scores.values() for v in s.values())
    assert len(records) == 2 * 3 * 2
    for name in datasets:
        budget = 128 - specs[name].max_new_tokens
        examples = lb.load_dataset(FIXTURES, name, limit=2)
        for plan in plans:
            rs = [r for r in records if r.dataset == name and r.plan == plan]
            assert [r.index for r in rs] == [0, 1] and all(r.prompt_tokens <= budget for r in rs)
            assert all(r.score == lb.score_example(name, r.prediction, e) for r, e in zip(rs, examples))
            assert all(r.answers == e.answers and r.id == e.extra["_id"] for r, e in zip(rs, examples))
            assert scores[plan][name] == pytest.approx(100 * sum(r.score for r in rs) / 2)
    # trec's prompts (~175 tokens) lose their middle to fit 128 - 8; the others fit whole.
    assert all(r.truncated == (r.dataset == "trec") for r in records)
    assert all(r.prompt_tokens == 120 for r in records if r.dataset == "trec")
    with pytest.raises(ValueError, match="'gov_report' generates up to 512 tokens"):
        lb.evaluate_longbench(model, tok, FIXTURES, ["gov_report"], plans, progress=False)
    with pytest.raises(FileNotFoundError, match="qasper"):  # before any generation
        lb.evaluate_longbench(model, tok, FIXTURES, ["trec", "qasper"], plans, progress=False,
                              specs={**specs, "qasper": replace(specs["qasper"], max_new_tokens=8)})
    with pytest.raises(ValueError, match="does not fit"):
        lb.evaluate_longbench(model, tok, FIXTURES, ["trec"], plans, max_prompt_tokens=100, progress=False)  # +64


def test_generating_the_answers_scores_100(tok, tmp_path, monkeypatch):
    """A stand-in generate that answers every prompt with the record's first answer: every
    dataset then scores 100, through prompt building, decoding and the per-dataset metric."""
    model = SimpleNamespace(args=SimpleNamespace(max_position_embeddings=4096))
    answers, calls = {}, []
    for name in ("multifieldqa_en", "triviaqa", "trec", "gov_report", "multi_news"):
        budget = 4096 - lb.DATASETS[name].max_new_tokens
        for ex in lb.load_dataset(FIXTURES, name):
            ids = lb.build_prompt_ids(ex, name, tok, budget)
            answers[tuple(ids)] = tok(ex.answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def fake_generate(m, prompts, max_new_tokens, plan=None):
        calls.append((plan, max_new_tokens))
        return GenerationResult(tokens=[answers[tuple(prompts[0])]])

    monkeypatch.setattr(lb, "generate", fake_generate)
    plans = {"full": None, "skip": SkipPlan(num_layers=2, skip_scales={3: 1.0})}
    scores = lb.evaluate_longbench(model, tok, FIXTURES, None, plans)  # None: every dataset with a file
    assert set(scores["full"]) == {"multifieldqa_en", "triviaqa", "trec", "gov_report", "multi_news"}
    assert all(v == pytest.approx(100, abs=1e-4) for s in scores.values() for v in s.values())
    assert {id(p) for p, _ in calls} == {id(None), id(plans["skip"])} and len(calls) == 2 * 12
    assert {n for _, n in calls} == {32, 64, 512}

    # A LongBench checkout in the data dir brings its prompts and lengths along.
    shutil.copytree(CHECKOUT / "config", tmp_path / "config")
    (tmp_path / "data").mkdir()
    shutil.copy(FIXTURES / "data" / "trec.jsonl", tmp_path / "data")
    seen = []
    monkeypatch.setattr(lb, "generate", lambda m, p, max_new_tokens, plan=None: (
        seen.append(max_new_tokens), GenerationResult(tokens=[[tok.eos_token_id]]))[1])
    assert lb.evaluate_longbench(model, tok, tmp_path, None, {"full": None}, progress=False) == {"full": {"trec": 0.0}}
    assert seen == [7, 7, 7]
