"""What every kind of training data provides, and the in-memory array dataset the small ones share.

A kind is one module with a `DataSource` subclass; `data.DATASETS` maps the config's `data.kind` to it.
The config, the pre-flight check and the training loop ask the registry, never the kind's name. A
kind's module imports torch only inside what loads tensors: the config checks a kind before torch loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DataIdentity:
    """What a run trained on, as MLflow records a dataset input: a name, where it is read from, a
    digest that changes when the data does, and how many samples it holds."""

    name: str
    source: str  # a local path (or URI) of what is read
    digest: str  # hex, from the data's own record (manifest, file listing, the split's arrays)
    num_samples: int


class DataSource:
    """One kind of training data. Its checks raise the project's one-line errors."""

    latent: bool = False  # samples are SD-VAE latents: decoded for FID and shown as channels in grids
    path_hint: str | None = None  # what data.path must be, for the kinds that read one
    smoke_model: str | None = None  # the model a `--smoke` search on this data falls back to

    @classmethod
    def check_config(cls, cfg) -> None:
        """At load time, from the config alone: the model fits this data (schema.FieldError)."""

    @classmethod
    def check_available(cls, data_cfg, cfg=None) -> None:
        """Before Ray, MLflow or any output folder starts: the data is there and fits `cfg` (InputError)."""

    @classmethod
    def identity(cls, data_cfg) -> DataIdentity:
        """The training split's name, source and digest, for the run's MLflow dataset input."""
        raise NotImplementedError

    @classmethod
    def load(cls, data_cfg, split: str, features: bool, image_size: int | None):
        """A dataset with `__len__`, `take(idx, draws) -> (x, y, extras)` and `read_ahead`."""
        raise NotImplementedError


class ArrayDataset:
    """Images (N, C, H, W) and labels (N,) held as arrays (in memory or memory-mapped)."""

    read_ahead = False  # in memory: nothing to wait for

    def __init__(self, images, labels, scale: float = 1.0, extras: dict | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.scale = images, labels, scale
        self.extras = extras or {}  # per-sample arrays handed to the objective, e.g. REPA's "repa_target"

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray, draws=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        import torch  # torch only to load: the config checks a kind without it

        order = np.argsort(idx, kind="stable")  # sorted reads suit memory maps
        x = torch.as_tensor(np.asarray(self.images[idx[order]]), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(self.labels[idx[order]]), dtype=torch.long)
        inverse = torch.as_tensor(np.argsort(order, kind="stable"))
        extras = {k: torch.as_tensor(np.asarray(v[idx[order]]))[inverse] for k, v in self.extras.items()}
        return x[inverse] * self.scale, y[inverse], extras
