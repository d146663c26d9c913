"""Sample grids from the EMA model: the quick look a person takes at a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from lsep_tune.sampling import sample


@torch.no_grad()
def generate(sit, cfg, n: int, device, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """n samples in model space (N, C, H, W), class-balanced labels unless given."""
    m, s = cfg.model, cfg.sampling
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, m.in_channels, m.input_size, m.input_size), generator=g).to(device)
    y = (torch.arange(n) % m.num_classes if labels is None else labels).to(device)
    was_training = sit.training
    sit.eval()
    x = sample(
        sit.velocity, noise, y, mode=s.mode, steps=s.steps, cfg_scale=s.cfg_scale,
        guidance_interval=(s.guidance_low, s.guidance_high), null_class=m.num_classes,
        path_type=cfg.objective.flow.path_type, generator=g,
    )
    sit.train(was_training)
    return x


def save_sample_grid(sit, cfg, path: str | Path, device, seed: int = 0) -> Path:
    """A PNG grid with one column per class. Latent models show latent channels 0-2 until decoded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = cfg.sampling.grid_images
    x = generate(sit, cfg, n, device, seed).float().cpu()
    if cfg.data.kind == "latents":
        x = x[:, :3] / cfg.data.latent_scale
        x = x / x.abs().amax().clamp_min(1e-6)
    if x.shape[-1] < 32:  # tiny images (digits are 8x8): enlarge so a person can see them
        x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = min(cfg.model.num_classes, n) if cfg.model.num_classes <= 16 else int(n**0.5)
    save_image(x.clamp(-1, 1), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
    return path


def decode_to_uint8(x: torch.Tensor, cfg) -> np.ndarray:
    """Model-space samples -> uint8 NHWC images (latents go through the configured SD-VAE)."""
    from lsep_tune.data.digits import to_uint8

    if cfg.data.kind == "latents":
        from lsep_tune.vae import decode, load_vae

        x = decode(load_vae(cfg.data.vae_path).to(x.device), x, cfg.data.latent_scale)
    return to_uint8(x)


@torch.no_grad()
def evaluate_samples(sit, cfg, device, n: int | None = None, seed: int = 12345, chunk: int = 250) -> dict[str, float]:
    """FID (with its bootstrap spread `fid_std`) and IS of n (default cfg.run.eval_samples) EMA samples.

    Common random numbers: the sampler noise comes from `seed` (not the run's training seed) and
    the labels are fixed, so every trial, rung and seed of a search is scored on the same draws and
    a difference between two evaluations is the models', not the evaluation's.
    """
    from lsep_tune.evaluation import compute_metrics
    from lsep_tune.evaluation.uncertainty import FID_BOOTSTRAPS

    n = n or cfg.run.eval_samples
    parts = []
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        labels = torch.arange(start, start + count) % cfg.model.num_classes
        parts.append(decode_to_uint8(generate(sit, cfg, count, device, seed=seed + start, labels=labels), cfg))
    images = np.concatenate(parts)
    out = compute_metrics(images, cfg.run.eval_reference, metrics=("fid", "isc"),
                          extractor_weights=cfg.run.eval_extractor_weights,
                          cuda=device.type == "cuda", fid_bootstraps=FID_BOOTSTRAPS)
    return {k: out[k] for k in ("fid", "fid_std", "isc_mean", "isc_std") if k in out}
