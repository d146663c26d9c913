"""A search's whole life as a Ray job: submitted to a `ray start` cluster on 127.0.0.1 with its code and
MLflow store in the job's runtime env, followed with `ray job logs --follow`, stopped with
`ray job stop`, and continued with `--resume`, against a real `mlflow server`."""
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.test_search import GOOD, child_runs, write_space

REPO = Path(__file__).resolve().parents[1]
# Long enough that the second trial still trains when the stop reaches it: its first checkpoint (step 10)
# plus the `ray job stop` command's start-up (~2 s) on the fastest machine (~17 tiny steps/s)
MAX_STEPS = 200


def ray_job(head, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([head.ray, "job", command, "--address", head.dashboard, *args], env=head.env,
                          capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    """The process runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def trial_pids(head) -> set[int]:
    """The trials' processes: Tune's function-trainable actors, as Ray's state API lists them."""
    listed = subprocess.run([head.ray, "list", "actors", "--address", head.dashboard, "--format", "json",
                             "--filter", "state=ALIVE"], env=head.env, capture_output=True, text=True)
    return {a["pid"] for a in json.loads(listed.stdout) if "ImplicitFunc" in a["class_name"]}


def interrupted_trial_is_resumable(out: Path) -> bool:
    """One trial finished, and a running one has a checkpoint that Tune's saved experiment state knows."""
    finished = {p.parent.name for p in out.glob("trial_runs/*/summary.json")}
    ckpts = {p.parents[2].name for p in out.glob("trial_runs/*/checkpoints/step_*/state.pt")} - finished
    saved = "".join(f.read_text() for f in out.glob("tune/search/experiment_state-*.json"))
    return len(finished) >= 1 and any(trial in saved for trial in ckpts)


@pytest.mark.slow
def test_a_submitted_search_is_followed_stopped_and_resumed(tmp_path, mlflow_server, ray_head):
    space = write_space(tmp_path / "space.yaml", [GOOD, {"optim.lr": 1e-3}], num_samples=2, max_concurrent=1,
                        max_steps=MAX_STEPS, scheduler={"type": "none"}, report_every=20)
    out = tmp_path / "search"
    job = f"lsep-search-{uuid.uuid4().hex[:8]}"
    # What the trials need travels with the job, not in the driver's environment: the code (working_dir)
    # and the MLflow store; the stop waits up to 60 s for the search to end its runs before SIGKILL.
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.uri, "RAY_JOB_STOP_WAIT_TIME_S": "60"}}
    submitted = ray_job(ray_head, "submit", "--no-wait", "--submission-id", job, "--working-dir", str(REPO),
                        "--runtime-env-json", json.dumps(runtime_env), "--",
                        sys.executable, "-m", "lsep_tune.search", "--space", str(space), "--output", str(out))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    follow_log = open(tmp_path / "follow.log", "w")
    follow = subprocess.Popen([ray_head.ray, "job", "logs", "--follow", "--address", ray_head.dashboard, job],
                              env=ray_head.env, stdout=follow_log, stderr=subprocess.STDOUT)

    deadline = time.time() + 420
    running: set[int] = set()
    while not interrupted_trial_is_resumable(out):
        assert follow.poll() is None, "the job ended early:\n" + (tmp_path / "follow.log").read_text()[-3000:]
        assert time.time() < deadline, "the search did not get far enough to be stopped"
        if not running and any(out.glob("trial_runs/*/metrics.jsonl")):  # listed while the first trial trains:
            running = trial_pids(ray_head)  # the stop below then follows the second trial's checkpoint at once
        time.sleep(0.2)
    # The live table, as the follow shows it, from the job's driver.
    assert re.search(r"\| Trial name +\| status", (tmp_path / "follow.log").read_text())
    assert running

    started = time.time()
    stopped = ray_job(ray_head, "stop", job, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    stop_s = time.time() - started
    print(f"ray job stop took {stop_s:.1f} s")
    follow.wait(timeout=60)  # the job's end ends the follow
    assert "was stopped" in ray_job(ray_head, "status", job).stdout  # Ray's STOPPED
    assert stop_s < 60  # ended by the search itself, not by the SIGKILL after RAY_JOB_STOP_WAIT_TIME_S
    followed = (tmp_path / "follow.log").read_text()
    assert "search stopped (SIGTERM)" in followed and "--resume" in followed, followed[-3000:]
    deadline = time.time() + 30
    while any(alive(pid) for pid in running) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in running)  # no trial process left behind
    assert not (out / "summary.json").exists()

    # MLflow: the finished trial FINISHED, the interrupted one and the search's run KILLED, all ended.
    state = json.loads((out / "search.json").read_text())
    assert state["mlflow_tracking_uri"] == mlflow_server.uri  # from the job's runtime env
    summary_so_far = {"mlflow_tracking_uri": mlflow_server.uri, "mlflow_parent_run_id": state["mlflow_parent_run_id"]}
    _, parent, children = child_runs(summary_so_far)
    assert parent.info.status == "KILLED" and parent.info.end_time
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"] and all(c.info.end_time for c in children)
    # Optuna: the finished trial is complete, once; nothing else is.
    import optuna

    study = optuna.load_study(study_name=state["study_name"], storage=state["optuna_storage"])
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) == 1
    assert len(study.trials) <= 2
    first_done = {p.parent.name: p.stat().st_mtime for p in out.glob("trial_runs/*/summary.json")}
    # The second trial ran in the process the first one left (Tune's reuse_actors): one start-up, one pid.
    reports = [json.loads(line) for f in out.glob("tune/search/*/result.json") for line in f.read_text().splitlines()]
    assert len({r["trial_id"] for r in reports}) == 2 and len({r["pid"] for r in reports}) == 1, reports

    # --resume on the same folder (here with a local Ray of its own) finishes the search.
    resumed = subprocess.run([sys.executable, "-m", "lsep_tune.search", "--output", str(out), "--resume"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={k: v for k, v in ray_head.env.items() if k != "MLFLOW_TRACKING_URI"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    for trial_id, mtime in first_done.items():  # the finished trial was not run again
        assert (out / "trial_runs" / trial_id / "summary.json").stat().st_mtime == mtime
    starts = [json.loads(p.read_text())["start_step"] for p in out.glob("trial_runs/*/summary.json")]
    assert sorted(starts)[0] == 0 and sorted(starts)[1] > 0  # the stopped one went on from its checkpoint
    client, parent, children = child_runs(summary)
    assert len(children) == 2 and [c.info.status for c in children] == ["FINISHED"] * 2
    # each step once, and the stopped trial's history the same steps as the uninterrupted one's
    uninterrupted, resumed_steps = ([m.step for m in client.get_metric_history(c.info.run_id, "flow_loss")]
                                    for c in sorted(children, key=lambda c: c.info.start_time))
    assert sorted(resumed_steps) == sorted(set(uninterrupted)) == sorted(uninterrupted)
    assert max(uninterrupted) == MAX_STEPS
    assert parent.info.status == "FINISHED"
    study = optuna.load_study(study_name=state["study_name"], storage=state["optuna_storage"])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
