"""What every typed config of moeforge shares: strict sections, cross-field checks and readable errors.

A leaf module (pydantic only), so the model's own config (`pipeline/model/config.py`) and the application's
(`pipeline/config.py`) both build on it without importing each other.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each offending key path."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def at_most(field: str, other: str, value: Any, info: ValidationInfo) -> Any:
    """Validator helper: `field` must be <= the already-validated field `other` of the same section."""
    limit = info.data.get(other)
    if limit is not None and value is not None and value > limit:
        raise ValueError(f"{field} ({value}) must be <= {other} ({limit})")
    return value


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `section.key: reason (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if not loc:  # a check across sections
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif e["type"] in ("value_error", "missing"):
            lines.append(f"  {loc}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e['input']!r})")
    return "invalid configuration:\n" + "\n".join(lines)
