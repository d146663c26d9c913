"""Confirmation: train the search's top configurations and a baseline again on fresh seeds.

A search names its best from one training seed, and the seed alone moves the digits FID by several
points. So after the search, the top K configurations and a baseline are each trained again at the
full budget on S seeds the search never used, as Tune trials in parallel on the same cluster,
through the search's own trial function (one nested MLflow run each, tagged as a confirmation).
The per-seed values are compared with the baseline paired by seed (`lsep_tune.stats`): a
configuration replaces the baseline only when its interval excludes zero on the better side.

`run_arms` is the engine underneath and is shared with `python -m lsep_tune.ablate`: named
configurations ("arms") x seeds as one Tune experiment, returning each run's final report.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from lsep_tune import stats, tracking
from lsep_tune.cluster import TrialResources, trial_resources
from lsep_tune.config import Config, dump_config, validate
from lsep_tune.search.report import value
from lsep_tune.search.schema import ConfirmConfig
from lsep_tune.search.stop import fit_or_stop
from lsep_tune.search.trials import SearchPaths, TrialRuns, end_unfinished_runs, live_table, open_trial_run, trial_main

ROLE_TAG = "lsep_tune.role"
ARM_TAG = "lsep_tune.arm"
SEED_TAG = "lsep_tune.seed"
BASELINE = "baseline"


# ----- the engine: named configurations x seeds as Tune trials ----------------------------------

@dataclass
class Arm:
    """One configuration to train on every seed: a name, the params that define it, its Config."""

    name: str
    params: dict[str, Any]
    config: Config
    origin: str = ""  # where it came from (a search trial id, points_to_evaluate[0], an arms file)


class ArmSpace:
    """What the search's trial function needs from a space, for fixed arms: `trial_config` of a
    Tune config {arm, seed} and `resources`. The search's own trial function then runs it unchanged."""

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


def _trial(tune_config: dict, space: ArmSpace, paths, role: str) -> None:
    """One (arm, seed) Tune trial through the search's trial function: the adapter to re-point
    if that function moves."""
    trial_id = tune.get_context().get_trial_id()
    open_trial_run(paths, trial_id, space, tune_config, trial_id, role)
    trial_main(tune_config, space=space, paths=paths)


def arms_table():
    """Tune's live table for arms x seeds: which run is where, by arm and seed."""
    return live_table({"step": "step"}, {"arm": "arm", "seed": "seed"})


def run_arms(arms: list[Arm], seeds: list[int], resources: TrialResources, paths, role: str) -> dict[str, dict[int, dict]]:
    """Train every arm on every seed (Ray must be connected); returns {arm: {seed: last report}},
    where a failed or diverged run's report is {} (no value). Every run ends in its true MLflow state;
    one still open when this returns or raises (never started, interrupted) ends KILLED."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    space = ArmSpace(arms, resources)
    trainable = tune.with_resources(tune.with_parameters(_trial, space=space, paths=paths, role=role),
                                    trial_resources(resources))
    tuner = tune.Tuner(
        trainable,
        # seed-major: the runs that will be compared with each other finish close together
        param_space={"seed": tune.grid_search(list(seeds)), "arm": tune.grid_search([a.name for a in arms])},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=resources.max_concurrent),
        run_config=tune.RunConfig(name=role, storage_path=str(paths.tune_root),
                                  # once more after a lost worker (e.g. a node out of memory); it
                                  # resumes from its checkpoint into the same MLflow run
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[TrialRuns(paths, space, role)],
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


def _clean(value):
    """JSON without NaN / Infinity: a missing or unbounded number is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# ----- confirmation -------------------------------------------------------------------------------

def confirm(arms: list[Arm], seeds: list[int], resources: TrialResources, paths, metric: str, mode: str,
            baseline: str = BASELINE, max_steps: int | None = None) -> dict:
    """Train `arms` (the baseline among them) on `seeds` and judge them against the baseline.

    Returns the `confirmation` object of summary.json; logs its numbers, a bar chart and
    confirmation.json to the MLflow run `paths.parent_run_id` (which must still be open).
    """
    reports = run_arms(arms, seeds, resources, paths, "confirmation")
    values = {a.name: values_of(reports[a.name], seeds, metric, max_steps) for a in arms}
    decision = stats.decide(values, baseline, mode, metric)
    configs = []
    for a in arms:
        s = stats.spread([v for v in values[a.name] if math.isfinite(v)])
        entry = {"name": a.name, "origin": a.origin, "params": a.params, "seeds": list(seeds),
                 "values": values[a.name], "n": s.n, "mean": s.mean, "std": s.std}
        eval_std = values_of(reports[a.name], seeds, f"{metric}_std", max_steps)
        if any(math.isfinite(v) for v in eval_std):
            entry[f"{metric}_std_per_seed"] = eval_std  # the evaluation's own noise on each seed
        if a.name != baseline:
            entry["difference"] = decision.differences[a.name].to_dict()
            entry["adjusted_difference"] = decision.adjusted[a.name].to_dict()
            entry["beats_baseline"] = decision.beats_baseline[a.name]
        configs.append(entry)
    winner = next(a for a in arms if a.name == decision.winner)
    out = _clean({
        "metric": metric, "mode": mode, "seeds": list(seeds), "baseline": baseline,
        "confidence": stats.CONFIDENCE, "multiplicity": "bonferroni",
        "adjusted_confidence": stats.adjusted_confidence(len(arms) - 1),
        "configs": configs, "winner": winner.name, "winner_params": winner.params, "verdict": decision.verdict,
    })
    _log_to_parent(out, paths, metric)
    return out


def _log_to_parent(confirmation: dict, paths, metric: str) -> None:
    folder = Path(paths.output)
    folder.mkdir(parents=True, exist_ok=True)
    parent = tracking.RunTracker(paths.mlflow_uri, paths.parent_run_id)
    numbers = {}
    for c in confirmation["configs"]:
        for key in ("mean", "std"):
            if c[key] is not None:
                numbers[metric_key("confirm", c["name"], metric, key)] = c[key]
        for key in ("mean", "ci_low", "ci_high"):
            d = (c.get("difference") or {}).get(key)
            if d is not None:
                numbers[metric_key("confirm", c["name"], metric, "diff" if key == "mean" else key)] = d
    parent.log_metrics(numbers, 0)
    parent.set_tags({"confirm.winner": confirmation["winner"], "confirm.verdict": confirmation["verdict"][:5000]})
    table = {metric: {c["name"]: [math.nan if v is None else v for v in c["values"]] for c in confirmation["configs"]}}
    chart = bar_chart(table, folder / "confirmation.png", f"confirmation on {len(confirmation['seeds'])} fresh seeds")
    (folder / "confirmation.json").write_text(json.dumps(confirmation, indent=2) + "\n")
    parent.log_artifact(chart, "confirmation")
    parent.log_artifact(folder / "confirmation.json", "confirmation")


# ----- wiring into a search -------------------------------------------------------------------------

def baseline_params(space, settings: ConfirmConfig) -> tuple[dict[str, Any], str]:
    """The baseline's searched params and where they came from."""
    if isinstance(settings.baseline, dict):
        return dict(settings.baseline), "confirm.baseline"
    if settings.baseline == "first_point" and space.points_to_evaluate:
        return dict(space.points_to_evaluate[0]), "points_to_evaluate[0]"
    return {}, "base"


def top_configurations(rows: list[dict], k: int, mode: str, key=None) -> list[dict]:
    """The k best trials of a search table with distinct `key(params)`, those trained furthest
    first (an early rung's metric is not comparable with a finished trial's)."""
    key = key or (lambda params: json.dumps(params, sort_keys=True, default=str))
    done = [r for r in rows if r["status"] != "failed" and value(r) is not None]
    sign = 1.0 if mode == "min" else -1.0
    done.sort(key=lambda r: (-(r["step"] or 0), sign * value(r)))
    chosen, seen = [], set()
    for r in done:
        kr = key(r["params"])
        if kr not in seen:
            seen.add(kr)
            chosen.append(r)
    return chosen[:k]


def end_only(cfg: Config) -> Config:
    """A confirmation run is judged by its value at the end alone: its in-training evaluations before
    the last step (the search's ASHA rungs) would only cost time, so it evaluates at max_steps only."""
    if not cfg.run.eval_every or cfg.run.eval_every >= cfg.run.max_steps:
        return cfg
    data = cfg.to_dict()
    data["run"]["eval_every"] = cfg.run.max_steps
    return validate(data, "confirmation")


def confirm_search(space, rows: list[dict], paths, settings: ConfirmConfig) -> dict:
    """After a search: confirm the top `settings.top_k` trials of `rows` against the baseline on
    fresh seeds, write OUTPUT/best.yaml as the confirmed winner (the baseline when nothing beats it)
    and return the `confirmation` object. `paths` is the search's SearchPaths."""
    metric, mode = space.metric_names[0], space.modes[0]
    base_params, origin = baseline_params(space, settings)
    baseline_cfg = end_only(space.trial_config(base_params))

    def config_key(params: dict) -> str:
        return json.dumps(space.trial_config(params).to_dict(), sort_keys=True, default=str)

    # Trials are told apart by the config they train: one equal to the baseline is not trained twice.
    candidates = [r for r in top_configurations(rows, settings.top_k + 1, mode, config_key)
                  if config_key(r["params"]) != config_key(base_params)][: settings.top_k]
    arms = [Arm(BASELINE, base_params, baseline_cfg, origin)]
    for i, row in enumerate(candidates, 1):
        arms.append(Arm(f"top{i}", dict(row["params"]), end_only(space.trial_config(row["params"])), f"trial {row['id']}"))
    seeds = settings.fresh_seeds(space.training_seeds(), space.source)
    sub = SearchPaths(Path(paths.output) / "confirmation", paths.mlflow_uri, paths.parent_run_id)
    out = confirm(arms, seeds, space.resources, sub, metric, mode, max_steps=space.budget.max_steps)
    by_trial = {f"trial {r['id']}": r["metric"] for r in rows}
    for c in out["configs"]:
        c["search_metric"] = _clean(by_trial.get(c["origin"]))
    winner = next(a for a in arms if a.name == out["winner"])
    dump_config(space.trial_config(winner.params), Path(paths.output) / "best.yaml")  # as the search trained it
    out["best_yaml"] = str(Path(paths.output) / "best.yaml")
    (sub.output / "confirmation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out

