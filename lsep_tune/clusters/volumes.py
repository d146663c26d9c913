"""Kubernetes PersistentVolumeClaims shipped beside the KubeRay files: the shared volume every pod
mounts at once, so it must be ReadWriteMany (a ReadWriteOnce claim binds to one node only)."""
from __future__ import annotations

from typing import Any

from lsep_tune.clusters.shape import Shape, get
from lsep_tune.errors import InputError

KIND = "Kubernetes PersistentVolumeClaim"


def matches(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "PersistentVolumeClaim"


def check(doc: dict, source: str, placement: bool) -> Shape:
    modes = get(doc, "spec.accessModes", source, list)
    if "ReadWriteMany" not in modes:
        raise InputError(source, "spec.accessModes", f"expected ReadWriteMany: every Ray pod mounts the search "
                                                     f"folder at once, got {modes}")
    name = get(doc, "metadata.name", source, str)
    size = doc.get("spec", {}).get("resources", {}).get("requests", {}).get("storage", "?")
    return Shape(KIND, [], f"PVC {name} ({size}, ReadWriteMany)")
