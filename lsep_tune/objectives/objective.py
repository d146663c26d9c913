"""The training objective as one nn.Module: flow matching plus the sum of the enabled regularizers."""
from __future__ import annotations

import torch
import torch.nn as nn

from lsep_tune.objectives.base import Regularizer
from lsep_tune.objectives.configs import OBJECTIVE_METRICS
from lsep_tune.objectives.flow import flow_loss, make_flow_batch
from lsep_tune.objectives.lsep import LSEP
from lsep_tune.objectives.randomness import Draws
from lsep_tune.objectives.repa import REPA
from lsep_tune.objectives.sra import SRA

# The modules of configs.REGULARIZER_CONFIGS, by the same names.
REGULARIZERS: dict[str, type[Regularizer]] = {
    "lsep": LSEP,
    "sra": SRA,
    "repa": REPA,
}


class TrainObjective(nn.Module):
    """Backbone + regularizer heads in one module, so one DDP wrapper syncs all their gradients.

    `forward` returns the total loss and detached metrics for one micro-batch.
    """

    metrics = OBJECTIVE_METRICS  # besides each enabled regularizer's own

    def __init__(self, sit: nn.Module, objective_cfg):
        super().__init__()
        self.sit = sit
        self.flow_cfg = objective_cfg.flow
        self.regularizers = nn.ModuleDict()
        for name, cls in REGULARIZERS.items():
            reg_cfg = getattr(objective_cfg, name)
            if reg_cfg.enabled:
                self.regularizers[name] = cls(reg_cfg, sit.hidden_size, sit.num_classes, sit.grid_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, draws: Draws, teacher: nn.Module | None = None,
                extras: dict[str, torch.Tensor] | None = None):
        batch = make_flow_batch(
            x, y, draws, self.flow_cfg.path_type, self.flow_cfg.time_sampling,
            self.flow_cfg.class_dropout_prob, self.sit.null_class,
        )
        batch.extras = extras or {}
        depths = tuple(sorted({d for reg in self.regularizers.values() for d in reg.feature_depths}))
        pred, features = self.sit(batch.x_t, batch.t, batch.y_model, return_depths=depths)
        loss_flow = flow_loss(pred, batch.target)
        total = loss_flow
        metrics = {"flow_loss": loss_flow.detach()}
        for reg in self.regularizers.values():
            out = reg(self.sit, batch, features, draws, teacher)
            total = total + out.loss
            metrics.update(out.metrics)
        metrics["loss"] = total.detach()
        return total, metrics

    def set_step(self, step: int, steps_per_epoch: int) -> None:
        """Tell the regularizers the optimizer step, for their weight schedules."""
        for reg in self.regularizers.values():
            reg.set_step(step, steps_per_epoch)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Backbone parameters with the main settings, then each regularizer's own groups."""
        groups = [{"params": [p for p in self.sit.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        for reg in self.regularizers.values():
            for group in reg.param_groups():
                groups.append({"weight_decay": weight_decay, **group})
        return groups
