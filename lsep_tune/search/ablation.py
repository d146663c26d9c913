"""An ablation: named arms (no regularizer, LSEP, SRA, LSEP+SRA, or any configs an arms file gives)
each trained on the same N seeds through the arms x seeds engine (`search/arms.py`), one nested
MLflow run each, tagged `lsep_tune.role=ablation`. The output folder gets, per metric, each arm's
mean +/- std over seeds and its difference from the first arm paired by seed with a 95% t-interval:
`table.md`, `table.csv`, the per-seed values in `values.csv`, and `bars.png`. The intervals are per
comparison (no multiplicity correction): the table reports, it does not pick a winner.

`python -m lsep_tune.ablate` is the command on top of it.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from lsep_tune import stats, tracking
from lsep_tune.cluster import TrialResources
from lsep_tune.config import flatten, load_base, read_yaml, set_path, validate
from lsep_tune.errors import InputError
from lsep_tune.schema import StrictModel, explain
from lsep_tune.search.arms import Arm, bar_chart, metric_key, run_arms, values_of
from lsep_tune.search.space import SPACES_DIR, reported_metrics
from lsep_tune.search.trials import SearchPaths


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


# ----- the table -----------------------------------------------------------------------------------

def table_rows(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    """values: {metric: {arm: per-seed values, first arm first}} -> one row per (metric, arm)."""
    rows = []
    for metric, by_arm in values.items():
        first = next(iter(by_arm))
        for arm, vals in by_arm.items():
            s = stats.spread([v for v in vals if math.isfinite(v)])
            row = {"metric": metric, "arm": arm, "n": s.n, "mean": s.mean, "std": s.std,
                   "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan}
            if arm != first:
                d = stats.paired_difference(vals, by_arm[first])
                row.update(diff=d.mean, ci_low=d.ci_low, ci_high=d.ci_high)
            rows.append(row)
    return rows


def _fmt(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.4g}"


def write_tables(values: dict[str, dict[str, list[float]]], seeds: list[int], output: Path,
                 title: str = "") -> dict[str, Path]:
    """table.md, table.csv (per metric and arm), values.csv (per seed) and bars.png."""
    output.mkdir(parents=True, exist_ok=True)
    rows = table_rows(values)
    with open(output / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (_fmt(v) if isinstance(v, float) else v) for k, v in r.items()})
    with open(output / "values.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "arm", "seed", "value"])
        for metric, by_arm in values.items():
            for arm, vals in by_arm.items():
                for seed, v in zip(seeds, vals):
                    w.writerow([metric, arm, seed, _fmt(v)])
    lines = [f"# {title}" if title else "# Ablation", "",
             f"Seeds: {', '.join(map(str, seeds))}. Differences are paired by seed against the first arm, "
             "with 95% t-intervals (per comparison, no multiplicity correction).", ""]
    for metric, by_arm in values.items():
        first = next(iter(by_arm))
        lines += [f"## {metric}", "", f"| arm | n | mean ± std | diff vs {first} | 95% CI |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r["metric"] == metric):
            ci = "" if not math.isfinite(r["diff"]) else (
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if math.isfinite(r["ci_low"]) else "(needs 2 paired seeds)")
            spread = f"{_fmt(r['mean'])} ± {_fmt(r['std'])}" if r["n"] else "(no value)"
            lines.append(f"| {r['arm']} | {r['n']} | {spread} | {_fmt(r['diff'])} | {ci} |")
        lines.append("")
    (output / "table.md").write_text("\n".join(lines))
    bar_chart(values, output / "bars.png", title)
    return {"table.md": output / "table.md", "table.csv": output / "table.csv",
            "values.csv": output / "values.csv", "bars.png": output / "bars.png"}


# ----- the run ------------------------------------------------------------------------------------

def run_ablation(spec: AblationSpec, arms: list[Arm], output: Path, mlflow_uri: str, name: str) -> dict:
    """Train arms x seeds (Ray must be connected), write the tables, log everything to MLflow."""
    started = time.time()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)  # the default MLflow store lies in it
    seeds = list(range(spec.seed, spec.seed + spec.seeds))
    parent = tracking.create_run(
        mlflow_uri, {metric_key(f"ablation.{k}"): v for k, v in flatten(spec.model_dump()).items()},
        {"lsep_tune.kind": "ablation", "lsep_tune.role": "ablation", "output": str(output)},
        run_name=f"ablation-{name}", artifact_location=tracking.artifact_location_for(mlflow_uri, output))
    paths = SearchPaths(output, mlflow_uri, parent)
    reports = run_arms(arms, seeds, spec.budget.resources, paths, "ablation")
    max_steps = arms[0].config.run.max_steps
    values = {m: {a.name: values_of(reports[a.name], seeds, m, a.config.run.max_steps) for a in arms}
              for m in spec.metrics}
    files = write_tables(values, seeds, output, f"Ablation {name}: {len(arms)} arms x {len(seeds)} seeds, "
                                                f"{max_steps} steps")
    tracker = tracking.RunTracker(mlflow_uri, parent)
    numbers = {}
    for r in table_rows(values):
        for key in ("mean", "std", "diff", "ci_low", "ci_high"):
            if math.isfinite(r[key]):
                numbers[metric_key("ablation", r["arm"], r["metric"], key)] = r[key]
    tracker.log_metrics(numbers, 0)
    for path in files.values():
        tracker.log_artifact(path, "ablation")
    failed = sum(1 for a in arms for s in seeds if not reports[a.name].get(s))
    summary = {"arms": {a.name: a.params for a in arms}, "seeds": seeds, "metrics": spec.metrics,
               "values": {m: {a: [None if not math.isfinite(v) else v for v in vs] for a, vs in by.items()}
                          for m, by in values.items()},
               "failed_runs": failed, "wall_time_s": round(time.time() - started, 1),
               "mlflow_tracking_uri": mlflow_uri, "mlflow_parent_run_id": parent,
               "files": {k: str(v) for k, v in files.items()}}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracker.log_artifact(output / "summary.json", "ablation")
    tracker.finish("FINISHED" if failed < len(arms) * len(seeds) else "FAILED")
    return summary
