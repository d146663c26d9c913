"""Sample grids from the EMA model: the quick look a person takes at a run."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from lsep_tune.sample.generate import DEFAULT_SEED, generate


def save_sample_grid(sit, cfg, path: str | Path, device, seed: int = DEFAULT_SEED) -> Path:
    """A PNG grid with one column per class: the first cfg.sampling.grid_images samples of `seed`
    (one chunk). Latent models show latent channels 0-2, not decoded images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = cfg.sampling.grid_images
    x = generate(sit, cfg, n, device, seed=seed, batch=n).float().cpu()
    if cfg.data.latent:
        x = x[:, :3] / cfg.data.latent_scale
        x = x / x.abs().amax().clamp_min(1e-6)
    if x.shape[-1] < 32:  # tiny images (digits are 8x8): enlarge so a person can see them
        x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = min(cfg.model.num_classes, n) if cfg.model.num_classes <= 16 else int(n**0.5)
    save_image(x.clamp(-1, 1), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
    return path
