"""An ablation: named arms (no regularizer, LSEP, SRA, LSEP+SRA, or any configs an arms file gives)
each trained on the same N seeds through the arms x seeds engine (`search/arms.py`), one nested
MLflow run each, tagged `lsep_tune.role=ablation`. The output folder gets, per metric, each arm's
mean +/- std over seeds and its difference from the first arm paired by seed with a 95% t-interval:
`table.md`, `table.csv`, the per-seed values in `values.csv`, and `bars.png`. The intervals are per
comparison (no multiplicity correction): the table reports, it does not pick a winner.

The arms file and its arms are read by `search/arms_file.py` (without torch, Ray or MLflow);
`python -m lsep_tune.ablate` is the command on top of both.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from lsep_tune import stats, tracking
from lsep_tune.config import flatten
from lsep_tune.search.arms import bar_chart, metric_key, run_arms, values_of
from lsep_tune.search.arms_file import AblationSpec, Arm
from lsep_tune.search.trials import SearchPaths, ends_killed_on_error


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
    tracker = tracking.RunTracker(mlflow_uri, parent)
    with ends_killed_on_error(paths, tracker):  # a stop (SIGTERM) or a crash: every open run ends KILLED
        reports = run_arms(arms, seeds, spec.budget.resources, paths, "ablation")
        max_steps = arms[0].config.run.max_steps
        values = {m: {a.name: values_of(reports[a.name], seeds, m, a.config.run.max_steps) for a in arms}
                  for m in spec.metrics}
        files = write_tables(values, seeds, output, f"Ablation {name}: {len(arms)} arms x {len(seeds)} seeds, "
                                                    f"{max_steps} steps")
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
