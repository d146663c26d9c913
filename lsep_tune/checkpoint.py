"""The checkpoint format on disk, in one place.

A training checkpoint is a folder ``step_NNNNNNNN`` holding ``state.pt``: a dict with ``step``,
``model`` (the whole objective, the SiT under ``sit.``), ``ema`` (same keys), ``optimizer``,
``scaler``, ``config`` (the validated config as a dict), ``world_size`` and ``train_cost``. A
finished run also leaves ``ema_final.pt``: ``step``, ``ema`` (plain SiT keys) and ``config``.
Everything is read with ``weights_only=True``.

For sampling, `read_sit_checkpoint` is the single entry point that turns a file into (config dict,
SiT state dict); other layouts (published checkpoints) plug in beside it, and `load_checkpoint`
checks the result against the model the config describes.
"""
from __future__ import annotations

import io
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsep_tune import published
from lsep_tune.config import Config, validate
from lsep_tune.data import digits
from lsep_tune.errors import InputError
from lsep_tune.files import atomic_write
from lsep_tune.models.sit import sit_from_config
from lsep_tune.published import read_file

STATE_FILE = "state.pt"
EMA_FILE = "ema_final.pt"


# --------------------------------------------------------------------------- training state

def _save(obj: dict, path: Path) -> None:
    buf = io.BytesIO()  # serialise first: a failing torch.save never touches the file system
    torch.save(obj, buf)
    with atomic_write(path) as fh:
        fh.write(buf.getbuffer())


def save_state(folder: str | Path, state: dict) -> Path:
    """Write ``folder/state.pt`` atomically: a crash mid-write never leaves a truncated one behind."""
    folder = Path(folder)
    _save(state, folder / STATE_FILE)
    return folder


def save_ema(path: str | Path, step: int, sit_state: dict[str, torch.Tensor], config: dict) -> Path:
    """Write an ``ema_final.pt`` (plain SiT keys) atomically."""
    path = Path(path)
    _save({"step": step, "ema": sit_state, "config": config}, path)
    return path


def load_state(folder: str | Path, map_location="cpu") -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location=map_location, weights_only=True)


def step_folder(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def whole(path: Path) -> bool:
    """A torch file whose zip directory reads: a checkpoint that Ray Train was still copying into storage
    (file by file, in place) when its node died has none, and is not one to resume from."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if whole(p / STATE_FILE)) if root.exists() else []


def latest(root: str | Path) -> Path | None:
    done = _complete(Path(root))
    return done[-1] if done else None


def prune(root: str | Path, keep: int) -> None:
    for old in _complete(Path(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- checkpoints to sample from

@dataclass
class Checkpoint:
    """A SiT's EMA weights (plain SiT keys) and the validated config it was trained with."""

    config: Config
    state: dict[str, torch.Tensor]
    step: int | None = None
    path: str | None = None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A file as given; a folder -> its state.pt, else its ema_final.pt (a run folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", f"not found; expected {EMA_FILE}, a {STATE_FILE} or a checkpoint folder")
    if path.is_dir():
        for name in (STATE_FILE, EMA_FILE):
            if (path / name).is_file():
                return path / name
        raise InputError(path, STATE_FILE, f"expected a checkpoint folder holding {STATE_FILE} "
                                           f"(or a run folder holding {EMA_FILE})")
    return path


def read_sit_checkpoint(file: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], int | None]:
    """(config dict, SiT EMA state dict, step) of an ``ema_final.pt`` or ``state.pt``."""
    file = Path(file)
    blob = read_file(file, str(file))
    if not isinstance(blob, dict):
        raise InputError(file, "file", f"expected a dict with 'ema' and 'config', got {type(blob).__name__}")
    for key in ("ema", "config"):
        if not isinstance(blob.get(key), dict):
            raise InputError(file, key, "missing; expected a training checkpoint (ema_final.pt or state.pt)")
    ema = blob["ema"]
    if any(k.startswith("sit.") for k in ema):  # state.pt holds the whole objective
        ema = {k[len("sit."):]: v for k, v in ema.items() if k.startswith("sit.")}
    step = blob.get("step")
    return blob["config"], dict(ema), int(step) if isinstance(step, int) else None


def check_weights(cfg: Config, state: dict[str, torch.Tensor], source: str) -> None:
    """Compare keys and shapes with the configured model built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = sit_from_config(cfg.model).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
    if problems:
        raise InputError(source, "ema", f"weights do not fit {cfg.model.name} from the stored config: "
                                        + ", ".join(problems))


def load_checkpoint(path: str | Path, fmt: str = "lsep_tune", model: dict | None = None) -> Checkpoint:
    """The EMA weights and validated config of ``ema_final.pt`` / ``state.pt`` / a checkpoint folder,
    or of a published checkpoint (`fmt` lsep|sra|repa|sit; `model` fills in what the file does not say)."""
    file = resolve_checkpoint_path(path)
    if fmt != "lsep_tune":
        return _published_checkpoint(file, fmt, model)
    config, state, step = read_sit_checkpoint(file)
    cfg = validate(config, source=f"{file} config")
    check_weights(cfg, state, str(file))
    return Checkpoint(cfg, state, step, str(file))


def _published_checkpoint(file: Path, fmt: str, model: dict | None) -> Checkpoint:
    """A published file has no lsep_tune config: the model's defaults are the papers' sampling settings."""
    conv = published.load(file, fmt, model)
    m = {"name": "SiT-XL/2", **conv.model}
    shape = (m.get("input_size", 32), m.get("in_channels", 4), m.get("num_classes", 1000))
    # The papers release latent models; a model of the embedded digits' shape samples as pixels.
    pixels = shape == (digits.IMAGE_SIZE, digits.CHANNELS, digits.NUM_CLASSES)
    cfg = validate({"model": m, **({"data": {"kind": "digits"}} if pixels else {})}, source=f"{file} ({fmt} layout)")
    return Checkpoint(cfg, conv.sit, conv.step, str(file))
