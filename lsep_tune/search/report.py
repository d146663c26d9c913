"""What a finished search leaves behind: the trial table, the best trial, the Optuna plots, how well
early rungs predict the final ranking, and the lines printed at the end."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from lsep_tune.search.space import reported_metrics

PROXY_WARNING = 0.5  # below this rank correlation, stopping trials at a rung is close to guessing


def trial_table(results, space) -> list[dict]:
    """One row per trial; a metric with an uncertainty (fid -> fid_std) gets it beside it, `metric_std`."""
    rows = []
    metric = space.metric_names[0]
    stds = uncertainties()
    for res in results:
        last = res.metrics or {}
        trial_id = last.get("trial_id") or Path(res.path).name
        row = {
            "id": trial_id,
            "status": "failed" if res.error else ("stopped" if last.get("step", 0) < space.budget.max_steps else "completed"),
            "params": {k: v for k, v in (res.config or {}).items()},
            "metric": {m: last.get(m) for m in space.metric_names} if len(space.metric_names) > 1 else last.get(metric),
        }
        spread = {m: last[stds[m]] for m in space.metric_names if m in stds and last.get(stds[m]) is not None}
        if spread:
            row["metric_std"] = spread if len(space.metric_names) > 1 else spread[metric]
        row.update(step=last.get("step"), error=str(res.error).splitlines()[-1][:300] if res.error else None)
        rows.append(row)
    return rows


def uncertainties() -> dict[str, str]:
    """{metric: the key of its uncertainty}, e.g. fid -> fid_std, from what the trainer reports."""
    return {r.uncertainty_of: name for name, r in reported_metrics().items() if r.uncertainty_of}


def value(row: dict) -> float | None:
    """A trial row's metric, the first objective's when there are several (the row's metric is then a
    dict in the space's order); None when it is missing or not finite."""
    v = row["metric"]
    v = next(iter(v.values())) if isinstance(v, dict) else v
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def best_trial(rows: list[dict], space) -> dict | None:
    """The best metric among the trials trained furthest: an early rung's FID is not comparable
    with a fully trained trial's, so trials the scheduler stopped early only win if none went further.
    With several objectives the first decides (the whole Pareto front is in the summary)."""
    mode = space.modes[0]
    done = [r for r in rows if r["status"] != "failed" and value(r) is not None]
    if not done:
        return None
    furthest = max(r["step"] or 0 for r in done)
    done = [r for r in done if (r["step"] or 0) == furthest]
    return (min if mode == "min" else max)(done, key=value)


def histories(results, rows: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """{trial id: {step: metric}} of the trials that ran to the end, from Tune's own result logs."""
    completed = {r["id"] for r in rows if r["status"] == "completed"}
    out = {}
    for res, row in zip(results, rows):
        frame = res.metrics_dataframe
        if row["id"] in completed and frame is not None and metric in frame:
            frame = frame.dropna(subset=[metric])
            out[row["id"]] = dict(zip(frame["step"].astype(int), frame[metric].astype(float)))
    return out


def proxy_validity(curves: dict[str, dict[int, float]], final_step: int, steps: list[int]) -> dict[int, float]:
    """Spearman rank correlation, over the trials that ran to `final_step`, between the metric at each
    earlier rung step and the final metric: how far the scheduler's early decisions can be trusted.
    A step needs at least three trials with a value there (two ranks always correlate +-1)."""
    from scipy.stats import spearmanr

    out = {}
    for step in steps:
        pairs = [(c[step], c[final_step]) for c in curves.values() if step in c and final_step in c]
        if len(pairs) < 3:
            continue
        rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
        if math.isfinite(rho):
            out[step] = round(float(rho), 4)
    return out


def rung_steps(space) -> list[int]:
    """The steps before the end at which a scheduler can compare trials on the primary metric:
    every report, or for an evaluation metric every fresh evaluation."""
    cfg = space.base_config()
    every = space.report_every
    if reported_metrics()[space.metric_names[0]].evaluation:
        every = cfg.run.eval_every
    return list(range(every, space.budget.max_steps, every))


def pareto_front(study) -> list[dict]:
    return [{"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials]


def optuna_plots(study, space, out_dir: Path) -> list[Path]:
    """Optimization history, parameter importances and parallel coordinates as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out_dir.mkdir(exist_ok=True)
    target = None if len(space.metric_names) == 1 else (lambda t: t.values[0])
    name = space.metric_names[0]
    made = []
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    for title, fn in plots.items():
        if title == "param_importances" and len(complete) < 2:
            continue
        try:
            with warnings.catch_warnings():  # "experimental" notes and degenerate-axis notes: nothing to act on
                warnings.simplefilter("ignore")
                fn(study, target=target, target_name=name)
        except (ValueError, RuntimeError) as err:  # e.g. too few trials for importances
            print(f"note: no {title} plot ({err})")
            plt.close("all")
            continue
        path = out_dir / f"{title}.png"
        plt.gcf().savefig(path, bbox_inches="tight", dpi=110)
        plt.close("all")
        made.append(path)
    return made


def print_summary(summary: dict, output: Path, ui_command: str) -> None:
    failed = sum(r["status"] == "failed" for r in summary["trials"])
    print(f"\n{len(summary['trials'])} trials ({failed} failed) in {summary['wall_time_s']:.0f} s")
    if summary["best_trial"]:
        best = summary["best_metric"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in best.items()) if isinstance(best, dict) else f"{best:.4g}"
        print(f"best {summary['metric']}: {shown} (trial {summary['best_trial']})")
        for key, value in sorted(summary["best_params"].items()):
            print(f"  {key} = {value}")
        confirmation = summary.get("confirmation")
        if confirmation:
            print(f"confirmation: {confirmation['verdict']}")
            if confirmation["winner"] == confirmation["baseline"]:
                same = confirmation.get("winner_params") == summary["best_params"]
                print(f"best.yaml holds the baseline ({confirmation['configs'][0]['origin']})"
                      + (", which is also the search's best trial" if same else ", not the search's best trial"))
        print(f"best config: {summary['best_yaml']}  (rerun: python -m lsep_tune.train --config {summary['best_yaml']})")
        if summary.get("mlflow_model_uri"):
            registered = f", registered as {summary['registered_model']}" if summary.get("registered_model") else ""
            print(f"MLflow model: {summary['mlflow_model_uri']}{registered}  (its EMA weights and config; "
                  "lsep_tune.mlflow_model.load_model(URI) reads it back)")
    else:
        print("no trial finished with a metric")
    proxy = summary.get("proxy_validity")
    if proxy:
        shown = ", ".join(f"step {step}: {rho:+.2f}" for step, rho in proxy.items())
        print(f"proxy validity (Spearman, rung vs final {summary['metric']}, trials run to the end): {shown}")
        if min(proxy.values()) < PROXY_WARNING:
            print(f"warning: early rungs do not predict the final ranking here (Spearman < {PROXY_WARNING}); "
                  "consider a later grace_period or no scheduler")
    print(f"summary: {output / 'summary.json'}")
    print(f"Optuna study: optuna-dashboard {summary['optuna_storage']}  (pip install optuna-dashboard)")
    print(f"MLflow: {ui_command}")
