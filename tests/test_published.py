"""Published checkpoint layouts, written here from the project's own model with each layout's
names and conventions, load and give the velocity their convention implies."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from lsep_tune import published
from lsep_tune.models.sit import create_model
from lsep_tune.checkpoint import load_checkpoint

MODEL = {"name": "SiT-Tiny/2", "input_size": 8, "in_channels": 3, "num_classes": 5}


def random_sit(seed=0):
    """A SiT whose every weight is random: adaLN-Zero's zeros would hide most of the network."""
    torch.manual_seed(seed)
    sit = create_model(MODEL["name"], input_size=8, in_channels=3, num_classes=5)
    with torch.no_grad():
        for p in sit.parameters():
            p.normal_(0, 0.2)
    return sit.eval()


def published_state(sit, fmt, learn_sigma=True):
    """The backbone as the published code saves it: pos_embed as a parameter, the paper's own head."""
    state = {k: v.float().clone() for k, v in sit.state_dict().items()}
    state["pos_embed"] = sit.pos_embed.float().clone()
    d = sit.hidden_size
    if fmt == "lsep":
        probe = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, sit.num_classes))
        state.update({f"classifier.{k}": v for k, v in probe.state_dict().items()})
    elif fmt == "sra":
        state.update({"ap_head.linear1.weight": torch.randn(2 * d, d), "ap_head.linear1.bias": torch.randn(2 * d),
                      "ap_head.linear2.weight": torch.randn(d, 2 * d), "ap_head.linear2.bias": torch.randn(d)})
    elif fmt == "repa":
        state.update({"projectors.0.0.weight": torch.randn(16, d), "projectors.0.0.bias": torch.randn(16)})
    elif fmt == "sit" and learn_sigma:
        # Twice as wide: per token (p, q, 2C) with the channel fastest; the second C are sigma.
        p, c = sit.patch_size, sit.in_channels
        w, b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
        w = torch.cat([w.view(p, p, c, d), torch.randn(p, p, c, d)], dim=2).reshape(p * p * 2 * c, d)
        b = torch.cat([b.view(p, p, c), torch.randn(p, p, c)], dim=2).reshape(p * p * 2 * c)
        state["final_layer.linear.weight"], state["final_layer.linear.bias"] = w, b
    return state


def training_file(state, fmt):
    """What the published training scripts save (SiT's released file is the bare EMA state)."""
    if fmt == "sit":
        return state
    args = argparse.Namespace(model=MODEL["name"], resolution=64, num_classes=5, qk_norm=False)
    return {"model": {k: v + 1 for k, v in state.items()}, "ema": state, "opt": {}, "args": args,
            "epoch": 3, "steps": 1234}


def converted_model(conv):
    sit = create_model(conv.model["name"], input_size=conv.model["input_size"], in_channels=3,
                       num_classes=conv.model["num_classes"]).eval()
    sit.load_state_dict(conv.sit)
    return sit


def inputs(n=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, 8, 8, generator=g, ), torch.rand(n, generator=g),
            torch.tensor([0, 1, 2, 3, 4, 5]))


@pytest.mark.parametrize("fmt", ["lsep", "sra", "repa"])
def test_repa_family_layouts_keep_the_velocity(tmp_path, fmt):
    sit = random_sit()
    path = tmp_path / "ckpt.pt"
    torch.save(training_file(published_state(sit, fmt), fmt), path)
    conv = published.load(path, fmt, {"in_channels": 3})  # the rest comes from the saved args
    assert conv.model["name"] == MODEL["name"] and conv.model["input_size"] == 8 and conv.step == 1234
    x, t, y = inputs()
    torch.testing.assert_close(converted_model(conv).velocity(x, t, y), sit.velocity(x, t, y), atol=1e-5, rtol=1e-4)


def test_lsep_probe_and_sra_head_map_onto_the_regularizer_heads():
    from lsep_tune.objectives.configs import LSEPConfig, SRAConfig
    from lsep_tune.objectives.lsep import LSEP
    from lsep_tune.objectives.sra import SRA

    state = published_state(random_sit(), "lsep")
    probe = LSEP(LSEPConfig(enabled=True), 64, 5, 4)
    probe.load_state_dict({k.removeprefix("regularizers.lsep."): v
                           for k, v in published.heads(state, "lsep").items()})
    torch.testing.assert_close(probe.probe[1].weight, state["classifier.1.weight"])
    state = published_state(random_sit(), "sra")
    head = SRA(SRAConfig(enabled=True), 64, 5, 4)
    head.load_state_dict({k.removeprefix("regularizers.sra."): v for k, v in published.heads(state, "sra").items()})
    z = torch.randn(2, 3, 64)
    expected = nn.functional.linear(nn.functional.silu(nn.functional.linear(
        z, state["ap_head.linear1.weight"], state["ap_head.linear1.bias"])),
        state["ap_head.linear2.weight"], state["ap_head.linear2.bias"])
    torch.testing.assert_close(head.head(z), expected)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sit_layout_flips_time_and_velocity(tmp_path, learn_sigma):
    # Read the random network with SiT's meaning: v_sit(x, s) with s = 0 noise, v = data - noise.
    sit = random_sit()
    path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(published_state(sit, "sit", learn_sigma), path)
    conv = published.load(path, "sit", {"name": MODEL["name"], "input_size": 8, "in_channels": 3, "num_classes": 5})
    x, t, y = inputs()
    # lsep_tune's t = 1 - s and its velocity is d x / d t = -v_sit.
    expected = -sit.velocity(x, 1 - t, y)
    torch.testing.assert_close(converted_model(conv).velocity(x, t, y), expected, atol=1e-4, rtol=1e-4)


def test_weights_at_the_top_level_or_under_model(tmp_path):
    sit = random_sit()
    state = published_state(sit, "repa")
    x, t, y = inputs()
    for blob in (state, {"model": state, "args": None}):
        torch.save(blob, tmp_path / "c.pt")
        conv = published.load(tmp_path / "c.pt", "repa", MODEL)
        torch.testing.assert_close(converted_model(conv).velocity(x, t, y), sit.velocity(x, t, y), atol=1e-5,
                                   rtol=1e-4)


def test_a_layout_that_does_not_fit_fails_in_one_line_naming_the_keys(tmp_path):
    state = published_state(random_sit(), "lsep")
    state["blocks.0.attn.to_qkv.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(published.PublishedError) as err:
        published.load(tmp_path / "c.pt", "lsep", MODEL)
    line = str(err.value)
    assert "\n" not in line
    assert "unexpected blocks.0.attn.to_qkv.weight" in line and "missing blocks.0.attn.qkv.weight" in line
    # SRA's head is not part of an LSEP layout.
    torch.save(published_state(random_sit(), "sra"), tmp_path / "s.pt")
    with pytest.raises(published.PublishedError, match="unexpected ap_head.linear1.bias"):
        published.load(tmp_path / "s.pt", "lsep", MODEL)
    # The architecture given does not match the file.
    torch.save(published_state(random_sit(), "repa"), tmp_path / "r.pt")
    with pytest.raises(published.PublishedError, match="pos_embed"):
        published.load(tmp_path / "r.pt", "repa", {**MODEL, "input_size": 16})


@pytest.mark.slow
def test_sample_cli_reads_a_published_checkpoint(tmp_path):
    # The digits shape (8x8, 1 channel, 10 classes) samples as pixels: no VAE needed.
    torch.manual_seed(0)
    sit = create_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10)
    state = {**sit.state_dict(), "pos_embed": sit.pos_embed.clone()}
    torch.save({"ema": state}, tmp_path / "sit.pt")
    ckpt = load_checkpoint(tmp_path / "sit.pt", "sit", {"name": "SiT-S/2", "input_size": 8, "in_channels": 1,
                                                       "num_classes": 10})
    assert ckpt.config.sampling.mode == "sde" and ckpt.config.data.kind == "digits"
    out = tmp_path / "s.npz"
    run = subprocess.run([sys.executable, "-m", "lsep_tune.sample", "--checkpoint", str(tmp_path / "sit.pt"),
                          "--checkpoint-format", "sit", "--model", "SiT-S/2", "--input-size", "8",
                          "--in-channels", "1", "--num-classes", "10", "--num", "4", "--steps", "3",
                          "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert np.load(out)["arr_0"].shape == (4, 8, 8, 1)
    bad = subprocess.run([sys.executable, "-m", "lsep_tune.sample", "--checkpoint", str(tmp_path / "sit.pt"),
                          "--checkpoint-format", "lsep", "--num", "4", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    # Without --model the default SiT-XL/2 is assumed, whose weights the file's do not fit: the keys say so.
    assert len(bad.stderr.strip().splitlines()) == 1 and "keys do not fit SiT-XL/2" in bad.stderr
    assert "wrong shape blocks." in bad.stderr


def test_training_starts_from_a_published_checkpoint(tmp_path):
    from lsep_tune.config import load_config
    from lsep_tune.checkpoint import load_state
    from lsep_tune.train.context import LocalContext
    from lsep_tune.train.loop import train_loop

    torch.manual_seed(3)
    sit = create_model("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in sit.parameters():
            p.normal_(0, 0.2)
    state = {**sit.state_dict(), "pos_embed": sit.pos_embed.clone(),
             "classifier.0.weight": torch.rand(64) + 0.5, "classifier.0.bias": torch.randn(64),
             "classifier.1.weight": torch.randn(10, 64), "classifier.1.bias": torch.randn(10)}
    args = argparse.Namespace(model="SiT-Tiny/2", resolution=64, num_classes=10)
    torch.save({"model": state, "ema": state, "args": args, "steps": 400000}, tmp_path / "lsep.pt")
    cfg = load_config(preset="digits", overrides=[
        "model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2", "data.batch_size=8", "run.max_steps=1",
        "run.ckpt_every=1", "sampling.steps=2", "sampling.grid_images=10", "optim.lr=1e-12",
        "objective.lsep.probe_lr=1e-12", f"run.init_from={tmp_path / 'lsep.pt'}", "run.init_format=lsep"])
    train_loop(cfg, LocalContext(tmp_path / "run", keep_checkpoints=1, device="cpu"))
    ema = torch.load(tmp_path / "run" / "ema_final.pt", weights_only=True)["ema"]
    for name, value in sit.state_dict().items():
        torch.testing.assert_close(ema[name], value, atol=1e-5, rtol=0)  # the EMA starts from them too
    model = load_state(tmp_path / "run" / "checkpoints" / "step_00000001")["model"]
    torch.testing.assert_close(model["regularizers.lsep.probe.1.weight"], state["classifier.1.weight"])
    torch.testing.assert_close(model["sit.blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_train_cli_refuses_an_init_file_that_does_not_fit_before_starting(tmp_path, capsys):
    from lsep_tune.train.__main__ import main

    state = published_state(random_sit(), "sra")  # SiT-Tiny/2 with 3 channels: not the digits model
    torch.save({"ema": state}, tmp_path / "sra.pt")
    out = tmp_path / "run"
    code = main(["--preset", "digits", "--output", str(out), "--set", f"run.init_from={tmp_path / 'sra.pt'}",
                 "--set", "run.init_format=sra"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: run.init_from: sra: keys do not fit")
    assert not out.exists()
