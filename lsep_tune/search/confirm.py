"""Confirmation: train the search's top configurations and a baseline again on fresh seeds.

A search names its best from one training seed, and the seed alone moves the digits FID by several
points. So after the search, the top K configurations and a baseline are each trained again at the
full budget on S seeds the search never used, as Tune trials in parallel on the same cluster,
through the search's own trial function (one nested MLflow run each, tagged as a confirmation).
The per-seed values are compared with the baseline paired by seed (`lsep_tune.stats`): a
configuration replaces the baseline only when its interval excludes zero on the better side.

The engine underneath, named configurations ("arms") x seeds as one Tune experiment, is
`search/arms.py`, shared with `python -m lsep_tune.ablate`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lsep_tune import stats, tracking
from lsep_tune.cluster import TrialResources
from lsep_tune.config import Config, dump_config, validate
from lsep_tune.search.arms import bar_chart, clean_json, metric_key, run_arms, values_of
from lsep_tune.search.arms_file import Arm
from lsep_tune.search.report import value
from lsep_tune.search.schema import ConfirmConfig
from lsep_tune.search.trials import SearchPaths

BASELINE = "baseline"


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
    out = clean_json({
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
        c["search_metric"] = clean_json(by_trial.get(c["origin"]))
    winner = next(a for a in arms if a.name == out["winner"])
    dump_config(space.trial_config(winner.params), Path(paths.output) / "best.yaml")  # as the search trained it
    out["best_yaml"] = str(Path(paths.output) / "best.yaml")
    (sub.output / "confirmation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out

