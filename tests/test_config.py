import subprocess
import sys

import pytest
import yaml

from lsep_tune.config import load_config, preset_names
from lsep_tune.errors import InputError
from lsep_tune.train.__main__ import main


def test_presets_load_with_paper_defaults():
    assert {"digits", "imagenet256-sit-b2", "imagenet256-sit-xl2"} <= set(preset_names())
    xl = load_config(preset="imagenet256-sit-xl2")
    lsep = xl.objective.lsep
    assert (xl.model.name, lsep.encoder_depth, lsep.uncond_prob, lsep.crop_start) == ("SiT-XL/2", 8, 0.9, 12)
    assert (lsep.weights_type, lsep.weight_start, lsep.weight_end, lsep.n_weights) == ("steps", 0.0225, 0.03, 10)
    assert (xl.optim.lr, xl.optim.betas, xl.optim.grad_clip, xl.ema.decay) == (1e-4, (0.9, 0.999), 1.0, 0.9999)
    assert xl.objective.flow.class_dropout_prob == 0.1
    assert xl.data.batch_size * 8 == 256  # per worker: 8 workers give the papers' global batch
    # SRA pairs XL blocks 8 -> 20 (the issue "Numbers comparable with the papers"; was 4 -> 8).
    assert xl.objective.sra.block_out_s == 8 and xl.objective.sra.block_out_t == 20 and xl.objective.sra.t_max == 0.2
    assert load_config(preset="imagenet256-sit-b2").objective.lsep.probe_lr == 3e-2


def test_overrides_parse_as_yaml_values():
    cfg = load_config(preset="digits", overrides=["objective.lsep.uncond_prob=0.5", "optim.betas=[0.9, 0.95]",
                                                  "objective.lsep.crop_start=null", "objective.sra.enabled=true"])
    assert cfg.objective.lsep.uncond_prob == 0.5 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.objective.lsep.crop_start is None and cfg.objective.sra.enabled


BAD = [
    ("objective.lsep.uncond_prob=1.5", "objective.lsep.uncond_prob", "less than or equal to 1"),
    ("objective.lsep.crop_start=5", "objective.lsep.crop_start", "larger than the token grid (4)"),
    ("objective.lsep.encoder_depth=5", "objective.lsep.encoder_depth", "deeper than the model (4 blocks)"),
    ("objective.sra.block_out_t=9", "objective.sra.block_out_t", "deeper than the model"),
    ("objective.lsep.uncond_prb=0.5", "objective.lsep.uncond_prb", "unknown field"),
    ("optim.lr=fast", "optim.lr", "valid number"),
    ("objective.lsep.weights_type=linear", "objective.lsep.weights_type", "'constant' or 'steps'"),
    ("model.name=SiT-H/2", "model.name", "unknown model"),
]


@pytest.mark.parametrize("override,field,expectation", BAD)
def test_bad_overrides_one_line_exit_2(override, field, expectation, tmp_path, capsys):
    rc = main(["--preset", "digits", "--set", override, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert f"preset digits (with --set): {field}: " in err and expectation in err
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("section,expectation", [
    ({"objective": {"lsep": {"uncond_prob": 1.5}}}, "objective.lsep.uncond_prob: "),
    ({"objective": {"lsep": {"crop_start": 99}}}, "objective.lsep.crop_start: 99 is larger than the token grid"),
    ({"model": {"depth": 3}}, "model.depth: unknown field"),
    ({"run": {"max_steps": "many"}}, "run.max_steps: "),
])
def test_bad_yaml_file_names_the_file_and_field(tmp_path, capsys, section, expectation):
    data = yaml.safe_load(open(load_config.__globals__["resources"].files("lsep_tune.presets") / "digits.yaml"))
    for key, value in section.items():
        data.setdefault(key, {})
        for k, v in value.items():
            if isinstance(v, dict):
                data[key].setdefault(k, {}).update(v)
            else:
                data[key][k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["--config", str(path), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: {expectation}")


def test_missing_file_invalid_yaml_and_unwritable_output(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["--config", str(tmp_path / "broken.yaml")]) == 2
    assert "broken.yaml: invalid YAML" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["--preset", "digits", "--output", str(tmp_path / "file" / "run")]) == 2
    assert "--output: " in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown preset"):
        load_config(preset="imagenet1024")


def test_cli_exit_code_and_single_line_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lsep_tune.train", "--preset", "digits", "--set", "objective.lsep.uncond_prob=1.5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "objective.lsep.uncond_prob" in proc.stderr and not (tmp_path / "runs").exists()
