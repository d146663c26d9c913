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

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune import Callback

from lsep_tune import tracking
from lsep_tune.cluster import trial_resources
from lsep_tune.config import dump_config, flatten
from lsep_tune.search import report
from lsep_tune.search.searcher import STUDY_NAME, make_scheduler, make_searcher
TRIAL_ID_TAG = "lsep_tune.trial_id"


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


def trial_run_name(number: int | str, params: dict) -> str:
    """`trial 3: uncond_prob=0.9, probe_lr=0.003`: the trial's number and its searched values."""
    short = {k: k.rsplit(".", 1)[-1] for k in params}
    for key, name in short.items():  # objective.lsep.weight and objective.sra.weight: keep the section
        if list(short.values()).count(name) > 1:
            short[key] = ".".join(key.split(".")[-2:])
    values = ", ".join(f"{short[k]}={v:.3g}" if isinstance(v, float) else f"{short[k]}={v}" for k, v in params.items())
    return f"trial {number}: {values}" if values else f"trial {number}"


def find_child_run(client, paths: SearchPaths, trial_id: str):
    parent = client.get_run(paths.parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{paths.parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
    )
    return found[0] if found else None


def child_run_id(paths: SearchPaths, trial_id: str, cfg, params: dict, number: int | str) -> str:
    """The trial's nested MLflow run: found again by tag (after a restart, or made by the driver), else created."""
    client = tracking.client(paths.mlflow_uri)
    found = find_child_run(client, paths, trial_id)
    if found:
        return found.info.run_id
    parent = client.get_run(paths.parent_run_id)
    return tracking.create_run(
        paths.mlflow_uri, cfg.flat(), {TRIAL_ID_TAG: trial_id, **{f"searched.{k}": v for k, v in params.items()}},
        run_name=trial_run_name(number, params), experiment=client.get_experiment(parent.info.experiment_id).name,
        parent_run_id=paths.parent_run_id,
    )


def trial_main(params: dict, space=None, paths: SearchPaths = None) -> None:
    """One Tune trial of the space's config with `params` applied: a one-worker trial runs the training
    loop in this process (reporting to Tune itself); a larger one runs a Ray Train worker group."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lsep_tune.cluster import Placement
    from lsep_tune.train.distributed import RunPaths, build_trainer, divergence

    trial_id = tune.get_context().get_trial_id()
    cfg = space.trial_config(params)
    run_id = child_run_id(paths, trial_id, cfg, params, trial_id)  # the driver made it already, numbered
    b = space.budget
    out = paths.output.resolve() / "trial_runs" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    if divergence(out):  # Tune retried a trial that diverged: it would only diverge again
        raise TrialDiverged(f"trial {trial_id} diverged: {divergence(out)['error']}")
    if b.workers_per_trial == 1:  # nothing to coordinate: train here, no worker group to start
        from lsep_tune.train.tune_context import run_in_trial

        run_in_trial(cfg, out, paths.mlflow_uri, run_id)
    else:
        placement = Placement(b.workers_per_trial, b.gpus_per_worker, b.cpus_per_worker, b.max_failures)
        run_paths = RunPaths(output=str(out), storage=str(paths.ray_storage), name=trial_id,
                             mlflow_uri=paths.mlflow_uri, mlflow_run_id=run_id, resume=True)
        build_trainer(cfg, placement, run_paths, callbacks=[TuneReportCallback()]).fit()
    diverged = divergence(out)
    if diverged:
        raise TrialDiverged(f"trial {trial_id} diverged: {diverged['error']}")


class TrialDiverged(RuntimeError):
    """Raised in a trial so Tune records it as failed (and the searcher hears a penalty)."""


class TrialRuns(Callback):
    """The driver's side of the trials' MLflow runs: each is made when its trial starts, named by its
    place in the search, and ended in the state the trial reached: FINISHED when it trained to the end,
    KILLED when the scheduler (or the time budget) stopped it, FAILED on error."""

    def __init__(self, paths: SearchPaths, space):
        self.paths, self.space = paths, space

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial whose process died (its node lost) is started again by Tune; count it on disk, where a
        resumed search finds the count again. The retried trial resumes from its checkpoints."""
        record_restart(self.paths.output, trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        try:
            cfg = self.space.trial_config(trial.config)
            child_run_id(self.paths, trial.trial_id, cfg, trial.config, trials.index(trial) + 1)
        except Exception as err:  # tracking never stops a search; the trial makes its run itself
            print(f"warning: could not make the MLflow run of trial {trial.trial_id} ({type(err).__name__}: {err})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        end_run(self.paths, trial.trial_id, "FINISHED" if step >= self.space.budget.max_steps else "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        end_run(self.paths, trial.trial_id, "FAILED")


RESTARTS_FILE = "restarts.json"  # {trial id: times Tune started it again after its process died}


def restarts(output: Path) -> dict[str, int]:
    path = output / RESTARTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_restart(output: Path, trial_id: str) -> None:
    counts = restarts(output)
    counts[trial_id] = counts.get(trial_id, 0) + 1
    (output / RESTARTS_FILE).write_text(json.dumps(counts, indent=2) + "\n")


def end_run(paths: SearchPaths, trial_id: str, status: str) -> None:
    try:
        client = tracking.client(paths.mlflow_uri)
        run = find_child_run(client, paths, trial_id)
        if run is not None:
            client.set_terminated(run.info.run_id, status)
    except Exception as err:  # tracking never stops a search
        print(f"warning: could not end the MLflow run of trial {trial_id} ({type(err).__name__}: {err})")


def end_unfinished_runs(paths: SearchPaths, status: str) -> None:
    """Whatever trial run is still RUNNING when the command exits (a trial never started, an interrupt)
    ends now; a resumed search reopens nothing, it logs into the same run and ends it again."""
    client = tracking.client(paths.mlflow_uri)
    parent = client.get_run(paths.parent_run_id)
    for run in client.search_runs([parent.info.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{paths.parent_run_id}' and attributes.status = 'RUNNING'")):
        client.set_terminated(run.info.run_id, status)


@contextlib.contextmanager
def ends_killed_on_error(paths: SearchPaths, parent_tracker):
    """An interrupted or crashed search ends its open trial runs and its parent run KILLED."""
    try:
        yield
    except BaseException:
        end_unfinished_runs(paths, "KILLED")
        parent_tracker.finish("KILLED")
        raise


def parent_run_name(output: Path) -> str:
    return output.name if output.name.startswith("search") else f"search-{output.name}"


def run_search(space, output: Path, mlflow_uri: str, resume: bool = False) -> dict:
    """Run (or resume) the search; Ray must already be connected. Returns the summary."""
    import optuna
    import ray

    # A trial that diverges before its first report has no metric yet; the space's own validation
    # already guarantees every metric is one the trainer reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    started = time.time()
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)  # checked writable before Ray started; made only now
    state_file = output / "search.json"
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
    parent = state.get("mlflow_parent_run_id") or tracking.create_run(
        mlflow_uri, {f"space.{k}": v for k, v in flatten(space.to_dict()).items()},
        {"lsep_tune.kind": "search", "space": space.source, "output": str(output)},
        run_name=parent_run_name(output), artifact_location=tracking.artifact_location_for(mlflow_uri, output),
    )
    paths = SearchPaths(output, mlflow_uri, parent)
    state.update(mlflow_tracking_uri=mlflow_uri, mlflow_parent_run_id=parent, optuna_storage=paths.optuna_storage,
                 study_name=STUDY_NAME, space=space.source, tune_path=str(paths.tune_root / "search"))
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    parent_tracker = tracking.RunTracker(mlflow_uri, parent)
    space_file = output / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    parent_tracker.log_artifact(space_file)
    with ends_killed_on_error(paths, parent_tracker):
        results = fit(space, paths, resume)
    end_unfinished_runs(paths, "KILLED")
    rows = report.trial_table(results, space)
    restarted = restarts(output)
    for row in rows:
        row["restarts"] = restarted.get(row["id"], 0)
    single = len(space.metric_names) == 1
    best = report.best_trial(rows, space)
    confirmation = None
    if best and space.confirm:  # trained again on fresh seeds; writes best.yaml as the confirmed winner
        from lsep_tune.search.confirm import confirm_search

        with ends_killed_on_error(paths, parent_tracker):
            confirmation = confirm_search(space, rows, paths, space.confirm)
    study = optuna.load_study(study_name=STUDY_NAME, storage=paths.optuna_storage)
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
    state["wall_time_s"] = summary["wall_time_s"]
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    parent_tracker.log_artifact(output / "summary.json")
    parent_tracker.finish("FINISHED" if best else "FAILED")
    return summary


def live_table(metric_columns: dict, parameter_columns: dict, **options):
    """Tune's live table, the same for a search and for its confirmation (or an ablation)."""
    from ray.tune import CLIReporter

    # Tune's newer table shows the first four metrics a trial reports, not the ones asked for.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # print_intermediate_tables: its default follows the verbosity the previous Tune run of this process
    # left behind (verbose=1 -> no table), so a second run (the confirmation) would lose its table.
    return CLIReporter(metric_columns=metric_columns, parameter_columns=parameter_columns,
                       max_report_frequency=30, print_intermediate_tables=True, **options)


def progress_table(space):
    """The search's live table: the searched metric(s) and the training step, params by short names."""
    columns = {"step": "step", **{m: m for m in space.metric_names}}
    # Only params every trial has: Tune's "best trial" line looks each column up in the best trial's
    # config and fails on a conditional param that trial did not sample (its value is in MLflow).
    params = {p: p.rsplit(".", 1)[-1] for p, param in space.params.items() if not param.when}
    return live_table(columns, params, sort_by_metric=True)  # ranked on TuneConfig's metric


def fit(space, paths: SearchPaths, resume: bool):
    """The Tuner run, new or restored; returns Tune's ResultGrid."""
    from ray import tune

    # Tune saves its experiment state at most every 10 s by default; a trial started (or ended) after
    # the last save is unknown to --resume, which then trains it again from the start. Every 2 s
    # costs a few ms per save at this size.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

    trainable = tune.with_resources(tune.with_parameters(trial_main, space=space, paths=paths),
                                    trial_resources(space.budget))
    tune_path = paths.tune_root / "search"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        single = len(space.metric_names) == 1
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, paths.optuna_storage),
                scheduler=make_scheduler(space),
                num_samples=space.budget.num_samples,
                metric=space.metric_names[0] if single else None,
                mode=space.modes[0] if single else None,
                time_budget_s=space.budget.time_budget_s,
            ),
            run_config=tune.RunConfig(name="search", storage_path=str(paths.tune_root),
                                      # a trial whose process died (a lost node) starts again, up to max_failures
                                      # times, and resumes from the checkpoints in its folder
                                      failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
                                      callbacks=[TrialRuns(paths, space)], progress_reporter=progress_table(space),
                                      verbose=1),  # the live table only: no per-report result dumps
        )
    return tuner.fit()
