"""The whole `DistServeDeployment` object and loading it from a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError

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


class ObjectMeta(ApiModel):
    """The fields of metadata we read; the rest passes through untouched."""

    model_config = ConfigDict(**{**ApiModel.model_config, "extra": "allow"})
    name: str = Field(..., min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


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
