"""REPA: an MLP projector aligned to a frozen timm encoder's tokens stored by preprocess --encoder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lsep_tune.objectives.configs import REPAConfig
from lsep_tune.objectives.repa import REPA, match_grid
from tests.test_preprocess import make_image_tree, make_tiny_vae

ENCODER = "vit_tiny_patch16_224"  # 14 x 14 tokens of 192 channels at 224px; random weights here


def make_tiny_encoder(path: Path) -> Path:
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(ENCODER, pretrained=False).state_dict(), path)  # with its head, as published
    return path


def test_match_grid_resizes_a_square_token_grid():
    target = torch.arange(2 * 196 * 3, dtype=torch.float32).view(2, 196, 3)
    assert match_grid(target, 196) is target
    out = match_grid(target, 256)
    assert out.shape == (2, 256, 3)
    # The corner token stays near the corner token: rows are resized as a 14 x 14 -> 16 x 16 image.
    assert abs(out[0, 0, 0] - target[0, 0, 0]) < abs(out[0, 0, 0] - target[0, 195, 0])


def test_projector_learns_to_align_with_fixed_targets():
    from types import SimpleNamespace

    torch.manual_seed(0)
    reg = REPA(REPAConfig(enabled=True, encoder_depth=1, projector_dim=32, encoder_dim=8), 16, 10, 4)
    tokens, target = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    batch = SimpleNamespace(extras={"repa_target": target})
    opt = torch.optim.Adam(reg.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = reg(None, batch, {1: tokens}, None, None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["repa_loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="encoder features"):
        reg(None, SimpleNamespace(extras={}), {1: tokens}, None, None)


@pytest.mark.slow
def test_lsep_plus_repa_trains_on_preprocessed_features_and_the_repa_loss_falls(ray_local, tmp_path, capsys):
    from lsep_tune import preprocess
    from lsep_tune.config import load_config
    from lsep_tune.data import check_available
    from lsep_tune.errors import InputError
    from lsep_tune.train.__main__ import main

    images = make_image_tree(tmp_path / "imgs", per_class=6)
    vae = make_tiny_vae(tmp_path / "vae")
    weights = make_tiny_encoder(tmp_path / "vit.pt")
    out = tmp_path / "latents"
    assert preprocess.main(["--images", str(images), "--out", str(out), "--vae", str(vae), "--batch", "6",
                            "--workers", "1", "--encoder", ENCODER, "--encoder-weights", str(weights)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == ENCODER and manifest["encoder"]["input_size"] == 224
    assert manifest["feature_shape"] == [196, 192]
    feats = np.load(out / "shard-00000.features.npy", mmap_mode="r")
    assert feats.shape == (18, 2, 196, 192) and not np.allclose(feats[:, 0], feats[:, 1])

    sets = [f"data.path={out}", "data.kind=latents", "data.batch_size=8", "model.name=SiT-Tiny/2",
            "model.input_size=32", "model.in_channels=4", "model.num_classes=3",
            "objective.lsep.encoder_depth=2", "objective.lsep.crop_start=null",
            "objective.sra.block_out_s=1", "objective.sra.block_out_t=2",
            "objective.repa.enabled=true", "objective.repa.encoder_depth=2", f"objective.repa.encoder={ENCODER}",
            "objective.repa.encoder_dim=192", "objective.repa.projector_dim=64",
            "run.eval_every=0", "run.log_every=5", "run.ckpt_every=40", "sampling.steps=2",
            "sampling.grid_images=4"]
    wrong = load_config(preset="digits", overrides=sets + ["objective.repa.encoder=vit_small_patch14_dinov2"])
    with pytest.raises(InputError, match="objective.repa.encoder"):
        check_available(wrong.data, cfg=wrong)

    run = tmp_path / "run"
    argv = ["--preset", "digits", "--max-steps", "40", "--output", str(run)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    repa = [r["repa_loss"] for r in records]
    assert len(repa) == 8 and "probe_acc" in records[-1]  # LSEP and REPA together
    assert repa[-1] < 0.8 * repa[0], repa


def test_encoder_weights_come_from_the_local_file(tmp_path):
    from lsep_tune import preprocess
    from lsep_tune.errors import InputError

    path = make_tiny_encoder(tmp_path / "vit.pt")
    saved = torch.load(path, weights_only=True)
    model = preprocess.load_encoder(ENCODER, str(path), 224)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], msg=name)
    with pytest.raises(InputError) as refused:
        preprocess.load_encoder("no_such_model", str(path), 224)
    assert refused.value.line(preprocess.FLAGS).startswith("--encoder: no_such_model")  # as the command prints it
