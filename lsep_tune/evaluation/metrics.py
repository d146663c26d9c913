"""``compute_metrics``: FID / IS / KID / precision-recall of generated samples, through torch-fidelity.

Features come from a feature extractor registered in torch-fidelity's registry and are extracted by
torch-fidelity's own loop; the numbers come from torch-fidelity's metric functions
(``fid_statistics_to_metric``, ``isc_features_to_metric``, ``kid_features_to_metric``,
``prc_features_to_metric``). We call those lower-level functions instead of ``calculate_metrics``
because the reference side is usually cached statistics/features, not images. For the same images
and extractor the results equal ``torch_fidelity.calculate_metrics`` (the tests check this).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from lsep_tune.errors import InputError
from lsep_tune.evaluation.extractors import LoadedExtractor, check_extractor_name, check_images_fit, default_extractor
from lsep_tune.evaluation.reference import Reference, check_image_array, reference_statistics, statistics_from_features
from lsep_tune.evaluation.uncertainty import fid_bootstrap_std

METRICS = ("fid", "isc", "kid", "prc")
METRIC_KEYS = {
    "fid": ("fid",),
    "isc": ("isc_mean", "isc_std"),
    "kid": ("kid_mean", "kid_std"),
    "prc": ("precision", "recall"),
}
DEFAULT_METRICS = ("fid", "isc")
ISC_SPLITS = 10
KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000  # torch-fidelity's default; shrunk to the smaller set when that is smaller
PRC_NEIGHBORHOOD = 3
SEED = 2020  # torch-fidelity's default rng_seed, so numbers match its CLI


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """'fid,isc' or ['fid', 'isc'] -> ('fid', 'isc'), refusing unknown names."""
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name not in METRICS:
            raise InputError("metrics", name, f"unknown metric; expected some of {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("metrics", "(empty)", f"expected at least one of {', '.join(METRICS)}")
    return tuple(out)


def check_samples(samples, source: str = "samples") -> tuple[int, int, int]:
    """Samples must be a uint8 NHWC numpy array (the ADM ``arr_0`` layout); returns (H, W, C)."""
    if not isinstance(samples, np.ndarray):
        raise InputError(source, "type", f"expected a numpy array of uint8 NHWC images, got {type(samples).__name__}")
    return check_image_array(samples.shape, samples.dtype, source, "arr_0")


def _require(n: int, needed: int, source: str, what: str) -> None:
    if n < needed:
        raise InputError(source, "count", f"{what} needs at least {needed} images, got {n}")


def compute_metrics(
    samples: np.ndarray,
    reference: str,
    metrics: str | Iterable[str] = DEFAULT_METRICS,
    extractor: str | None = None,
    extractor_weights: str | None = None,
    cache_dir: str | None = None,
    *,
    samples_name: str = "samples",
    cuda: bool | None = None,
    batch_size: int | None = None,
    isc_splits: int = ISC_SPLITS,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int | None = None,
    prc_neighborhood: int = PRC_NEIGHBORHOOD,
    seed: int = SEED,
    fid_bootstraps: int = 0,
) -> dict[str, float]:
    """Metrics of ``samples`` (uint8 NHWC) against ``reference``.

    reference: ``digits``, an ADM reference-batch ``.npz`` (``arr_0``), an image folder, or a
    statistics ``.npz`` (mu/sigma[/features]). Returns the keys of the requested metrics among
    fid, isc_mean, isc_std, kid_mean, kid_std, precision, recall. Bad input raises
    :class:`InputError` before any feature is extracted, where it can be known by then.
    ``fid_bootstraps`` >= 2 adds ``fid_std``, the FID's spread over resampled sample features.
    ``samples_name`` names the samples in error messages (the CLI passes the file path).
    """
    wanted = parse_metrics(metrics)
    for arg, value, least in (("isc_splits", isc_splits, 1), ("kid_subsets", kid_subsets, 1),
                              ("kid_subset_size", kid_subset_size or 2, 2), ("prc_neighborhood", prc_neighborhood, 1)):
        if int(value) < least:
            raise InputError("metrics", arg, f"expected an integer >= {least}, got {value}")
    sample_shape = check_samples(samples, samples_name)
    n = int(samples.shape[0])
    ref = Reference(reference) if any(m in wanted for m in ("fid", "kid", "prc")) else None

    ref_shape = ref.image_shape() if ref is not None else None
    if ref_shape is not None and ref_shape != sample_shape:
        raise InputError(
            ref.source, "shape",
            f"reference images are {'x'.join(map(str, ref_shape))} (HxWxC) but samples are {'x'.join(map(str, sample_shape))}",
        )
    name = extractor or default_extractor(sample_shape, reference)
    spec = check_extractor_name(name)
    check_images_fit(spec, sample_shape, samples_name)

    if "fid" in wanted:
        _require(n, 2, samples_name, "FID")
    if "isc" in wanted:
        _require(n, isc_splits, samples_name, f"IS with {isc_splits} splits")
    if "kid" in wanted:
        _require(n, max(2, kid_subset_size or 2), samples_name, "KID")
    if "prc" in wanted:
        _require(n, prc_neighborhood + 1, samples_name, f"precision/recall with {prc_neighborhood} neighbours")

    ext = LoadedExtractor(name, extractor_weights, cuda=cuda, batch_size=batch_size)
    stats = None
    if ref is not None:
        stats = reference_statistics(ref, ext, cache_dir)
        if stats.image_shape is not None and stats.image_shape != sample_shape:
            raise InputError(
                ref.source, "image_shape",
                f"statistics are of {'x'.join(map(str, stats.image_shape))} images but samples are {'x'.join(map(str, sample_shape))}",
            )
        m = stats.num_images
        if "fid" in wanted and m is not None:
            _require(m, 2, ref.source, "FID")
        if ("kid" in wanted or "prc" in wanted) and stats.features is None:
            raise InputError(
                ref.source, "features",
                "KID and precision/recall need reference features; this statistics file holds only mu/sigma (pass the reference images instead)",
            )
        if "kid" in wanted:
            _require(len(stats.features), max(2, kid_subset_size or 2), ref.source, "KID")
        if "prc" in wanted:
            _require(len(stats.features), prc_neighborhood + 1, ref.source, f"precision/recall with {prc_neighborhood} neighbours")

    feats = ext.extract(samples)
    sample_features = feats[ext.feature_layer]
    if stats is not None and stats.mu.shape[0] != sample_features.shape[1]:
        raise InputError(
            ref.source, "mu", f"has {stats.mu.shape[0]} dims but {name} layer {ext.feature_layer} gives {sample_features.shape[1]}"
        )

    out: dict[str, float] = {}
    if "fid" in wanted:
        mu, sigma = statistics_from_features(sample_features)
        ref_stats = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
        out["fid"] = float(fid_statistics_to_metric({"mu": mu, "sigma": sigma}, ref_stats, False)[KEY_METRIC_FID])
        if fid_bootstraps:
            out["fid_std"] = fid_bootstrap_std(sample_features, ref_stats["mu"], ref_stats["sigma"], fid_bootstraps)
    if "isc" in wanted:
        isc = isc_features_to_metric(feats[ext.logits_layer], splits=isc_splits, shuffle=True, rng_seed=seed)
        out["isc_mean"], out["isc_std"] = float(isc[KEY_METRIC_ISC_MEAN]), float(isc[KEY_METRIC_ISC_STD])
    if "kid" in wanted:
        ref_features = torch.from_numpy(np.asarray(stats.features, dtype=np.float32))
        size = kid_subset_size or min(KID_MAX_SUBSET_SIZE, n, len(ref_features))
        kid = kid_features_to_metric(
            sample_features, ref_features, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed, verbose=False
        )
        out["kid_mean"], out["kid_std"] = float(kid[KEY_METRIC_KID_MEAN]), float(kid[KEY_METRIC_KID_STD])
    if "prc" in wanted:
        ref_features = torch.from_numpy(np.asarray(stats.features, dtype=np.float32))
        prc = prc_features_to_metric(
            sample_features, ref_features, prc_neighborhood=prc_neighborhood, save_cpu_ram=False, verbose=False
        )
        out["precision"], out["recall"] = float(prc[KEY_METRIC_PRECISION]), float(prc[KEY_METRIC_RECALL])
    return out


def load_samples_npz(path: str) -> np.ndarray:
    """``arr_0`` of an ADM-layout sample file, validated as uint8 NHWC (no pickles are loaded)."""
    if not os.path.isfile(path):
        raise InputError(path, "path", "file not found; expected an .npz with uint8 NHWC images under arr_0")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(path, "format", f"not a readable .npz ({type(exc).__name__}); expected np.savez output with arr_0") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(path, "format", "a bare .npy array; expected an .npz (np.savez) with uint8 NHWC images under arr_0")
    with loaded as z:
        if "arr_0" not in z.files:
            raise InputError(path, "arr_0", f"missing (found {', '.join(z.files) or 'nothing'}); expected uint8 NHWC images under arr_0 (ADM sample layout)")
        try:
            samples = z["arr_0"]
        except ValueError as exc:  # e.g. an object array, which would need pickle
            raise InputError(path, "arr_0", f"not a plain array ({exc}); expected uint8 NHWC images") from exc
    check_samples(samples, path)
    return samples
