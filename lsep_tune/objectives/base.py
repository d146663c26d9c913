"""The one small interface every representation regularizer implements.

A regularizer is an nn.Module (its heads train with the backbone, under the same DDP wrapper) that
names the main-pass token depths it wants, and turns one noisy batch into a weighted loss plus
metrics. Its config class, and the directions of those metrics, live in `configs.py` without torch;
the module is registered in `objective.REGULARIZERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from lsep_tune.objectives.configs import RegularizerConfig
from lsep_tune.objectives.flow import FlowBatch
from lsep_tune.objectives.randomness import Draws


@dataclass
class RegularizerOutput:
    loss: torch.Tensor  # already weighted: added to the flow loss as is
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


class Regularizer(nn.Module):
    Config: ClassVar[type[RegularizerConfig]]  # in configs.py, with the metrics `forward` reports
    feature_depths: tuple[int, ...] = ()
    # Where training stands, for weight schedules; the loop sets them through TrainObjective.set_step.
    step: int = 0
    steps_per_epoch: int = 1

    def forward(
        self,
        sit: nn.Module,
        batch: FlowBatch,
        features: dict[int, torch.Tensor],
        draws: Draws,
        teacher: nn.Module | None,
    ) -> RegularizerOutput:
        raise NotImplementedError

    def set_step(self, step: int, steps_per_epoch: int) -> None:
        """Called once per optimizer step before its forward passes (`step` counts from 0)."""
        self.step, self.steps_per_epoch = step, max(1, steps_per_epoch)

    def param_groups(self) -> list[dict]:
        """Optimizer groups for this regularizer's own parameters; by default the main settings."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []
