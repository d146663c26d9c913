"""A one-worker trial that trains inside the Tune trial: reports, checkpoints, resumes, diverges."""
import json

import pytest

from lsep_tune.config import load_config

TINY = ["model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2", "sampling.steps=2", "sampling.grid_images=10",
        "run.log_every=2", "run.ckpt_every=2", "run.eval_every=0"]  # no 1,000-sample FID at the end


def trial(params, out_root=None):
    from ray import tune

    from lsep_tune.train.tune_context import run_in_trial

    cfg = load_config(preset="digits", overrides=TINY + [f"{k}={v}" for k, v in params.items()])
    out = f"{out_root}/{tune.get_context().get_trial_id()}"
    run_in_trial(cfg, out)


@pytest.mark.slow
def test_loop_runs_inside_the_tune_trial(ray_local, tmp_path):
    from ray import tune

    trainable = tune.with_parameters(trial, out_root=str(tmp_path / "runs"))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"run.max_steps": 4, "optim.lr": tune.grid_search([1e-4, 1e4]), "optim.grad_clip": 0},
        run_config=tune.RunConfig(name="t", storage_path=str(tmp_path / "tune")),
    )
    results = {r.config["optim.lr"]: r for r in tuner.fit()}
    good, bad = results[1e-4], results[1e4]
    assert good.error is None and good.metrics["step"] == 4
    # Checkpoints stay in the trial's run folder, where a restarted trial looks for them first.
    good_dir = next(p.parent for p in (tmp_path / "runs").glob("*/summary.json"))
    assert sorted(p.name for p in (good_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert good.metrics["time_train_s"] > 0 and "time_startup_s" in good.metrics
    steps = [m["step"] for m in good.metrics_dataframe.to_dict("records")]
    assert steps == [2, 4]
    # A diverging trial fails on the divergence itself, and leaves the record a Ray Train run leaves
    # (what a retry of the trial finds).
    assert "TrainingDiverged" in repr(bad.error) and bad.metrics.get("diverged") == 1.0
    record = json.loads(next((tmp_path / "runs").glob("*/diverged.json")).read_text())
    assert record["step"] >= 1 and "non-finite" in record["error"]
