"""checkpoint.py on its own: atomic state files, the newest complete step, pruning, and the loader's
one-line refusals of what is not a checkpoint."""
import pytest
import torch

from lsep_tune import checkpoint as ckpt
from lsep_tune.config import load_config
from lsep_tune.errors import InputError
from lsep_tune.models.sit import sit_from_config


def test_state_round_trips_and_only_complete_steps_count(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ckpt.save_state(ckpt.step_folder(root, step), {"step": step, "w": torch.full((3,), float(step))})
    ckpt.step_folder(root, 8).mkdir()  # a step whose state.pt was never written is not a checkpoint
    # nor one that Ray Train was still copying into storage, in place, when its node died (CI saw a
    # restarted worker group fail on it: "failed finding central directory")
    whole = (root / "step_00000006" / ckpt.STATE_FILE).read_bytes()
    ckpt.step_folder(root, 10).mkdir()
    (ckpt.step_folder(root, 10) / ckpt.STATE_FILE).write_bytes(whole[: len(whole) * 2 // 3])
    assert ckpt.latest(root) == root / "step_00000006"
    assert torch.equal(ckpt.load_state(ckpt.latest(root))["w"], torch.full((3,), 6.0))
    ckpt.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006", "step_00000008",
                                                      "step_00000010"]
    assert ckpt.latest(tmp_path / "none") is None
    assert not list(root.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_ema_file_loads_back_with_its_config_and_step(tmp_path):
    cfg = load_config(preset="digits", overrides=["model.name=SiT-Tiny/2"])
    sit = sit_from_config(cfg.model)
    path = ckpt.save_ema(tmp_path / "run" / ckpt.EMA_FILE, 7, sit.state_dict(), cfg.to_dict())
    for given in (path, tmp_path / "run"):  # the file, or the run folder holding it
        loaded = ckpt.load_checkpoint(given)
        assert loaded.step == 7 and loaded.config == cfg and loaded.path == str(path)
        assert all(torch.equal(loaded.state[k], v) for k, v in sit.state_dict().items())


def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    cfg = load_config(preset="digits", overrides=["model.name=SiT-Tiny/2"])
    (tmp_path / "notes.pt").write_text("not a zip")
    (tmp_path / "empty").mkdir()
    other = load_config(preset="digits", overrides=["model.name=SiT-S/2"])
    ckpt.save_ema(tmp_path / "wrong.pt", 1, sit_from_config(other.model).state_dict(), cfg.to_dict())
    cases = {tmp_path / "missing.pt": "path: not found",
             tmp_path / "empty": f"expected a checkpoint folder holding {ckpt.STATE_FILE}",
             tmp_path / "notes.pt": "file: not a torch checkpoint",
             tmp_path / "wrong.pt": "ema: weights do not fit SiT-Tiny/2 from the stored config"}
    for path, message in cases.items():
        with pytest.raises(InputError) as err:
            ckpt.load_checkpoint(path)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)

