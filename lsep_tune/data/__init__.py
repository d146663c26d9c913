"""Training data: the embedded digits, an image-class-folder tree, and the latent shards written by
`lsep_tune.preprocess`.

To add a dataset: write one module with a `base.DataSource` subclass, importing torch only inside what
loads tensors (the config reads this registry before torch loads), then add one line to DATASETS.
`data.kind` accepts its name, and its checks run at load time and before Ray starts.
"""
from __future__ import annotations

from lsep_tune.data.base import DataIdentity, DataSource
from lsep_tune.data.digits import Digits
from lsep_tune.data.images import Images
from lsep_tune.data.latents import Latents

DATASETS: dict[str, type[DataSource]] = {
    "digits": Digits,
    "images": Images,
    "latents": Latents,
}


def check_available(data_cfg, cfg=None) -> None:
    """Pre-flight: raise errors.InputError (one line, naming the data folder or manifest file) when the
    data is missing, incomplete, or does not fit the model and regularizers of `cfg`; called before
    Ray, MLflow or any output folder starts."""
    DATASETS[data_cfg.kind].check_available(data_cfg, cfg)


def identity(data_cfg) -> DataIdentity:
    """What a run of this data trains on (name, source, digest), for its MLflow dataset input."""
    return DATASETS[data_cfg.kind].identity(data_cfg)


__all__ = ["DATASETS", "DataIdentity", "DataSource", "check_available", "identity"]
