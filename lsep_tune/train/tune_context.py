"""A one-worker search trial that runs the training loop inside the Tune trial itself.

Starting a Ray Train worker group for a single worker costs a trial tens of seconds (a new actor,
its imports, a process group) before the first step. With one worker there is nothing to
coordinate, so the loop can run in the trial's own process: `TuneContext` reports metrics to Tune
(`ray.tune.report`, what schedulers and searchers read) and keeps checkpoints in the trial's run
folder, resuming from there. The trial must then be given the worker's resources (CPU / GPU) itself.
"""
from __future__ import annotations

import json
from pathlib import Path

from lsep_tune.tracking import RunTracker
from lsep_tune.train.context import LocalContext
from lsep_tune.train.distributed import DIVERGED_FILE, DIVERGED_KEY
from lsep_tune.train.loop import train_loop
from lsep_tune.train.metrics import TrainingDiverged


class TuneContext(LocalContext):
    """The loop's context inside a Tune function trial: one process; metrics go to Tune as well.

    Checkpoints stay in the trial's own run folder (OUTPUT/trial_runs/ID/checkpoints), the way a
    local run keeps them: a restarted trial, or a search resumed after its driver was killed, finds
    them there under the same trial id, whether or not Tune had synced its state before the kill.
    """

    echo_steps = False  # the search's live table shows the trial; its step lines would flood the console

    def __init__(self, output_dir: str | Path, keep_checkpoints: int, device: str | None = None):
        super().__init__(output_dir, keep_checkpoints, device=device, resume_from=output_dir, progress=False)

    def report(self, metrics: dict[str, float], step: int, state: dict | None = None) -> str | None:
        from ray import tune

        folder = super().report(metrics, step, state)
        tune.report({**metrics, "step": step})
        return folder


def run_in_trial(cfg, output: str | Path, mlflow_uri: str | None = None, mlflow_run_id: str | None = None) -> dict:
    """Train `cfg` inside the current Tune trial. On divergence it leaves diverged.json (as Ray Train
    runs do: a retry of the trial finds it and does not train again), reports it, and raises."""
    from ray import tune

    ctx = TuneContext(output, cfg.run.keep_checkpoints)  # the local device: cuda where Tune gave a GPU
    if mlflow_uri and mlflow_run_id:
        ctx.callbacks.append(RunTracker(mlflow_uri, mlflow_run_id))
    try:
        return train_loop(cfg, ctx)
    except TrainingDiverged as err:
        record = {DIVERGED_KEY: 1.0, "step": err.step, "error": str(err)}
        (Path(output) / DIVERGED_FILE).write_text(json.dumps(record) + "\n")
        tune.report(record)
        raise
    finally:
        ctx.close()
