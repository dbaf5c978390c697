"""adaskip.calibrate on texts, files and token lists: the sources it records, the held-out split of
evaluation documents, the searches it runs, and the one measurement loop it shares with the
search and perplexity (tiny random LLaMA, fp32, CPU)."""
import hashlib
import math

import pytest
import torch

from behaviour_cases import tiny_model
from adaskip.evaluation.harness import held_out
from adaskip.evaluation.quality import perplexity
from adaskip.skipping.calibration import calibrate, calibration_requests, source_id
from adaskip.skipping.greedy import search
from adaskip.skipping.measurement import measure_requests
from adaskip.skipping.profile import ImportanceProfile

PROMPT_LEN = 40


class CharTokenizer:
    """One token per character: enough to cut texts into calibration requests."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % self.vocab for c in text]}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer(model):
    return CharTokenizer(model.args.vocab_size)


@pytest.fixture(scope="module")
def texts():
    """Three texts of two requests each: three requests read the first two texts, not the third."""
    g = torch.Generator().manual_seed(3)
    return ["".join(chr(97 + int(i)) for i in torch.randint(0, 26, (80,), generator=g)) for _ in range(3)]


@pytest.fixture()
def paths(tmp_path, texts):
    out = []
    for i, text in enumerate(texts):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


def _calibrate(model, data, tokenizer=None, **kw):
    return calibrate(model, data, tokenizer=tokenizer, num_requests=3, prompt_len=PROMPT_LEN, progress=False, **kw)


def _content_id(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def test_calibrate_on_texts_records_their_content_ids(model, tokenizer, texts):
    profile = _calibrate(model, texts, tokenizer)
    assert profile.sources == sorted([_content_id(texts[0]), _content_id(texts[1])])
    assert source_id(texts[2]) == _content_id(texts[2]) not in profile.sources


def test_calibrate_on_files_records_their_names_and_reads_what_the_texts_give(model, tokenizer, texts, paths):
    from_files = _calibrate(model, paths, tokenizer)
    assert from_files.sources == ["doc0.txt", "doc1.txt"]
    from_texts = _calibrate(model, texts, tokenizer)
    requests = calibration_requests(texts, tokenizer, num_requests=3, prompt_len=PROMPT_LEN)
    from_tokens = _calibrate(model, requests)
    assert from_tokens.sources == []  # token lists are requests, not documents: nothing to hold out
    for other in (from_texts, from_tokens):
        assert other.similarity == from_files.similarity and other.block_similarity == from_files.block_similarity
        assert other.per_request_similarity == from_files.per_request_similarity


def test_sources_survive_save_and_load(tmp_path, model, tokenizer, texts, paths):
    profile = _calibrate(model, [paths[0], texts[1], texts[2]], tokenizer)
    assert profile.sources == sorted(["doc0.txt", _content_id(texts[1])])
    one = calibrate(model, texts[0] * 2, tokenizer=tokenizer, num_requests=3, prompt_len=PROMPT_LEN, progress=False)
    assert one.sources == [_content_id(texts[0] * 2)]  # a single text, not a list of characters
    profile.save(tmp_path / "p.json")
    assert ImportanceProfile.load(tmp_path / "p.json").sources == profile.sources


def test_held_out_drops_exactly_the_documents_calibration_read(model, tokenizer, texts, paths):
    by_text = _calibrate(model, texts, tokenizer)
    assert held_out(texts, by_text) == [texts[2]]
    by_file = _calibrate(model, paths, tokenizer)
    assert held_out(paths, by_file) == [paths[2]]
    # Files match by name, texts by content: a copy of a read file elsewhere is still held out.
    copy = paths[0].parent / "copy" / "doc1.txt"
    copy.parent.mkdir()
    copy.write_text("other words")
    assert held_out([copy, *texts], by_file) == texts
    assert held_out([*paths, *texts], by_text) == [*paths, texts[2]]
    assert held_out(texts, _calibrate(model, calibration_requests(texts, tokenizer, num_requests=3,
                                                                  prompt_len=PROMPT_LEN))) == texts


def test_calibrate_runs_the_searches_on_its_first_requests(model, tokenizer, texts):
    profile = _calibrate(model, texts, tokenizer, search=("similarity", "loss"), search_max_sublayers=99,
                         search_candidates=2, search_requests=1)
    first = calibration_requests(texts, tokenizer, num_requests=1, prompt_len=PROMPT_LEN)
    assert set(profile.search) == {"similarity", "loss"}
    for method, stored in profile.search.items():
        alone = search(model, first, max_sublayers=6, method=method, candidates=2, progress=False).to_dict()
        assert len(stored["order"]) == 6  # at most all but one layer of 4
        assert {k: v for k, v in stored.items() if k != "wall_s"} == {k: v for k, v in alone.items() if k != "wall_s"}
    assert _calibrate(model, texts, tokenizer, search="similarity", search_max_sublayers=2,
                      search_requests=1).search["similarity"]["order"] == profile.search["similarity"]["order"][:2]


def test_calibrate_rejects_bad_data_and_search_settings(model, tokenizer, texts):
    with pytest.raises(ValueError, match="unknown search methods"):
        _calibrate(model, texts, tokenizer, search=("random",))
    with pytest.raises(ValueError, match="search_requests, search_max_sublayers and search_candidates >= 1"):
        _calibrate(model, texts, tokenizer, search=("loss",), search_requests=0)
    with pytest.raises(ValueError, match="not a mix"):
        _calibrate(model, [texts[0], [1, 2, 3]], tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        _calibrate(model, texts)
    with pytest.raises(ValueError, match="only texts"):
        held_out([[1, 2, 3]], _calibrate(model, texts, tokenizer))


def test_one_measurement_loop_for_calibration_search_and_perplexity(model, tokenizer, texts):
    requests = calibration_requests(texts, tokenizer, num_requests=3, prompt_len=PROMPT_LEN)
    profile = _calibrate(model, requests)
    measured = measure_requests(model, requests, stats=True, nll=True)
    assert measured.similarity.tolist() == profile.per_request_similarity
    assert measured.scale.mean(0).tolist() == profile.scale
    assert measured.block_similarity is None and measured.tokens == sum(map(len, requests))
    result = search(model, requests, max_sublayers=1, method="similarity", progress=False)
    assert result.loss[0] == measured.mean_nll and result.similarity[0] == max(profile.similarity)
    assert perplexity(model, requests) == math.exp(measured.mean_nll)
    assert measured.predicted_tokens == sum(len(r) - 1 for r in requests)
    with pytest.raises(ValueError, match="asked for nothing"):
        measure_requests(model, requests, stats=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        measure_requests(model, [[1]], nll=True)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [[1, 2], [3]])
