"""Evaluation of generated samples: FID, IS, KID and precision/recall through torch-fidelity.

Use ``compute_metrics(samples, reference)`` from the training loop and the search, or
``python -m lsep_tune.evaluate`` from a shell. Two feature extractors are registered in
torch-fidelity's registry: torch-fidelity's ``inception-v3-compat`` (ImageNet FID/IS, comparable
with published numbers) and ``digits``, a small CNN for the embedded 8x8 digits data set.

Digits FID is a domain FID measured in the digits CNN's feature space: it ranks digits models
against each other, but is not comparable with ImageNet (Inception) FID.
"""
from lsep_tune.evaluation.extractors import (
    DIGITS,
    INCEPTION,
    LoadedExtractor,
    UInt8ImageDataset,
    default_extractor,
    inception_cache_path,
    register_extractors,
)
from lsep_tune.evaluation.metrics import (
    DEFAULT_METRICS,
    METRIC_KEYS,
    METRICS,
    check_samples,
    compute_metrics,
    load_samples_npz,
    parse_metrics,
)
from lsep_tune.evaluation.reference import Reference, ReferenceStatistics, default_cache_dir, reference_statistics

register_extractors()


def compute_reference_statistics(
    reference: str,
    extractor: str | None = None,
    extractor_weights: str | None = None,
    cache_dir: str | None = None,
    *,
    cuda: bool | None = None,
) -> ReferenceStatistics:
    """Statistics (and features) of a reference set, e.g. to precompute ImageNet's once on a GPU
    machine with the Inception weights and ship the resulting file (``.save(path)``) to others."""
    ref = Reference(reference)
    name = extractor or default_extractor(ref.image_shape(), reference)
    return reference_statistics(ref, LoadedExtractor(name, extractor_weights, cuda=cuda), cache_dir)


__all__ = [
    "DEFAULT_METRICS",
    "DIGITS",
    "INCEPTION",
    "METRICS",
    "METRIC_KEYS",
    "LoadedExtractor",
    "Reference",
    "ReferenceStatistics",
    "UInt8ImageDataset",
    "check_samples",
    "compute_metrics",
    "compute_reference_statistics",
    "default_cache_dir",
    "default_extractor",
    "inception_cache_path",
    "load_samples_npz",
    "parse_metrics",
    "reference_statistics",
    "register_extractors",
]
