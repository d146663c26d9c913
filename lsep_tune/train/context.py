"""Where a training loop runs: in this process, or as one Ray Train worker among many.

The loop talks to a context through a narrow interface: who am I (rank, world size, device),
wrap the model for data parallelism, average a tensor across ranks, hand over metrics and
checkpoints, and find the checkpoint to resume from. Everything distributed hides behind it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from lsep_tune import checkpoint as ckpt
from lsep_tune.cluster import local_device


class LocalContext:
    """One process, no Ray: checkpoints in OUTPUT/checkpoints, metrics in OUTPUT/metrics.jsonl."""

    rank = 0
    world_size = 1

    def __init__(self, output_dir: str | Path, keep_checkpoints: int, device: str | None = None,
                 resume_from: str | Path | None = None, progress: bool | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep_checkpoints
        self.device = local_device(device)
        self.resume_from = Path(resume_from) if resume_from else None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.callbacks: list = []  # objects with log_metrics(metrics, step) / log_artifact(path) / close()

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
