"""The search: Ray Tune drives Optuna over a search space; every trial is a Ray Train run.

Train V2 pattern: each Tune trial is a small function that builds a `TorchTrainer` for its config
and forwards rank 0's reports to Tune (`TuneReportCallback`), so schedulers (ASHA / HyperBand)
stop poor trials on the step-indexed metrics. The Optuna study lives in an RDB file that
`optuna-dashboard` opens; MLflow gets one parent run per search and one nested run per trial.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lsep_tune import tracking
from lsep_tune.config import dump_config, flatten

STUDY_NAME = "lsep_tune"
TRIAL_ID_TAG = "lsep_tune.trial_id"
TRIAL_DRIVER_CPU = 0.01  # a trial's own process only waits on its TorchTrainer


@dataclass
class SearchPaths:
    output: Path
    mlflow_uri: str
    parent_run_id: str

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{(self.output / 'optuna.db').resolve()}"

    @property
    def tune_root(self) -> Path:
        return (self.output / "tune").resolve()

    @property
    def ray_storage(self) -> Path:
        return (self.output / "trials").resolve()


def penalty(mode: str) -> float:
    """What a failed trial tells the searcher: worse than anything a real trial can report."""
    return 1e12 if mode == "min" else -1e12


def make_searcher(space, paths: SearchPaths):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = space.metric_names, space.modes

    class PenalizingOptunaSearch(OptunaSearch):
        """A trial that failed or diverged is told to Optuna as the worst value, not dropped,
        so TPE learns to avoid that region instead of sampling it again."""

        def on_trial_result(self, trial_id, result):
            if all(m in result for m in metrics):  # a divergence report carries no metric
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if error:
                result = {m: penalty(mode) for m, mode in zip(metrics, modes)}
                error = False
            elif result is not None and any(m not in result for m in metrics):
                result = {**result, **{m: penalty(mode) for m, mode in zip(metrics, modes) if m not in result}}
            super().on_trial_complete(trial_id, result, error)

    searcher = PenalizingOptunaSearch(
        space=space.define_by_run,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=space.points_to_evaluate or None,
        sampler=space.sampler(),
        study_name=STUDY_NAME,
        storage=optuna.storages.RDBStorage(paths.optuna_storage),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.budget.max_concurrent)


def make_scheduler(space):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    kwargs = {k: v for k, v in space.scheduler_spec.items() if k != "type"}  # Ray's own argument names
    kwargs.setdefault("time_attr", "step")
    kwargs.setdefault("max_t", space.budget.max_steps)
    kind = space.scheduler_spec.get("type", "none")
    if kind == "asha":
        return ASHAScheduler(**kwargs)
    if kind == "hyperband":
        return HyperBandScheduler(**kwargs)
    return FIFOScheduler()


def child_run_id(paths: SearchPaths, trial_id: str, trial_name: str, cfg, params: dict) -> str:
    """The trial's nested MLflow run: found again by tag after a restart, created otherwise."""
    client = tracking.client(paths.mlflow_uri)
    parent = client.get_run(paths.parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{paths.parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
    )
    if found:
        return found[0].info.run_id
    return tracking.create_run(
        paths.mlflow_uri, cfg.flat(), {TRIAL_ID_TAG: trial_id, **{f"searched.{k}": v for k, v in params.items()}},
        run_name=trial_name, experiment=parent_experiment_name(client, parent), parent_run_id=paths.parent_run_id,
    )


def parent_experiment_name(client, parent) -> str:
    return client.get_experiment(parent.info.experiment_id).name


def trial_main(params: dict, space=None, paths: SearchPaths = None) -> None:
    """One Tune trial: a Ray Train run of the space's config with `params` applied."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lsep_tune.train.distributed import Placement, RunPaths, build_trainer, divergence

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = space.trial_config(params)
    run_id = child_run_id(paths, trial_id, trial_name, cfg, params)
    b = space.budget
    placement = Placement(b.workers_per_trial, b.gpus_per_worker, b.cpus_per_worker, b.max_failures)
    out = paths.output.resolve() / "trial_runs" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    run_paths = RunPaths(output=str(out), storage=str(paths.ray_storage), name=trial_id,
                         mlflow_uri=paths.mlflow_uri, mlflow_run_id=run_id, resume=True)
    tracker = tracking.RunTracker(paths.mlflow_uri, run_id)
    try:
        build_trainer(cfg, placement, run_paths, callbacks=[TuneReportCallback()]).fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    diverged = divergence(out)
    if diverged:
        tracker.finish("FAILED")
        raise TrialDiverged(f"trial {trial_id} diverged: {diverged['error']}")
    tracker.finish("FINISHED")


class TrialDiverged(RuntimeError):
    """Raised in a trial so Tune records it as failed (and the searcher hears a penalty)."""


def trial_table(results, space) -> list[dict]:
    rows = []
    metric = space.metric_names[0]
    for res in results:
        last = res.metrics or {}
        trial_id = last.get("trial_id") or Path(res.path).name
        rows.append({
            "id": trial_id,
            "status": "failed" if res.error else ("stopped" if last.get("step", 0) < space.budget.max_steps else "completed"),
            "params": {k: v for k, v in (res.config or {}).items()},
            "metric": {m: last.get(m) for m in space.metric_names} if len(space.metric_names) > 1 else last.get(metric),
            "step": last.get("step"),
            "error": str(res.error).splitlines()[-1][:300] if res.error else None,
        })
    return rows


def best_trial(rows: list[dict], space) -> dict | None:
    """The best metric among the trials trained furthest: an early rung's FID is not comparable
    with a fully trained trial's, so trials the scheduler stopped early only win if none went further.
    With several objectives the first decides (the whole Pareto front is in the summary)."""
    primary, mode = space.metric_names[0], space.modes[0]

    def value(row):
        v = row["metric"][primary] if isinstance(row["metric"], dict) else row["metric"]
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    done = [r for r in rows if r["status"] != "failed" and value(r) is not None]
    if not done:
        return None
    furthest = max(r["step"] or 0 for r in done)
    done = [r for r in done if (r["step"] or 0) == furthest]
    return (min if mode == "min" else max)(done, key=value)


def pareto_front(paths: SearchPaths) -> list[dict]:
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=paths.optuna_storage)
    return [{"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials]


def optuna_plots(paths: SearchPaths, space) -> list[Path]:
    """Optimization history, parameter importances and parallel coordinates as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name=STUDY_NAME, storage=paths.optuna_storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out_dir = paths.output / "plots"
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


def run_search(space, output: Path, mlflow_uri: str, resume: bool = False) -> dict:
    """Run (or resume) the search; Ray must already be connected. Returns the summary."""
    import ray
    from ray import tune

    # A trial that diverges before its first report has no metric yet; the space's own validation
    # already guarantees every metric is one the trainer reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    started = time.time()
    output = output.resolve()
    state_file = output / "search.json"
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
    parent = state.get("mlflow_parent_run_id") or tracking.create_run(
        mlflow_uri, {f"space.{k}": v for k, v in flatten(space.to_dict()).items()},
        {"lsep_tune.kind": "search", "space": space.source, "output": str(output)},
        run_name=f"search-{output.name}", artifact_location=tracking.artifact_location_for(mlflow_uri, output),
    )
    paths = SearchPaths(output, mlflow_uri, parent)
    state.update(mlflow_tracking_uri=mlflow_uri, mlflow_parent_run_id=parent, optuna_storage=paths.optuna_storage,
                 study_name=STUDY_NAME, space=space.source, tune_path=str(paths.tune_root / "search"))
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    parent_tracker = tracking.RunTracker(mlflow_uri, parent)
    space_file = output / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    parent_tracker.log_artifact(space_file)

    trainable = tune.with_resources(tune.with_parameters(trial_main, space=space, paths=paths),
                                    {"cpu": TRIAL_DRIVER_CPU})
    single = len(space.metric_names) == 1
    tune_path = paths.tune_root / "search"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, paths),
                scheduler=make_scheduler(space),
                num_samples=space.budget.num_samples,
                metric=space.metric_names[0] if single else None,
                mode=space.modes[0] if single else None,
                max_concurrent_trials=space.budget.max_concurrent,
                time_budget_s=space.budget.time_budget_s,
            ),
            run_config=tune.RunConfig(name="search", storage_path=str(paths.tune_root),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    results = tuner.fit()
    rows = trial_table(results, space)

    best = best_trial(rows, space)
    confirmation = None
    if best and getattr(space, "confirm", None):  # the top trials again on fresh seeds, against a baseline
        from lsep_tune.search.confirm import confirm_search

        confirmation = confirm_search(space, rows, paths, space.confirm)
    summary = {
        "space": space.source,
        "num_samples": space.budget.num_samples,
        "trials": rows,
        "best_metric": best["metric"] if best else None,  # a dict of objectives when several
        "best_trial": best["id"] if best else None,
        "best_params": best["params"] if best else None,
        "best_config": None,
        "metric": space.metric_names if not single else space.metric_names[0],
        "mode": space.modes if not single else space.modes[0],
        "wall_time_s": round(time.time() - started + state.get("wall_time_s", 0.0), 1),
        "mlflow_tracking_uri": mlflow_uri,
        "mlflow_parent_run_id": parent,
        "optuna_storage": paths.optuna_storage,
        "optuna_study": STUDY_NAME,
        "ray_address": ray.get_runtime_context().gcs_address,
    }
    if not single:
        summary["pareto_front"] = pareto_front(paths)
    if confirmation:
        summary["confirmation"] = confirmation
    if best:  # best.yaml: the confirmed winner when there was a confirmation
        best_cfg = space.trial_config(confirmation["winner_params"] if confirmation else best["params"])
        dump_config(best_cfg, output / "best.yaml")
        summary["best_config"] = best_cfg.to_dict()
        summary["best_yaml"] = str(output / "best.yaml")
        parent_tracker.log_artifact(output / "best.yaml")
        best_values = best["metric"] if isinstance(best["metric"], dict) else {space.metric_names[0]: best["metric"]}
        parent_tracker.log_metrics({f"best_{k}": float(v) for k, v in best_values.items() if v is not None}, 0)
        parent_tracker.set_tags({"best_trial": best["id"]})
    for plot in optuna_plots(paths, space):
        parent_tracker.log_artifact(plot, "plots")
    state["wall_time_s"] = summary["wall_time_s"]
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    parent_tracker.log_artifact(output / "summary.json")
    parent_tracker.finish("FINISHED" if best else "FAILED")
    return summary


def check_budget(space) -> None:
    """Every trial must fit on the cluster, or Tune would wait forever."""
    from lsep_tune.train.distributed import Placement, check_placement

    b = space.budget
    check_placement(Placement(b.workers_per_trial, b.gpus_per_worker, b.cpus_per_worker, b.max_failures),
                    cpu_field=f"{space.source}: budget.workers_per_trial",
                    gpu_field=f"{space.source}: budget.gpus_per_worker")


def local_cpus(space) -> int:
    """Logical CPUs for a local Ray: enough for max_concurrent trials even on a 2-core machine."""
    b = space.budget
    per_trial = b.workers_per_trial * b.cpus_per_worker + TRIAL_DRIVER_CPU
    return max(os.cpu_count() or 1, math.ceil(b.max_concurrent * per_trial))
