"""preprocess: a class-folder tree through a small random AutoencoderKL on Ray Data actors."""
import json
from pathlib import Path

import numpy as np
import pytest

from lsep_tune import preprocess
from lsep_tune.data.images import adm_center_crop, scan_class_folders

CLASSES = ("n01440764", "n01443537", "n02102040")  # synset-like names, sorted -> labels 0, 1, 2


def make_tiny_vae(folder: Path) -> Path:
    """A randomly initialised 4-level AutoencoderKL: 256px -> 4 x 32 x 32 latents, like the SD-VAE."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 4, 4),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=2, sample_size=256)
    vae.save_pretrained(folder)
    return folder


def make_image_tree(root: Path, per_class: int = 8) -> Path:
    """Non-square PNGs (so the centre crop and the box downsampling both run)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (300, 540) if i % 2 else (520, 280)
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            img[..., c] = 255  # a class-dependent colour
            Image.fromarray(img).save(root / name / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def test_adm_center_crop_square_and_centred():
    from PIL import Image

    img = np.zeros((300, 1200, 3), dtype=np.uint8)
    img[:, 590:610] = 255  # a bar in the middle stays in the middle
    out = adm_center_crop(Image.fromarray(img), 256)
    assert out.shape == (256, 256, 3)
    cols = np.nonzero(out[128, :, 0] > 128)[0]
    assert abs(cols.mean() - 127.5) < 3


def test_scan_is_sorted_and_stable(tmp_path):
    root = make_image_tree(tmp_path / "imgs", per_class=2)
    (root / "n00000001").mkdir()  # an empty class folder still takes its sorted place
    class_map, items = scan_class_folders(root)
    assert list(class_map) == sorted(class_map) and class_map["n00000001"] == 0
    assert class_map[CLASSES[2]] == 3
    assert items == sorted(items) and {label for _, label in items} == {1, 2, 3}


def test_bad_input_is_one_line_before_ray(tmp_path, capsys):
    import ray

    assert preprocess.main(["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--images" in err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_preprocess_writes_shards_reruns_and_reports_corrupt(tmp_path, tiny_vae, ray_local, capsys):
    root = make_image_tree(tmp_path / "imgs")
    (root / CLASSES[1] / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "latents"
    argv = ["--images", str(root), "--out", str(out), "--vae", str(tiny_vae), "--batch", "4",
            "--workers", "2", "--shard-size", "10"]
    assert preprocess.main(argv) == 0
    err = capsys.readouterr().err
    assert f"{CLASSES[1]}/broken.png" in err  # reported by its path

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 24 and manifest["resolution"] == 256
    assert manifest["latent_shape"] == [4, 32, 32]
    assert manifest["classes"] == {name: i for i, name in enumerate(CLASSES)}
    assert manifest["unreadable"] == [f"{CLASSES[1]}/broken.png"]
    # 25 files in shards of 10; broken.png sorts first in its class, so it is file 8, in shard 0.
    assert [s["num_images"] for s in manifest["shards"]] == [9, 10, 5]
    labels = np.concatenate([np.load(out / f"shard-{i:05d}.labels.npy") for i in range(3)])
    assert labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    for shard in manifest["shards"]:
        for name, meta in shard["files"].items():
            assert preprocess.sha256_of(out / name) == meta["sha256"]

    moments = np.load(out / "shard-00001.moments.npy", mmap_mode="r")
    assert moments.shape == (10, 2, 2, 4, 32, 32) and moments.dtype == np.float16
    assert (moments[:, :, 1] > 0).all()  # std
    # The flip's posterior is the posterior of the mirrored image, not a copy of the image's.
    assert not np.allclose(moments[:, 0, 0], moments[:, 1, 0])

    # A rerun encodes nothing; a shard whose file went missing is the only one done again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    assert preprocess.main(argv) == 0
    assert "0 images to encode" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")} == stamps
    (out / "shard-00001.moments.npy").unlink()
    assert preprocess.main(argv) == 0
    assert "10 images to encode" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    assert after["shard-00000.moments.npy"] == stamps["shard-00000.moments.npy"]
    assert after["shard-00001.labels.npy"] != stamps["shard-00001.labels.npy"]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_export_digits_writes_a_class_folder_tree(tmp_path):
    from lsep_tune.data.digits import load_digits_split

    assert preprocess.main(["--export-digits", str(tmp_path / "digits")]) == 0
    class_map, items = scan_class_folders(tmp_path / "digits")
    _, labels = load_digits_split("train")
    assert class_map == {str(i): i for i in range(10)}
    assert len(items) == len(labels) and sorted(label for _, label in items) == sorted(labels.tolist())
