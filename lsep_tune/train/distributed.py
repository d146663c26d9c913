"""Ray Train: the same training loop on N workers (DDP via Ray's model preparation).

`RayContext` is the loop's view of a Ray Train worker; `build_trainer` makes the `TorchTrainer`
whose checkpoints live in the run's storage (Ray keeps cfg.run.keep_checkpoints of them) and
which restarts failed workers from the latest one (FailureConfig.max_failures). Connecting to Ray
and checking a request against it is `lsep_tune.cluster`'s job.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lsep_tune import checkpoint as ckpt
from lsep_tune.cluster import Placement
from lsep_tune.config import Config, validate
from lsep_tune.tracking import RunTracker
from lsep_tune.train.context import StepCallback
from lsep_tune.train.loop import train_loop
from lsep_tune.train.metrics import TrainingDiverged


DIVERGED_KEY = "diverged"  # reported (= 1.0) by a run whose loss became non-finite
DIVERGED_FILE = "diverged.json"  # rank 0 leaves it in the run folder: what the driver checks
# Ray Train V2 holds one report per worker and its controller takes it on each poll: a worker's next
# ray.train.report waits for that poll. At Ray's 2 s default, a run reporting every step of a small
# model trains at one step per 2 s (measured: 10 two-worker digits steps 54 s, at 0.25 s 35 s, the same
# final loss). Set in the environment, it reaches the controller and the workers (Ray propagates it).
# Each poll is one small actor task per worker, four a second; a poll a worker is too busy to answer
# waits for the next one (a worker counts as dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S).
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def divergence(output: str | Path) -> dict | None:
    """The divergence record a run left in its folder, if it diverged."""
    path = Path(output) / DIVERGED_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class RunPaths:
    output: str  # run folder: config, metrics.jsonl, samples, summary (rank 0)
    storage: str  # Ray storage path or URI; checkpoints under STORAGE/NAME/step_*
    name: str
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    resume: bool = False

    @property
    def checkpoint_root(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


class RayContext:
    """The loop's context inside one Ray Train worker."""

    def __init__(self, paths: RunPaths):
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        self.rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.paths = paths
        self.output_dir = Path(paths.output)
        self.progress, self.echo_steps = False, True
        self.callbacks: list[StepCallback] = []
        if self.rank == 0 and paths.mlflow_uri and paths.mlflow_run_id:
            self.callbacks.append(RunTracker(paths.mlflow_uri, paths.mlflow_run_id))

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and torch.distributed.is_initialized():
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def all_gather(self, obj) -> list:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def resume_state(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                return ckpt.load_state(folder)
        if self.paths.resume and "://" not in self.paths.storage:
            folder = ckpt.latest(self.paths.checkpoint_root)
            return ckpt.load_state(folder) if folder else None
        return None

    def report(self, metrics: dict[str, float], step: int, state: dict | None = None) -> str | None:
        import ray.train

        payload = {**metrics, "step": step}
        if self.rank == 0:
            with (self.output_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(payload) + "\n")
            for cb in self.callbacks:
                cb.log_metrics(metrics, step)
        if state is None or self.rank != 0:
            ray.train.report(payload, checkpoint=None)  # every rank reports, checkpoint or not
            return None
        tmp = Path(tempfile.mkdtemp(prefix="lsep_ckpt_"))
        try:
            ckpt.save_state(tmp, state)
            name = ckpt.step_folder("", step).name
            ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return f"{self.paths.checkpoint_root}/{name}"

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        for cb in self.callbacks:
            cb.log_artifact(path, artifact_path)

    def close(self) -> None:
        for cb in self.callbacks:
            cb.close()


def quiet_report_log() -> None:
    """Ray Train V2 logs every report as a whole `TrainingReport(...)` line, on a logger named after its
    source file that its LoggingConfig does not reach; the run's own step lines already say it."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module logs no such line
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def worker_main(payload: dict) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train

    quiet_report_log()
    cfg = validate(payload["config"], "trial config")
    ctx = RayContext(RunPaths(**payload["paths"]))
    try:
        train_loop(cfg, ctx)
    except TrainingDiverged as err:
        # Every rank sees the same all-reduced loss, so all get here at the same step. Reporting
        # (instead of raising) keeps Ray Train from restarting a run that would only diverge again.
        record = {DIVERGED_KEY: 1.0, "step": err.step, "error": str(err)}
        if ctx.rank == 0:
            (ctx.output_dir / DIVERGED_FILE).write_text(json.dumps(record) + "\n")
        for cb in ctx.callbacks:
            cb.finish("FAILED")
        ray.train.report(record, checkpoint=None)
    finally:
        ctx.close()


def build_trainer(cfg: Config, placement: Placement, paths: RunPaths, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)  # a user's own setting stays
    resources = {"CPU": placement.cpus_per_worker}
    if placement.gpus_per_worker:
        resources["GPU"] = placement.gpus_per_worker
    return TorchTrainer(
        worker_main,
        train_loop_config={"config": cfg.to_dict(), "paths": asdict(paths)},
        scaling_config=ScalingConfig(num_workers=placement.workers, use_gpu=placement.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=paths.name,
            storage_path=paths.storage,
            failure_config=FailureConfig(max_failures=placement.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )
