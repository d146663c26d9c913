"""KubeRay RayCluster and RayJob files: what lsep_tune relies on in their pod templates.

Every pod (the head and each worker group) must mount the same shared volume (a PVC or NFS) at the
same path, run the lsep_tune image or install the project through the RayJob's runtime env, and
a RayJob's entrypoint must run `lsep_tune.search` with its search folder on that path. A pod's
CPUs and GPUs are what KubeRay tells Ray: rayStartParams num-cpus / num-gpus, else the Ray
container's limits (cpu, nvidia.com/gpu).
"""
from __future__ import annotations

import math
import shlex
from typing import Any

import yaml

from lsep_tune.clusters.shape import NodeGroup, Shape, get
from lsep_tune.errors import InputError

RAY_API = "ray.io/"
OFFICIAL_IMAGE = "rayproject/ray"  # Ray's image: the project comes from the RayJob's runtime env


def matches(doc: Any, kind: str) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(RAY_API) and doc.get("kind") == kind


def cpu_quantity(value: Any, source: str, field: str) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") as Ray counts it (KubeRay rounds up)."""
    text = str(value)
    try:
        return float(math.ceil(float(text[:-1]) / 1000)) if text.endswith("m") else float(math.ceil(float(text)))
    except ValueError:
        raise InputError(source, field, f"expected a CPU quantity such as 8 or 500m, got {text}") from None


def _ray_container(template: dict, source: str, where: str) -> dict:
    containers = get(template, "spec.containers", source, list)
    if not containers or not isinstance(containers[0], dict):
        raise InputError(source, f"{where}.spec.containers", "expected the Ray container first")
    return containers[0]  # KubeRay's convention: the Ray container is the first


def _shared_mounts(template: dict, container: dict) -> dict[str, str]:
    """{mountPath: claim or NFS export} of the container's mounts of volumes every pod can share."""
    volumes = {}
    for volume in template.get("spec", {}).get("volumes") or []:
        if "persistentVolumeClaim" in volume:
            volumes[volume.get("name")] = f"PVC {volume['persistentVolumeClaim'].get('claimName')}"
        elif "nfs" in volume:
            volumes[volume.get("name")] = f"NFS {volume['nfs'].get('server')}:{volume['nfs'].get('path')}"
    return {m.get("mountPath"): volumes[m.get("name")]
            for m in container.get("volumeMounts") or [] if m.get("name") in volumes}


def _group(template: dict, start: dict, name: str, count: int, source: str, where: str,
           shared: tuple[str, str] | None) -> tuple[NodeGroup, tuple[str, str], str]:
    container = _ray_container(template, source, where)
    cwhere = f"{where}.spec.containers[0]"
    mounts = _shared_mounts(template, container)
    if shared is None:
        if not mounts:
            raise InputError(source, f"{cwhere}.volumeMounts", "expected a shared volume (a ReadWriteMany PVC or "
                             "NFS) mounted on the head: the search folder must be a path every pod sees")
        shared = next(iter(mounts.items()))
    elif mounts.get(shared[0]) != shared[1]:
        raise InputError(source, f"{cwhere}.volumeMounts", f"expected the shared volume ({shared[1]}) mounted at "
                                                           f"{shared[0]} as on the head: every pod must see the "
                                                           "search folder")
    image = container.get("image")
    if not isinstance(image, str) or not image:
        raise InputError(source, f"{cwhere}.image", "expected an image (the lsep_tune image, clusters/Dockerfile)")
    limits = (container.get("resources") or {}).get("limits") or {}
    start = start or {}
    if "num-cpus" in start:
        cpu_field = f"{where}.rayStartParams.num-cpus"
        cpus = cpu_quantity(start["num-cpus"], source, cpu_field)
    elif "cpu" in limits:
        cpu_field = f"{cwhere}.resources.limits.cpu"
        cpus = cpu_quantity(limits["cpu"], source, cpu_field)
    else:
        raise InputError(source, f"{cwhere}.resources.limits.cpu", "expected a CPU limit: Ray counts it")
    gpu_field = f"{cwhere}.resources.limits.nvidia.com/gpu"
    gpus = float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    if float(limits.get("nvidia.com/gpu", 0)) and not template.get("spec", {}).get("tolerations"):
        raise InputError(source, f"{where}.spec.tolerations", "expected a toleration for the GPU nodes' taint "
                                                              "(e.g. nvidia.com/gpu NoSchedule) beside the GPU limit")
    return NodeGroup(name, count, cpus, gpus, cpu_field, gpu_field), shared, image


def cluster_spec(spec: dict, source: str, prefix: str) -> tuple[Shape, list[str]]:
    """The RayClusterSpec at `prefix`: its shape and the images its pods run."""
    head = get(spec, "headGroupSpec", source)
    where = f"{prefix}headGroupSpec.template"
    group, shared, image = _group(get(head, "template", source), head.get("rayStartParams"), "head", 1, source,
                                  where, None)
    groups, images = [group], [image]
    workers = get(spec, "workerGroupSpecs", source, list, default=[])
    for i, worker in enumerate(workers):
        name = worker.get("groupName", f"group{i}")
        count = int(worker.get("maxReplicas", worker.get("replicas", 1)))
        group, _, image = _group(get(worker, "template", source), worker.get("rayStartParams"), name, count,
                                 source, f"{prefix}workerGroupSpecs[{i}].template", shared)
        groups.append(group)
        images.append(image)
    mode = (spec.get("authOptions") or {}).get("mode")
    notes = [f"auth {mode}"] if mode else []
    return Shape("", groups, f"{shared[0]} ({shared[1]})", notes), images


def _needs_project(images: list[str], source: str, field: str) -> None:
    if any(image.split(":")[0].endswith(OFFICIAL_IMAGE) for image in images):
        raise InputError(source, field, f"{OFFICIAL_IMAGE} does not hold lsep_tune: use the lsep_tune image, or a "
                                        "RayJob whose runtimeEnvYAML installs the project (working_dir + pip)")


def check_raycluster(doc: dict, source: str, placement: bool) -> Shape:
    shape, images = cluster_spec(get(doc, "spec", source), source, "spec.")
    _needs_project(images, source, "spec.headGroupSpec.template.spec.containers[0].image")
    shape.kind = "KubeRay RayCluster"
    return shape


def check_rayjob(doc: dict, source: str, placement: bool) -> Shape:
    spec = get(doc, "spec", source)
    shape, images = cluster_spec(get(spec, "rayClusterSpec", source), source, "spec.rayClusterSpec.")
    entrypoint = get(spec, "entrypoint", source, str)
    words = shlex.split(entrypoint)
    if "lsep_tune.search" not in words:
        raise InputError(source, "spec.entrypoint", "expected `python -m lsep_tune.search ...`")
    mount = shape.shared.split(" ")[0]
    output = words[words.index("--output") + 1] if "--output" in words[:-1] else None
    if output is None or not (output + "/").startswith(mount.rstrip("/") + "/"):
        raise InputError(source, "spec.entrypoint", f"expected --output under the shared mount {mount}, got "
                                                    f"{output or 'none (runs/ in the job folder)'}")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    if not isinstance(runtime_env, dict):
        raise InputError(source, "spec.runtimeEnvYAML", "expected a YAML mapping (working_dir, pip, env_vars)")
    if not runtime_env.get("pip"):
        _needs_project(images, source, "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].image")
    shape.kind = "KubeRay RayJob"
    shape.notes.insert(0, f"shutdownAfterJobFinishes {str(bool(spec.get('shutdownAfterJobFinishes'))).lower()}")
    return shape
