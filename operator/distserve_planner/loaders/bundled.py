"""Latency profiles that ship with the package, by name (`spec.planner.profile`, `distserve plan
--profile NAME`): the DistServe paper's A100-80GB profiles of OPT-13B and OPT-66B, for its own
engine (`-distserve`) and for vLLM (`-vllm`), converted to distserve-profile/v1 with their provenance
inside by scripts/convert_distserve_profiles.py.

They are package data (`bundled_profiles/*.json`, in the wheel, so the operator image has them);
deploy/profiles/ holds the same files for people reading the repository. Tests keep the two equal,
and keep the API's `BundledProfile` enum (what the CRD accepts) equal to the files here.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from .. import profiles

DIRECTORY = "bundled_profiles"


def _folder() -> Traversable:
    return resources.files("distserve_planner") / DIRECTORY


@cache
def names() -> tuple[str, ...]:
    return tuple(
        sorted(p.name.removesuffix(".json") for p in _folder().iterdir() if p.name.endswith(".json"))
    )


@cache
def _read(name: str) -> profiles.Profile:
    return profiles.parse((_folder() / f"{name}.json").read_text(), source=f"bundled profile {name}")


def load(name: str, model: str | None = None, field: str = "spec.planner.profile") -> profiles.Profile:
    """The bundled profile `name`; with `model`, refused (naming `field` and the fix) unless it was
    measured on that model. ValueError for an unknown name, listing the bundled ones."""
    if name not in names():
        raise ValueError(f"{field}: no bundled profile {name!r}; bundled: {', '.join(names())}")
    profile = _read(name)
    if model is not None and not profiles.matches_model(profile.model, model):
        fitting = [n for n in names() if profiles.matches_model(_read(n).model, model)]
        fix = (
            f"use {' or '.join(fitting)}"
            if fitting
            else "profile this model (distserve profile) and plan with that (spec.planner.profileConfigMap, "
            "or the file for --profile), or drop the profile to plan with the analytical model"
        )
        raise ValueError(
            f"{field}: bundled profile {name} was measured on {profile.model}, not {model} "
            f"(spec.model.name); fix: {fix}"
        )
    return profile
