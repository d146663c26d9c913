"""Ray Train runs on a real local Ray (CPU, gloo), tracked in a real MLflow server."""
import json
from pathlib import Path

import pytest
import torch

from lsep_tune import checkpoint as ckpt
from lsep_tune.train.__main__ import main

pytestmark = pytest.mark.slow

# lr 1e-3: the attention key bias has a gradient that is zero up to float noise (softmax ignores a
# shift shared by all keys), and Adam scales that noise to lr-sized steps; at the digits preset's
# 4e-3 the reduction-order noise of 1 vs 2 workers then exceeds the tolerance in those biases alone.
TINY = ["--preset", "digits", "--set", "optim.lr=1e-3", "--set", "model.name=SiT-Tiny/2",
        "--set", "objective.lsep.encoder_depth=2",
        "--set", "sampling.steps=2", "--set", "sampling.grid_images=10", "--set", "run.log_every=1",
        "--set", "run.ckpt_every=4", "--set", "run.keep_checkpoints=5", "--set", "run.eval_every=0",
        "--max-steps", "10"]  # no FID of 1,000 samples at the end: these tests compare states and steps


def run_cli(args, tmp_path: Path, name: str) -> tuple[int, dict, Path]:
    out = tmp_path / name
    rc = main(args + ["--output", str(out)])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return rc, summary, out


def final_state(summary: dict) -> dict:
    return ckpt.load_state(summary["checkpoint"])


def assert_close_states(a: dict, b: dict, **tol):
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], msg=f"{key}.{name}", **tol)


@pytest.fixture(scope="module")
def two_worker_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    rc, summary, out = run_cli(TINY + ["--workers", "2", "--set", "data.batch_size=8"], tmp, "run")
    assert rc == 0
    return summary, out


def test_two_workers_stay_in_sync_and_match_one_worker(two_worker_run, tmp_path):
    summary, out = two_worker_run
    assert summary["world_size"] == 2 and summary["final_step"] == 10 and summary["global_batch"] == 16
    assert len(set(summary["replica_digests"])) == 1  # every rank holds the same parameters
    assert Path(summary["checkpoint"]).name == "step_00000010" and Path(summary["checkpoint"]).is_relative_to(out)
    # Same global batch in one process (16 per step; `--workers 0`, no worker group to start: a one-worker
    # Ray Train run is tests/test_train.py's): the same run, up to float reduction order.
    rc, single, _ = run_cli(TINY + ["--workers", "0", "--set", "data.batch_size=16"], tmp_path, "one")
    assert rc == 0 and single["world_size"] == 1
    assert_close_states(final_state(summary), final_state(single), rtol=1e-4, atol=1e-5)
    # ...and one worker accumulating two micro-batches of 8 gives it too.
    rc, accum, _ = run_cli(TINY + ["--workers", "0", "--set", "data.batch_size=8", "--set",
                                   "optim.grad_accum_steps=2"], tmp_path, "accum")
    assert rc == 0
    assert_close_states(final_state(summary), final_state(accum), rtol=1e-4, atol=1e-5)


def test_killed_worker_resumes_exactly_without_duplicate_metrics(two_worker_run, mlflow_server, tmp_path):
    baseline, _ = two_worker_run
    args = TINY + ["--workers", "2", "--set", "data.batch_size=8", "--set", "run.fail_at_step=7",
                   "--set", "run.fail_rank=1", "--mlflow-uri", mlflow_server.uri]
    rc, summary, out = run_cli(args, tmp_path, "killed")
    assert rc == 0
    assert (out / ".failure_drill_step_7").exists()  # the worker really died at step 7
    assert summary["start_step"] == 4 and summary["final_step"] == 10  # resumed from the step-4 checkpoint
    assert_close_states(final_state(summary), final_state(baseline), rtol=0, atol=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 11))  # every step once, none twice
    assert run.data.params["objective.lsep.uncond_prob"] == "0.9"
    assert run.data.params["run.fail_at_step"] == "7" and run.data.tags["world_size"] == "2"
    assert "torch.version" in run.data.tags
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"samples", "checkpoints"} <= artifacts
    assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/ema_final.pt"]


@pytest.mark.parametrize("extra,flag", [
    (["--workers", "8"], "--workers: 8: expected at most 3: 8 workers x 1 CPUs need 8 CPUs, the cluster has 3"),
    (["--workers", "1", "--gpus-per-worker", "1"], "--gpus-per-worker: "),
    (["--workers", "1", "--mlflow-uri", "http://127.0.0.1:9"], "--mlflow-uri: http://127.0.0.1:9: cannot reach"),
    (["--workers", "1", "--storage", "/proc/lsep_tune_storage"], "--storage: /proc/lsep_tune_storage: not writable"),
])
def test_bad_requests_fail_before_training(ray_local, tmp_path, capsys, extra, flag):
    rc, _, out = run_cli(TINY + extra, tmp_path, "bad")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {flag}")
    assert not (out / "metrics.jsonl").exists() and not (out / "run.json").exists()


def test_mlflow_outage_mid_run_warns_and_training_goes_on(tmp_path):
    from lsep_tune import tracking
    from lsep_tune.config import load_config
    from lsep_tune.train.context import LocalContext
    from lsep_tune.train.loop import train_loop
    from tests.conftest import MlflowServer

    server = MlflowServer(tmp_path / "outage")
    try:
        run_id = tracking.create_run(server.uri, {"a": 1}, {}, run_name="outage")
        tracker = tracking.RunTracker(server.uri, run_id)
        tracker.log_metrics({"loss": 1.0}, 1)
    finally:
        server.stop()  # the server goes away before training starts logging
    cfg = load_config(preset="digits", overrides=["model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2",
                                                  "run.max_steps=4", "run.log_every=1", "sampling.steps=2"])
    ctx = LocalContext(tmp_path / "run", keep_checkpoints=1, device="cpu")
    ctx.callbacks.append(tracker)
    with pytest.warns(UserWarning, match="MLflow tracking .* failed") as caught:
        summary = train_loop(cfg, ctx)
    assert summary["final_step"] == 4 and (tmp_path / "run" / "checkpoints" / "step_00000004").exists()
    assert len([w for w in caught if "MLflow tracking" in str(w.message)]) == 1  # one warning per outage
    assert tracker.logged_through == 1


def test_the_trainer_has_ray_train_take_reports_more_often_than_its_default(tmp_path, monkeypatch, digits_cfg):
    """Ray Train V2's controller takes each worker's one held report on its poll, and a worker's next
    report waits for that: at Ray's 2 s default, a small model reporting every step trains one step per
    2 s. The trainer asks for 0.25 s polls, which Ray passes on to its controller and workers; a user's
    own setting stays."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate  # what Ray passes on

    from lsep_tune.cluster import Placement
    from lsep_tune.train.distributed import REPORT_POLL_ENV, RunPaths, build_trainer

    paths = RunPaths(output=str(tmp_path), storage=str(tmp_path), name="run")
    monkeypatch.setenv(REPORT_POLL_ENV, "unset below")  # recorded, so that the value set here ends with the test
    monkeypatch.delenv(REPORT_POLL_ENV)
    build_trainer(digits_cfg, Placement(2), paths)
    assert get_env_vars_to_propagate()[REPORT_POLL_ENV] == "0.25"
    monkeypatch.setenv(REPORT_POLL_ENV, "5")
    build_trainer(digits_cfg, Placement(2), paths)
    assert get_env_vars_to_propagate()[REPORT_POLL_ENV] == "5"
