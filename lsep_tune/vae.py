"""The SD-VAE decoder that turns sampled latents back into images, loaded only from local disk.

Nothing is downloaded: the VAE must be a local diffusers ``AutoencoderKL`` folder (``config.json``
plus weights), or a pipeline folder holding one under ``vae/``. Bad input raises :class:`InputError`,
one line naming the path, the part at fault and what was expected, before any sampling starts.
The loaded VAE travels to remote workers as (config, state dict), so only the driver needs the
folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lsep_tune.errors import InputError


def _model_folder(path: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) that holds the AutoencoderKL's config.json."""
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():
        return path, "vae"
    raise InputError(path, "config.json", "expected a local diffusers AutoencoderKL folder (config.json and weights) "
                                        "or a pipeline folder with one under vae/; nothing is downloaded")


def load_vae(path: str | Path) -> Any:
    """A local ``diffusers.AutoencoderKL`` in eval mode, float32, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "not found; expected a local diffusers AutoencoderKL folder")
    if not path.is_dir():
        raise InputError(path, "path", "expected a folder (diffusers AutoencoderKL, saved with save_pretrained)")
    folder, subfolder = _model_folder(path)
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise InputError(path, "diffusers", f"the diffusers package is needed to decode latents ({err})") from None
    try:
        # low_cpu_mem_usage=False: without `accelerate` diffusers would warn on every load.
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True,
                                            low_cpu_mem_usage=False, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(path, "weights", f"cannot load an AutoencoderKL: {first}") from None
    return vae.eval().requires_grad_(False)


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


def to_payload(vae) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict): what a worker needs to rebuild the VAE without the folder."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return config, {k: v.detach().cpu() for k, v in vae.state_dict().items()}


def from_payload(payload: tuple[dict[str, Any], dict[str, torch.Tensor]]) -> Any:
    from diffusers import AutoencoderKL

    config, state = payload
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """Model-space latents (N, C, h, w) -> images (N, 3, H, W) clipped to [-1, 1].

    The diffusion model was trained on latents multiplied by `latent_scale` (SD-VAE: 0.18215), so
    they are divided by it before the decoder sees them.
    """
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype) / latent_scale
    images = vae.decode(z).sample
    return images.float().clamp(-1.0, 1.0)
