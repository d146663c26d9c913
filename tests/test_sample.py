import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from lsep_tune.config import load_config
from lsep_tune.checkpoint import load_checkpoint
from lsep_tune.errors import InputError
from lsep_tune.models.sit import create_model
from lsep_tune.sample.batch import generate_samples
from lsep_tune.sample.__main__ import main
from lsep_tune.train.context import LocalContext
from lsep_tune.train.loop import train_loop

TINY_DIGITS = ["model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2", "sampling.steps=3", "sampling.mode=sde"]


def _random_sit(cfg, seed: int):
    """A SiT whose every weight is random: a zero-initialised output layer would make the velocity
    zero and every sample pure noise, hiding whether the weights were loaded at all."""
    m = cfg.model
    sit = create_model(m.name, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return sit


def _save_ema_final(path, cfg, sit, step: int = 7):
    torch.save({"step": step, "ema": sit.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    cfg = load_config(preset="digits", overrides=TINY_DIGITS)
    return _save_ema_final(tmp_path_factory.mktemp("digits") / "ema_final.pt", cfg, _random_sit(cfg, 0))


def _samples_in_folder(folder):
    return sorted(p.name for p in folder.iterdir() if ".npz" in p.name)


def _bad(capsys, argv, out_dir, expect: str):
    """Bad input: exit 2, one `error:` line on stderr naming the problem, no file left behind."""
    capsys.readouterr()  # drop what earlier calls printed
    before = _samples_in_folder(out_dir)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]
    assert _samples_in_folder(out_dir) == before
    return lines[0]


def test_cli_writes_adm_npz_with_class_balanced_labels(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["--checkpoint", str(digits_ckpt), "--num", "23", "--batch", "5", "--out", str(out)]) == 0
    assert "sample" in capsys.readouterr().err  # the tqdm bar over chunks
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (23, 8, 8, 1)
    assert np.array_equal(labels, np.arange(23) % 10)
    assert np.bincount(labels, minlength=10).max() - np.bincount(labels, minlength=10).min() <= 1
    assert images.std() > 5  # real images, not a constant
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left
    from lsep_tune.evaluation import load_samples_npz

    assert np.array_equal(load_samples_npz(str(out)), images)


def test_chunks_make_samples_a_function_of_seed_and_index(digits_ckpt):
    full, _ = generate_samples(digits_ckpt, 12, batch=4, seed=3)
    prefix, _ = generate_samples(digits_ckpt, 8, batch=4, seed=3)
    other, _ = generate_samples(digits_ckpt, 8, batch=4, seed=4)
    assert np.array_equal(full[:8], prefix)  # chunk c's noise does not depend on how many follow
    assert not np.array_equal(prefix, other)
    assert not np.array_equal(full[:4], full[4:8])  # chunks draw different noise
    ode, _ = generate_samples(digits_ckpt, 8, batch=4, seed=3, sampler="ode")
    guided, _ = generate_samples(digits_ckpt, 8, batch=4, seed=3, cfg_scale=3.0, guidance_interval=(0.0, 1.0))
    assert not np.array_equal(ode, prefix) and not np.array_equal(guided, prefix)


def test_ema_weights_from_state_pt_folder_and_ema_final_agree(tmp_path):
    cfg = load_config(preset="digits", overrides=TINY_DIGITS + [
        "run.max_steps=2", "run.ckpt_every=2", "run.log_every=1", "run.precision=fp32", "data.batch_size=16",
        "sampling.grid_images=10", "optim.lr=0.05", "ema.decay=0.5"])
    train_loop(cfg, LocalContext(tmp_path / "run", keep_checkpoints=1, device="cpu"))
    folder = tmp_path / "run" / "checkpoints" / "step_00000002"
    from_final, labels = generate_samples(tmp_path / "run" / "ema_final.pt", 10, batch=5)
    from_folder, _ = generate_samples(folder, 10, batch=5)
    from_state, _ = generate_samples(folder / "state.pt", 10, batch=5)
    assert np.array_equal(from_final, from_folder) and np.array_equal(from_final, from_state)
    assert load_checkpoint(folder).step == 2
    # The trained (non-EMA) weights sample differently: the EMA is what was loaded.
    state = torch.load(folder / "state.pt", weights_only=True)
    raw = {k[len("sit."):]: v for k, v in state["model"].items() if k.startswith("sit.")}
    assert any(not torch.equal(raw[k], load_checkpoint(folder).state[k]) for k in raw)
    sit = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10)
    sit.load_state_dict(raw)
    from_raw, _ = generate_samples(_save_ema_final(tmp_path / "raw.pt", cfg, sit), 10, batch=5)
    assert not np.array_equal(from_raw, from_final)


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_one_and_two_ray_workers_write_identical_files(digits_ckpt, tmp_path, ray_cluster, capsys):
    args = ["--checkpoint", str(digits_ckpt), "--num", "23", "--batch", "5", "--seed", "11",
            "--sampler", "sde", "--cfg-scale", "2.0", "--guidance-interval", "0.2", "0.7"]
    for workers in (1, 2):
        assert main(args + ["--workers", str(workers), "--out", str(tmp_path / f"w{workers}.npz")]) == 0
    assert main(args + ["--out", str(tmp_path / "local.npz")]) == 0  # in this process
    one, two = (tmp_path / "w1.npz").read_bytes(), (tmp_path / "w2.npz").read_bytes()
    assert one == two
    assert np.array_equal(np.load(tmp_path / "local.npz")["arr_0"], np.load(tmp_path / "w2.npz")["arr_0"])
    images = np.load(tmp_path / "w2.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (23, 8, 8, 1)
    # The cluster has 2 CPUs: a third worker cannot be placed, and that is bad input, not a hang.
    line = _bad(capsys, args + ["--workers", "3", "--out", str(tmp_path / "w3.npz")], tmp_path, "--workers: 3")
    assert "at most 2" in line


def _tiny_vae(folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16,
    )
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("latent")
    cfg = load_config(preset="imagenet256-sit-b2", overrides=[
        "model.name=SiT-Tiny/2", "model.input_size=8", "model.num_classes=4", "objective.lsep.encoder_depth=2",
        "objective.lsep.crop_start=3", "objective.sra.block_out_s=1", "objective.sra.block_out_t=2",
        "sampling.steps=2", "sampling.mode=ode-euler"])
    ckpt = _save_ema_final(root / "ema_final.pt", cfg, _random_sit(cfg, 1))
    vae = _tiny_vae(root / "vae")
    return ckpt, root / "vae", vae, cfg


def test_latent_model_decodes_through_a_local_vae(latent_setup, tmp_path):
    ckpt, vae_dir, _, _ = latent_setup
    out = tmp_path / "latent.npz"
    assert main(["--checkpoint", str(ckpt), "--num", "6", "--batch", "4", "--vae", str(vae_dir), "--out", str(out)]) == 0
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    # SiT samples 4x8x8 latents; the VAE (one upsampling stage) turns them into 16x16 RGB images.
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    assert np.array_equal(labels, np.arange(6) % 4)
    assert images.std() > 0


def test_vae_decode_divides_by_the_latent_scale(latent_setup):
    from lsep_tune import vae as vae_lib

    _, vae_dir, reference, _ = latent_setup
    loaded = vae_lib.load_vae(vae_dir)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.decode(z / 0.18215).sample.clamp(-1, 1)
    got = vae_lib.decode(loaded, z, 0.18215)
    assert got.shape == (2, 3, 16, 16) and got.min() >= -1 and got.max() <= 1
    assert torch.allclose(got, expected, atol=1e-5)
    rebuilt = vae_lib.from_payload(vae_lib.to_payload(loaded))  # what a Ray worker receives
    assert torch.equal(vae_lib.decode(rebuilt, z, 0.18215), got)


def test_bad_input_is_one_line_and_exit_2(digits_ckpt, latent_setup, tmp_path, capsys):
    ckpt, vae_dir, _, _ = latent_setup
    out = str(tmp_path / "o.npz")
    base = ["--num", "4", "--out", out]
    _bad(capsys, ["--checkpoint", str(tmp_path / "nope.pt")] + base, tmp_path, "nope.pt: path: not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    _bad(capsys, ["--checkpoint", str(corrupt)] + base, tmp_path, "corrupt.pt: file:")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    _bad(capsys, ["--checkpoint", str(empty)] + base, tmp_path, "empty_folder: state.pt:")
    wrong = tmp_path / "wrong.pt"
    torch.save({"step": 1, "ema": {"x": torch.zeros(1)}, "config": load_config(preset="digits").to_dict()}, wrong)
    _bad(capsys, ["--checkpoint", str(wrong)] + base, tmp_path, "wrong.pt: ema: weights do not fit")
    _bad(capsys, ["--checkpoint", str(digits_ckpt), "--num", "0", "--out", out], tmp_path, "--num: 0: expected an integer >= 1")
    _bad(capsys, ["--checkpoint", str(digits_ckpt), "--guidance-interval", "0.8", "0.2"] + base, tmp_path,
         "--guidance-interval: 0.8 0.2: expected 0 <= LO <= HI <= 1")
    _bad(capsys, ["--checkpoint", str(digits_ckpt), "--vae", str(vae_dir)] + base, tmp_path, "--vae:")
    _bad(capsys, ["--checkpoint", str(digits_ckpt), "--num", "4", "--out", str(tmp_path / "o.npy")], tmp_path,
         "--out:")
    _bad(capsys, ["--checkpoint", str(ckpt)] + base, tmp_path, "--vae: (not given): the checkpoint is a latent model")
    _bad(capsys, ["--checkpoint", str(ckpt), "--vae", str(empty)] + base, tmp_path, "empty_folder: config.json:")
    _bad(capsys, ["--checkpoint", str(digits_ckpt), "--sampler", "ddim"] + base, tmp_path, "--sampler")
    with pytest.raises(InputError, match="workers"):
        generate_samples(digits_ckpt, 4, workers=-1)


def test_cli_subprocess_reports_a_missing_checkpoint(tmp_path):
    out = tmp_path / "o.npz"
    proc = subprocess.run([sys.executable, "-m", "lsep_tune.sample", "--checkpoint", str(tmp_path / "missing"),
                           "--num", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: path: not found; expected "
                                                "ema_final.pt, a state.pt or a checkpoint folder"]
    assert not out.exists() and proc.stdout == ""


def test_cli_subprocess_bad_checkpoints_are_one_short_line(tmp_path):
    """Corrupt and foreign files: one short line on stderr (no torch advice, no warnings before it)."""
    import argparse

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"ema": {}, "config": {}, "args": argparse.Namespace(lr=1)}, foreign)
    expected = {junk: "file: not a torch checkpoint (torch.save writes a zip archive; this is none)",
                foreign: "file: not a readable torch checkpoint (Unsupported global: GLOBAL argparse.Namespace"}
    for path, expect in expected.items():
        proc = subprocess.run([sys.executable, "-m", "lsep_tune.sample", "--checkpoint", str(path), "--num", "4",
                               "--out", str(tmp_path / "o.npz")], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: {path}: {expect}") and len(lines[0]) < 200 + len(str(path)), lines[0]
