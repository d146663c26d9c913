"""LSEP: linear-separability probing (arXiv 2509.21565).

A second pass runs blocks 1..k over the same noisy input and t, with labels dropped at rate
`uncond_prob`, so the class must be readable from the features rather than from the conditioning.
A linear probe (LayerNorm + Linear) on mean-pooled tokens of a random crop of the token grid
classifies it; its cross-entropy, weighted by a constant or by bins of t, trains probe and
backbone together. The probe has its own learning rate.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsep_tune.objectives.base import Regularizer, RegularizerOutput
from lsep_tune.objectives.configs import LSEPConfig
from lsep_tune.objectives.flow import drop_labels


def crop_window_mask(grid: int, window: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """(N, grid*grid) float mask of a window x window square at per-sample (top, left)."""
    rows = torch.arange(grid, device=top.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + window)  # (N, G)
    in_cols = (rows[None] >= left[:, None]) & (rows[None] < left[:, None] + window)  # (N, G)
    return (in_rows[:, :, None] & in_cols[:, None, :]).flatten(1).float()


def step_weights(t: torch.Tensor, start: float, end: float, n: int) -> torch.Tensor:
    """Weight of each sample by its t bin: bin i of n equal bins of [0, 1] gets linspace(start, end, n)[i]."""
    bins = (t.float() * n).floor().clamp(0, n - 1).long()
    return torch.linspace(start, end, n, device=t.device)[bins]


class LSEP(Regularizer):
    Config = LSEPConfig

    def __init__(self, cfg: LSEPConfig, hidden_size: int, num_classes: int, grid_size: int):
        super().__init__()
        self.cfg = cfg
        self.grid_size = grid_size
        self.probe = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, num_classes))
        if cfg.probe_init == "xavier":
            nn.init.xavier_uniform_(self.probe[1].weight)
            nn.init.zeros_(self.probe[1].bias)
        if cfg.reuse_main_pass:
            self.feature_depths = (cfg.encoder_depth,)

    def decay(self) -> float:
        """1 until decay_start_step, then 10x smaller every decay_period steps."""
        start = self.cfg.decay_start_step
        if start is None or self.step <= start:
            return 1.0
        return 0.1 ** ((self.step - start) / self.cfg.decay_period)

    def pool(self, tokens: torch.Tensor, draws) -> torch.Tensor:
        """Mean over a random crop of the token grid: one window size per batch, a position per sample."""
        grid, start = self.grid_size, self.cfg.crop_start
        window = grid if start is None else draws.randint_shared(start, grid + 1)
        u_top, u_left = draws.rand(), draws.rand()
        top = (u_top * (grid - window + 1)).floor().long()
        left = (u_left * (grid - window + 1)).floor().long()
        mask = crop_window_mask(grid, window, top, left)  # (N, T)
        return (tokens.float() * mask[:, :, None]).sum(1) / (window * window)  # (N, D)

    def forward(self, sit, batch, features, draws, teacher) -> RegularizerOutput:
        probe_dropped = draws.rand_host() < self.cfg.uncond_prob
        y_probe = drop_labels(batch.y, draws.to_device(probe_dropped), sit.null_class)
        logits = self.probe(self.pool(self.probe_tokens(sit, batch, features, y_probe, probe_dropped), draws))
        ce = F.cross_entropy(logits.float(), batch.y, reduction="none")  # (N,)
        if self.cfg.weights_type == "constant":
            loss = self.cfg.weight * ce.mean()
        else:
            loss = (step_weights(batch.t, self.cfg.weight_start, self.cfg.weight_end, self.cfg.n_weights) * ce).mean()
        loss = self.decay() * loss
        acc = (logits.argmax(-1) == batch.y).float().mean()
        return RegularizerOutput(loss, {"lsep_ce": ce.mean().detach(), "probe_acc": acc.detach()})

    def probe_tokens(self, sit, batch, features, y_probe, probe_dropped) -> torch.Tensor:
        """(N, T, D) block-k tokens of the probe pass.

        Where a sample's probe label equals its main-pass label (both dropped or both kept), its
        probe-pass tokens are the main pass's: same x_t, t and label through the same blocks. Only
        the others run again. Which ones is decided from host-side draws, so no device sync.
        """
        k = self.cfg.encoder_depth
        if not self.cfg.reuse_main_pass or k not in features or batch.dropped_host is None:
            return sit(batch.x_t, batch.t, y_probe, return_depths=(k,), stop_at=k)[1][k]
        differs = (probe_dropped != batch.dropped_host).nonzero().squeeze(1)
        if len(differs) == 0:
            return features[k]
        if len(differs) == len(probe_dropped):
            return sit(batch.x_t, batch.t, y_probe, return_depths=(k,), stop_at=k)[1][k]
        idx = differs.to(batch.x_t.device, non_blocking=True)
        _, feats = sit(batch.x_t[idx], batch.t[idx], y_probe[idx], return_depths=(k,), stop_at=k)
        return features[k].index_copy(0, idx, feats[k].to(features[k].dtype))

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.probe.parameters()), "lr": self.cfg.probe_lr,
                 "weight_decay": self.cfg.probe_weight_decay}]
