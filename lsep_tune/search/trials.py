"""A trial of the search (or of a confirmation or ablation) and the MLflow run that records it.

`trial_main` is the function Tune runs for one trial; `TrialRuns` is the driver's side of the
trials' MLflow runs (made when a trial starts, ended in the state it reached). Both take the run's
`TrialBuilder` (a search's `space.SearchTrials`, or `arms.ArmTrials` for fixed arms x seeds) and its
`SearchPaths`: where its files, its Tune and Ray storage and its MLflow parent run are.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from ray import tune
from ray.tune import Callback, CLIReporter
from ray.tune.integration.ray_train import TuneReportCallback

from lsep_tune import tracking
from lsep_tune.cluster import TrialResources
from lsep_tune.config import Config
from lsep_tune.data import identity as data_identity
from lsep_tune.search.searcher import STUDY_NAME
from lsep_tune.search.storage import default_storage
from lsep_tune.train.distributed import RunPaths, build_trainer, divergence
from lsep_tune.train.metrics import TrainingDiverged
from lsep_tune.train.tune_context import run_in_trial

TRIAL_ID_TAG = "lsep_tune.trial_id"
RUN_FILE = "mlflow_run.json"  # {"run_id": ...} in the trial's folder: its MLflow run, made by the driver


class TrialBuilder(Protocol):
    """What a trial is made from: its Tune config -> the Config it trains, and what it asks of the
    cluster. Tune pickles it into every trial, so it carries only that."""

    resources: TrialResources

    def trial_config(self, tune_config: Mapping[str, Any]) -> Config: ...


class RoleTrialBuilder(TrialBuilder, Protocol):
    """A builder for runs with a role (confirmation, ablation): their MLflow runs get its tags too."""

    def run_tags(self, tune_config: Mapping[str, Any], role: str) -> dict[str, Any]: ...


@dataclass
class SearchPaths:
    output: Path
    mlflow_uri: str
    parent_run_id: str
    study_storage: str | None = None  # --optuna-storage; None: a sqlite file in the search folder
    study_name: str = STUDY_NAME

    @property
    def optuna_storage(self) -> str:
        return self.study_storage or default_storage(self.output)

    @property
    def tune_root(self) -> Path:
        return (self.output / "tune").resolve()

    @property
    def ray_storage(self) -> Path:
        return (self.output / "trials").resolve()

    def trial_folder(self, trial_id: str) -> Path:
        """A trial's own files (its metrics, checkpoints, MLflow run id), on the path every node shares."""
        return self.output.resolve() / "trial_runs" / trial_id


def trial_run_name(number: int | str, params: dict) -> str:
    """`trial 3: uncond_prob=0.9, probe_lr=0.003`: the trial's number and its searched values."""
    short = {k: k.rsplit(".", 1)[-1] for k in params}
    for key, name in short.items():  # objective.lsep.weight and objective.sra.weight: keep the section
        if list(short.values()).count(name) > 1:
            short[key] = ".".join(key.split(".")[-2:])
    values = ", ".join(f"{short[k]}={v:.3g}" if isinstance(v, float) else f"{short[k]}={v}" for k, v in params.items())
    return f"trial {number}: {values}" if values else f"trial {number}"


def trial_run(paths: SearchPaths, trial_id: str) -> str | None:
    """The trial's MLflow run id, as the driver recorded it in the trial's folder (None: none was made)."""
    path = paths.trial_folder(trial_id) / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.exists() else None


def make_trial_run(paths: SearchPaths, trial_id: str, cfg: Config, params: Mapping[str, Any], number: int | str,
                   tags: Mapping[str, Any] | None = None) -> str:
    """The trial's nested MLflow run, made once, by the driver as the trial starts, and recorded in the
    trial's folder; a trial started again (a lost node, a resumed search) finds it there."""
    known = trial_run(paths, trial_id)
    if known:
        return known
    client = tracking.client(paths.mlflow_uri)
    parent = client.get_run(paths.parent_run_id)
    tags = dict(tags or {})  # a role's tags name the run themselves (`confirmation: best, seed 1`)
    name = tags.pop("mlflow.runName", None) or trial_run_name(number, dict(params))
    run_id = tracking.create_run(
        paths.mlflow_uri, cfg.flat(), {TRIAL_ID_TAG: trial_id, **{f"searched.{k}": v for k, v in params.items()}, **tags},
        run_name=name, experiment=client.get_experiment(parent.info.experiment_id).name,
        parent_run_id=paths.parent_run_id,
    )
    try:
        tracking.log_dataset(paths.mlflow_uri, run_id, data_identity(cfg.data))
    except Exception as err:  # tracking never stops a search: the run goes on without its dataset input
        print(f"warning: could not record the dataset of MLflow run {run_id} ({type(err).__name__}: {err})")
    folder = paths.trial_folder(trial_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


def trial_main(params: dict, builder: TrialBuilder, paths: SearchPaths) -> None:
    """One Tune trial of the builder's config for `params`: a one-worker trial runs the training loop in
    this process (reporting to Tune itself); a larger one runs a Ray Train worker group. Tune calls
    `TrialRuns.on_trial_start` on the driver before it runs this, so the trial's MLflow run is on disk."""
    trial_id = tune.get_context().get_trial_id()
    cfg = builder.trial_config(params)
    out = paths.trial_folder(trial_id)
    out.mkdir(parents=True, exist_ok=True)
    run_id = trial_run(paths, trial_id)
    if run_id is None:
        print(f"warning: trial {trial_id} has no MLflow run (the driver could not make one); "
              f"it trains untracked, its curves are in {out / 'metrics.jsonl'}")
    if divergence(out):  # Tune retried a trial that diverged: it would only diverge again
        raise TrialDiverged(f"trial {trial_id} diverged: {divergence(out)['error']}")
    if builder.resources.workers == 1:  # nothing to coordinate: train here, no worker group to start
        try:
            run_in_trial(cfg, out, paths.mlflow_uri, run_id)
        except TrainingDiverged as err:
            raise TrialDiverged(f"trial {trial_id} diverged: {err}") from err
        return
    run_paths = RunPaths(output=str(out), storage=str(paths.ray_storage), name=trial_id,
                         mlflow_uri=paths.mlflow_uri, mlflow_run_id=run_id, resume=True)
    build_trainer(cfg, builder.resources, run_paths, callbacks=[TuneReportCallback()]).fit()
    diverged = divergence(out)  # the worker group's rank 0 left it: the workers report, they do not raise
    if diverged:
        raise TrialDiverged(f"trial {trial_id} diverged: {diverged['error']}")


class TrialDiverged(RuntimeError):
    """Raised in a trial so Tune records it as failed (and the searcher hears a penalty)."""


class TrialRuns(Callback):
    """The driver's side of the trials' MLflow runs, for every role (search, confirmation, ablation):
    each is made when its trial starts, named by its place in the run, and ended in the state the trial
    reached: FINISHED when it trained to the end (its config's run.max_steps), KILLED when the scheduler
    (or the time budget) stopped it, FAILED on error. `builder` turns a Tune config into the trial's
    Config (`trial_config`); with a `role`, it is a `RoleTrialBuilder`."""

    def __init__(self, paths: SearchPaths, builder: TrialBuilder, role: str | None = None):
        self.paths, self.builder, self.role = paths, builder, role
        self.max_steps: dict[str, int] = {}  # trial id -> its config's run.max_steps, read as it started

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial whose process died (its node lost) is started again by Tune; count it on disk, where a
        resumed search finds the count again. The retried trial resumes from its checkpoints."""
        record_restart(self.paths.output, trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        try:
            cfg = self.builder.trial_config(trial.config)
            self.max_steps[trial.trial_id] = cfg.run.max_steps
            tags = self.builder.run_tags(trial.config, self.role) if self.role else None
            make_trial_run(self.paths, trial.trial_id, cfg, trial.config, trials.index(trial) + 1, tags)
        except Exception as err:  # tracking never stops a search: the trial trains untracked
            which = f"{self.role} trial" if self.role else "trial"
            print(f"warning: could not make the MLflow run of {which} {trial.trial_id} ({type(err).__name__}: {err})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        max_steps = self.max_steps.get(trial.trial_id) or self.builder.trial_config(trial.config).run.max_steps
        end_run(self.paths, trial.trial_id, "FINISHED" if step >= max_steps else "KILLED")

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
        run_id = trial_run(paths, trial_id)
        if run_id is not None:
            tracking.client(paths.mlflow_uri).set_terminated(run_id, status)
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
    """An interrupted (SIGTERM) or crashed search or ablation ends its open trial runs and its parent run
    KILLED."""
    try:
        yield
    except BaseException:
        end_unfinished_runs(paths, "KILLED")
        parent_tracker.finish("KILLED")
        raise


def live_table(metric_columns: dict, parameter_columns: dict, **options):
    """Tune's live table, the same for a search and for its confirmation (or an ablation)."""
    # Tune's newer table shows the first four metrics a trial reports, not the ones asked for.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # print_intermediate_tables: its default follows the verbosity the previous Tune run of this process
    # left behind (verbose=1 -> no table), so a second run (the confirmation) would lose its table.
    return CLIReporter(metric_columns=metric_columns, parameter_columns=parameter_columns,
                       max_report_frequency=30, print_intermediate_tables=True, **options)


