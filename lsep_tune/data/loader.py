"""Deterministic batches: the position in the data stream is a function of the step alone.

Samples are read in per-epoch permutations seeded by (seed, epoch). Global micro-batch j of step s
covers stream positions [(s * accum + j) * G, ... + G), and rank r reads its contiguous slice. A
resumed run therefore continues at exactly the right sample, and the split of the global batch
over workers does not change which samples are seen. Datasets that draw per-sample randomness
(the latent shards' flip and posterior sample) get the step's data draws, sliced the same way.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from lsep_tune.data import DATASETS
from lsep_tune.objectives.randomness import Draws

DATA_STREAM = 0x5EED_DA7A  # keeps the data draws apart from the objective's draws of the same step


def data_draws(seed: int, step: int, global_batch: int, offset: int, local_batch: int) -> Draws:
    """The data's own per-step generator: (seed, step) -> draws for every sample of the global batch."""
    state = np.random.SeedSequence([seed, step, DATA_STREAM]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return Draws(g, global_batch, offset, local_batch, torch.device("cpu"))


def load_dataset(data_cfg, split: str = "train", features: bool = False, image_size: int | None = None):
    """The dataset of `data_cfg.kind` (data.DATASETS); `features` adds REPA targets where stored."""
    return DATASETS[data_cfg.kind].load(data_cfg, split, features, image_size)


class StepBatches:
    def __init__(self, dataset, seed: int, local_batch: int, world_size: int, rank: int, accum: int):
        self.dataset, self.seed = dataset, seed
        self.local_batch, self.world_size, self.rank, self.accum = local_batch, world_size, rank, accum
        self.global_micro = local_batch * world_size
        self._perm_epoch, self._perm = -1, None
        # One batch read ahead in a background thread, so a step does not wait on storage.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if dataset.read_ahead else None
        self._ahead: tuple[tuple[int, int], Future] | None = None

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

    def draws(self, step: int, micro: int):
        """The step's data draws, sliced to this rank and micro-step (as the objective's draws are)."""
        offset = (micro * self.world_size + self.rank) * self.local_batch
        return data_draws(self.seed, step, self.global_micro * self.accum, offset, self.local_batch)

    def read(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return self.dataset.take(self.indices(step, micro), self.draws(step, micro))

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x, y, extras) of (step, micro); the next one starts loading in the background."""
        if self._pool is None:
            return self.read(step, micro)
        key = (step, micro)
        ahead, self._ahead = self._ahead, None
        out = ahead[1].result() if ahead is not None and ahead[0] == key else self.read(step, micro)
        nxt = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        self._ahead = (nxt, self._pool.submit(self.read, *nxt))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
