"""The latent-shard dataset written by `python -m lsep_tune.preprocess`, and its pre-flight check.

Every shard is memory-mapped; a worker reads only the rows of its own slice of each batch. As in the
published LSEP and REPA training, a sample is not a fixed latent: each step picks the image or its
mirror and draws z = mean + std * eps from the stored posterior, times the SD-VAE scale 0.18215.
The flip and eps come from a generator seeded by (seed, step) that draws for the whole global batch
(`loader.data_draws`), so they depend only on (seed, step, position in the global batch):
the same with 1 or 8 workers, and replayed exactly on resume.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsep_tune.data.base import DataIdentity, DataSource
from lsep_tune.errors import InputError

if TYPE_CHECKING:
    import torch

    from lsep_tune.objectives.randomness import Draws

FORMAT = "lsep_tune-latents/1"
SHARD = "shard-{:05d}"  # the files of shard i: SHARD.format(i) + .moments.npy, .labels.npy, ...
MAKE_IT = "create it with python -m lsep_tune.preprocess --images IMAGE_FOLDER --out {path}"


def read_manifest(path: str | Path) -> dict:
    """The manifest of a preprocess output folder, checked for completeness; InputError otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(path, "data.path", f"no such folder; {MAKE_IT.format(path=path)}")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise InputError(path, "data.path", f"no manifest.json (unfinished or not a preprocess output); "
                                            f"{MAKE_IT.format(path=path)}") from None
    except (OSError, ValueError) as err:
        raise InputError(root / "manifest.json", "manifest", f"unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(root / "manifest.json", "format", f"expected {FORMAT!r}, got {manifest.get('format')!r}")
    for shard in manifest["shards"]:
        for name, meta in shard["files"].items():
            file = root / name
            if not file.is_file():
                raise InputError(file, "shards", "missing; rerun preprocess with the same --out to rebuild it")
            if file.stat().st_size != meta["bytes"]:
                raise InputError(file, "shards", f"{file.stat().st_size} bytes, the manifest says {meta['bytes']}; "
                                                 "rerun preprocess to rebuild it")
    return manifest


def check_fits(manifest: dict, path: str, cfg) -> None:
    """The model and the regularizers must fit the data before anything starts."""
    channels, side = manifest["latent_shape"][0], manifest["latent_shape"][1]
    got = (cfg.model.in_channels, cfg.model.input_size)
    if got != (channels, side):
        raise InputError(path, "model.in_channels/input_size",
                         f"the latents are {channels} x {side} x {side}, the model expects {got[0]} x {got[1]} x {got[1]}")
    if cfg.model.num_classes < len(manifest["classes"]):
        raise InputError(path, "model.num_classes",
                         f"{cfg.model.num_classes} is fewer than the {len(manifest['classes'])} classes of the data")
    repa = getattr(cfg.objective, "repa", None)
    if repa is not None and repa.enabled:
        encoder = manifest.get("encoder")
        if not encoder:
            raise InputError(path, "objective.repa.enabled",
                             "REPA needs encoder features stored with the latents; rerun preprocess with "
                             f"--encoder {repa.encoder}")
        if encoder["name"] != repa.encoder:
            raise InputError(path, "objective.repa.encoder",
                             f"{repa.encoder!r}, but the stored features are from {encoder['name']!r}")
        if manifest["feature_shape"][1] != repa.encoder_dim:
            raise InputError(path, "objective.repa.encoder_dim",
                             f"{repa.encoder_dim}, but the stored features have {manifest['feature_shape'][1]} channels")


class LatentShards:
    """Memory-mapped posterior shards; `take` draws the step's flips and posterior samples."""

    read_ahead = True  # storage reads go to a background thread (see loader.StepBatches)

    def __init__(self, path: str | Path, scale: float = 0.18215, features: bool = False):
        self.root = Path(path)
        self.manifest = read_manifest(path)
        self.scale = scale
        self.moments, self.features, labels, starts = [], [], [], [0]
        for shard in self.manifest["shards"]:
            if not shard["num_images"]:
                continue
            stem = self.root / SHARD.format(shard['index'])
            self.moments.append(np.load(f"{stem}.moments.npy", mmap_mode="r"))
            labels.append(np.load(f"{stem}.labels.npy"))
            if features:
                self.features.append(np.load(f"{stem}.features.npy", mmap_mode="r"))
            starts.append(starts[-1] + shard["num_images"])
        self.starts = np.asarray(starts)
        self.labels = np.concatenate(labels)  # small: 8 bytes an image, kept in memory
        self.latent_shape = tuple(self.manifest["latent_shape"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _gather(self, arrays: list[np.ndarray], idx: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Rows idx (global) of the per-shard arrays, view (0 image, 1 flip) of each, in idx order."""
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = None
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx[sel] - self.starts[s]
            order = np.argsort(local, kind="stable")  # sorted reads suit memory maps
            rows = np.asarray(arrays[s][local[order], view[sel][order]])
            if out is None:
                out = np.empty((len(idx), *rows.shape[1:]), dtype=rows.dtype)
            out[sel[order]] = rows
        return out

    def take(self, idx: np.ndarray, draws: Draws) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        import torch  # torch only to load: the config checks a kind without it

        flip = (draws.rand() < 0.5).numpy()
        eps = draws.randn(*self.latent_shape)
        moments = torch.from_numpy(self._gather(self.moments, idx, flip.astype(np.int64))).float()
        z = (moments[:, 0] + moments[:, 1] * eps) * self.scale  # (N, C, h, w)
        y = torch.from_numpy(self.labels[idx])
        extras = {}
        if self.features:
            extras["repa_target"] = torch.from_numpy(self._gather(self.features, idx, flip.astype(np.int64)))
        return z, y, extras


class Latents(DataSource):
    """`data.kind: latents`: the SD-VAE posteriors (and REPA features) written by preprocess."""

    latent = True
    path_hint = "the output folder of lsep_tune.preprocess"

    @classmethod
    def check_available(cls, data_cfg, cfg=None) -> None:
        manifest = read_manifest(data_cfg.path)
        if cfg is not None:
            check_fits(manifest, data_cfg.path, cfg)

    @classmethod
    def identity(cls, data_cfg) -> DataIdentity:
        """The manifest names every shard with its files' sha256: its own digest stands for the data."""
        root = Path(data_cfg.path).resolve()
        manifest = read_manifest(root)
        digest = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
        return DataIdentity(root.name, str(root), digest[:16], int(manifest["num_images"]))

    @classmethod
    def load(cls, data_cfg, split: str, features: bool, image_size: int | None) -> LatentShards:
        return LatentShards(data_cfg.path, scale=data_cfg.latent_scale, features=features)
