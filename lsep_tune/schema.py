"""Pydantic building blocks shared by every config section."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown fields are errors: a typo in a YAML file must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldError(ValueError):
    """A cross-field check failed; `field` is the dotted path to blame (relative to where it is raised)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def known(what: str, name: str, names) -> str:
    """`name` when it is one of a registry's `names`, else the ValueError a field validator raises."""
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}, expected one of {', '.join(names)}")
    return name
