"""ImportanceProfile: per-sublayer IO similarity and compensation scale learned offline."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "adaskip-importance-profile/1"


def model_fingerprint(model) -> dict:
    """What a profile must match: architecture, size, and hashes of the config and of the
    weights' names and shapes (not values: a fine-tune of the same geometry would pass, a
    different model would not)."""
    args = model.args
    shapes = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return {"architecture": args.architecture, "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "config_hash": args.fingerprint(),
            "weights_hash": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}


@dataclass
class SearchResult:
    method: str
    order: list  # sublayers in the order they were chosen
    scales: list  # the compensation scale of each, measured with the earlier choices applied (1.0: identity)
    similarity: list  # its IO similarity, measured the same way
    loss: list  # mean next-token NLL on the search data after each choice (loss[0]: full model)
    candidates: int  # the most sublayers tried at one step
    requests: int
    tokens: int
    forward_passes: int
    wall_s: float
    notes: dict = field(default_factory=dict)

    def skip_scales(self, k: int) -> dict:
        if not 0 <= k <= len(self.order):
            raise ValueError(f"adaskip: the stored search covers budgets up to {len(self.order)} sublayers, "
                             f"{k} were asked for; run the search with a larger max_sublayers")
        return {s: c for s, c in zip(self.order[:k], self.scales[:k])}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(**d)


def _check_numbers(name: str, values, positive: bool = False) -> None:
    """Refuses a list holding a value that is not a finite number (or, for compensation scales,
    not positive): a plan built on it would run and answer garbage."""
    for i, v in enumerate(values):
        try:
            number = None if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ValueError(f"adaskip: profile field {name!r} holds {v!r} at index {i}; expected a finite number")
        if positive and not number > 0:
            raise ValueError(f"adaskip: profile field {name!r} holds {v!r} at index {i}; a compensation scale must be "
                             "positive")


def _check_search(method: str, result, num_sublayers: int) -> None:
    if not isinstance(result, dict) or not isinstance(result.get("order"), list):
        raise ValueError(f"adaskip: the profile's {method!r} search is malformed (no 'order' list)")
    order = result["order"]
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < num_sublayers for s in order):
        raise ValueError(f"adaskip: the profile's {method!r} search orders sublayers outside [0, {num_sublayers}): "
                         f"{order}")
    if len(set(order)) != len(order):
        raise ValueError(f"adaskip: the profile's {method!r} search names a sublayer twice: {order}")
    for name, length in (("scales", len(order)), ("similarity", len(order)), ("loss", len(order) + 1)):
        values = result.get(name)
        if not isinstance(values, list) or len(values) != length:
            raise ValueError(f"adaskip: the profile's {method!r} search field {name!r} must hold {length} values "
                             f"for its {len(order)} choices")
    _check_numbers(f"search.{method}.scales", result["scales"], positive=True)
    _check_numbers(f"search.{method}.similarity", result["similarity"])
    _check_numbers(f"search.{method}.loss", [v for v in result["loss"] if v is not None])


@dataclass
class ImportanceProfile:
    num_layers: int
    similarity: list  # [2 * num_layers] mean IO cosine similarity (per request, then across requests)
    scale: list  # [2 * num_layers] mean norm ratio |after| / |before|: the compensation scale
    similarity_std: list  # spread across requests
    scale_std: list
    block_similarity: list  # [num_layers] whole-layer IO similarity (ShortGPT's block influence)
    fingerprint: dict
    num_requests: int
    tokens: int
    prompt_len: int
    data: str = ""
    adaskip_version: str = ""
    per_request_similarity: list = field(default_factory=list)  # [requests][2 * num_layers]
    # What calibration read, to hold it out of evaluation: file names and content ids of texts (source_id)
    sources: list = field(default_factory=list)
    # Greedy searches (adaskip.search), by method: {"order", "scales", "similarity", "loss", ...}
    search: dict = field(default_factory=dict)
    # Quality of plans on validation requests calibration and the searches did not read (calibration.validate),
    # by strategy: {"budgets", "kl", "top1_agreement", "perplexity", "sublayers", "requests", "tokens"}
    validation: dict = field(default_factory=dict)

    def __post_init__(self):
        n = 2 * self.num_layers
        for name in ("similarity", "scale", "similarity_std", "scale_std"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"adaskip: profile field {name!r} has {len(getattr(self, name))} values, expected {n}")
        if len(self.block_similarity) != self.num_layers:
            raise ValueError("adaskip: profile field 'block_similarity' has the wrong length")
        for name in ("similarity", "similarity_std", "scale_std", "block_similarity"):
            _check_numbers(name, getattr(self, name))
        _check_numbers("scale", self.scale, positive=True)
        for method, result in self.search.items():
            _check_search(method, result, n)
        for strategy, entry in self.validation.items():
            lists = ("budgets", "kl", "top1_agreement", "sublayers")
            if not isinstance(entry, dict) or any(not isinstance(entry.get(k), list) for k in lists) \
                    or len({len(entry[k]) for k in lists}) != 1 or any(not 0 <= int(b) < n for b in entry["budgets"]):
                raise ValueError(f"adaskip: the profile's validation of {strategy!r} is malformed")

    def validation_of(self, strategy: str) -> dict:
        """The stored validation of `strategy` (calibration.validate)."""
        if strategy not in self.validation:
            have = f" (it has {sorted(self.validation)})" if self.validation else ""
            raise ValueError(f"adaskip: this profile has no validation of {strategy!r}{have}; run `adaskip calibrate "
                             f"--validate-budgets ... --validate-strategies {strategy}` (or "
                             "adaskip.skipping.calibration.validate) to add it")
        return self.validation[strategy]

    def search_result(self, method: str):
        """The stored greedy search of `method` (adaskip.search.SearchResult)."""
        if method not in self.search:
            raise ValueError(f"adaskip: this profile has no {method!r} search; run `adaskip calibrate --search "
                             f"{method}` (or adaskip.search.search) to add it")
        return SearchResult.from_dict(self.search[method])

    def check_model(self, model) -> None:
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            diff = {k: (self.fingerprint.get(k), fp[k]) for k in fp if self.fingerprint.get(k) != fp[k]}
            raise ValueError(f"adaskip: this profile was made for another model (profile vs model: {diff}); "
                             "calibrate this model first")

    def ranking(self) -> list:
        """Sublayers from least to most important (highest similarity first); ties by index."""
        return sorted(range(2 * self.num_layers), key=lambda s: (-self.similarity[s], s))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "ImportanceProfile":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"adaskip: cannot read profile {path}: {e}") from e
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"adaskip: {path} is not an adaskip importance profile ({FORMAT})")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"adaskip: profile {path} is malformed: {e}") from e
