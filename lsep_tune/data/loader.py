"""Deterministic batches: the position in the data stream is a function of the step alone.

Samples are read in per-epoch permutations seeded by (seed, epoch). Global micro-batch j of step s
covers stream positions [(s * accum + j) * G, ... + G), and rank r reads its contiguous slice. A
resumed run therefore continues at exactly the right sample, and the split of the global batch
over workers does not change which samples are seen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lsep_tune.data import digits


class ArrayDataset:
    """Images (N, C, H, W) and labels (N,) held as arrays (in memory or memory-mapped)."""

    def __init__(self, images, labels, scale: float = 1.0):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.scale = images, labels, scale

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.argsort(idx, kind="stable")  # sorted reads suit memory maps
        x = torch.as_tensor(np.asarray(self.images[idx[order]]), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(self.labels[idx[order]]), dtype=torch.long)
        inverse = torch.as_tensor(np.argsort(order, kind="stable"))
        return x[inverse] * self.scale, y[inverse]


def load_dataset(data_cfg, split: str = "train") -> ArrayDataset:
    if data_cfg.kind == "digits":
        images, labels = digits.load_digits_split(split)
        return ArrayDataset(images.numpy(), labels.numpy())
    root = Path(data_cfg.path)
    try:
        images = np.load(root / "latents.npy", mmap_mode="r")
        labels = np.load(root / "labels.npy", mmap_mode="r")
    except OSError as err:
        raise FileNotFoundError(f"data.path: {root}: expected latents.npy and labels.npy ({err})") from None
    return ArrayDataset(images, labels, scale=data_cfg.latent_scale)


class StepBatches:
    def __init__(self, dataset: ArrayDataset, seed: int, local_batch: int, world_size: int, rank: int, accum: int):
        self.dataset, self.seed = dataset, seed
        self.local_batch, self.world_size, self.rank, self.accum = local_batch, world_size, rank, accum
        self.global_micro = local_batch * world_size
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, micro: int) -> np.ndarray:
        n = len(self.dataset)
        start = (step * self.accum + micro) * self.global_micro + self.rank * self.local_batch
        positions = np.arange(start, start + self.local_batch)
        out = np.empty(self.local_batch, dtype=np.int64)
        for epoch in np.unique(positions // n):
            sel = positions // n == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % n]
        return out

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.take(self.indices(step, micro))
