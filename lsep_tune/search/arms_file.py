"""An arms file (`python -m lsep_tune.ablate --arms`): its schema, and its arms read into `Arm`s with
every arm's config validated, before torch, Ray or MLflow load (a bad file is refused in a second,
not after the training stack has loaded).

`Arm`, what the arms x seeds engine (`search/arms.py`) trains on every seed, lives here so that a file
is read without the engine; confirmation (`search/confirm.py`) builds its arms from a search's trials.
The tables and the run of an ablation are `search/ablation.py`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from lsep_tune.cluster import TrialResources
from lsep_tune.config import Config, flatten, load_base, read_yaml, set_path, validate
from lsep_tune.errors import InputError
from lsep_tune.schema import StrictModel, explain
from lsep_tune.search.space import SPACES_DIR, reported_metrics


@dataclass
class Arm:
    """One configuration to train on every seed: a name, the params that define it, its Config."""

    name: str
    params: dict[str, Any]
    config: Config
    origin: str = ""  # where it came from (a search trial id, points_to_evaluate[0], an arms file)


class AblationBudget(StrictModel):
    max_concurrent: int = Field(2, ge=1)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_failures: int = Field(0, ge=0)

    @property
    def resources(self):
        """As a search's budget gives them (lsep_tune.cluster.TrialResources)."""
        return TrialResources(self.workers_per_trial, self.gpus_per_worker, self.cpus_per_worker,
                              self.max_failures, self.max_concurrent)


class AblationSpec(StrictModel):
    """An arms file: a base config, overrides for every arm, the arms, metrics, seeds, budget."""

    description: str = ""
    base: dict[str, str]
    overrides: dict[str, Any] = {}
    arms: dict[str, dict[str, Any]] = Field(min_length=2)
    metrics: list[str] = Field(["fid", "flow_loss"], min_length=1)
    seeds: int = Field(3, ge=2, description="seeds per arm (a confidence interval needs 2)")
    seed: int = Field(0, ge=0, description="the first seed; arms train on seed, seed+1, ...")
    budget: AblationBudget = AblationBudget()

    @field_validator("base")
    @classmethod
    def _one_base(cls, v):
        if len(v) != 1 or next(iter(v)) not in ("preset", "config"):
            raise ValueError("expected {preset: NAME} or {config: PATH}")
        return v

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v):
        known = reported_metrics()
        unknown = [m for m in v if m not in known]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}, expected some of {', '.join(known)}")
        return v


def resolve_arms_file(name_or_path: str) -> Path:
    """A path as given, else a shipped arms file by name (`digits`: search_spaces/ablation-digits.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    for candidate in (SPACES_DIR / f"ablation-{name_or_path}.yaml", SPACES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem.removeprefix("ablation-") for p in SPACES_DIR.glob("ablation-*.yaml"))
    raise InputError("arms", name_or_path, f"no such file or shipped arms ({', '.join(shipped)})")


def load_ablation(name_or_path: str, seeds: int | None = None, max_steps: int | None = None
                  ) -> tuple[AblationSpec, list[Arm], str]:
    """Parse and validate the arms file and every arm's config (`seeds` and `max_steps` override the
    file's); a one-line InputError otherwise."""
    path = resolve_arms_file(name_or_path)
    source = str(path)
    raw = read_yaml(path, source, "expected a mapping with base, arms, metrics, seeds, ...", empty={})
    if seeds is not None:
        raw["seeds"] = seeds
    try:
        spec = AblationSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError(source, *explain(err, show_input=False)) from None
    base, _ = load_base(spec.base, path.parent, source)
    overrides = dict(spec.overrides)
    if max_steps is not None:
        overrides["run.max_steps"] = max_steps
    fields = flatten(validate(copy.deepcopy(base), source).to_dict())
    known = reported_metrics()
    arms = []
    for name, changes in spec.arms.items():
        data = copy.deepcopy(base)
        for where, items in (("overrides", overrides), (f"arms.{name}", changes)):
            for key, value in (items or {}).items():
                if key not in fields:
                    raise InputError(source, f"{where}.{key}", "not a config field")
                set_path(data, key, value)
        cfg = validate(data, f"{source} (arm {name})")
        if cfg.run.eval_every == 0 and any(known[m].evaluation for m in spec.metrics):
            raise InputError(source, f"arms.{name}",
                             "metrics include an evaluation metric but run.eval_every is 0")
        arms.append(Arm(name, dict(changes or {}), cfg, source))
    return spec, arms, source
