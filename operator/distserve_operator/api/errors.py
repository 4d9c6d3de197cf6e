"""Turn pydantic errors into messages that name the field (camelCase path) and say the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


def field_path(root: str, loc: Sequence[int | str]) -> str:
    parts = [root] if root else []
    for item in loc:
        if isinstance(item, int):
            parts[-1 if parts else 0 :] = [f"{parts[-1] if parts else ''}[{item}]"]
        elif item.startswith("function-") or item in ("str", "int", "float", "bool", "enum"):
            continue  # pydantic's union/validator branch names are not user fields
        else:
            parts.append(item)
    return ".".join(parts)


def _known_fields(model: type[BaseModel] | None, loc: Sequence[int | str]) -> list[str]:
    """The wire names allowed beside an unknown key, for 'did you mean'."""
    current: Any = model
    for item in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or isinstance(item, int):
            continue
        for name, info in current.model_fields.items():
            if item in (name, info.alias):
                ann = info.annotation
                args = getattr(ann, "__args__", None) or (ann,)
                current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
                break
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [info.alias or name for name, info in current.model_fields.items()]
    return []


def _fix(err: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    loc = err["loc"]
    if kind == "missing":
        return "add this required field"
    if kind == "extra_forbidden":
        known = _known_fields(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        allowed = f"; allowed here: {', '.join(sorted(known))}" if known else ""
        return f"remove this unknown field{hint}{allowed}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = {
            "greater_than": "above",
            "greater_than_equal": "at least",
            "less_than": "below",
            "less_than_equal": "at most",
        }
        limit = next(iter(ctx.values()), "?")
        return f"use a value {bounds[kind]} {limit}"
    if kind in ("enum", "literal_error"):
        return "pick one of the values listed (spelling and case matter)"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "use a whole number (integers only in spec; units are in the field name)"
    if kind in ("string_too_short",):
        return "give a non-empty value"
    if kind in ("string_too_long",):
        return f"shorten it to at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"match the pattern {ctx.get('pattern')}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "give a mapping (key: value lines), not a scalar or list"
    if kind == "list_type":
        return "give a list"
    if kind in ("bool_type", "bool_parsing"):
        return "use true or false"
    return ""


def format_errors(
    exc: ValidationError, root: str = "spec", model: type[BaseModel] | None = None
) -> list[str]:
    """One line per problem: `spec.slo.ttftMillis: Input should be greater than 0 (got -5); fix: ...`."""
    lines = []
    for err in exc.errors(include_url=False):
        path = field_path(root, err["loc"]) or root
        message = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        scalar = isinstance(got, str | int | float | bool) and err["type"] != "missing"
        got_text = f" (got {got!r})" if scalar else ""
        fix = _fix(err, model)
        lines.append(f"{path}: {message}{got_text}" + (f"; fix: {fix}" if fix else ""))
    return lines


class SpecError(ValueError):
    """An invalid DistServeDeployment; `problems` holds one line per field."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    def report(self, source: str) -> str:
        """For a person at a terminal: which file, then one problem per line."""
        return "\n".join([f"{source}: invalid DistServeDeployment", *(f"  {line}" for line in self.problems)])
