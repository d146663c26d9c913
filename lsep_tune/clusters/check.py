"""Which kind of recipe a file is, its check, and whether one trial of a search space fits it.

Adding a recipe kind is one module with `matches` and `check` (returning a `Shape`) and one line
in `KINDS`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import yaml

from lsep_tune.clusters import kuberay, launcher, slurm, volumes
from lsep_tune.clusters.shape import Shape
from lsep_tune.errors import InputError


@dataclass(frozen=True)
class Kind:
    name: str
    reads: str  # "yaml": each YAML document of the file; "text": the file's text
    matches: Callable[[Any], bool]
    check: Callable[[Any, str, bool], Shape]


KINDS = (
    Kind(launcher.KIND, "yaml", launcher.matches, launcher.check),
    Kind("KubeRay RayCluster", "yaml", partial(kuberay.matches, kind="RayCluster"), kuberay.check_raycluster),
    Kind("KubeRay RayJob", "yaml", partial(kuberay.matches, kind="RayJob"), kuberay.check_rayjob),
    Kind(volumes.KIND, "yaml", volumes.matches, volumes.check),
    Kind(slurm.KIND, "text", slurm.matches, slurm.check),
)
KNOWN = ("a Ray cluster-launcher YAML (cluster_name, provider), a KubeRay RayCluster or RayJob (apiVersion ray.io/v1), "
         "a PersistentVolumeClaim, or a Slurm sbatch script (#! and #SBATCH lines)")


def read(path: str) -> tuple[str, list[Any]]:
    """The file's text and its YAML documents (none when it is not YAML)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InputError(path, "<file>", f"cannot read: {err.strerror}") from None
    if slurm.matches(text):
        return text, []
    try:
        return text, [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        raise InputError(path, "<file>", f"invalid YAML: {str(err).splitlines()[0]}") from None


def check_file(path: str, placement: bool = False) -> list[Shape]:
    """Every recipe in the file, checked; a file that holds none is refused."""
    text, docs = read(path)
    shapes = []
    for kind in KINDS:
        for item in (docs if kind.reads == "yaml" else [text]):
            if kind.matches(item):
                shapes.append(kind.check(item, path, placement))
    if not shapes:
        raise InputError(path, "kind", f"expected {KNOWN}")
    return shapes


def check_space(shape: Shape, space, source: str) -> str:
    """One trial of `space` must fit the cluster at its largest, and one of its workers one node.
    Uses the project's placement check (lsep_tune.cluster), as the search itself does on joining."""
    from lsep_tune.cluster import check_placement, check_trial_fits  # torch: only with --space

    b = space.budget
    groups = [g for g in shape.groups if g.max_nodes > 0]
    worker_groups = [g for g in groups if g.name != "head"] or groups
    try:
        check_trial_fits(space.resources, space.source, shape.resources(), "this cluster at its largest")
        best = max(groups, key=lambda g: (g.gpus, g.cpus))
        check_placement(replace(space.resources, workers=1), {"CPU": best.cpus, "GPU": best.gpus},
                        f"its largest node ({best.name})")
    except InputError as err:
        # check_trial_fits names the budget's field; check_placement its neutral argument
        budget_field = err.field if err.field.startswith("budget.") else {
            "gpus_per_worker": "budget.gpus_per_worker"}.get(err.source, "budget.cpus_per_worker")
        short = worker_groups[-1]
        field = short.gpu_field if budget_field == "budget.gpus_per_worker" else short.cpu_field
        raise InputError(source, field, f"one trial of {space.source} must fit: {budget_field}: "
                                        f"{err.expectation}") from None
    return (f"{space.source}: one trial ({b.workers_per_trial} x ({b.cpus_per_worker:g} CPUs, "
            f"{b.gpus_per_worker:g} GPUs)) fits")


def check(files: list[str], space_name: str | None = None) -> list[str]:
    """The one-line summaries of `files`; the first problem is an InputError, before anything starts."""
    space = None
    if space_name:
        from lsep_tune.search.space import load_space  # pydantic and the config: only with --space

        space = load_space(space_name)
    lines = []
    for path in files:
        for shape in check_file(path, placement=space is not None):
            line = f"{path}: {shape.summary()}"
            if space is not None and shape.groups:
                line += f"; {check_space(shape, space, path)}"
            lines.append(line)
    return lines
