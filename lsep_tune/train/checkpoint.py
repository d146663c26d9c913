"""Training state on disk: one `state.pt` per checkpoint folder, loaded with weights_only=True."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

STATE_FILE = "state.pt"


def save_state(folder: str | Path, state: dict) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated state.pt behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    return folder


def load_state(folder: str | Path, map_location="cpu") -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location=map_location, weights_only=True)


def step_folder(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root: str | Path) -> Path | None:
    root = Path(root)
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists()) if root.exists() else []
    return done[-1] if done else None


def prune(root: str | Path, keep: int) -> None:
    done = sorted(p for p in Path(root).glob("step_*") if (p / STATE_FILE).exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
