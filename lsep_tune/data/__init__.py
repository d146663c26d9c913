"""Training data: the embedded digits set, or precomputed SD-VAE latents on disk."""
from __future__ import annotations

from pathlib import Path

from lsep_tune.errors import InputError

LATENT_FILES = ("latents.npy", "labels.npy")


def check_available(data_cfg, source: str = "config") -> None:
    """Refuse, in one line and before any run starts, data that `loader.load_dataset` could not read."""
    if data_cfg.kind != "latents":
        return  # digits ship inside the package
    root = Path(data_cfg.path)
    if not root.is_dir():
        raise InputError(source, "data.path", f"{root} is not a folder; expected one holding "
                                              f"{' and '.join(LATENT_FILES)} (precomputed SD-VAE latents)")
    missing = [name for name in LATENT_FILES if not (root / name).is_file()]
    if missing:
        raise InputError(source, "data.path", f"{root} lacks {' and '.join(missing)}; expected precomputed "
                                              f"SD-VAE latents as {' and '.join(LATENT_FILES)}")
