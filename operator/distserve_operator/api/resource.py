"""The whole `DistServeDeployment` object and loading it from a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from .base import ApiModel
from .errors import SpecError, format_errors
from .spec import DistServeDeploymentSpec
from .status import DistServeDeploymentStatus

GROUP = "distserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DistServeDeployment"
PLURAL = "distservedeployments"
SINGULAR = "distservedeployment"
SHORT_NAMES = ["dsd"]
# Worker StatefulSets are `<name>-<role>-<revision>-s<stage>` (the name plus up to 20 characters), and
# Kubernetes labels each of their pods with `<statefulset>-<10-character hash>`, which must fit 63.
MAX_NAME_LENGTH = 32


def name_problem(name: str) -> str | None:
    """Why this deployment name cannot be used, with the fix; None when it can."""
    if len(name) > MAX_NAME_LENGTH:
        return (
            f"metadata.name {name!r} is {len(name)} characters: the worker StatefulSets' names add up to 20 "
            f"more and their pods' controller-revision-hash labels must fit 63, so use at most "
            f"{MAX_NAME_LENGTH} characters"
        )
    return None


class ObjectMeta(ApiModel):
    """The fields of metadata we read; the rest passes through untouched."""

    model_config = ConfigDict(**{**ApiModel.model_config, "extra": "allow"})
    name: str = Field(..., min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _short_enough(cls, name: str) -> str:
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        return name


class DistServeDeployment(ApiModel):
    api_version: Literal["distserve.io/v1alpha1"] = Field("distserve.io/v1alpha1", alias="apiVersion")
    kind: Literal["DistServeDeployment"] = "DistServeDeployment"
    metadata: ObjectMeta
    spec: DistServeDeploymentSpec
    status: DistServeDeploymentStatus | None = None


def parse_spec(spec: Any) -> DistServeDeploymentSpec:
    """Validate a spec mapping; raise SpecError whose lines name each field and its fix."""
    try:
        return DistServeDeploymentSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, "spec", DistServeDeploymentSpec)) from None


def parse_resource(body: Any) -> DistServeDeployment:
    try:
        return DistServeDeployment.model_validate(body)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, "", DistServeDeployment)) from None


def load_manifest(path: str | Path) -> DistServeDeployment:
    """Read the first DistServeDeployment from a YAML file (other kinds in the file are skipped)."""
    text = Path(path).read_text()
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return parse_resource(doc)
    raise SpecError([f"{path}: no document of kind {KIND} found; add one with apiVersion {API_VERSION}"])
