"""Ray cluster-launcher files (`ray up FILE`): Ray's own schema, then what lsep_tune relies on.

The schema is the one Ray ships inside its package (ray/autoscaler/ray-schema.json), so a file
passes exactly when the installed Ray's launcher would accept its shape. On top of it: a head
node type that exists, a GPU worker type's bounds, the project installed (pip) or an image, and
one shared path mounted on every node (an EFS / Filestore / NFS `mount` among the commands each
node runs) and bound into the container when there is one.
"""
from __future__ import annotations

import json
import shlex
from importlib import resources
from typing import Any

from lsep_tune.clusters.shape import NodeGroup, Shape, get
from lsep_tune.errors import InputError

KIND = "Ray cluster launcher"
OFFICIAL_IMAGE = "rayproject/ray"  # Ray's image, without lsep_tune


def matches(doc: Any) -> bool:
    return isinstance(doc, dict) and "provider" in doc and "kind" not in doc


def ray_schema() -> dict:
    """The launcher schema of the installed Ray (importing ray.autoscaler, not starting anything)."""
    return json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())


def validate_schema(doc: dict, source: str) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(ray_schema()).iter_errors(doc))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "<root>"
        raise InputError(source, where, f"Ray's cluster-launcher schema: {error.message}")


def mount_points(commands: list) -> list[str]:
    """Where the `mount` commands among `commands` mount something (their last argument)."""
    points = []
    for command in commands:
        for part in str(command).replace("&&", ";").replace("||", ";").split(";"):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            if "mount" in words:
                args = [w for w in words[words.index("mount") + 1:] if not w.startswith("-")]
                if len(args) >= 2:
                    points.append(args[-1])
    return points


def _node_commands(doc: dict, name: str, node: dict) -> tuple[list, list]:
    """(initialization, setup) commands a node of type `name` runs: a type's own lists replace the
    file's, as Ray's launcher merges them."""
    head = name == doc["head_node_type"]
    init = node.get("initialization_commands", doc.get("initialization_commands", []))
    role = "head_setup_commands" if head else "worker_setup_commands"
    setup = list(doc.get("setup_commands", [])) + list(doc.get(role, []))
    if not head and "worker_setup_commands" in node:
        setup = list(node["worker_setup_commands"])
    return list(init), setup


def _resource(node: dict, key: str, source: str, field: str) -> float:
    value = node.get("resources", {}).get(key)
    if value is None:
        raise InputError(source, field, f"expected an explicit {key} count: Ray fills resources in only for "
                                        "some AWS instance types, and the placement check needs them")
    return float(value)


def check(doc: dict, source: str, placement: bool) -> Shape:
    validate_schema(doc, source)
    types = get(doc, "available_node_types", source)
    head_type = get(doc, "head_node_type", source, str)
    if head_type not in types:
        raise InputError(source, "head_node_type", f"expected one of available_node_types ({', '.join(types)}), "
                                                   f"got {head_type}")
    docker = doc.get("docker") or {}
    installs = any("pip install" in str(c) for c in doc.get("setup_commands", []))
    image = str(docker.get("image") or docker.get("head_image") or "")
    if not installs and (not image or image.split(":")[0].endswith(OFFICIAL_IMAGE)):
        lacks = f" ({image} lacks it)" if image else ""
        raise InputError(source, "docker.image", f"expected the lsep_tune image, or setup_commands that pip install "
                                                 f"the project on every node{lacks}")
    shared = None
    for name, node in types.items():
        init, setup = _node_commands(doc, name, node)
        points = mount_points(init + setup)
        if not points:
            raise InputError(source, f"available_node_types.{name}", "expected the shared storage (EFS, Filestore, "
                             "NFS) mounted by its initialization_commands or setup_commands: the search folder must "
                             "be a path every node sees")
        if shared is None:
            shared = points[0]
        elif shared not in points:
            raise InputError(source, f"available_node_types.{name}", f"expected the shared path {shared} mounted "
                                                                     f"as on the other nodes, got {points}")
    if docker.get("image") or docker.get("head_image"):
        binds = " ".join(str(o) for o in docker.get("run_options", []))
        if f"{shared}:{shared}" not in binds:
            raise InputError(source, "docker.run_options", f"expected -v {shared}:{shared}: the shared path must "
                                                           "reach the container on every node")
    groups = []
    for name, node in types.items():
        cap = int(doc.get("max_workers", 2))  # the launcher's cap on all worker nodes together (Ray's default: 2)
        count = 1 if name == head_type else min(int(node.get("max_workers", cap)), cap)
        field = f"available_node_types.{name}.resources"
        if placement:
            cpus, gpus = _resource(node, "CPU", source, field), float(node.get("resources", {}).get("GPU", 0))
        else:
            cpus, gpus = float(node.get("resources", {}).get("CPU", 0)), float(node.get("resources", {}).get("GPU", 0))
        groups.append(NodeGroup(name, count, cpus, gpus, field, field))
    groups.sort(key=lambda g: g.name != head_type)
    return Shape(KIND, groups, shared, notes=[f"provider {doc['provider']['type']}"])
