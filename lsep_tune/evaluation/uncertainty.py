"""How much an FID moves with the generated samples drawn: a bootstrap over the sample features.

FID is a function of the mean and covariance of N generated features; drawing another N samples
from the same model moves it. Resampling the N features with replacement B times and taking the
standard deviation of the B FIDs estimates that spread without generating anything again, so every
evaluation can say whether a difference between two runs is larger than its own noise. The
resampling uses a fixed seed: two runs scored at once get the same resampling indices (common
random numbers), and the same features always give the same `fid_std`.

The bootstrap FIDs are biased upward (repeated samples shrink the covariance), so only their
spread is used; `fid` itself is always the plain FID of all N samples.
"""
from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

from lsep_tune.evaluation.reference import statistics_from_features

FID_BOOTSTRAPS = 20  # the std of a std from 20 draws is within ~16% of the truth: enough to compare
BOOTSTRAP_SEED = 2020


def fid_bootstrap_std(features: torch.Tensor, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                      bootstraps: int = FID_BOOTSTRAPS, seed: int = BOOTSTRAP_SEED) -> float:
    """Standard deviation (ddof=1) of the FID over `bootstraps` resamplings of the N sample features."""
    if bootstraps < 2:
        raise ValueError(f"a bootstrap standard deviation needs at least 2 resamplings, got {bootstraps}")
    ref = {"mu": np.asarray(ref_mu, np.float64), "sigma": np.asarray(ref_sigma, np.float64)}
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    fids = []
    for _ in range(bootstraps):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        mu, sigma = statistics_from_features(features[idx])
        fids.append(float(fid_statistics_to_metric({"mu": mu, "sigma": sigma}, ref, False)[KEY_METRIC_FID]))
    return float(np.std(fids, ddof=1))
