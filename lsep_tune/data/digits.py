"""scikit-learn's digits (1797 real 8x8 images, 10 classes) as the embedded, offline dataset.

Images are kept at their native 8x8 resolution, one channel, scaled from [0, 16] to [-1, 1], so
a tiny SiT with patch size 1 sees an 8x8 token grid on a CPU. The split is deterministic.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsep_tune.data.base import ArrayDataset, DataIdentity, DataSource
from lsep_tune.schema import FieldError

if TYPE_CHECKING:
    import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8
CHANNELS = 1
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def _split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_held = int(round(n * HELDOUT_FRACTION))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels): images float32 (N, 1, 8, 8) in [-1, 1], labels int64 (N,)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    import torch  # torch only to load: the config checks a kind without it
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    labels = bunch.target.astype(np.int64)
    if split != "all":
        train_idx, held_idx = _split_indices(len(labels))
        idx = train_idx if split == "train" else held_idx
        images, labels = images[idx], labels[idx]
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-space images (N, C, H, W) in [-1, 1] -> uint8 NHWC, the ADM sample layout."""
    import torch  # torch only for tensors: the config checks a kind without it

    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def heldout_uint8() -> np.ndarray:
    """The held-out split as uint8 (N, 8, 8, 1): the reference set for digits FID."""
    images, _ = load_digits_split("heldout")
    return to_uint8(images)


class Digits(DataSource):
    """`data.kind: digits`: embedded, so always available; the model must match its 8x8x1, 10 classes."""

    smoke_model = "SiT-Tiny/2"

    @classmethod
    def check_config(cls, cfg) -> None:
        expected = (IMAGE_SIZE, CHANNELS, NUM_CLASSES)
        got = (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes)
        if got != expected:
            raise FieldError("model", f"digits data needs input_size/in_channels/num_classes = {expected}, got {got}")

    @classmethod
    def identity(cls, data_cfg) -> DataIdentity:
        """The train split as trained on: its digest covers the split's pixels and labels."""
        import sklearn.datasets

        images, labels = load_digits_split("train")
        digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"  # what load_digits reads
        return DataIdentity(f"digits-train (split seed {SPLIT_SEED}, {1 - HELDOUT_FRACTION:.0%})", str(source),
                            digest[:16], len(labels))

    @classmethod
    def load(cls, data_cfg, split: str, features: bool, image_size: int | None) -> ArrayDataset:
        images, labels = load_digits_split(split)
        return ArrayDataset(images.numpy(), labels.numpy())
