"""The one way samples are drawn from a SiT, so a seed means the same samples everywhere.

Sample i has label ``i % num_classes``. The samples are cut into fixed chunks of `batch`; chunk c
draws its initial (and SDE) noise from a generator seeded by (seed, c). The result therefore
depends on the seed and the batch size, never on how many processes drew the chunks: the command
line (in one process or on Ray actors), the in-training FID/IS evaluation and the sample grids
all go through `generate_chunk`, and `python -m lsep_tune.sample --num N` with the default seed
and batch draws exactly the images the in-training evaluation of N samples scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lsep_tune.data.digits import to_uint8
from lsep_tune.sample.solvers import sample
from lsep_tune.vae import decode

DEFAULT_SEED = 0
DEFAULT_BATCH = 64


@dataclass(frozen=True)
class SolverSettings:
    """How to integrate: plain data, so it pickles into Ray actors."""

    mode: str
    steps: int
    cfg_scale: float
    guidance_interval: tuple[float, float]

    @classmethod
    def from_config(cls, sampling_cfg) -> "SolverSettings":
        s = sampling_cfg
        return cls(s.mode, s.steps, s.cfg_scale, (s.guidance_low, s.guidance_high))


def chunk_bounds(num: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: fixed by (num, batch), never by the worker count."""
    return [(start, min(start + batch, num)) for start in range(0, num, batch)]


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed per (seed, chunk): SeedSequence mixing keeps nearby pairs unrelated."""
    words = np.random.SeedSequence([seed, chunk]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def class_labels(num: int, num_classes: int) -> np.ndarray:
    return np.arange(num, dtype=np.int64) % num_classes


@torch.no_grad()
def generate_chunk(sit, cfg, settings: SolverSettings, seed: int, chunk: int, start: int, stop: int,
                   device: torch.device | str) -> torch.Tensor:
    """Samples start..stop-1 (chunk `chunk`) in model space, (N, C, H, W)."""
    m = cfg.model
    g = torch.Generator().manual_seed(chunk_seed(seed, chunk))
    noise = torch.randn((stop - start, m.in_channels, m.input_size, m.input_size), generator=g).to(device)
    y = torch.from_numpy(class_labels(stop, m.num_classes)[start:]).to(device)
    was_training = sit.training
    sit.eval()
    try:
        return sample(sit.velocity, noise, y, mode=settings.mode, steps=settings.steps, cfg_scale=settings.cfg_scale,
                      guidance_interval=settings.guidance_interval, null_class=m.num_classes,
                      path_type=cfg.objective.flow.path_type, generator=g)
    finally:
        sit.train(was_training)


def to_images(x: torch.Tensor, cfg, vae=None) -> np.ndarray:
    """Model-space samples -> uint8 NHWC images; a latent model's go through `vae` (an AutoencoderKL)."""
    if vae is not None:
        x = decode(vae, x, cfg.data.latent_scale)
    return to_uint8(x)


def generate(sit, cfg, num: int, device: torch.device | str, *, seed: int = DEFAULT_SEED,
             batch: int = DEFAULT_BATCH, settings: SolverSettings | None = None, images: bool = False,
             vae=None) -> torch.Tensor | np.ndarray:
    """`num` class-balanced samples in this process: model space (N, C, H, W) tensors, or with
    `images` uint8 NHWC arrays (decoded chunk by chunk, through `vae` for a latent model)."""
    settings = settings or SolverSettings.from_config(cfg.sampling)
    parts = []
    for c, (start, stop) in enumerate(chunk_bounds(num, batch)):
        x = generate_chunk(sit, cfg, settings, seed, c, start, stop, device)
        parts.append(to_images(x, cfg, vae) if images else x)
    return np.concatenate(parts) if images else torch.cat(parts)
