"""Feature extractors, registered in torch-fidelity's registry, and how their weights are found.

Two names are supported:

* ``inception-v3-compat``: torch-fidelity's own ``FeatureExtractorInceptionV3`` (the TF-compatible
  port used for published FID/IS numbers), registered by torch-fidelity itself. Its weights come
  from ``extractor_weights`` (a local state dict file saved with ``torch.save``) or, by default,
  from torch-fidelity's download URL through torch.hub's cache. Either way the bytes are first
  loaded with ``weights_only=True`` so that no file can run code, then handed to torch-fidelity.
* ``digits``: our small CNN for 8x8 digits (see ``digits_extractor``), registered here.

An extractor's *identity* (its name plus the SHA-256 of its weights bytes) keys the reference
statistics cache, so statistics computed with other weights are never reused by mistake.
"""
from __future__ import annotations

import hashlib
import io
import os
import urllib.parse
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from lsep_tune.evaluation.digits_extractor import IMAGE_SIZE as DIGITS_SIZE
from lsep_tune.evaluation.digits_extractor import DigitsFeatureExtractor, shipped_weights_bytes
from lsep_tune.errors import InputError

DIGITS = "digits"
INCEPTION = "inception-v3-compat"
SUPPORTED = (DIGITS, INCEPTION)
# Module-level so tests can point it at an unreachable address to exercise the offline path.
INCEPTION_URL = URL_INCEPTION_V3


def register_extractors() -> None:
    """Register ``digits`` with torch-fidelity (idempotent: torch-fidelity refuses duplicates)."""
    if DIGITS not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS, DigitsFeatureExtractor)


@dataclass(frozen=True)
class ExtractorSpec:
    """What an extractor accepts: its channel count and fixed input size (None: resized inside)."""

    name: str
    channels: int
    image_size: int | None
    batch_size: int  # default extraction batch: small for a 299x299 network, large for 8x8 digits

    @property
    def feature_layer(self) -> str:
        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric("fid")

    @property
    def logits_layer(self) -> str:
        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric("isc")


SPECS = {
    DIGITS: ExtractorSpec(DIGITS, channels=1, image_size=DIGITS_SIZE, batch_size=1024),
    INCEPTION: ExtractorSpec(INCEPTION, channels=3, image_size=None, batch_size=64),
}


def default_extractor(image_shape: tuple[int, int, int] | None, reference: str | None = None) -> str:
    """``digits`` for 8x8x1 images or the ``digits`` reference, Inception otherwise."""
    if reference == DIGITS or (image_shape is not None and tuple(image_shape) == (DIGITS_SIZE, DIGITS_SIZE, 1)):
        return DIGITS
    return INCEPTION


def check_extractor_name(name: str) -> ExtractorSpec:
    if name not in SPECS:
        raise InputError("extractor", name, f"unknown extractor; expected one of {', '.join(SUPPORTED)}")
    return SPECS[name]


def check_images_fit(spec: ExtractorSpec, image_shape: tuple[int, int, int], source: str) -> None:
    """Refuse images the network cannot take (the digits CNN only takes 8x8 one-channel images)."""
    h, w, c = image_shape
    if spec.image_size is not None and (h, w) != (spec.image_size, spec.image_size):
        raise InputError(
            source, "shape",
            f"extractor {spec.name} takes {spec.image_size}x{spec.image_size} images, got {h}x{w}x{c}"
            f" (use --extractor {INCEPTION} for other resolutions)",
        )
    if spec.channels == 1 and c != 1:
        raise InputError(source, "shape", f"extractor {spec.name} takes one-channel images, got {c} channels")


def inception_cache_path() -> str:
    """Where torch.hub (and so torch-fidelity) keeps the downloaded Inception weights."""
    filename = os.path.basename(urllib.parse.urlparse(INCEPTION_URL).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _weights_missing_message(detail: str) -> str:
    return (
        f"Inception weights are not available ({detail}); pass --extractor-weights PATH "
        f"(extractor_weights=PATH) to a local state dict saved with torch.save, or put torch-fidelity's "
        f"weights file at {inception_cache_path()}"
    )


def _read_weights_bytes(name: str, weights: str | None) -> bytes:
    if weights is not None:
        if not os.path.isfile(weights):
            raise InputError(weights, "extractor_weights", "file not found; expected a state dict saved with torch.save")
        with open(weights, "rb") as f:
            return f.read()
    if name == DIGITS:
        return shipped_weights_bytes()
    cached = inception_cache_path()
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            # Same URL and cache file torch-fidelity uses; writes to a temp file and renames.
            torch.hub.download_url_to_file(INCEPTION_URL, cached, progress=False)
        except Exception as exc:  # URLError, HTTPError, timeouts, SSL errors: all mean "not available"
            raise InputError(INCEPTION, "weights", _weights_missing_message(f"download failed: {exc}")) from exc
    with open(cached, "rb") as f:
        return f.read()


def _safe_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """Load with weights_only=True and insist on a flat dict of tensors."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            source, "state_dict", f"cannot be loaded with torch.load(weights_only=True): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InputError(source, "state_dict", "expected a dict of parameter name -> tensor (model.state_dict())")
    return state


class UInt8ImageDataset(Dataset):
    """uint8 NHWC images as the uint8 CHW tensors torch-fidelity's extractors take."""

    def __init__(self, images: np.ndarray, channels: int | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.repeat = channels == 3 and self.images.shape[1] == 1  # grey -> RGB for Inception

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if self.repeat else x.contiguous()


class LoadedExtractor:
    """A torch-fidelity feature extractor plus what the evaluation code needs to know about it."""

    def __init__(self, name: str, weights: str | None = None, cuda: bool | None = None, batch_size: int | None = None):
        register_extractors()
        self.spec = check_extractor_name(name)
        self.name = name
        self.cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
        self.batch_size = batch_size or self.spec.batch_size
        data = _read_weights_bytes(name, weights)
        source = weights if weights is not None else (INCEPTION if name == INCEPTION else "digits weights")
        state = _safe_state_dict(data, source)
        self.identity = f"{name}:sha256={hashlib.sha256(data).hexdigest()}"
        # Re-serialise the tensors-only dict: whatever torch-fidelity then does with the buffer
        # (it loads with weights_only=False) can only rebuild tensors.
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        layers = [self.spec.feature_layer, self.spec.logits_layer]
        try:
            self.module = create_feature_extractor(
                name, layers, cuda=self.cuda, verbose=False, feature_extractor_weights_path=buf
            )
        except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shape mismatch
            if "state_dict" not in str(exc):
                raise
            first = str(exc).strip().splitlines()
            detail = " ".join(first[:3])[:300]
            raise InputError(source, "state_dict", f"does not fit the {name} network: {detail}") from exc

    @property
    def feature_layer(self) -> str:
        return self.spec.feature_layer

    @property
    def logits_layer(self) -> str:
        return self.spec.logits_layer

    def extract(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """Features of uint8 NHWC images via torch-fidelity's own batching loop (CPU float32 out)."""
        dataset = UInt8ImageDataset(images, self.spec.channels)
        return get_featuresdict_from_dataset(
            dataset, self.module, self.batch_size, self.cuda, save_cpu_ram=True, verbose=False
        )
