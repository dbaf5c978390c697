"""ImportanceProfile: per-sublayer IO similarity and compensation scale learned offline."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from ..runtime.stand_in import KINDS, StandIn

FORMAT = "adaskip-importance-profile/1"
STAND_IN_SUFFIX = ".stand-ins.safetensors"


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
    objective: list = field(default_factory=list)  # method "kl": the weighted KL after each choice ([0]: 0)
    # Per choice, the stand-ins fitted for it by kind ({"scalar", "channel", "linear"} -> StandIn);
    # empty for searches that fit none. Not in to_dict: the profile keeps their tensors in a file of their own.
    fits: list = field(default_factory=list, repr=False)

    def skip_scales(self, k: int) -> dict:
        if not 0 <= k <= len(self.order):
            raise ValueError(f"adaskip: the stored search covers budgets up to {len(self.order)} sublayers, "
                             f"{k} were asked for; run the search with a larger max_sublayers")
        return {s: c for s, c in zip(self.order[:k], self.scales[:k])}

    @property
    def stand_in(self) -> str:
        """The stand-in kind the search scored its candidates with."""
        return self.notes.get("stand_in", "scalar")

    def stand_ins(self, k: int, kind: str) -> dict:
        """Sublayer -> StandIn of `kind` for the first k choices (empty for "scalar")."""
        if kind not in KINDS:
            raise ValueError(f"adaskip: unknown stand-in kind {kind!r}; choose from {KINDS}")
        self.skip_scales(k)  # the budget check
        if kind == "scalar":
            return {}
        if len(self.fits) < k or any(kind not in f for f in self.fits[:k]):
            raise ValueError(f"adaskip: the profile's {self.method!r} search fitted no {kind} stand-ins; only a 'kl' "
                             f"search fits them (adaskip calibrate --search kl)")
        return {s: f[kind] for s, f in zip(self.order[:k], self.fits[:k])}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fits"}

    @classmethod
    def from_dict(cls, d: dict, fits: list = ()) -> "SearchResult":
        return cls(**d, fits=list(fits))


# A compensation scale multiplies the residual stream; real ones stay within a few tens (the
# first layers of small models), and one this large is a corrupted file, not a plan.
MAX_SCALE = 1e4
# Cosine similarities, up to float rounding of the means.
SIMILARITY_RANGE = (-1.0 - 1e-3, 1.0 + 1e-3)


def _check_numbers(name: str, values, positive: bool = False, within=None, scale: bool = False) -> None:
    """Refuses a list holding a value that is not a finite number (or, for compensation scales,
    not positive and below MAX_SCALE; with `within`, outside that range): a plan built on it
    would run and answer garbage."""
    if not isinstance(values, list):
        raise ValueError(f"adaskip: profile field {name!r} must be a list of numbers, got {type(values).__name__}")
    for i, v in enumerate(values):
        try:
            number = None if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ValueError(f"adaskip: profile field {name!r} holds {v!r} at index {i}; expected a finite number")
        if scale and not 0 < number <= MAX_SCALE:
            raise ValueError(f"adaskip: profile field {name!r} holds {v!r} at index {i}; a compensation scale must be "
                             f"positive and at most {MAX_SCALE:g}")
        if positive and not number >= 0:
            raise ValueError(f"adaskip: profile field {name!r} holds {v!r} at index {i}; expected a number >= 0")
        if within is not None and not within[0] <= number <= within[1]:
            raise ValueError(f"adaskip: profile field {name!r} holds {v!r} at index {i}; expected a number in "
                             f"[{within[0]:g}, {within[1]:g}]")


def _check_count(name: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"adaskip: profile field {name!r} must be an integer >= {minimum}, got {value!r}")


def _check_streaming_row(strategy: str, row, num_sublayers: int, probes: Optional[int]) -> None:
    """One budget + streaming-groups row of a validation (calibration.validate(streaming=)): what
    a tolerance chooses by, so a malformed one is refused at load."""
    what = f"the profile's validation of {strategy!r} has a malformed streaming row"
    keys = ("budget", "groups", "layers", "kl", "top1_agreement")
    if not isinstance(row, dict) or any(k not in row for k in keys):
        raise ValueError(f"adaskip: {what} (it needs {list(keys)}): {row!r}")
    _check_count(f"validation.{strategy}.streaming.budget", row["budget"])
    _check_count(f"validation.{strategy}.streaming.groups", row["groups"], minimum=1)
    layers = row["layers"]
    if row["budget"] >= num_sublayers or not isinstance(layers, list) or any(
            not isinstance(x, list) or len(x) != 2 or not isinstance(x[1], list) for x in layers) \
            or sum(len(x[1]) for x in layers) != row["groups"]:
        raise ValueError(f"adaskip: {what}: {row['groups']} groups expected as [[layer, [groups]], ...], got "
                         f"{layers!r}")
    _check_numbers(f"validation.{strategy}.streaming.kl", [row["kl"]], positive=True)
    _check_numbers(f"validation.{strategy}.streaming.top1_agreement", [row["top1_agreement"]], within=(0.0, 1.0))
    if probes is not None:
        hits = row.get("retrieval_hits")
        if isinstance(hits, bool) or not isinstance(hits, int) or not 0 <= hits <= probes:
            raise ValueError(f"adaskip: {what}: retrieval_hits must be a count in [0, {probes}], got {hits!r}")


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
    _check_numbers(f"search.{method}.scales", result["scales"], scale=True)
    _check_numbers(f"search.{method}.similarity", result["similarity"], within=SIMILARITY_RANGE)
    # A loss not yet measured (the last choice of a search that stopped) is null.
    _check_numbers(f"search.{method}.loss", [v for v in result["loss"] if v is not None], positive=True)
    objective = result.get("objective", [])
    if objective:
        if not isinstance(objective, list) or len(objective) != len(order) + 1:
            raise ValueError(f"adaskip: the profile's {method!r} search field 'objective' must hold "
                             f"{len(order) + 1} values for its {len(order)} choices")
        _check_numbers(f"search.{method}.objective", [v for v in objective if v is not None], positive=True)


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
    # The first 16 hex digits of the SHA-256 of the calibration requests' token ids (greedy.requests_digest):
    # what a resumed calibration checks it reads again ("" in profiles of older adaskip)
    requests_sha256: str = ""
    # Greedy searches (adaskip.search), by method: {"order", "scales", "similarity", "loss", ...}
    search: dict = field(default_factory=dict)
    # Quality of plans on validation requests calibration and the searches did not read (calibration.validate),
    # by strategy: {"budgets", "kl", "top1_agreement", "perplexity", "sublayers", "requests", "tokens"}
    validation: dict = field(default_factory=dict)
    # KV-head groups ranked for streaming (head_groups.GroupScores.to_dict, plus how they were
    # scored): what plan(..., streaming_groups=n) takes its groups from; {} when not scored
    group_scores: dict = field(default_factory=dict)
    # The run that wrote this file, as every result file records it (benchmarks.common.provenance:
    # the command as run, commit, dirty state, date, versions), set by `adaskip calibrate` / `eval`;
    # a resumed run keeps the interrupted run's under "resumed_from". {} from the library or older adaskip
    provenance: dict = field(default_factory=dict)
    # Stand-ins fitted by the searches, by method: per choice {kind: StandIn} (saved beside the
    # JSON in <name>.stand-ins.safetensors)
    fits: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        _check_count("num_layers", self.num_layers, 1)
        for name in ("num_requests", "tokens", "prompt_len"):
            _check_count(name, getattr(self, name))
        n = 2 * self.num_layers
        for name, length in (("similarity", n), ("scale", n), ("similarity_std", n), ("scale_std", n),
                             ("block_similarity", self.num_layers)):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != length:
                size = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
                raise ValueError(f"adaskip: profile field {name!r} has {size}, expected a list of {length} "
                                 f"(the model's {self.num_layers} layers)")
        for name in ("similarity", "block_similarity"):
            _check_numbers(name, getattr(self, name), within=SIMILARITY_RANGE)
        for name in ("similarity_std", "scale_std"):
            _check_numbers(name, getattr(self, name), positive=True)
        _check_numbers("scale", self.scale, scale=True)
        if not isinstance(self.requests_sha256, str):
            raise ValueError(f"adaskip: profile field 'requests_sha256' must be a string, got "
                             f"{type(self.requests_sha256).__name__}")
        for name in ("fingerprint", "search", "validation", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"adaskip: profile field {name!r} must be a JSON object, got "
                                 f"{type(getattr(self, name)).__name__}")
        for method, result in self.search.items():
            _check_search(method, result, n)
        if self.group_scores:
            from .head_groups import GroupScores

            GroupScores.from_dict(self.group_scores, self.num_layers)  # a malformed table fails at load
        for method, per_choice in self.fits.items():
            if method not in self.search or len(per_choice) > len(self.search[method]["order"]):
                raise ValueError(f"adaskip: the profile holds stand-ins of a {method!r} search it does not have")
        for strategy, entry in self.validation.items():
            lists = ("budgets", "kl", "top1_agreement", "sublayers")
            if not isinstance(entry, dict) or any(not isinstance(entry.get(k), list) for k in lists) \
                    or len({len(entry[k]) for k in lists}) != 1 or any(not 0 <= int(b) < n for b in entry["budgets"]):
                raise ValueError(f"adaskip: the profile's validation of {strategy!r} is malformed")
            for b, chosen in zip(entry["budgets"], entry["sublayers"]):
                if not isinstance(chosen, list) or len(chosen) != int(b) or len(set(chosen)) != len(chosen) \
                        or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n for x in chosen):
                    raise ValueError(f"adaskip: the profile's validation of {strategy!r} lists {chosen!r} as the "
                                     f"plan of budget {b}; expected {b} distinct sublayers in [0, {n})")
            # What plan(min_agreement=, max_kl=) picks by: a NaN would compare false and pick wrongly.
            _check_numbers(f"validation.{strategy}.kl", entry["kl"], positive=True)
            _check_numbers(f"validation.{strategy}.top1_agreement", entry["top1_agreement"], within=(0.0, 1.0))
            if "retrieval_hits" in entry:  # what plan(min_retrieval=) picks by
                probes = entry.get("retrieval_probes")
                _check_count(f"validation.{strategy}.retrieval_probes", probes, minimum=1)
                hits = entry["retrieval_hits"] + [entry.get("retrieval_full_hits")]
                if not isinstance(entry["retrieval_hits"], list) or len(entry["retrieval_hits"]) != len(entry["budgets"]) \
                        or any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= probes for h in hits):
                    raise ValueError(f"adaskip: the profile's validation of {strategy!r} has malformed retrieval hits "
                                     f"(one count in [0, {probes}] per budget, and the full model's)")
            for row in entry.get("streaming", []):
                _check_streaming_row(strategy, row, n, entry.get("retrieval_probes") if "retrieval_hits" in entry
                                     else None)

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
        return SearchResult.from_dict(self.search[method], self.fits.get(method, ()))

    def add_search(self, result) -> None:
        """Stores a SearchResult (its stand-ins included) under its method."""
        self.search[result.method] = result.to_dict()
        if result.fits:
            self.fits[result.method] = list(result.fits)
        else:
            self.fits.pop(result.method, None)

    def check_model(self, model) -> None:
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            diff = {k: (self.fingerprint.get(k), fp[k]) for k in fp if self.fingerprint.get(k) != fp[k]}
            raise ValueError(f"adaskip: this profile was made for another model (profile vs model: {diff}); "
                             "calibrate this model first")

    def group_scores_of(self):
        """The profile's KV-head group scores (head_groups.GroupScores)."""
        if not self.group_scores:
            raise ValueError("adaskip: this profile ranks no KV-head groups for streaming; calibrate with "
                             "--streaming-probes (calibrate(..., streaming_probes=n)) to plan streaming groups")
        from .head_groups import GroupScores

        return GroupScores.from_dict(self.group_scores, self.num_layers)

    def ranking(self) -> list:
        """Sublayers from least to most important (highest similarity first); ties by index."""
        return sorted(range(2 * self.num_layers), key=lambda s: (-self.similarity[s], s))

    def save(self, path) -> None:
        """Writes the profile as JSON to `path`; fitted stand-ins go to a safetensors file beside
        it (the JSON's name with .stand-ins.safetensors instead of its suffix), which the JSON
        names with its SHA-256. Each file is written whole or not at all."""
        path = Path(path)
        data = {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "fits"}}
        tensors = {f"{method}/{i}/{kind}/{name}": t for method, per_choice in self.fits.items()
                   for i, by_kind in enumerate(per_choice) for kind, stand_in in by_kind.items()
                   for name, t in _stand_in_tensors(stand_in).items()}
        if tensors:
            from safetensors.torch import save
            blob = save(tensors)
            sidecar = path.with_name(path.stem + STAND_IN_SUFFIX)
            _write_whole(sidecar, blob)
            data["stand_in_file"] = {"name": sidecar.name, "sha256": hashlib.sha256(blob).hexdigest()}
        _write_whole(path, (json.dumps(data, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path) -> "ImportanceProfile":
        try:  # a folder, no path at all, a binary file, not JSON: all one message naming it
            data = json.loads(Path(path).read_text())
        except (OSError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"adaskip: cannot read profile {path}: {e}") from e
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"adaskip: {path} is not an adaskip importance profile ({FORMAT})")
        sidecar = data.pop("stand_in_file", None)
        fits = _load_fits(Path(path), sidecar) if sidecar is not None else {}
        try:
            return cls(**data, fits=fits)
        except TypeError as e:
            raise ValueError(f"adaskip: profile {path} is malformed: {e}") from e


def _write_whole(path: Path, blob: bytes) -> None:
    from .._util import write_atomic

    write_atomic(path, blob)


def _stand_in_tensors(stand_in: StandIn) -> dict:
    if stand_in.kind == "scalar":
        return {"scale": torch.tensor([stand_in.scale], dtype=torch.float32)}
    return stand_in.tensors()


def _load_fits(path: Path, sidecar) -> dict:
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("name"), str) or "/" in sidecar["name"]:
        raise ValueError(f"adaskip: profile {path} names its stand-in file in a malformed way: {sidecar!r}")
    file = path.with_name(sidecar["name"])
    try:
        blob = file.read_bytes()
    except OSError as e:
        raise ValueError(f"adaskip: profile {path} keeps its fitted stand-ins in {file.name}, which cannot be read "
                         f"({e}); copy it beside the profile") from e
    if hashlib.sha256(blob).hexdigest() != sidecar.get("sha256"):
        raise ValueError(f"adaskip: {file.name} is not the stand-in file profile {path} was saved with (SHA-256 "
                         "differs)")
    from safetensors.torch import load
    grouped: dict = {}
    for key, t in load(blob).items():
        parts = key.split("/")
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in KINDS:
            raise ValueError(f"adaskip: {file.name} holds an unexpected tensor {key!r}")
        grouped.setdefault(parts[0], {}).setdefault(int(parts[1]), {}).setdefault(parts[2], {})[parts[3]] = t
    fits = {}
    for method, by_index in grouped.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"adaskip: {file.name} misses stand-ins of some {method!r} choices")
        per_choice = []
        for i in range(len(by_index)):
            by_kind = {}
            for kind, named in by_index[i].items():
                try:
                    if kind == "scalar":
                        by_kind[kind] = StandIn("scalar", scale=float(named["scale"][0]))
                    else:
                        by_kind[kind] = StandIn(kind, **named)
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"adaskip: {file.name}: the {kind} stand-in of {method!r} choice {i} is "
                                     f"malformed: {e}") from e
            per_choice.append(by_kind)
        fits[method] = per_choice
    return fits
