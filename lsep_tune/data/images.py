"""A class-folder image tree read directly, for pixel-space models (`data.kind: images`).

Each image gets the ADM centre crop to `model.input_size` and, per step, a horizontal flip drawn like
the latent dataset's (from (seed, step, sample position) alone), scaled to [-1, 1]. Images are
decoded on every read, so this suits small sets; large ones belong in `lsep_tune.preprocess`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsep_tune.data.base import DataIdentity, DataSource
from lsep_tune.errors import InputError

if TYPE_CHECKING:
    import torch

    from lsep_tune.objectives.randomness import Draws

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def scan_class_folders(root: Path) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """({class folder name: index}, [(path relative to root, label)]); both sorted, so stable."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_map = {name: i for i, name in enumerate(classes)}
    items = []
    for name in classes:
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((path.relative_to(root).as_posix(), class_map[name]))
    return class_map, items


def adm_center_crop(image, size: int) -> np.ndarray:
    """The ADM (guided-diffusion) crop used by SiT, REPA and LSEP: halve with a box filter while the
    short side is at least 2 x size, resize the short side to `size` (bicubic), cut the centre."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def check_image_folder(path, cfg=None) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """The folder holds images in class sub-folders and, with `cfg`, fits its model (RGB, enough classes);
    returns its scan (scan_class_folders), so a reader need not walk the tree again."""
    if not path or not Path(path).is_dir():
        raise InputError(path, "data.path", "no such folder; expected one sub-folder of images per class")
    classes, items = scan_class_folders(Path(path))
    if not items:
        raise InputError(path, "data.path", "no images in class sub-folders")
    if cfg is not None and cfg.model.in_channels != 3:
        raise InputError(path, "model.in_channels", f"{cfg.model.in_channels}, but images are read as RGB (3)")
    if cfg is not None and cfg.model.num_classes < len(classes):
        raise InputError(path, "model.num_classes",
                         f"{cfg.model.num_classes} is fewer than the {len(classes)} class folders of the data")
    return classes, items


class ImageFolder:
    read_ahead = True  # decoding goes to the background thread

    def __init__(self, path, resolution: int):
        self.classes, items = check_image_folder(path)
        self.root, self.resolution = Path(path), resolution
        self.paths = [rel for rel, _ in items]
        self.labels = np.asarray([label for _, label in items], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray, draws: Draws) -> tuple[torch.Tensor, torch.Tensor, dict]:
        import torch  # torch only to load: the config checks a kind without it
        from PIL import Image

        flip = draws.rand() < 0.5
        crops = []
        for i in idx:
            with Image.open(self.root / self.paths[i]) as img:
                crops.append(adm_center_crop(img.convert("RGB"), self.resolution))
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, torch.from_numpy(self.labels[idx]), {}


class Images(DataSource):
    """`data.kind: images`: pixels decoded and centre-cropped to `model.input_size` on every read."""

    path_hint = "a folder with one sub-folder of images per class"

    @classmethod
    def check_available(cls, data_cfg, cfg=None) -> None:
        check_image_folder(data_cfg.path, cfg)

    @classmethod
    def identity(cls, data_cfg) -> DataIdentity:
        """The folder's listing as read: every image's path, label and size in bytes."""
        root = Path(data_cfg.path).resolve()
        _, items = check_image_folder(root)
        h = hashlib.sha256()
        for rel, label in items:
            h.update(f"{rel}\t{label}\t{(root / rel).stat().st_size}\n".encode())
        return DataIdentity(root.name, str(root), h.hexdigest()[:16], len(items))

    @classmethod
    def load(cls, data_cfg, split: str, features: bool, image_size: int | None) -> ImageFolder:
        return ImageFolder(data_cfg.path, image_size)
