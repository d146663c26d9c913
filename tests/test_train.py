import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from lsep_tune import checkpoint as ckpt
from lsep_tune.config import load_config
from lsep_tune.train.__main__ import main
from lsep_tune.train.context import LocalContext
from lsep_tune.train.loop import train_loop


def test_digits_training_lowers_loss_and_lifts_probe_accuracy(tmp_path):
    cfg = load_config(preset="digits", overrides=["run.max_steps=300", "run.log_every=50", "run.ckpt_every=150",
                                                  "sampling.grid_images=20", "sampling.steps=8",
                                                  "run.eval_every=0"])  # FID is test_in_training_evaluation's
    summary = train_loop(cfg, LocalContext(tmp_path, keep_checkpoints=1, device="cpu"))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [50, 100, 150, 200, 250, 300]
    assert logged[-1]["flow_loss"] < 0.8 * logged[0]["flow_loss"]
    assert summary["probe_acc"] > 0.3  # chance is 0.1
    assert summary["final_step"] == 300 and summary["world_size"] == 1
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["checkpoint"] == str(tmp_path / "checkpoints" / "step_00000300")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000300"]  # keep 1
    grid = Image.open(written["sample_grid"])
    assert grid.size[0] > 8 * 10 and grid.size[1] > 8 * 2  # 10 columns (classes) x 2 rows


def small_cfg(max_steps, **extra):
    overrides = ["model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2", "objective.sra.enabled=true",
                 "objective.sra.block_out_s=1", "objective.sra.block_out_t=3", "data.batch_size=16",
                 f"run.max_steps={max_steps}", "run.ckpt_every=4", "run.log_every=2", "sampling.steps=2",
                 "sampling.grid_images=10", "optim.grad_accum_steps=2"]
    return load_config(preset="digits", overrides=overrides + [f"{k}={v}" for k, v in extra.items()])


def assert_same_state(a: dict, b: dict):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for idx in sa:
        for k in sa[idx]:
            assert torch.equal(torch.as_tensor(sa[idx][k]), torch.as_tensor(sb[idx][k])), f"optimizer {idx}.{k}"


def test_resume_continues_with_identical_state_at_the_right_step(tmp_path):
    straight = tmp_path / "straight"
    train_loop(small_cfg(8), LocalContext(straight, keep_checkpoints=5, device="cpu"))
    split = tmp_path / "split"
    first = train_loop(small_cfg(4), LocalContext(split, keep_checkpoints=5, device="cpu"))
    assert first["final_step"] == 4
    # Round trip: the checkpoint on disk loads (weights_only) and holds the step and config.
    state4 = ckpt.load_state(split / "checkpoints" / "step_00000004")
    assert state4["step"] == 4 and state4["config"]["run"]["max_steps"] == 4
    resumed = train_loop(small_cfg(8), LocalContext(split, keep_checkpoints=5, device="cpu", resume_from=split))
    assert resumed["start_step"] == 4 and resumed["final_step"] == 8
    assert_same_state(ckpt.load_state(straight / "checkpoints" / "step_00000008"),
                      ckpt.load_state(split / "checkpoints" / "step_00000008"))
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


class RecordingContext(LocalContext):
    """A local context that remembers what the loop reported, as a Tune trial's scheduler would see it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reported = []

    def report(self, metrics, step, state=None):
        self.reported.append((step, dict(metrics)))
        return super().report(metrics, step, state)


def test_resumed_from_its_final_checkpoint_a_run_reports_its_end_again(tmp_path):
    """Killed between its last checkpoint and its summary, a run resumed there trains nothing but
    must report the final record again (once), or a Tune trial waiting on it never sees it end."""
    run = tmp_path / "run"
    first = train_loop(small_cfg(4), LocalContext(run, keep_checkpoints=5, device="cpu"))
    (run / "summary.json").unlink()  # as if the process died right after the step-4 checkpoint
    ctx = RecordingContext(run, keep_checkpoints=5, device="cpu", resume_from=run)
    resumed = train_loop(small_cfg(4), ctx)
    assert resumed["start_step"] == 4 and resumed["final_step"] == 4
    assert [step for step, _ in ctx.reported] == [4]
    assert ctx.reported[0][1]["flow_loss"] == first["final_flow_loss"]
    assert resumed["final_flow_loss"] == first["final_flow_loss"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the history still holds each step once

    # Ended before (a search restarting a trial whose end its driver had not recorded): the same
    # report again, and the summary, EMA and final evaluation it left stand untouched.
    finished = {p.name: p.stat().st_mtime_ns for p in (run / "summary.json", run / "ema_final.pt")}
    again = RecordingContext(run, keep_checkpoints=5, device="cpu", resume_from=run)
    assert train_loop(small_cfg(4), again) == json.loads((run / "summary.json").read_text())
    assert [step for step, _ in again.reported] == [4]
    assert {p.name: p.stat().st_mtime_ns for p in (run / "summary.json", run / "ema_final.pt")} == finished


def test_cli_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--preset", "digits", "--set", "model.name=SiT-Tiny/2", "--set", "objective.lsep.encoder_depth=2",
            "--set", "sampling.steps=2", "--set", "run.ckpt_every=2", "--max-steps", "2", "--output", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["probe_acc"] is not None
    assert (out / "config.yaml").exists() and summary["world_size"] == 1
    assert main(["--resume", str(out), "--max-steps", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == 2 and summary["final_step"] == 4
    assert main(["--resume", str(tmp_path / "missing")]) == 2


def test_in_training_evaluation_reports_digits_fid(tmp_path):
    cfg = load_config(preset="digits", overrides=[
        "model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2", "run.max_steps=6", "run.log_every=2",
        "run.eval_every=4", "run.eval_samples=200", "run.final_eval_samples=300", "sampling.steps=4"])
    summary = train_loop(cfg, LocalContext(tmp_path, keep_checkpoints=1, device="cpu"))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "fid" not in logged[0]  # step 2: no evaluation yet
    assert logged[1]["eval_step"] == 4 and logged[2]["eval_step"] == 6  # every 4 steps and at the end
    assert logged[1]["fid"] > 1.0 and 1.0 <= logged[1]["isc_mean"] <= 10.0  # an untrained model is far off
    assert logged[1]["fid"] != logged[2]["fid"]
    assert summary["fid"] == logged[2]["fid"] and summary["final_eval"]["fid"] > 1.0


def test_diverging_run_ends_as_failed(tmp_path, capsys):
    args = ["--preset", "digits", "--set", "model.name=SiT-Tiny/2", "--set", "objective.lsep.encoder_depth=2",
            "--set", "optim.lr=1e4", "--set", "optim.grad_clip=0", "--max-steps", "50", "--output", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "training diverged: non-finite loss" in err
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"


def test_bf16_autocast_path_trains(tmp_path):
    cfg = load_config(preset="digits", overrides=["model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2",
                                                  "objective.sra.enabled=true", "objective.sra.block_out_s=1",
                                                  "objective.sra.block_out_t=3", "run.precision=bf16",
                                                  "run.max_steps=3", "run.log_every=1", "sampling.steps=2"])
    summary = train_loop(cfg, LocalContext(tmp_path, keep_checkpoints=1, device="cpu"))
    state = ckpt.load_state(summary["checkpoint"])
    assert summary["final_step"] == 3 and all(t.dtype == torch.float32 for t in state["model"].values())
    assert summary["final_metrics"]["sra_loss"] > 0


def test_too_many_workers_refused_before_a_local_ray_starts(tmp_path, capsys, no_local_ray):
    """More workers than this machine has CPUs: one line, exit 2, no Ray started, no folder made."""
    from lsep_tune.cluster import machine_resources

    workers = int(machine_resources()["CPU"]) + 1
    out = tmp_path / "run"
    assert main(["--preset", "digits", "--workers", str(workers), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --workers: {workers}: expected at most {workers - 1}: {workers} workers x 1 CPUs need "
                   f"{workers} CPUs, this machine has {workers - 1}"]
    assert not out.exists()


def test_unreachable_mlflow_server_refused_before_a_local_ray_starts(tmp_path, capsys, no_local_ray):
    """A given --mlflow-uri that cannot be reached: one line, exit 2, no Ray started, no folder made."""
    out = tmp_path / "run"
    assert main(["--preset", "digits", "--workers", "1", "--mlflow-uri", "http://127.0.0.1:9", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --mlflow-uri: http://127.0.0.1:9: cannot reach the MLflow server")
    assert not out.exists()


def test_missing_training_data_fails_before_mlflow_or_any_folder(tmp_path):
    """A latent preset whose data folder is absent: one line, exit 2, nothing created."""
    proc = subprocess.run([sys.executable, "-m", "lsep_tune.train", "--preset", "imagenet256-sit-b2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: data/imagenet256-latents: data.path: no such folder; create it with python -m lsep_tune.preprocess "
        "--images IMAGE_FOLDER --out data/imagenet256-latents"]
    assert list(tmp_path.iterdir()) == []  # no runs/, no mlflow.db, no mlruns/


def test_check_available_names_what_is_missing(tmp_path):
    from lsep_tune.data import check_available
    from lsep_tune.errors import InputError

    cfg = load_config(preset="imagenet256-sit-b2", overrides=[f"data.path={tmp_path / 'absent'}"])
    with pytest.raises(InputError, match="data.path: no such folder"):
        check_available(cfg.data)
    cfg = load_config(preset="imagenet256-sit-b2", overrides=[f"data.path={tmp_path}"])
    with pytest.raises(InputError, match="no manifest.json"):
        check_available(cfg.data)


@pytest.mark.slow
def test_a_ray_train_run_prints_each_step_once_and_no_report_objects(tmp_path):
    """The console of `train --workers 1`: the run's own step lines, once each; Ray Train's per-report
    `TrainingReport(...)` lines and its print tee (every worker line twice) are gone."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "lsep_tune.train", "--preset", "digits", "--workers", "1", "--max-steps", "4",
         "--set", "model.name=SiT-Tiny/2", "--set", "objective.lsep.encoder_depth=2", "--set", "run.log_every=2",
         "--set", "run.eval_every=0", "--set", "sampling.steps=2", "--set", "sampling.grid_images=10",
         "--output", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    for step in (2, 4):
        assert sum(f"step {step}/4 " in line for line in printed.splitlines()) == 1, printed[-3000:]
    assert "TrainingReport(" not in printed
