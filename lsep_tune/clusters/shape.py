"""What a recipe describes, as the checks need it: node groups of known size and a shared path."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lsep_tune.errors import InputError


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one kind: up to `max_nodes` of them, each offering `cpus` and `gpus` to Ray.
    `cpu_field` and `gpu_field` name where the file sets them, for error lines."""

    name: str
    max_nodes: int
    cpus: float
    gpus: float
    cpu_field: str
    gpu_field: str

    def describe(self) -> str:
        count = "1" if self.name == "head" else f"up to {self.max_nodes}"
        return f"{self.name} {count} x ({self.cpus:g} CPUs, {self.gpus:g} GPUs)"


@dataclass
class Shape:
    """A checked recipe: its kind, node groups (the head first) and the path every node shares."""

    kind: str
    groups: list[NodeGroup]
    shared: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [", ".join(g.describe() for g in self.groups)] if self.groups else []
        return f"{self.kind} ok: " + "; ".join([*parts, f"shared {self.shared}", *self.notes])

    def resources(self) -> dict[str, float]:
        """The cluster at its largest, as Ray's cluster_resources() would report it."""
        return {"CPU": sum(g.max_nodes * g.cpus for g in self.groups),
                "GPU": sum(g.max_nodes * g.gpus for g in self.groups)}


def get(doc: Any, path: str, source: str, kind: type | tuple = dict, default: Any = ...) -> Any:
    """`doc`'s value at the dotted `path` ("spec.headGroupSpec"), checked to be a `kind`; missing
    or mistyped values are the file's error, named by that path."""
    value = doc
    for key in path.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif default is not ...:
            return default
        else:
            raise InputError(source, path, f"missing; expected {_name(kind)}")
    if not isinstance(value, kind):
        raise InputError(source, path, f"expected {_name(kind)}, got {type(value).__name__}")
    return value


def _name(kind) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
