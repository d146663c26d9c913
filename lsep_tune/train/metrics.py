"""What a run measures as it trains: the step metrics' windows (and divergence, found in them), the
wall time by stage, and the metrics file a resumed run trims back to its checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lsep_tune.train.context import TrainContext


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite: the run (or search trial) has failed."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


# What the loop itself reports besides the objective's metrics (None: neither direction is better).
LOOP_METRICS = {"grad_norm": None, "lr": None, "train_cost": "min"}


def trim_metrics(path: Path, start_step: int, keep_last: bool = True) -> dict:
    """Drop records past the checkpoint a run resumes from: those steps are trained again. Without
    `keep_last` the checkpoint's own record goes too, and is returned for the run to report again."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= start_step]
    last = json.loads(kept[-1]) if kept else {}
    if not keep_last and last.get("step") == start_step:
        kept.pop()
    else:
        last = {}
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    last.pop("step", None)
    return last


class MetricWindow:
    """Sums of the step metrics since the last log, kept on the device: no host sync per step.

    A non-finite loss (or gradient norm without a loss scaler) is remembered with its step, so
    `close` ends the run as diverged at the first logging boundary after it: at most one window
    late, and before any checkpoint of the poisoned state is written.
    """

    def __init__(self, check_grad_norm: bool):
        self.check_grad_norm = check_grad_norm
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None
        self.steps = 0

    def add(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        if self.names is None:
            self.names = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in self.names])
        bad = ~torch.isfinite(values[self.names.index("loss")])
        if self.check_grad_norm:
            bad = bad | ~torch.isfinite(values[self.names.index("grad_norm")])
        step_tensor = torch.full((), step, dtype=torch.float32, device=values.device)
        if self.sums is None:
            self.sums, self.first_bad = values, torch.where(bad, step_tensor, torch.zeros_like(step_tensor))
        else:
            self.sums = self.sums + values
            self.first_bad = torch.where(bad & (self.first_bad == 0), step_tensor, self.first_bad)
        self.steps += 1

    def close(self, ctx: TrainContext) -> dict[str, float]:
        """Window means, averaged over ranks (one all-reduce, one sync); raises on divergence."""
        flag = (self.first_bad > 0).float().reshape(1)
        reduced = ctx.all_reduce_mean(torch.cat([flag, self.sums / self.steps])).tolist()
        names, first_bad = self.names, self.first_bad
        self.names, self.sums, self.first_bad, self.steps = None, None, None, 0
        if reduced[0] > 0:  # some rank saw a non-finite value: all ranks raise, at the earliest step
            step = int(min(s for s in ctx.all_gather(int(first_bad.item())) if s > 0))
            values = dict(zip(names, reduced[1:]))
            raise TrainingDiverged(f"non-finite loss {values['loss']} / grad norm {values['grad_norm']} at step "
                                   f"{step}", step)
        return dict(zip(names, reduced[1:]))


class StageClock:
    """Wall seconds by stage (startup, train, eval, checkpoint, report): where a run or trial spends its time."""

    STAGES = ("startup", "train", "eval", "checkpoint", "report")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.mark = time.perf_counter()

    def charge(self, stage: str) -> None:
        """Add the time since the previous charge to `stage`."""
        now = time.perf_counter()
        self.seconds[stage] += now - self.mark
        self.mark = now

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": round(v, 3) for k, v in self.seconds.items()}
