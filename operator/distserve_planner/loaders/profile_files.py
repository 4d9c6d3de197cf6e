"""Profile files: read (our format or a DistServe profiler file) and written (`distserve profile`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..profiles import Profile, parse


def save(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.model_dump(mode="json", exclude_none=True), indent=2) + "\n")


def load(path: str | Path, model: str | None = None) -> Profile:
    """Our format, or a DistServe profiler file (then `model` picks the model inside it)."""
    return parse(Path(path).read_text(), model, source=str(path))
