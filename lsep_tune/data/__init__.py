"""Training data: the embedded digits, and the latent shards written by `lsep_tune.preprocess`."""
from __future__ import annotations


def check_available(data_cfg, source: str = "config", cfg=None) -> None:
    """Pre-flight: raise errors.InputError (one line) when the data is missing, incomplete, or does not
    fit the model and regularizers of `cfg`; called before Ray, MLflow or any output folder starts.
    The errors name the data folder (or manifest file) as their source; `source` is accepted for the
    callers that pass the config's name."""
    if data_cfg.kind == "digits":
        return
    if data_cfg.kind == "images":
        from lsep_tune.data.images import check_image_folder

        return check_image_folder(data_cfg.path)
    from lsep_tune.data.latents import check_fits, read_manifest

    manifest = read_manifest(data_cfg.path)
    if cfg is not None:
        check_fits(manifest, data_cfg.path, cfg)
