"""REPA: representation alignment with a frozen pretrained encoder (arXiv 2410.06940).

The tokens after block k of the main pass go through an MLP projector (hidden -> projector_dim ->
projector_dim -> encoder_dim, SiLU) and are pulled by cosine towards the frozen encoder's patch
tokens of the same clean image (or its mirror, whichever the step drew). The encoder's tokens are
computed once by `python -m lsep_tune.preprocess --encoder NAME` and arrive with the batch as
`batch.extras["repa_target"]`. When the encoder's token grid differs from the SiT's (e.g. a /16
encoder at 224px gives 14 x 14 against SiT/2's 16 x 16), the target grid is resized bilinearly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsep_tune.objectives.base import Regularizer, RegularizerOutput
from lsep_tune.objectives.configs import REPAConfig


def match_grid(target: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, T_e, D) square token grid -> (N, tokens, D), bilinear when the grids differ."""
    n, t_e, d = target.shape
    if t_e == tokens:
        return target
    g_e, g = math.isqrt(t_e), math.isqrt(tokens)
    grid = target.transpose(1, 2).reshape(n, d, g_e, g_e)
    grid = F.interpolate(grid.float(), size=(g, g), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class REPA(Regularizer):
    Config = REPAConfig

    def __init__(self, cfg: REPAConfig, hidden_size: int, num_classes: int, grid_size: int):
        super().__init__()
        self.cfg = cfg
        self.feature_depths = (cfg.encoder_depth,)
        p = cfg.projector_dim
        self.projector = nn.Sequential(nn.Linear(hidden_size, p), nn.SiLU(), nn.Linear(p, p), nn.SiLU(),
                                       nn.Linear(p, cfg.encoder_dim))

    def forward(self, sit, batch, features, draws, teacher) -> RegularizerOutput:
        target = batch.extras.get("repa_target")
        if target is None:
            raise ValueError("REPA needs the encoder features with the batch: latent data preprocessed with --encoder")
        tokens = features[self.cfg.encoder_depth]  # (N, T, D)
        projected = self.projector(tokens)  # (N, T, encoder_dim)
        target = match_grid(target.float(), tokens.shape[1])
        raw = (1 - F.cosine_similarity(projected.float(), target, dim=-1)).mean()
        return RegularizerOutput(self.cfg.weight * raw, {"repa_loss": raw.detach()})
