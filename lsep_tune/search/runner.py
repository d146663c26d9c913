"""The search: Ray Tune drives Optuna over a search space; every trial is a Ray Train run.

Train V2 pattern: each Tune trial is a small function that builds a `TorchTrainer` for its config
and forwards rank 0's reports to Tune (`TuneReportCallback`), so schedulers (ASHA / HyperBand)
stop poor trials on the step-indexed metrics. The Optuna study lives in an RDB file that
`optuna-dashboard` opens; MLflow gets one parent run per search and one nested run per trial.
The driver owns every run's end state: a stopped trial's process is killed before it could say.
With `confirm:` in the space, the best trials and a baseline are then trained again on fresh seeds
(search/confirm.py) before the parent run ends, and best.yaml is the confirmed winner.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import yaml

from lsep_tune import tracking
from lsep_tune.checkpoint import EMA_FILE
from lsep_tune.cluster import trial_resources
from lsep_tune.config import dump_config, flatten
from lsep_tune.data import identity as data_identity
from lsep_tune.search import report
from lsep_tune.search.arms import ARM_TAG, ROLE_TAG, SEED_TAG
from lsep_tune.search.confirm import confirm_search
from lsep_tune.search.searcher import STUDY_NAME, make_scheduler, make_searcher
from lsep_tune.search.stop import fit_or_stop
from lsep_tune.search.storage import default_storage, masked, open_storage, without_password
from lsep_tune.search.trials import (TRIAL_ID_TAG, SearchPaths, TrialRuns, end_unfinished_runs, ends_killed_on_error,
                                     live_table, restarts, trial_main)
from lsep_tune.search.tune_state import WholeState, restore_whole_state


def parent_run_name(output: Path) -> str:
    return output.name if output.name.startswith("search") else f"search-{output.name}"


def study_name_for(output: Path, optuna_storage: str | None) -> str:
    """`lsep_tune` in the search's own sqlite file; in a database searches share, one study per search,
    named by its folder and a random suffix, so that no search joins another's study."""
    return STUDY_NAME if optuna_storage is None else f"{parent_run_name(output)}-{uuid.uuid4().hex[:8]}"


def run_search(space, output: Path, mlflow_uri: str, resume: bool = False, optuna_storage: str | None = None,
               register_model: str | None = None, *, resources=None, callbacks: tuple = ()) -> dict:
    """Run (or resume) the search; Ray must already be connected. Returns the summary. The confirmed
    winner (the best trial without a confirmation) becomes the parent run's MLflow model, registered
    as `register_model` when given.
    `optuna_storage`: the study's database URL (default: optuna.db in `output`).
    `resources` (what each trial asks of Ray, default `trial_resources(space.resources)`) and extra Tune
    `callbacks` let `bench cluster` run this same search on simulated GPU slots and time it."""
    # A trial that diverges before its first report has no metric yet; the space's own validation
    # already guarantees every metric is one the trainer reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    started = time.time()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)  # checked writable before Ray started; made only now
    state_file = output / "search.json"
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
    storage = optuna_storage or default_storage(output)
    study_name = state.get("study_name") or study_name_for(output, optuna_storage)
    parent = state.get("mlflow_parent_run_id") or tracking.create_run(
        mlflow_uri, {f"space.{k}": v for k, v in flatten(space.to_dict()).items()},
        {"lsep_tune.kind": "search", "space": space.source, "output": str(output),
         "optuna_storage": masked(storage), "optuna_study": study_name},
        run_name=parent_run_name(output), artifact_location=tracking.artifact_location_for(mlflow_uri, output),
    )
    if not state.get("mlflow_parent_run_id"):  # the parent's Dataset column: the data every trial trains on
        try:
            tracking.log_dataset(mlflow_uri, parent, data_identity(space.base_config().data))
        except Exception as err:  # tracking never stops a search
            print(f"warning: could not record the dataset of the search's MLflow run ({type(err).__name__}: {err})")
    try:  # the page the search prints: its metrics and searched params as columns, best first
        tracking.share_runs_view(mlflow_uri, parent, list(space.metric_names), list(space.params),
                                 ascending=space.modes[0] == "min")
    except Exception as err:  # tracking never stops a search: the link opens MLflow's default columns
        print(f"warning: could not save the runs-table view of the search ({type(err).__name__}: {err})")
    paths = SearchPaths(output, mlflow_uri, parent, storage, study_name)
    state.update(mlflow_tracking_uri=mlflow_uri, mlflow_parent_run_id=parent,
                 optuna_storage=without_password(storage),
                 study_name=paths.study_name, space=space.source, tune_path=str(paths.tune_root / "search"))
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    parent_tracker = tracking.RunTracker(mlflow_uri, parent)
    space_file = output / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    parent_tracker.log_artifact(space_file)
    # Until the parent run ends, a stop (SIGTERM) or a crash ends it KILLED: during the trials, the
    # confirmation, or the summary after them.
    with ends_killed_on_error(paths, parent_tracker):
        results = fit(space, paths, resume, resources, callbacks)
        summary = conclude(space, paths, parent_tracker, results, state, started, register_model)
    parent_tracker.finish("FINISHED" if summary["best_trial"] else "FAILED")
    return summary


def conclude(space, paths: SearchPaths, parent_tracker, results, state: dict, started: float,
             register_model: str | None) -> dict:
    """After the trials: the table, the confirmation, the plots and the winner's model; summary.json."""
    import optuna
    import ray

    output, state_file = paths.output, paths.output / "search.json"
    mlflow_uri, parent = paths.mlflow_uri, paths.parent_run_id
    end_unfinished_runs(paths, "KILLED")
    rows = report.trial_table(results, space)
    restarted = restarts(output)
    for row in rows:
        row["restarts"] = restarted.get(row["id"], 0)
    single = len(space.metric_names) == 1
    best = report.best_trial(rows, space)
    confirmation = None
    if best and space.confirm:  # trained again on fresh seeds; writes best.yaml as the confirmed winner
        confirmation = confirm_search(space, rows, paths, space.confirm)
    study = optuna.load_study(study_name=paths.study_name, storage=open_storage(paths.optuna_storage))
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
        "optuna_storage": masked(paths.optuna_storage),
        "optuna_study": paths.study_name,
        "ray_address": ray.get_runtime_context().gcs_address,
    }
    if single:
        curves = report.histories(results, rows, space.metric_names[0])
        proxy = report.proxy_validity(curves, space.budget.max_steps, report.rung_steps(space))
        summary["proxy_validity"] = {str(step): rho for step, rho in proxy.items()}
        for step, rho in proxy.items():
            parent_tracker.log_metrics({"proxy_validity": rho}, step)
    else:
        summary["pareto_front"] = report.pareto_front(study)
    if confirmation:
        summary["confirmation"] = confirmation
    if best:
        best_cfg = space.trial_config(confirmation["winner_params"] if confirmation else best["params"])
        if not confirmation:
            dump_config(best_cfg, output / "best.yaml")
        summary["best_config"] = best_cfg.to_dict()
        summary["best_yaml"] = str(output / "best.yaml")
        parent_tracker.log_artifact(output / "best.yaml")
        best_values = best["metric"] if isinstance(best["metric"], dict) else {space.metric_names[0]: best["metric"]}
        parent_tracker.log_metrics({f"best_{k}": float(v) for k, v in best_values.items() if v is not None},
                                   space.budget.max_steps)
        parent_tracker.set_tags({"best_trial": best["id"]})
    for plot in report.optuna_plots(study, space, output / "plots"):
        parent_tracker.log_artifact(plot, "plots")
    if best:
        summary.update(log_winner_model(paths, best, confirmation, register_model))
    summary["mlflow_runs_url"] = tracking.runs_page(mlflow_uri, parent)
    state["wall_time_s"] = summary["wall_time_s"]
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    parent_tracker.log_artifact(output / "summary.json")
    return summary


def winner_checkpoint(paths: SearchPaths, best: dict, confirmation: dict | None) -> Path | None:
    """The EMA weights of what the search chose: the confirmation winner's run on its first fresh seed
    (found by the tags of its MLflow run), else the best trial's."""
    if not confirmation:
        found = paths.trial_folder(best["id"]) / EMA_FILE
        return found if found.exists() else None
    client = tracking.client(paths.mlflow_uri)
    parent = client.get_run(paths.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{paths.parent_run_id}' and tags.`{ROLE_TAG}` = 'confirmation' "
        f"and tags.`{ARM_TAG}` = '{confirmation['winner']}' and attributes.status = 'FINISHED'"))
    for run in sorted(runs, key=lambda r: int(r.data.tags.get(SEED_TAG, 0))):
        found = paths.output / "confirmation" / "trial_runs" / run.data.tags[TRIAL_ID_TAG] / EMA_FILE
        if found.exists():
            return found
    return None


def log_winner_model(paths: SearchPaths, best: dict, confirmation: dict | None, register_model: str | None) -> dict:
    """The chosen configuration as the parent run's MLflow model; {} with a warning when it cannot be."""
    try:
        checkpoint = winner_checkpoint(paths, best, confirmation)
        if checkpoint is None:
            print("warning: no finished run of the chosen configuration left its EMA weights; no MLflow model logged")
            return {}
        from lsep_tune import mlflow_model  # MLflow's model API: only once a search has a winner

        logged = mlflow_model.log_model(paths.mlflow_uri, paths.parent_run_id, checkpoint, register_model)
    except Exception as err:  # tracking never stops a search: its results are on disk already
        print(f"warning: could not log the chosen model to MLflow ({type(err).__name__}: {err})")
        return {}
    return {**logged, "model_checkpoint": str(checkpoint)}


def progress_table(space):
    """The search's live table: the searched metric(s) and the training step, params by short names."""
    columns = {"step": "step", **{m: m for m in space.metric_names}}
    # Only params every trial has: Tune's "best trial" line looks each column up in the best trial's
    # config and fails on a conditional param that trial did not sample (its value is in MLflow).
    params = {p: p.rsplit(".", 1)[-1] for p, param in space.params.items() if not param.when}
    return live_table(columns, params, sort_by_metric=True)  # ranked on TuneConfig's metric


def fit(space, paths: SearchPaths, resume: bool, resources=None, callbacks: tuple = ()):
    """The Tuner run, new or restored; returns Tune's ResultGrid."""
    from ray import tune

    # Tune saves its experiment state at most every 10 s by default; a trial started (or ended) after
    # the last save is unknown to --resume, which then trains it again from the start. Every 2 s
    # costs a few ms per save at this size.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

    trainable = tune.with_resources(tune.with_parameters(trial_main, builder=space.trials, paths=paths),
                                    trial_resources(space.resources) if resources is None else resources)
    tune_path = paths.tune_root / "search"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        restore_whole_state(tune_path)  # what a driver killed mid-copy left is replaced by its last whole save
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        single = len(space.metric_names) == 1
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, paths.optuna_storage, paths.study_name),
                scheduler=make_scheduler(space),
                num_samples=space.budget.num_samples,
                metric=space.metric_names[0] if single else None,
                mode=space.modes[0] if single else None,
                time_budget_s=space.budget.time_budget_s,
                # the next trial runs in the process the last one left (Tune resets it): each trial's
                # start-up (a Python process importing torch and the trainer) is paid once per slot
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(name="search", storage_path=str(paths.tune_root),
                                      # a trial whose process died (a lost node) starts again, up to max_failures
                                      # times, and resumes from the checkpoints in its folder
                                      failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
                                      callbacks=[TrialRuns(paths, space.trials), WholeState(tune_path), *callbacks],
                                      progress_reporter=progress_table(space),
                                      verbose=1),  # the live table only: no per-report result dumps
        )
    return fit_or_stop(tuner)
