"""The latent-shard dataset: per-step flip and posterior sample, worker-count independence, pre-flight."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lsep_tune import preprocess
from lsep_tune.config import load_config
from lsep_tune.data import check_available
from lsep_tune.data.latents import LatentShards
from lsep_tune.data.loader import StepBatches
from lsep_tune.errors import InputError

CLASSES = {"a": 0, "b": 1, "c": 2}


def make_latent_folder(out: Path, n: int = 40, shard_size: int = 16, shape=(4, 8, 8), std: float = 0.5,
                       features: tuple[int, int] | None = None) -> Path:
    """A preprocess-format folder of synthetic posteriors, written by preprocess's own writers.

    Image i has mean +i+1 everywhere, its mirror -(i+1), so a sample shows which row and view it came from.
    """
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, start in enumerate(range(0, n, shard_size)):
        rows = []
        for i in range(start, min(start + shard_size, n)):
            mean = np.full((2, *shape), i + 1.0, dtype=np.float16)
            mean[1] *= -1
            moments = np.stack([mean, np.full((2, *shape), std, dtype=np.float16)], axis=1)  # (2, 2, C, h, w)
            row = {"label": i % 3, "moments": moments}
            if features:
                row["features"] = np.full((2, *features), i + 1.0, dtype=np.float16)
                row["features"][1] *= -1  # the mirror's features, told apart like its latents
            rows.append(row)
        records.append(preprocess.write_shard(out, index, "synthetic", rows, []))
    encoder = {"name": "vit_tiny_patch16_224", "input_size": 224} if features else None
    preprocess.write_manifest(out, records, resolution=256, vae="synthetic", images="synthetic",
                              classes=CLASSES, encoder=encoder)
    return out


@pytest.fixture
def latents(tmp_path):
    return make_latent_folder(tmp_path / "latents")


def latent_cfg(path, **overrides):
    sets = [f"data.path={path}", "data.kind=latents", "model.name=SiT-Tiny/2", "model.input_size=8",
            "model.in_channels=4", "model.num_classes=3", "objective.lsep.encoder_depth=2",
            "objective.lsep.crop_start=null", "objective.sra.block_out_s=1", "objective.sra.block_out_t=2",
            "objective.repa.encoder_depth=2", "run.eval_every=0"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(preset="digits", overrides=sets)


def test_sample_is_posterior_draw_of_image_or_flip_times_scale(latents):
    ds = LatentShards(latents, scale=0.18215)
    assert len(ds) == 40 and ds.latent_shape == (4, 8, 8)
    batches = StepBatches(ds, seed=0, local_batch=40, world_size=1, rank=0, accum=1)
    x, y, extras = batches.batch(0, 0)
    idx = batches.indices(0, 0)
    assert extras == {} and x.shape == (40, 4, 8, 8)
    assert y.tolist() == (idx % 3).tolist()
    sample_mean = (x / 0.18215).mean(dim=(1, 2, 3))
    sign = torch.sign(sample_mean)
    assert torch.allclose(sample_mean.abs(), torch.as_tensor(idx + 1.0).float(), atol=0.2)  # its own row
    assert 5 < int((sign < 0).sum()) < 35  # both views occur, about half each
    resid = x / 0.18215 - sign.view(-1, 1, 1, 1) * torch.as_tensor(idx + 1.0).float().view(-1, 1, 1, 1)
    assert abs(resid.std().item() - 0.5) < 0.05  # std * N(0, 1): a fresh posterior sample
    x2, _, _ = batches.batch(1, 0)  # another step: other flips and other noise
    assert not torch.equal(x2, x)
    batches.close()


@pytest.mark.parametrize("world, accum", [(2, 1), (4, 1), (1, 2), (2, 2)])
def test_flip_and_noise_depend_only_on_seed_step_and_sample(latents, world, accum):
    ds = LatentShards(latents)
    whole = StepBatches(ds, seed=3, local_batch=8, world_size=1, rank=0, accum=1)
    local = 8 // (world * accum)
    for step in (0, 4, 9):  # 9 crosses into the third epoch of 40 samples
        x_ref, y_ref, _ = whole.batch(step, 0)
        parts = [StepBatches(ds, 3, local, world, rank, accum).batch(step, micro)
                 for micro in range(accum) for rank in range(world)]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x_ref, rtol=0, atol=0)
        assert torch.cat([p[1] for p in parts]).tolist() == y_ref.tolist()
    whole.close()


def test_read_ahead_returns_the_batches_a_direct_read_gives(latents):
    ds = LatentShards(latents)
    ahead = StepBatches(ds, seed=1, local_batch=6, world_size=1, rank=0, accum=2)
    direct = StepBatches(ds, seed=1, local_batch=6, world_size=1, rank=0, accum=2)
    assert ahead._pool is not None
    for step, micro in [(0, 0), (0, 1), (1, 0), (1, 1), (5, 0)]:  # in order, then a jump (a resume)
        torch.testing.assert_close(ahead.batch(step, micro)[0], direct.read(step, micro)[0], rtol=0, atol=0)
    ahead.close()


def test_features_travel_with_the_drawn_view(tmp_path):
    folder = make_latent_folder(tmp_path / "f", features=(4, 6))
    ds = LatentShards(folder, features=True)
    b = StepBatches(ds, seed=0, local_batch=16, world_size=1, rank=0, accum=1)
    x, _, extras = b.batch(2, 0)
    target = extras["repa_target"]
    assert target.shape == (16, 4, 6)
    # The features are those of the same row and of the same view (image or mirror) as the latent.
    view_sign = torch.sign(x.mean(dim=(1, 2, 3)))
    idx = torch.as_tensor(b.indices(2, 0) + 1.0).float()
    torch.testing.assert_close(target.float().mean(dim=(1, 2)), view_sign * idx)
    assert (view_sign < 0).any() and (view_sign > 0).any()
    b.close()


def test_check_available_refuses_missing_incomplete_and_mismatched(tmp_path, latents):
    with pytest.raises(InputError, match="data.path: no such folder"):
        check_available(latent_cfg(tmp_path / "nowhere").data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest.json"):
        check_available(latent_cfg(tmp_path / "empty").data)
    cfg = latent_cfg(latents)
    check_available(cfg.data, cfg=cfg)
    with pytest.raises(InputError, match="model.in_channels/input_size: the latents are 4 x 8 x 8"):
        bad = latent_cfg(latents, **{"model.input_size": 16})
        check_available(bad.data, cfg=bad)
    with pytest.raises(InputError, match="model.num_classes"):
        bad = latent_cfg(latents, **{"model.num_classes": 2})
        check_available(bad.data, cfg=bad)
    with pytest.raises(InputError, match="rerun preprocess with --encoder"):
        bad = latent_cfg(latents, **{"objective.repa.enabled": True})
        check_available(bad.data, cfg=bad)
    (latents / "shard-00001.moments.npy").write_bytes(b"truncated")
    with pytest.raises(InputError, match="shard-00001.moments.npy: shards: 9 bytes"):
        check_available(cfg.data)
    (latents / "shard-00001.moments.npy").unlink()
    with pytest.raises(InputError, match="missing; rerun preprocess"):
        check_available(cfg.data)


def test_train_refuses_a_missing_data_folder_before_anything_is_created(tmp_path, capsys):
    import ray

    from lsep_tune.train.__main__ import main

    out = tmp_path / "run"
    rc = main(["--preset", "imagenet256-sit-b2", "--set", f"data.path={tmp_path / 'missing'}", "--output", str(out),
               "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith(f"error: {tmp_path / 'missing'}: data.path: no such folder")
    assert not out.exists() and not ray.is_initialized()


def test_digits_batches_are_unchanged_by_the_data_draws(digits_cfg):
    from lsep_tune.data.loader import load_dataset

    ds = load_dataset(digits_cfg.data)
    b = StepBatches(ds, 0, 16, 1, 0, 1)
    x, y, extras = b.batch(3, 0)
    idx = b.indices(3, 0)
    assert extras == {} and b._pool is None
    torch.testing.assert_close(x, torch.as_tensor(ds.images[idx]))
    assert y.tolist() == ds.labels[idx].tolist()


@pytest.mark.slow
def test_latent_dataset_feeds_two_worker_training(ray_local, tmp_path):
    from lsep_tune.train.__main__ import main

    folder = make_latent_folder(tmp_path / "latents", n=48)
    cfg = latent_cfg(folder)
    config_file = tmp_path / "cfg.yaml"
    from lsep_tune.config import dump_config

    dump_config(cfg, config_file)
    out = tmp_path / "run"
    rc = main(["--config", str(config_file), "--workers", "2", "--set", "data.batch_size=4", "--max-steps", "6",
               "--set", "run.log_every=2", "--set", "run.ckpt_every=6", "--set", "sampling.steps=2",
               "--set", "sampling.grid_images=4", "--set", "run.precision=fp32", "--output", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["final_step"] == 6
    assert len(set(summary["replica_digests"])) == 1
    assert np.isfinite(summary["final_loss"])


def test_image_folder_dataset_crops_flips_per_step_and_trains(tmp_path):
    from PIL import Image

    from lsep_tune.train.__main__ import main

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            img = np.zeros((12, 20, 3), dtype=np.uint8)
            img[:, :10] = 255  # left half white: a flip shows
            img[..., 2] = rng.integers(0, 255)
            Image.fromarray(img).save(tmp_path / "imgs" / c / f"{i}.png")
    cfg = load_config(preset="digits", overrides=[f"data.path={tmp_path / 'imgs'}", "data.kind=images",
                                                  "model.in_channels=3", "model.num_classes=2",
                                                  "model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2",
                                                  "objective.lsep.crop_start=null", "run.eval_every=0"])
    check_available(cfg.data, cfg=cfg)
    from lsep_tune.data.loader import load_dataset

    ds = load_dataset(cfg.data, image_size=8)
    whole = StepBatches(ds, 0, 8, 1, 0, 1)
    x, y, _ = whole.batch(0, 0)
    assert x.shape == (8, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    left_white = x[:, 0, :, 0] > 0.9
    assert left_white.any() and (~left_white).any()  # some flipped, some not
    halves = [StepBatches(ds, 0, 4, 2, r, 1).batch(0, 0)[0] for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), x, rtol=0, atol=0)
    whole.close()
    with pytest.raises(InputError, match="data.path: no such folder"):
        check_available(load_config(preset="digits", overrides=[f"data.path={tmp_path}/no", "data.kind=images",
                                                                "model.in_channels=3"]).data)
    for field, value, says in (("in_channels", 1, "read as RGB"), ("num_classes", 1, "fewer than the 2 class")):
        wrong = cfg.model_copy(update={"model": cfg.model.model_copy(update={field: value})})
        with pytest.raises(InputError, match=f"imgs: model.{field}: {value}.*{says}"):
            check_available(wrong.data, cfg=wrong)
    from lsep_tune.config import dump_config

    dump_config(cfg, tmp_path / "cfg.yaml")
    assert main(["--config", str(tmp_path / "cfg.yaml"), "--max-steps", "3", "--set", "data.batch_size=4",
                 "--set", "sampling.steps=2", "--set", "sampling.grid_images=4", "--output", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == 3


def test_a_dataset_is_one_source_class_plus_one_registry_line(tmp_path, monkeypatch):
    """A kind registered in DATASETS is accepted by the config, checked at load time and before the run,
    and is what training reads: nothing else names it."""
    from lsep_tune.data import DATASETS
    from lsep_tune.data.base import ArrayDataset, DataSource
    from lsep_tune.schema import FieldError
    from lsep_tune.train.__main__ import main

    read = []

    class Stripes(DataSource):
        path_hint = "a folder holding stripes.npy"

        @classmethod
        def check_config(cls, cfg):
            if cfg.model.in_channels != 2:
                raise FieldError("model.in_channels", "stripes have 2 channels")

        @classmethod
        def check_available(cls, data_cfg, cfg=None):
            if not (Path(data_cfg.path) / "stripes.npy").is_file():
                raise InputError(data_cfg.path, "data.path", "no stripes.npy")

        @classmethod
        def load(cls, data_cfg, split, features, image_size):
            images = np.load(Path(data_cfg.path) / "stripes.npy")
            read.append(split)
            return ArrayDataset(images, np.arange(len(images)) % 3)

    monkeypatch.setitem(DATASETS, "stripes", Stripes)
    sets = ["data.kind=stripes", "model.name=SiT-Tiny/2", "model.num_classes=3", "objective.lsep.encoder_depth=2",
            "objective.lsep.crop_start=null", "run.eval_every=0"]
    with pytest.raises(InputError, match="data.kind 'stripes' needs data.path"):
        load_config(preset="digits", overrides=sets + ["model.in_channels=2"])
    with pytest.raises(InputError, match="model.in_channels: stripes have 2 channels"):
        load_config(preset="digits", overrides=sets + [f"data.path={tmp_path}", "model.in_channels=1"])
    with pytest.raises(InputError, match="unknown data kind 'stipes', expected one of digits, images, latents, "
                                         "stripes"):
        load_config(preset="digits", overrides=[*sets, "data.kind=stipes"])
    out = tmp_path / "run"
    args = ["--preset", "digits", "--max-steps", "3", "--output", str(out), "--set", "data.batch_size=4",
            "--set", "sampling.steps=2", "--set", "sampling.grid_images=4", "--set", f"data.path={tmp_path}",
            "--set", "model.in_channels=2"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 2 and not out.exists()  # refused before anything is created
    rng = np.random.default_rng(0)
    np.save(tmp_path / "stripes.npy", rng.standard_normal((12, 2, 8, 8)).astype(np.float32))
    assert main(args) == 0 and read == ["train"]
    assert json.loads((out / "summary.json").read_text())["final_step"] == 3
