"""FID and IS of a model while it trains, on the samples `python -m lsep_tune.sample` would draw.

The images come from `sample.generate` with the command line's default seed and batch, so the
file ``python -m lsep_tune.sample --checkpoint RUN/ema_final.pt --num N`` holds exactly the images
a final evaluation of N samples scored (same device and precision assumed).
"""
from __future__ import annotations

import numpy as np
import torch

from lsep_tune.evaluation import compute_metrics
from lsep_tune.evaluation.uncertainty import FID_BOOTSTRAPS
from lsep_tune.sample.generate import DEFAULT_BATCH, DEFAULT_SEED, generate
from lsep_tune.vae import load_vae

# What an in-training evaluation reports, and the direction in which each improves. The std keys
# have none: they are each metric's uncertainty (UNCERTAINTY_OF), reported beside it, not objectives.
EVAL_METRICS = {"fid": "min", "fid_std": None, "isc_mean": "max", "isc_std": None}
UNCERTAINTY_OF = {"fid_std": "fid", "isc_std": "isc_mean"}


@torch.no_grad()
def sample_images(sit, cfg, device, n: int, seed: int = DEFAULT_SEED, batch: int = DEFAULT_BATCH) -> np.ndarray:
    """n uint8 NHWC images; a latent model's are decoded by the SD-VAE in cfg.data.vae_path."""
    vae = None
    if cfg.data.latent:
        vae = load_vae(cfg.data.vae_path).to(device)
    return generate(sit, cfg, n, device, seed=seed, batch=batch, images=True, vae=vae)


def evaluate_samples(sit, cfg, device, n: int | None = None, seed: int = DEFAULT_SEED) -> dict[str, float]:
    """FID and IS of n (default cfg.run.eval_samples) EMA samples against cfg.run.eval_reference, each
    with its uncertainty: the FID's bootstrap spread over the samples and the IS's spread over splits."""
    images = sample_images(sit, cfg, device, n or cfg.run.eval_samples, seed)
    out = compute_metrics(images, cfg.run.eval_reference, metrics=("fid", "isc"),
                          extractor_weights=cfg.run.eval_extractor_weights,
                          cuda=torch.device(device).type == "cuda", fid_bootstraps=FID_BOOTSTRAPS)
    return {k: out[k] for k in EVAL_METRICS if k in out}
