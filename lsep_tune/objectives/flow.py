"""Flow matching (SiT): x_t = alpha_t x + sigma_t eps, the model predicts the velocity d x_t / d t."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lsep_tune.objectives.randomness import Draws


def interpolant(t: torch.Tensor, path_type: str):
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) for t in [0, 1]: t = 0 data, t = 1 noise."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(t * half_pi),
            torch.sin(t * half_pi),
            -half_pi * torch.sin(t * half_pi),
            half_pi * torch.cos(t * half_pi),
        )
    raise ValueError(f"unknown path_type {path_type!r}")


def sample_time(draws: Draws, time_sampling: str, path_type: str) -> torch.Tensor:
    """(N,) training times: uniform, or EDM's lognormal sigma mapped onto the path."""
    if time_sampling == "uniform":
        return draws.rand()
    if time_sampling == "lognormal":
        sigma = draws.randn().exp()
        return sigma / (1 + sigma) if path_type == "linear" else (2 / math.pi) * torch.atan(sigma)
    raise ValueError(f"unknown time_sampling {time_sampling!r}")


def drop_labels(y: torch.Tensor, drop: torch.Tensor, null_class: int) -> torch.Tensor:
    """Replace the labels where `drop` is True by the null class."""
    return torch.where(drop, torch.full_like(y, null_class), y)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class FlowBatch:
    """Everything about one noisy batch that the regularizers may reuse."""

    x: torch.Tensor  # (N, C, H, W) clean data
    y: torch.Tensor  # (N,) labels as given
    y_model: torch.Tensor  # (N,) labels after CFG dropout: what the main pass sees
    t: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, C, H, W)
    x_t: torch.Tensor  # (N, C, H, W)
    target: torch.Tensor  # (N, C, H, W) velocity target
    path_type: str
    dropped_host: torch.Tensor | None = None  # (N,) bool on the host: which labels y_model dropped
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample data targets, e.g. REPA's

    def noised(self, t: torch.Tensor) -> torch.Tensor:
        """The same data and noise at other times t (N,): SRA's teacher input."""
        alpha, sigma, _, _ = interpolant(t.view(-1, 1, 1, 1), self.path_type)
        return alpha * self.x + sigma * self.noise


def make_flow_batch(
    x: torch.Tensor, y: torch.Tensor, draws: Draws, path_type: str, time_sampling: str,
    class_dropout_prob: float, null_class: int,
) -> FlowBatch:
    t = sample_time(draws, time_sampling, path_type)
    noise = draws.randn(*x.shape[1:]).to(x.dtype)
    dropped_host = draws.rand_host() < class_dropout_prob
    drop = draws.to_device(dropped_host)
    alpha, sigma, d_alpha, d_sigma = interpolant(t.view(-1, 1, 1, 1), path_type)
    return FlowBatch(
        x=x, y=y, y_model=drop_labels(y, drop, null_class), t=t, noise=noise,
        x_t=alpha * x + sigma * noise, target=d_alpha * x + d_sigma * noise, path_type=path_type,
        dropped_host=dropped_host,
    )


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE averaged over the batch."""
    return mean_flat((pred.float() - target.float()) ** 2).mean()
