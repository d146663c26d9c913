"""SRA: self-representation alignment (arXiv 2505.02831).

The student's tokens after an early block (at the batch's noise level) go through an MLP head and
are aligned with the tokens after a later block of the EMA teacher, fed the same data, noise and
labels at a lower noise level t - U(0, t_max). The teacher gets no gradient and no head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from lsep_tune.objectives.base import Regularizer, RegularizerOutput
from lsep_tune.objectives.configs import SRAConfig


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: SRAConfig) -> torch.Tensor:
    """Mean alignment loss between (N, T, D) token tensors."""
    s, t = student.float(), teacher.float()
    if cfg.loss_type == "cos":
        dim = -1 if cfg.cos_axis == "features" else 1
        return (1 - F.cosine_similarity(s, t, dim=dim)).mean()
    if cfg.loss_type == "sml1":
        return F.smooth_l1_loss(s, t, beta=cfg.smooth_l1_beta)
    if cfg.loss_type == "l1":
        return F.l1_loss(s, t)
    return F.mse_loss(s, t)


def decayed_weight(weight: float, epoch: int, start: int, period: float) -> float:
    """The published SRA schedule: constant up to `start`, then down by 10x every `period` epochs."""
    return weight if epoch <= start else weight * 0.1 ** ((epoch - start) / period)


def xavier_init(module: nn.Module) -> None:
    """The published heads' initialisation: xavier-uniform Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SRA(Regularizer):
    Config = SRAConfig

    def __init__(self, cfg: SRAConfig, hidden_size: int, num_classes: int, grid_size: int):
        super().__init__()
        self.cfg = cfg
        self.feature_depths = (cfg.block_out_s,)
        self.head = Mlp(hidden_size, cfg.head_mult * hidden_size, hidden_size, act_layer=nn.SiLU)
        if cfg.head_init == "xavier":
            xavier_init(self.head)

    def weight(self) -> float:
        c = self.cfg
        if c.weight_schedule == "constant":
            return c.weight
        return decayed_weight(c.weight, self.step // self.steps_per_epoch, c.decay_start_epoch, c.decay_period_epochs)

    def teacher_time(self, t: torch.Tensor, draws) -> torch.Tensor:
        return (t - self.cfg.t_max * draws.rand()).clamp(0.0, 1.0)

    def forward(self, sit, batch, features, draws, teacher) -> RegularizerOutput:
        if teacher is None:
            raise ValueError("SRA needs the EMA model as teacher")
        student = self.head(features[self.cfg.block_out_s])  # (N, T, D)
        t_teacher = self.teacher_time(batch.t, draws)
        depth = self.cfg.block_out_t
        with torch.no_grad():
            _, feats = teacher(batch.noised(t_teacher), t_teacher, batch.y_model, return_depths=(depth,), stop_at=depth)
        raw = alignment_loss(student, feats[depth].detach(), self.cfg)
        return RegularizerOutput(self.weight() * raw, {"sra_loss": raw.detach()})
