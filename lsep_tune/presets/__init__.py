"""The shipped training presets: one YAML file per preset in this package."""
from __future__ import annotations

from importlib import resources


def preset_names() -> list[str]:
    """Read from the package's files only, so a command's --help can list them without the config's
    registries (which import torch)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
