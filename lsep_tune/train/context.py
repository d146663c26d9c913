"""Where a training loop runs: in this process, or as one Ray Train worker among many.

The loop talks to a context through a narrow interface: who am I (rank, world size, device),
wrap the model for data parallelism, average a tensor across ranks, hand over metrics and
checkpoints, and find the checkpoint to resume from. Everything distributed hides behind it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from lsep_tune import checkpoint as ckpt
from lsep_tune.cluster import local_device


class StepCallback(Protocol):
    """What rank 0 hands a run's metrics and files to besides the context (tracking.RunTracker)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class TrainContext(Protocol):
    """The loop's whole view of where it runs (`LocalContext`, `TuneContext`, `distributed.RayContext`)."""

    rank: int
    world_size: int
    device: torch.device
    output_dir: Path  # the run folder: config, metrics, samples, summary (rank 0 writes them)
    progress: bool  # a tqdm bar on rank 0
    echo_steps: bool  # without the bar, a line per logged step on rank 0
    callbacks: list[StepCallback]

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module on this rank's device, wrapped for data parallelism where there are several."""

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, obj) -> list: ...

    def resume_state(self) -> dict | None:
        """The training state of the checkpoint to continue from, if any."""

    def report(self, metrics: dict[str, float], step: int, state: dict | None = None) -> str | None:
        """Record metrics at `step`; with `state`, also write a checkpoint and return its folder."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class LocalContext:
    """One process, no Ray: checkpoints in OUTPUT/checkpoints, metrics in OUTPUT/metrics.jsonl."""

    rank = 0
    world_size = 1
    echo_steps = True

    def __init__(self, output_dir: str | Path, keep_checkpoints: int, device: str | None = None,
                 resume_from: str | Path | None = None, progress: bool | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep_checkpoints
        self.device = local_device(device)
        self.resume_from = Path(resume_from) if resume_from else None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.callbacks: list[StepCallback] = []

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def resume_state(self) -> dict | None:
        folder = ckpt.latest(self.resume_from / "checkpoints") if self.resume_from else None
        return ckpt.load_state(folder) if folder else None

    def report(self, metrics: dict[str, float], step: int, state: dict | None = None) -> str | None:
        """Record metrics at `step`; with `state`, also write a checkpoint and return its folder."""
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for cb in self.callbacks:
            cb.log_metrics(metrics, step)
        if state is None:
            return None
        folder = ckpt.save_state(ckpt.step_folder(self.checkpoint_root, step), state)
        ckpt.prune(self.checkpoint_root, self.keep)
        return str(folder)

    def all_gather(self, obj) -> list:
        return [obj]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for cb in self.callbacks:
            cb.log_artifact(path, artifact_path)

    def close(self) -> None:
        for cb in self.callbacks:
            cb.close()
