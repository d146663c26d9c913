"""The SiT sizes by name, without torch: the config checks `model.name` before torch loads."""
from __future__ import annotations

# name -> (depth, hidden size, heads); patch size comes from the "/p" suffix.
SIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    # Small backbones for the embedded digits data (8x8x1 inputs, CPU).
    "Digits": (6, 96, 4),
    "Tiny": (4, 64, 4),
}


def model_names() -> list[str]:
    names = [f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    names += [f"SiT-{s}/{p}" for s in ("Digits", "Tiny") for p in (1, 2)]
    return names


def parse_model_name(name: str) -> dict[str, int]:
    """'SiT-XL/2' -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)."""
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(model_names())}")
    size, patch = name[len("SiT-"):].split("/")
    depth, hidden, heads = SIT_SIZES[size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
