"""`python -m lsep_tune.search` on a real local Ray with real MLflow and Optuna storage."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lsep_tune.search.__main__ import main

TINY_OVERRIDES = {
    "model.name": "SiT-Tiny/2", "objective.lsep.encoder_depth": 2, "data.batch_size": 32,
    "sampling.steps": 2, "sampling.grid_images": 10, "run.ckpt_every": 10, "optim.grad_clip": 0.0,
    "run.eval_every": 0,  # the metric is flow_loss: no in-training FID of 1,000 samples at each trial's end
}
GOOD = {"optim.lr": 2e-3}


def write_space(path: Path, points, num_samples: int, max_concurrent: int = 2, max_steps: int = 40,
                scheduler=None, report_every: int = 5, overrides=None, confirm=None) -> Path:
    space = {
        "description": "test space",
        "base": {"preset": "digits"},
        "overrides": {**TINY_OVERRIDES, **(overrides or {})},
        "params": {"optim.lr": {"type": "loguniform", "low": 1e-8, "high": 1e4},
                   "objective.lsep.uncond_prob": {"type": "uniform", "low": 0.5, "high": 1.0}},
        "metric": {"name": "flow_loss", "mode": "min"},
        "searcher": {"type": "tpe", "n_startup_trials": 2},
        "scheduler": scheduler or {"type": "asha", "grace_period": 10, "reduction_factor": 2},
        "budget": {"num_samples": num_samples, "max_concurrent": max_concurrent, "workers_per_trial": 1,
                   "cpus_per_worker": 1, "max_steps": max_steps, "max_failures": 1},
        "report_every": report_every,
        "seed": 0,
        "points_to_evaluate": points,
        **({"confirm": confirm} if confirm else {}),
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def child_runs(summary: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, children


SMOKE_POINTS = [
    GOOD,
    {"optim.lr": 1e-3},
    {"optim.lr": 1e-8},  # deliberately bad: it barely learns, so ASHA stops it at a rung
    {"optim.lr": 1e4},  # diverges: a failed trial, and the search goes on
]


@pytest.fixture(scope="module")
def submitted(tmp_path_factory, mlflow_server, ray_head):
    """One search submitted with `ray job submit` to a cluster started by `ray start`, as a user runs one,
    tracked on a real `mlflow server`: the tests below each read one property of it back. Its 4 trials
    end in every state a run can end in (FINISHED, KILLED by ASHA, FAILED on divergence)."""
    from types import SimpleNamespace

    import optuna

    root = tmp_path_factory.mktemp("submitted")
    # A small final evaluation after the last step: its final_* metrics must reach MLflow.
    space = write_space(root / "space.yaml", SMOKE_POINTS, num_samples=4, max_concurrent=2,
                        overrides={"run.final_eval_samples": 20})
    out = root / "search"
    head = ray_head
    rc, printed = head.submit(sys.executable, "-m", "lsep_tune.search", "--space", str(space), "--output",
                              str(out), "--mlflow-uri", mlflow_server.uri)
    assert rc == 0, printed[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    client, parent, children = child_runs(summary)
    return SimpleNamespace(
        root=root, out=out, head=head, printed=printed, summary=summary, client=client, parent=parent,
        children=children, trials={t["params"]["optim.lr"]: t for t in summary["trials"]},
        by_lr={float(c.data.params["optim.lr"]): c for c in children},
        study=optuna.load_study(study_name=summary["optuna_study"], storage=summary["optuna_storage"]))


@pytest.mark.slow
def test_a_submitted_search_joins_the_cluster_and_prints_where_to_look(submitted, mlflow_server):
    summary, printed = submitted.summary, submitted.printed
    assert "succeeded" in printed
    assert summary["ray_address"].endswith(f":{submitted.head.gcs_port}")  # it joined that cluster
    assert summary["mlflow_tracking_uri"] == mlflow_server.uri
    # the printed line opens the experiment on its runs table (MLflow 3 would open on its GenAI overview)
    assert summary["mlflow_runs_url"].startswith(f"{mlflow_server.uri}/#/experiments/")
    assert f"open {summary['mlflow_runs_url']} in a browser" in printed
    assert "best flow_loss" in printed


@pytest.mark.slow
def test_every_trial_ends_in_its_state_and_a_diverged_one_fails(submitted):
    summary, trials = submitted.summary, submitted.trials
    assert len(summary["trials"]) == 4
    assert trials[1e4]["status"] == "failed" and "diverged" in trials[1e4]["error"]
    assert trials[1e-8]["status"] == "stopped" and trials[1e-8]["step"] < 40
    assert {trials[2e-3]["status"], trials[1e-3]["status"]} <= {"completed", "stopped"}
    assert summary["best_params"]["optim.lr"] in (2e-3, 1e-3)


@pytest.mark.slow
def test_one_nested_mlflow_run_per_trial_with_its_params_curves_and_name(submitted):
    client, parent, children = submitted.client, submitted.parent, submitted.children
    assert len(children) == 4
    assert {c.data.params["optim.lr"] for c in children} == {str(v) for v in (2e-3, 1e-3, 1e-8, 1e4)}
    assert len(client.get_metric_history(submitted.by_lr[2e-3].info.run_id, "flow_loss")) >= 2
    # Names a person reads: the trial's number and its searched values; the search's name once.
    assert parent.info.run_name == "search"
    assert sorted(c.info.run_name.split(":")[0] for c in children) == [f"trial {i}" for i in range(1, 5)]
    assert all("lr=" in c.info.run_name and "uncond_prob=" in c.info.run_name for c in children)


@pytest.mark.slow
def test_every_mlflow_run_ends_in_the_state_its_trial_reached(submitted):
    """FAILED (diverged), KILLED (stopped by ASHA), FINISHED (trained to the end, with its final_*
    metrics), each with an end time; none is left RUNNING; the parent has its best_* metric."""
    by_lr, trials, children, parent = submitted.by_lr, submitted.trials, submitted.children, submitted.parent
    assert by_lr[1e4].info.status == "FAILED"
    assert by_lr[1e-8].info.status == "KILLED"  # stopped by ASHA
    for lr in (2e-3, 1e-3):
        expected = "FINISHED" if trials[lr]["status"] == "completed" else "KILLED"
        assert by_lr[lr].info.status == expected
    assert all(c.info.end_time for c in children) and parent.info.status == "FINISHED" and parent.info.end_time
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished and all("final_fid" in c.data.metrics for c in finished)
    assert parent.data.metrics["best_flow_loss"] == pytest.approx(submitted.summary["best_metric"])


@pytest.mark.slow
def test_the_parent_run_holds_the_search_files_and_plots(submitted):
    client, parent = submitted.client, submitted.parent
    assert {"best.yaml", "space.yaml", "summary.json", "plots"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    plots = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= plots


@pytest.mark.slow
def test_the_optuna_study_has_the_diverged_trial_worst_and_stopped_ones_pruned(submitted):
    """The study in its RDB storage: the diverged trial told to the searcher as the worst value; the
    scheduler-stopped trials PRUNED, their intermediate values keyed by training step."""
    import optuna

    study, summary, trials = submitted.study, submitted.summary, submitted.trials
    values = {t.params["optim.lr"]: t.value for t in study.trials}
    assert values[1e4] == 1e12 and values[2e-3] < values[1e-8] < 1e12
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert sorted(t.params["optim.lr"] for t in pruned) == sorted(
        s["params"]["optim.lr"] for s in summary["trials"] if s["status"] == "stopped")
    stopped = next(t for t in pruned if t.params["optim.lr"] == 1e-8)
    assert sorted(stopped.intermediate_values) == list(range(5, trials[1e-8]["step"] + 1, 5))
    assert "proxy_validity" in summary  # needs three trials run to the end: none here


@pytest.mark.slow
def test_best_yaml_is_a_full_config_the_trainer_reruns(submitted):
    from lsep_tune.train.__main__ import main as train_main

    rerun = submitted.root / "rerun"
    assert train_main(["--config", str(submitted.out / "best.yaml"), "--max-steps", "2", "--output", str(rerun)]) == 0


@pytest.mark.slow
def test_a_stop_after_the_trials_ended_ends_the_search_run_killed(tmp_path, capsys, monkeypatch):
    """SIGTERM (`ray job stop`, `scancel`) that comes once the trials have ended, while the search writes
    its plots and summary: the search's MLflow run ends KILLED, as the printed line says, not RUNNING."""
    from lsep_tune.search import report
    from lsep_tune.search.__main__ import EXIT_STOPPED

    def stopped_while_plotting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this process's own handler
        return []

    monkeypatch.setattr(report, "optuna_plots", stopped_while_plotting)
    space = write_space(tmp_path / "space.yaml", [GOOD], num_samples=1, max_steps=4, scheduler={"type": "none"},
                        report_every=2)
    out = tmp_path / "search"
    assert main(["--space", str(space), "--output", str(out)]) == EXIT_STOPPED
    assert "search stopped (SIGTERM)" in capsys.readouterr().out
    state = json.loads((out / "search.json").read_text())
    _, parent, children = child_runs({"mlflow_tracking_uri": state["mlflow_tracking_uri"],
                                      "mlflow_parent_run_id": state["mlflow_parent_run_id"]})
    assert parent.info.status == "KILLED" and parent.info.end_time
    assert [c.info.status for c in children] == ["FINISHED"]  # the trial had ended: it stays FINISHED
    assert not (out / "summary.json").exists()


def test_a_stop_ends_with_its_search_and_the_next_run_of_the_process_goes_on():
    """A SIGTERM stops the search it came to; an ablation run later in the same process is not stopped by it."""
    from lsep_tune.search.stop import SearchStopped, fit_or_stop, sigterm_stops_search

    class Tuner:
        def fit(self):
            return "results"

    with pytest.raises(SearchStopped):
        with sigterm_stops_search():
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; outside a Tuner run it raises at once
            time.sleep(5)  # not reached: the handler raises in this thread as the signal lands
    try:  # (a KeyboardInterrupt: uncaught, it would end the whole test session)
        assert fit_or_stop(Tuner()) == "results"
    except SearchStopped:
        pytest.fail("the stop of the search that ended stopped the next run too")


@pytest.mark.slow
def test_resume_after_losing_the_driver_and_the_head(tmp_path, mlflow_server, ray_heads, ray_head):
    """The search's driver and the Ray head it runs on (a `ray start` cluster) die together mid-search,
    SIGKILL, no grace, in the middle of copying Tune's state: `--resume` on the same folder against
    another head (the session's) finishes it, tracked on a real `mlflow server`."""
    space = write_space(tmp_path / "space.yaml", [GOOD], num_samples=3, max_concurrent=1, max_steps=60,
                        scheduler={"type": "none"}, report_every=10)
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "lsep_tune.search", "--space", str(space), "--output", str(out),
           "--mlflow-uri", mlflow_server.uri]
    head = ray_heads(num_cpus=2)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd + ["--address", head.address], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path, env=head.env)
    # Kill once the first trial has finished and the second has written a checkpoint that Tune's saved
    # experiment state knows of (a trial started after Tune's last save is new to a resumed search: it
    # starts over under a new id, its checkpoint unused).
    deadline = time.time() + 400
    while time.time() < deadline:
        done = list(out.glob("trial_runs/*/summary.json"))
        finished = {d.parent.name for d in done}
        # A one-worker trial trains inside its Tune trial and keeps its checkpoints in its run folder.
        ckpts = [p for p in out.glob("trial_runs/*/checkpoints/step_*/state.pt")
                 if p.parent.parent.parent.name not in finished]
        saved = "".join(f.read_text() for f in out.glob("tune/search/experiment_state-*.json"))
        if len(done) >= 1 and any(p.parent.parent.parent.name in saved for p in ckpts):  # the trial id
            break
        assert proc.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("the search did not get far enough to be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    head.kill()
    proc.wait()
    first_done = {p.parent.name: p.stat().st_mtime for p in out.glob("trial_runs/*/summary.json")}
    assert not (out / "summary.json").exists()
    # Tune copies its state into the search folder file by file, in place, in a background thread: a
    # driver killed during that copy leaves files cut short (CI once killed it mid-copy: the resumed
    # search hung). The same, every time: each state file cut to half its length.
    from lsep_tune.search.tune_state import state_files

    state = state_files(out / "tune" / "search")
    assert {p.name.split("-")[0] for p in state} >= {"experiment_state", "searcher", "search_gen_state"}
    for path in state:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    new_head = ray_head
    resumed = subprocess.run(cmd + ["--resume", "--address", new_head.address], capture_output=True, text=True,
                             timeout=600, cwd=tmp_path, env=new_head.env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 3 and all(t["status"] == "completed" for t in summary["trials"])
    for trial_id, mtime in first_done.items():  # finished trials were not run again
        assert (out / "trial_runs" / trial_id / "summary.json").stat().st_mtime == mtime
    starts = [json.loads(p.read_text())["start_step"] for p in out.glob("trial_runs/*/summary.json")]
    assert any(s > 0 for s in starts)  # the interrupted trial resumed from its checkpoint
    for metrics in out.glob("trial_runs/*/metrics.jsonl"):
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert steps == [10, 20, 30, 40, 50, 60]  # the history holds each step once
    client, _, children = child_runs(summary)
    assert len(children) == 3  # no duplicate MLflow child runs
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "flow_loss")]
        assert sorted(steps) == [10, 20, 30, 40, 50, 60]
    # Read back from the server: every run ended FINISHED with an end time, the interrupted one too;
    # the parent has its best_* metric; names are the trial's number and values, the search's name once.
    _, parent, children = child_runs(summary)
    assert [c.info.status for c in children] == ["FINISHED"] * 3 and all(c.info.end_time for c in children)
    assert parent.info.status == "FINISHED" and parent.info.end_time and parent.info.run_name == "search"
    assert parent.data.metrics["best_flow_loss"] == pytest.approx(summary["best_metric"])
    assert sorted(c.info.run_name.split(":")[0] for c in children) == ["trial 1", "trial 2", "trial 3"]
    # Three trials ran to the end: the rank correlation of each earlier report with the final loss.
    proxy = summary["proxy_validity"]
    assert proxy and set(proxy) <= {"10", "20", "30", "40", "50"} and all(-1 <= v <= 1 for v in proxy.values())


BAD_SPACES = [
    ({"params": {"optim.lr": {"type": "gaussian", "low": 1, "high": 2}}}, "params.optim.lr.type"),
    ({"params": {"optim.lr": {"type": "uniform", "low": 2.0, "high": 1.0}}}, "params.optim.lr"),
    ({"params": {"optim.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3,
                              "when": {"objective.lsep.nonexistent": True}}}}, "params.optim.lr.when"),
    ({"metric": {"name": "accuracy", "mode": "max"}}, "metric"),
]


@pytest.mark.parametrize("change,field", BAD_SPACES)
def test_bad_spaces_fail_in_one_line_before_ray(tmp_path, capsys, change, field):
    import ray

    ray.shutdown()  # whatever an earlier test left: this one must not start Ray
    path = write_space(tmp_path / "bad.yaml", [], num_samples=2)
    data = yaml.safe_load(path.read_text())
    data.pop("points_to_evaluate")
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    rc = main(["--space", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: {field}")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_cli_argument_errors(tmp_path, capsys):
    assert main(["--space", "no-such-space"]) == 2
    assert "no-such-space" in capsys.readouterr().err
    assert main(["--num-samples", "0", "--output", str(tmp_path / "x")]) == 2
    assert "--num-samples: 0" in capsys.readouterr().err
    assert main(["--resume", "--output", str(tmp_path / "never")]) == 2
    assert "search.json" in capsys.readouterr().err


def test_proxy_validity_is_the_rank_correlation_of_rungs_with_the_end():
    from lsep_tune.search.report import proxy_validity

    # Four trials run to step 30; at step 10 their order is 1,2,4,3 (by value), at step 20 fully reversed.
    curves = {
        "a": {10: 1.0, 20: 9.0, 30: 1.0},
        "b": {10: 2.0, 20: 8.0, 30: 2.0},
        "c": {10: 4.0, 20: 7.0, 30: 3.0},
        "d": {10: 3.0, 20: 6.0, 30: 40.0},  # ranks, not values, count
        "short": {10: 0.5},  # stopped early: not part of the figure
    }
    # By hand: ranks at 10 are 1,2,4,3 against 1,2,3,4 at the end -> d^2 = 0+0+1+1 = 2,
    # rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8; step 20 reverses the order -> -1.
    assert proxy_validity(curves, 30, [10, 20]) == {10: 0.8, 20: -1.0}
    # Fewer than three trials with a value at a step: no figure for that step.
    assert proxy_validity({k: curves[k] for k in "ab"}, 30, [10]) == {}


def test_trial_rows_carry_the_metric_uncertainty_beside_the_metric(tmp_path):
    """Each trial row: the metric and, where evaluation reported one, its uncertainty (fid -> fid_std)."""
    from types import SimpleNamespace

    from lsep_tune.search.report import trial_table
    from lsep_tune.search.space import load_space

    fid_space = load_space("digits")
    result = SimpleNamespace(metrics={"trial_id": "t1", "step": fid_space.budget.max_steps, "fid": 330.0, "fid_std": 4.5, "isc_std": 0.1},
                             config={"optim.lr": 1e-3}, error=None, path=str(tmp_path / "t1"))
    unevaluated = SimpleNamespace(metrics={"trial_id": "t2", "step": 80, "fid": 400.0}, config={}, error=None,
                                  path=str(tmp_path / "t2"))
    rows = trial_table([result, unevaluated], fid_space)
    assert rows[0]["metric"] == 330.0 and rows[0]["metric_std"] == 4.5 and rows[0]["status"] == "completed"
    assert rows[1]["metric"] == 400.0 and "metric_std" not in rows[1] and rows[1]["status"] == "stopped"
    flow = load_space(write_space(tmp_path / "s.yaml", [GOOD], num_samples=1))
    assert "metric_std" not in trial_table([result], flow)[0]  # flow_loss has no uncertainty


def test_bad_output_and_a_trial_larger_than_the_machine_fail_before_ray(tmp_path, capsys):
    import ray

    ray.shutdown()
    assert main(["--smoke", "--output", "/proc/x"]) == 2  # not a place anyone can write
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output: /proc/x: not writable") and len(err.splitlines()) == 1
    path = write_space(tmp_path / "big.yaml", [], num_samples=2)
    data = yaml.safe_load(path.read_text())
    data["budget"]["cpus_per_worker"] = (os.cpu_count() or 1) * 8
    path.write_text(yaml.safe_dump(data))
    assert main(["--space", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: budget.workers_per_trial: one trial needs") and len(err.splitlines()) == 1
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_missing_data_and_a_gpu_trial_on_a_cpu_machine_fail_before_ray(tmp_path, capsys, monkeypatch, no_local_ray):
    """A shipped ImageNet space without its latents, and a space asking for a GPU this machine does not
    have: one line each, exit 2, no Ray started, no folder made."""
    ray = no_local_ray
    monkeypatch.chdir(tmp_path)  # the space's relative data.path resolves here, where nothing is
    assert main(["--space", "lsep-sit-b2-imagenet256", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data/imagenet256-latents: data.path: no such folder") and len(err.splitlines()) == 1
    path = write_space(tmp_path / "gpu.yaml", [], num_samples=1)
    data = yaml.safe_load(path.read_text())
    data["budget"]["gpus_per_worker"] = 1
    path.write_text(yaml.safe_dump(data))
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    assert main(["--space", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: budget.gpus_per_worker: one trial needs more than this machine has")
    assert len(err.splitlines()) == 1
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_live_table_prints_with_conditional_params(tmp_path, capsys):
    """The digits space samples some params only under a condition; Tune's table (and its "best trial"
    line, which looks each column up in the best trial's config) must print for a trial without them."""
    from ray.tune.experiment import Trial

    from lsep_tune.search.runner import progress_table
    from lsep_tune.search.space import load_space

    space = load_space("digits")
    point = space.points_to_evaluate[0]  # weights_type "steps": objective.lsep.weight was not sampled
    assert "objective.lsep.weight" in space.params and "objective.lsep.weight" not in point
    from ray.tune.utils.log import Verbosity, set_verbosity

    set_verbosity(Verbosity.V1_EXPERIMENT)  # what an earlier search of this process leaves (verbose=1)
    table = progress_table(space)
    table.setup(metric="fid", mode="min")
    table.set_start_time(time.time())
    from ray.train._internal.storage import StorageContext

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="search", trial_dir_name="t")
    trial = Trial("trial_main", config=dict(point), stub=True, storage=storage)
    trial.update_last_result({"fid": 30.0, "step": 1000, "training_iteration": 1, "time_total_s": 1.0,
                              "config": dict(point)})  # what Tune puts in every result
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:  # a trial's name and folder are read from the running Ray's session
        table.report([trial], False)
    finally:
        ray.shutdown()
        set_verbosity(Verbosity.V3_TRIAL_DETAILS)  # Tune's default, for whatever runs next
    printed = capsys.readouterr().out
    assert "Current best trial" in printed and "fid=30" in printed
    header = next((line for line in printed.splitlines() if "Trial name" in line), None)
    assert header, printed
    assert "fid" in header and "step" in header  # the searched metric and the step are columns


def test_a_trial_the_study_finished_may_report_its_end_again(tmp_path):
    """A search resumed after its driver died before Tune saved that a trial had ended runs that trial
    again, and it reports its end again: the searcher keeps the study's record instead of failing."""
    import optuna

    from lsep_tune.search.searcher import make_searcher
    from lsep_tune.search.space import load_space

    space = load_space(write_space(tmp_path / "space.yaml", [GOOD], num_samples=2, scheduler={"type": "none"}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(space, storage).searcher
    assert searcher.suggest("t1") == GOOD | {"objective.lsep.uncond_prob": 0.9}
    end = {"flow_loss": 0.5, "step": space.budget.max_steps}
    searcher.on_trial_result("t1", {"flow_loss": 0.7, "step": 10})
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's last saved state: t1 still running
    searcher.on_trial_result("t1", end)
    searcher.on_trial_complete("t1", end)  # the study records it; then the driver is killed
    resumed = make_searcher(space, storage).searcher
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("t1", end)  # the rerun's report of the same end
    study = optuna.load_study(study_name="lsep_tune", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    # (the second searcher built here queued the first point again, as a WAITING trial; Tune's own
    # restore does not build one)
    finished = [(t.number, t.state, t.value) for t in study.trials if t.state.is_finished()]
    assert finished == [(0, optuna.trial.TrialState.COMPLETE, 0.5)]


def test_a_cut_state_file_is_put_back_whole_or_refused_in_one_line(tmp_path):
    """Tune's state as its copy left it when the driver died: the last whole save replaces it; without
    one, a file that does not read is refused naming it (Tune would start over and hang instead)."""
    import pickle
    import zipfile

    from lsep_tune.errors import InputError
    from lsep_tune.search.tune_state import restore_whole_state, snapshot_path

    experiment = tmp_path / "search"
    experiment.mkdir()
    trials, searcher = experiment / "experiment_state-s1.json", experiment / "searcher-state-s1.pkl"
    trials.write_text(json.dumps({"trial_data": []}))
    whole = pickle.dumps({"ot_trials": {"t1": 0}})
    searcher.write_bytes(whole[:10])
    with pytest.raises(InputError, match="searcher-state-s1.pkl: Tune experiment state"):
        restore_whole_state(experiment)
    with zipfile.ZipFile(snapshot_path(experiment), "w") as archive:
        archive.writestr(trials.name, trials.read_text())
        archive.writestr(searcher.name, whole)
    (experiment / "searcher-state-s0.pkl").write_bytes(b"")  # not in the last save: gone after restoring
    restore_whole_state(experiment)
    assert searcher.read_bytes() == whole and not (experiment / "searcher-state-s0.pkl").exists()
