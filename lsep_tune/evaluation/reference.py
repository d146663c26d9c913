"""Reference sets for FID/KID/precision-recall, and a content-addressed cache of their statistics.

A reference is one of:

* ``digits``: the held-out split of the embedded digits data set (8x8x1);
* an ``.npz`` with ``arr_0`` (the ADM reference-batch layout, uint8 NHWC); if it also holds ADM's
  own ``mu``/``sigma`` those are ignored, because they come from a different Inception port;
* a folder of ``.png``/``.jpg``/``.jpeg`` images (one size; grey images stay one-channel);
* a statistics ``.npz`` (``mu``, ``sigma`` and optionally ``features`` plus metadata), as written
  by :meth:`ReferenceStatistics.save`; the cache files are exactly such files.

Statistics are cached under a key made of the SHA-256 of the reference's contents and the
extractor's identity (name + weights hash), so a changed file or different weights never hit a
stale entry, while a moved or renamed reference still does. Extracting Inception features of
ImageNet's 10k-50k reference images is the slow part of an evaluation; it runs once per machine.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.utils import glob_samples_paths

from lsep_tune.data.digits import heldout_uint8
from lsep_tune.errors import InputError
from lsep_tune.files import atomic_write

STATS_FORMAT = "lsep_tune-reference-stats-v1"
IMAGE_EXTENSIONS = "png,jpg,jpeg"
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lsep_tune", "reference_stats")


@dataclass
class ReferenceStatistics:
    """FID statistics of a reference set, its features (for KID/PRC) and where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num_images: int | None = None
    image_shape: tuple[int, int, int] | None = None
    extractor: str | None = None  # identity: name + weights hash
    extractor_name: str | None = None
    feature_layer: str | None = None
    source: str = ""

    def save(self, path: str) -> None:
        arrays = {"format": np.array(STATS_FORMAT), "mu": self.mu, "sigma": self.sigma, "source": np.array(self.source)}
        if self.features is not None:
            arrays["features"] = self.features
        if self.num_images is not None:
            arrays["num_images"] = np.array(self.num_images, dtype=np.int64)
        if self.image_shape is not None:
            arrays["image_shape"] = np.array(self.image_shape, dtype=np.int64)
        for key in ("extractor", "extractor_name", "feature_layer"):
            if getattr(self, key) is not None:
                arrays[key] = np.array(getattr(self, key))
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> "ReferenceStatistics":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:
            raise InputError(path, "format", f"not a readable statistics .npz: {exc}") from exc
        for key in ("mu", "sigma"):
            if key not in data:
                raise InputError(path, key, "missing; a statistics file needs mu (D,) and sigma (D, D)")
        mu, sigma = data["mu"], data["sigma"]
        if mu.ndim != 1 or not np.issubdtype(mu.dtype, np.floating):
            raise InputError(path, "mu", f"expected a float vector (D,), got {mu.dtype} {mu.shape}")
        d = mu.shape[0]
        if sigma.shape != (d, d) or not np.issubdtype(sigma.dtype, np.floating):
            raise InputError(path, "sigma", f"expected a float ({d}, {d}) matrix, got {sigma.dtype} {sigma.shape}")
        features = data.get("features")
        if features is not None and (features.ndim != 2 or features.shape[1] != d):
            raise InputError(path, "features", f"expected (N, {d}), got {features.shape}")

        def text(key):
            return str(data[key][()]) if key in data else None

        shape = data.get("image_shape")
        if shape is not None and shape.shape != (3,):
            raise InputError(path, "image_shape", f"expected (H, W, C), got {shape.tolist()}")
        return cls(
            mu=mu, sigma=sigma, features=features,
            num_images=int(data["num_images"]) if "num_images" in data else (len(features) if features is not None else None),
            image_shape=tuple(int(v) for v in shape) if shape is not None else None,
            extractor=text("extractor"), extractor_name=text("extractor_name"),
            feature_layer=text("feature_layer"), source=text("source") or path,
        )


def _sha256_file(path: str, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def _peek_npy_in_npz(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz from its header, without reading the array."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            arr = np.load(path, allow_pickle=False)[key]
            shape, dtype = arr.shape, arr.dtype
    return tuple(shape), np.dtype(dtype)


def check_image_array(shape: tuple[int, ...], dtype: np.dtype, source: str, field: str) -> tuple[int, int, int]:
    """uint8 NHWC with 1 or 3 channels and at least one image; returns (H, W, C)."""
    if np.dtype(dtype) != np.uint8:
        raise InputError(source, field, f"expected uint8 images (ADM npz layout), got dtype {np.dtype(dtype)}")
    if len(shape) != 4 or shape[3] not in (1, 3):
        hint = " (looks like NCHW; transpose to NHWC)" if len(shape) == 4 and shape[1] in (1, 3) else ""
        raise InputError(source, field, f"expected shape (N, H, W, C) with C = 1 or 3, got {tuple(shape)}{hint}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise InputError(source, field, f"expected at least one non-empty image, got shape {tuple(shape)}")
    return int(shape[1]), int(shape[2]), int(shape[3])


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in _GREY_MODES:
        return np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class Reference:
    """A reference set, resolved from the user's string; cheap until images are asked for."""

    def __init__(self, reference: str):
        self.source = str(reference)
        self.path = None
        self._files: list[str] = []
        if reference == "digits":
            self.kind = "digits"
        elif os.path.isdir(reference):
            self.kind, self.path = "folder", reference
            self._files = glob_samples_paths(reference, False, IMAGE_EXTENSIONS, None, verbose=False)
            if not self._files:
                raise InputError(reference, "images", f"folder holds no {IMAGE_EXTENSIONS} files")
        elif os.path.isfile(reference):
            self.path = reference
            try:
                with np.load(reference, allow_pickle=False) as z:
                    keys = set(z.files)
            except Exception as exc:
                raise InputError(
                    reference, "format", "expected an .npz (reference batch with arr_0, or statistics with mu/sigma)"
                ) from exc
            if "arr_0" in keys:
                self.kind = "npz"
            elif {"mu", "sigma"} <= keys:
                self.kind = "stats"
            else:
                raise InputError(
                    reference, "arr_0", "missing; expected uint8 NHWC images under arr_0 (ADM reference batch) or mu/sigma statistics"
                )
        else:
            raise InputError(
                reference, "path", "not found; expected an .npz reference batch or statistics file, an image folder, or 'digits'"
            )

    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) of the images, validated, read without loading them all (None for bare stats)."""
        if self.kind == "digits":
            return (8, 8, 1)
        if self.kind == "npz":
            shape, dtype = _peek_npy_in_npz(self.path, "arr_0")
            return check_image_array(shape, dtype, self.path, "arr_0")
        if self.kind == "folder":
            with Image.open(self._files[0]) as img:
                arr = _pil_to_array(img)
            return arr.shape[0], arr.shape[1], arr.shape[2]
        return None

    def content_digest(self) -> str:
        """SHA-256 of what the reference holds, independent of where it lives."""
        if self.kind == "digits":
            images = heldout_uint8()
            h = hashlib.sha256(b"digits-heldout|" + str(images.shape).encode())
            h.update(images.tobytes())
            return h.hexdigest()
        if self.kind == "folder":
            h = hashlib.sha256(b"folder|")
            for f in self._files:
                h.update(os.path.relpath(f, os.path.realpath(self.path)).encode() + b"\0")
                _sha256_file(f, h)
            return h.hexdigest()
        return _sha256_file(self.path, hashlib.sha256(b"npz|")).hexdigest()

    def load_images(self) -> np.ndarray:
        """All images as uint8 NHWC, validated."""
        if self.kind == "digits":
            return heldout_uint8()
        if self.kind == "npz":
            with np.load(self.path, allow_pickle=False) as z:
                images = z["arr_0"]
            check_image_array(images.shape, images.dtype, self.path, "arr_0")
            return images
        if self.kind == "folder":
            arrays, first = [], None
            for f in self._files:
                with Image.open(f) as img:
                    arr = _pil_to_array(img)
                if first is None:
                    first = arr.shape
                elif arr.shape != first:
                    raise InputError(
                        f, "shape", f"all images in {self.path} must share one size and channel count; expected {first}, got {arr.shape}"
                    )
                arrays.append(arr)
            return np.stack(arrays)
        raise InputError(self.source, "arr_0", "a statistics file holds no images")


def cache_key(content_digest: str, extractor_identity: str, feature_layer: str) -> str:
    material = f"{STATS_FORMAT}|{content_digest}|{extractor_identity}|{feature_layer}|torch-fidelity-{torch_fidelity.__version__}"
    return hashlib.sha256(material.encode()).hexdigest()


def statistics_from_features(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """torch-fidelity's own mean/covariance, as float64 so files from any source compare alike."""
    stats = fid_features_to_statistics(features)
    return np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)


def reference_statistics(ref: Reference, extractor, cache_dir: str | None = None) -> ReferenceStatistics:
    """Statistics of ``ref`` under ``extractor`` (a LoadedExtractor): from the file, the cache, or computed."""
    if ref.kind == "stats":
        stats = ReferenceStatistics.load(ref.path)
        if stats.extractor_name is not None and stats.extractor_name != extractor.name:
            raise InputError(
                ref.path, "extractor_name", f"statistics were computed with {stats.extractor_name}, not {extractor.name}"
            )
        if stats.extractor is not None and stats.extractor != extractor.identity:
            raise InputError(
                ref.path, "extractor", f"statistics were computed with other {extractor.name} weights ({stats.extractor})"
            )
        if stats.feature_layer is not None and stats.feature_layer != extractor.feature_layer:
            raise InputError(
                ref.path, "feature_layer", f"statistics use layer {stats.feature_layer}, expected {extractor.feature_layer}"
            )
        return stats

    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(ref.content_digest(), extractor.identity, extractor.feature_layer)
    entry = os.path.join(cache_dir, f"{key}.npz")
    if os.path.isfile(entry):
        try:
            cached = ReferenceStatistics.load(entry)
            if cached.extractor == extractor.identity and cached.features is not None:
                return cached
        except InputError:
            pass  # a damaged entry is recomputed and replaced below

    images = ref.load_images()
    features = extractor.extract(images)[extractor.feature_layer]
    mu, sigma = statistics_from_features(features)
    stats = ReferenceStatistics(
        mu=mu, sigma=sigma, features=features.numpy().astype(np.float32), num_images=len(images),
        image_shape=tuple(int(v) for v in images.shape[1:]), extractor=extractor.identity,
        extractor_name=extractor.name, feature_layer=extractor.feature_layer, source=ref.source,
    )
    try:
        stats.save(entry)
    except OSError as exc:  # a read-only cache costs time, not correctness
        warnings.warn(f"could not write reference statistics cache {entry}: {exc}", stacklevel=2)
    return stats
