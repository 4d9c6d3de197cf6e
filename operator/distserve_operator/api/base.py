"""The base every API model shares: camelCase on the wire, snake_case in Python, unknown keys refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A strict, camelCase-on-the-wire model.

    Unknown keys are errors (a typo such as `ttftMilis` must not silently fall back to a default),
    and `loc_by_alias` keeps error paths in the spelling the user wrote.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=False,
        loc_by_alias=True,
    )

    def to_wire(self) -> dict[str, object]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
