"""Named configurations ("arms") x seeds as one Tune experiment: the engine under confirmation
(`search/confirm.py`) and `python -m lsep_tune.ablate`.

Every (arm, seed) is one Tune trial through the search's own trial function, with its nested MLflow
run tagged by role, arm and seed; `run_arms` returns each run's final report, `values_of` turns
those into per-seed values for `lsep_tune.stats`. `Arm` itself is defined in `search/arms_file.py`,
beside the arms file's loader, so that reading an arms file needs no Ray.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ray import tune

from lsep_tune import stats
from lsep_tune.cluster import TrialResources, trial_resources
from lsep_tune.config import Config, validate
from lsep_tune.search.arms_file import Arm
from lsep_tune.search.stop import fit_or_stop
from lsep_tune.search.trials import TrialRuns, end_unfinished_runs, live_table, trial_main

ROLE_TAG = "lsep_tune.role"
ARM_TAG = "lsep_tune.arm"
SEED_TAG = "lsep_tune.seed"


class ArmTrials:
    """The trial builder for fixed arms x seeds (`trials.RoleTrialBuilder`): a Tune config {arm, seed}
    -> that arm's Config on that seed, and its runs' tags. The search's own trial function runs it."""

    def __init__(self, arms: list[Arm], resources: TrialResources):
        self.arms = {a.name: a for a in arms}
        self.resources = resources

    def trial_config(self, tune_config: dict) -> Config:
        data = self.arms[tune_config["arm"]].config.to_dict()
        data["run"]["seed"] = int(tune_config["seed"])
        return validate(data, f"arm {tune_config['arm']} seed {tune_config['seed']}")

    def run_tags(self, tune_config: dict, role: str) -> dict[str, Any]:
        """The (arm, seed) trial's MLflow tags: its role, arm and seed, and its name."""
        arm, seed = tune_config["arm"], tune_config["seed"]
        return {ROLE_TAG: role, ARM_TAG: arm, SEED_TAG: seed, "mlflow.runName": f"{role}: {arm}, seed {seed}"}


def arms_table():
    """Tune's live table for arms x seeds: which run is where, by arm and seed."""
    return live_table({"step": "step"}, {"arm": "arm", "seed": "seed"})


def run_arms(arms: list[Arm], seeds: list[int], resources: TrialResources, paths, role: str) -> dict[str, dict[int, dict]]:
    """Train every arm on every seed (Ray must be connected); returns {arm: {seed: last report}},
    where a failed or diverged run's report is {} (no value). Every run ends in its true MLflow state;
    one still open when this returns or raises (never started, interrupted) ends KILLED."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    builder = ArmTrials(arms, resources)
    trainable = tune.with_resources(tune.with_parameters(trial_main, builder=builder, paths=paths),
                                    trial_resources(resources))
    tuner = tune.Tuner(
        trainable,
        # seed-major: the runs that will be compared with each other finish close together
        param_space={"seed": tune.grid_search(list(seeds)), "arm": tune.grid_search([a.name for a in arms])},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=resources.max_concurrent,
                                    reuse_actors=True),  # one start-up per slot, as the search's
        run_config=tune.RunConfig(name=role, storage_path=str(paths.tune_root),
                                  # once more after a lost worker (e.g. a node out of memory); it
                                  # resumes from its checkpoint into the same MLflow run
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[TrialRuns(paths, builder, role)],
                                  progress_reporter=arms_table(), verbose=1),
    )
    try:
        try:
            results = fit_or_stop(tuner)
        except Exception as err:  # noqa: BLE001 - Tune's own loop dies when a node runs out of memory
            folder = str(paths.tune_root / role)
            if not tune.Tuner.can_restore(folder):
                raise
            print(f"note: the {role} runs were interrupted ({type(err).__name__}); resuming the unfinished ones")
            results = fit_or_stop(tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True,
                                                     resume_errored=True))
    finally:
        end_unfinished_runs(paths, "KILLED")
    out: dict[str, dict[int, dict]] = {a.name: {} for a in arms}
    for res in results:
        cfg = res.config or {}
        if "arm" not in cfg:
            continue
        out[cfg["arm"]][int(cfg["seed"])] = {} if res.error else dict(res.metrics or {})
    return out


def values_of(reports: dict[int, dict], seeds: list[int], metric: str, max_steps: int | None = None) -> list[float]:
    """Per-seed values in seed order; NaN where a run failed, or stopped before max_steps."""
    out = []
    for s in seeds:
        r = reports.get(s) or {}
        v = r.get(metric)
        finished = max_steps is None or (r.get("step") or 0) >= max_steps
        out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) and finished else math.nan)
    return out


def bar_chart(table: dict[str, dict[str, list[float]]], path: Path, title: str = "") -> Path:
    """One panel per metric: each arm's mean over seeds, error bars one standard deviation, the
    seeds as dots. table: {metric: {arm: per-seed values}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(table)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.3 * len(next(iter(table.values())))) * len(metrics), 3.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        names = list(table[metric])
        spreads = [stats.spread([v for v in table[metric][n] if math.isfinite(v)]) for n in names]
        x = np.arange(len(names))
        ax.bar(x, [s.mean for s in spreads], yerr=[s.std for s in spreads], capsize=5, color="#8fb3d9",
               edgecolor="#2f5d8a")
        for i, n in enumerate(names):
            ys = [v for v in table[metric][n] if math.isfinite(v)]
            ax.scatter([i] * len(ys), ys, color="#1b1b1b", s=12, zorder=3)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean +/- std over seeds")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_key(*parts: str) -> str:
    """An MLflow metric name (letters, digits, _ - . / and spaces only)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", "_".join(parts))


def clean_json(value):
    """JSON without NaN / Infinity: a missing or unbounded number is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value
