"""Pydantic building blocks shared by every file kind: the strict model, the cross-field error, and the one
translator of a validation error into the (field, expectation) pair of the one-line refusal."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


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


def _owner(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The model whose key `loc` names (None when it lies inside a plain mapping)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _worded(e: dict[str, Any], field: str, loc: list[str], noun: str, owner: type[BaseModel] | None) -> tuple[str, str]:
    """A space file's sentences: what is expected there, with the known keys of the model that owns the field."""
    ctx, kind, got = e.get("ctx") or {}, e["type"], e.get("input")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        expected = ctx.get("expected_tags", "").replace("'", "")
        shown = f"unknown {noun} {ctx['tag']!r}" if kind == "union_tag_invalid" else "missing"
        return ".".join(loc + ["type"]), f"{shown}, expected one of {expected}"
    owner = _owner(owner, loc) if owner else None
    if kind == "extra_forbidden":
        known_keys = f", expected one of {', '.join(owner.model_fields)}" if owner else ""
        return field, f"unknown key{known_keys}"
    if kind == "missing":
        about = owner.model_fields[loc[-1]].description if owner else None
        return field, f"missing; expected {about}" if about else "missing"
    if kind == "literal_error":
        return field, f"expected {ctx['expected'].replace(chr(39), '')} (got {got!r})"
    if kind == "too_short":
        return field, f"expected at least {ctx['min_length']} (got none)"
    bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}.get(kind)
    if bound:
        limit = next(v for k, v in ctx.items() if k in ("ge", "gt", "le"))
        return field, f"expected {bound} {limit} (got {got!r})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return field, f"expected an integer (got {got!r})"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return field, f"expected a number (got {got!r})"
    if kind == "bool_type":
        return field, f"expected true or false (got {got!r})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return field, f"expected a mapping (got {got!r})"
    return field, f"{e['msg']} (got {got!r})"


def explain(err: ValidationError, *, worded: bool = False, show_input: bool = True, noun: str = "type",
            tag: Any = None, owner: type[BaseModel] | None = None) -> tuple[str, str]:
    """(dotted field, expectation) for the first error of any file kind. Config and arms files keep
    pydantic's sentence (with the value given unless `show_input` is false); space files are `worded`,
    since their keys are distributions and searchers a person picks from a list (`noun` names the kind,
    `owner` is the model whose keys are listed, `tag` the union's tag value, which is not a key)."""
    e = err.errors()[0]
    # a union names the member that failed in the location (seeds.int, baseline.literal[...]): not a key
    loc = [str(p) for p in e["loc"] if not (str(p) in ("int", "float", "str", "bool") or "[" in str(p))]
    if loc and tag is not None and loc[0] == tag:
        loc = loc[1:]
    ctx_err = (e.get("ctx") or {}).get("error")
    if isinstance(ctx_err, FieldError):
        return ".".join(p for p in loc + [ctx_err.field] if p), str(ctx_err)
    field = ".".join(loc) or "<root>"
    if worded:
        return _worded(e, field, loc, noun, owner)
    if e["type"] == "extra_forbidden":
        return field, "unknown field"
    msg = e["msg"].removeprefix("Value error, ")
    if show_input and "input" in e and not isinstance(e["input"], dict) and e["type"] != "missing":
        msg = f"{msg} (got {e['input']!r})"
    return field, msg
