"""The restructured runtime computes exactly what it computed before (tests/behaviour_cases.py)."""
import os
from pathlib import Path

import pytest
import torch

import decode_cases
from behaviour_cases import STRATEGIES, compute

FIXTURE = Path(__file__).parent / "fixtures" / "behaviour.pt"
DECODE_FIXTURE = Path(__file__).parent / "fixtures" / "decode.pt"


@pytest.fixture(scope="module")
def now():
    return compute()


def test_behaviour_is_bit_identical_to_the_fixtures(now):
    _check_against(FIXTURE, now)


def test_decoding_is_identical_to_its_fixtures():
    """Speculative rounds, generate's step options and adaskip.hf's generate (tests/decode_cases.py)."""
    now = decode_cases.compute()
    if not decode_cases.has_transformers():  # its hf cases were recorded with transformers
        pytest.skip("transformers is not installed")
    _check_against(DECODE_FIXTURE, now)


def _check_against(fixture: Path, now: dict) -> None:
    if os.environ.get("ADASKIP_REGENERATE_BEHAVIOUR") == "1":
        torch.save(now, fixture)
        pytest.skip(f"regenerated {fixture}")
    before = torch.load(fixture, weights_only=False)
    assert sorted(now) == sorted(before), "the set of cases changed"
    different = []
    for name, value in before.items():
        got = now[name]
        if isinstance(value, torch.Tensor):
            same = (isinstance(got, torch.Tensor) and got.dtype == value.dtype and got.shape == value.shape
                    and torch.equal(got.view(torch.uint8) if got.dtype != torch.bool else got,
                                    value.view(torch.uint8) if value.dtype != torch.bool else value))
        else:
            same = got == value
        if not same:
            different.append(name)
    assert not different, f"{len(different)} cases changed: {different[:20]}"


def test_the_cases_cover_what_the_refactor_touches(now):
    names = set(now)
    for strategy in STRATEGIES:
        for mode in ("prefill", "decode", "e2e"):
            assert f"llama/generate/{strategy}/{mode}" in names
    # Online learning really gated FFNs off in some case, and not in others.
    skipped = [now[n]["online_skipped"] for n in names if n.startswith("llama/generate/online-beta/")]
    assert any(any(s) for s in skipped) and any(not any(s) for s in skipped)
