"""Fitted latency coefficients: our own `distserve-profile/v1` format, and import of the
DistServe profiler's JSON (model -> TP -> {prefill, decoding_smallbs, decoding_largebs, threshold}).

Both load into the same `Profile`; `latency_model()` turns one into the planner's `LatencyModel`.
Profiles that ship with the package (the DistServe paper's A100-80GB ones, converted) are loaded by
name by `loaders/bundled.py`; files are read and written by `loaders/profile_files.py`, and
`loaders.spec.resolve_profile` picks a parsed `Profile`, a file or a bundled name.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .architecture import catalogue_key
from .latency import NO_THRESHOLD, LatencyModel, PhaseCoefficients, check_decode_starts

FORMAT = "distserve-profile/v1"


class DecodeRangeEntry(BaseModel):
    """Decode step cost for batches of `from_batch` requests up to the next range's start."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    from_batch: int = Field(..., ge=1)
    coefficients: tuple[float, float, float] = Field(..., description="a + b*context_tokens + c*batch")


class ProfileEntry(BaseModel):
    """Coefficients of one (TP, PP), milliseconds. Decode is given either as ranges of batch sizes
    (`decode_ranges`, what `distserve profile` writes) or in DistServe's two-range shape
    (`decode_small` below `decode_threshold`, `decode_large` from it on)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tp: int = Field(..., ge=1)
    pp: int = Field(1, ge=1)
    prefill: tuple[float, float, float] = Field(..., description="a + b*tokens + c*sum(len^2)")
    decode_ranges: tuple[DecodeRangeEntry, ...] | None = Field(
        None, description="decode step cost per range of batch sizes, the first from batch 1"
    )
    decode_small: tuple[float, float, float] | None = Field(
        None, description="a + b*context_tokens + c*batch"
    )
    decode_large: tuple[float, float, float] | None = Field(
        None, description="same, from decode_threshold on"
    )
    decode_threshold: int | None = Field(
        None, ge=1, description="batch size where decode_large starts (none: decode_small throughout)"
    )
    batching: Literal["packed", "padded"] = Field(
        "packed",
        description="how the engine batches requests of different lengths: packed (paged or "
        "variable-length attention: a batch costs the sum of its lengths) or padded (every row as "
        "long as the longest, as the distserve worker runs: batch x longest)",
    )
    samples: int | None = Field(None, ge=0, description="measurements the fit used")
    fit_error_percent: float | None = Field(None, ge=0, description="mean absolute relative error of the fit")

    @model_validator(mode="after")
    def _one_decode_shape(self) -> ProfileEntry:
        two = self.decode_small is not None or self.decode_large is not None
        if self.decode_ranges is not None and (two or self.decode_threshold is not None):
            raise ValueError("give decode_ranges or decode_small/decode_large/decode_threshold, not both")
        if self.decode_ranges is None and (self.decode_small is None or self.decode_large is None):
            raise ValueError("decode cost missing: give decode_ranges, or decode_small and decode_large")
        if self.decode_ranges is not None:
            check_decode_starts([r.from_batch for r in self.decode_ranges], "from_batch")
        return self

    def coefficients(self) -> PhaseCoefficients:
        padded = self.batching == "padded"
        if self.decode_ranges is not None:
            ranges = tuple((r.from_batch, r.coefficients) for r in self.decode_ranges)
            return PhaseCoefficients(self.prefill, ranges, padded)
        assert self.decode_small is not None and self.decode_large is not None  # the validator's
        return PhaseCoefficients.two_ranges(
            self.prefill, self.decode_small, self.decode_large, self.decode_threshold or NO_THRESHOLD, padded
        )


class Provenance(BaseModel):
    """Where figures that were not measured here come from, precisely enough to fetch them again and
    to honour their licence."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    repository: str = Field(..., min_length=1, description="URL of the repository the figures come from")
    path: str = Field(..., min_length=1, description="the source file's path in that repository")
    commit: str = Field(
        "",
        pattern=r"^([0-9a-f]{40})?$",
        description="a commit at which the file had exactly the bytes converted (empty: not established)",
    )
    license: str = Field(..., min_length=1, description="SPDX identifier of the source's licence")
    copyright: str = Field("", description="the source's copyright line")
    sha256: str = Field(
        "", pattern=r"^([0-9a-f]{64})?$", description="SHA-256 of the source file's bytes as converted"
    )
    converted_by: str = Field("", description="the script that wrote this profile from the source")
    conversion: str = Field("", description="what was taken from the source and how it was mapped")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["distserve-profile/v1"] = "distserve-profile/v1"
    model: str = Field(..., min_length=1)
    dtype: str = "float16"
    device: str = Field(..., min_length=1)
    created: str = Field("", description="RFC 3339 time of the measurement or import")
    source: str = Field("", description="where the numbers come from (tool, file)")
    provenance: Provenance | None = Field(
        None, description="origin and licence of figures taken from elsewhere (none: measured here)"
    )
    entries: list[ProfileEntry] = Field(default_factory=list)

    def entry(self, tp: int, pp: int) -> ProfileEntry | None:
        return next((e for e in self.entries if e.tp == tp and e.pp == pp), None)


def parse(text: str, model: str | None = None, source: str = "") -> Profile:
    """Our format, or a DistServe profiler file (then `model` picks the model inside it), from its
    text (a file's, a ConfigMap's profile.json); `source` names it in errors.
    ValueError (pydantic's ValidationError is one) when it is not a profile."""
    where = f"{source}: " if source else ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}not JSON ({exc}); fix: give a file written by `distserve profile`") from exc
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return Profile.model_validate(data)
    if isinstance(data, dict) and data and all(_looks_distserve(v) for v in data.values()):
        return import_distserve(data, model, source=source)
    raise ValueError(
        f"{where}neither a {FORMAT} profile (no 'format' key) nor a DistServe profiler file "
        "(model -> TP -> prefill/decoding_*); fix: pass a file written by `distserve profile`"
    )


def _looks_distserve(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, dict) and "prefill" in v for v in value.values())


def import_distserve(data: dict[str, Any], model: str | None, source: str = "") -> Profile:
    """One model of a DistServe profiler file. Its PP is modelled, so entries are PP1."""
    names = list(data)
    chosen = _match_model(names, model) if model else (names[0] if len(names) == 1 else None)
    if chosen is None:
        raise ValueError(
            f"the DistServe profile holds {', '.join(names)}, none matching model {model!r}; fix: set "
            "spec.model.name to one of them or profile this model"
        )
    entries = []
    for tp, row in sorted(data[chosen].items(), key=lambda kv: int(kv[0])):
        entries.append(
            ProfileEntry(
                tp=int(tp),
                prefill=tuple(row["prefill"]),
                decode_small=tuple(row["decoding_smallbs"]),
                decode_large=tuple(row["decoding_largebs"]),
                decode_threshold=row.get("decoding_large_small_bs_threshold"),
            )
        )
    return Profile(
        model=chosen,
        dtype="float16",
        device="A100-80GB",
        source=f"DistServe profiler {source}".strip(),
        entries=entries,
    )


def matches_model(profile_model: str, model: str) -> bool:
    """Whether a profile taken for `profile_model` is one of `model` (same catalogue entry or name)."""
    return _match_model([profile_model], model) is not None


def _match_model(names: list[str], model: str) -> str | None:
    if model in names:
        return model
    key = catalogue_key(model) or model.lower().rsplit("/", 1)[-1]
    return next((n for n in names if (catalogue_key(n) or n.lower().rsplit("/", 1)[-1]) == key), None)


def latency_model(profile: Profile, label: str = "") -> LatencyModel:
    """`label` (e.g. which bundled profile) leads the description the plan reports."""
    table = {(e.tp, e.pp): e.coefficients() for e in profile.entries}
    tps = sorted({e.tp for e in profile.entries})
    origin = ": ".join(part for part in (label, profile.source) if part) or "profile"
    return LatencyModel(
        lambda tp, pp: table.get((tp, pp)),
        f"{origin} ({profile.model} on {profile.device})",
        missing_reason=f"profile has no entry for this TP (has TP {', '.join(map(str, tps))})",
    )
