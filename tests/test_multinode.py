"""Several Ray nodes on this machine (127.0.0.1): trials on different nodes, and a node lost mid-search."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsep_tune.checkpoint import STATE_FILE, latest, whole
from tests.test_search import write_space

pytestmark = pytest.mark.slow

# Both trials train the same point with the space's one seed: the uninterrupted one is the reference
# for the one whose node is lost.
POINT = {"optim.lr": 2e-3, "objective.lsep.uncond_prob": 0.9}
MAX_STEPS, CKPT_EVERY = 24, 6


def last_step(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def checkpoint_steps(trial: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[-1]) for p in trial.glob("checkpoints/step_*/state.pt"))


def alive_actors(cluster, name: str) -> list[dict]:
    """The cluster's live actors whose class name holds `name` (Tune's trials: ImplicitFunc)."""
    return [a for a in cluster.cluster.global_state.actor_table(None).values()
            if str(a["State"]) in ("ALIVE", "2") and name in a["ActorClassName"]]


def ends_as_the_uninterrupted_trial(out: Path, summary: dict, lost: str, kept: str) -> None:
    """The interrupted trial `lost` ends as `kept`, the uninterrupted one of the same point and seed: the
    same searched metric and final losses, each step once in its history and in MLflow, both runs FINISHED."""
    from mlflow.tracking import MlflowClient

    rows = {row["id"]: row for row in summary["trials"]}
    runs = {t: json.loads((out / "trial_runs" / t / "summary.json").read_text()) for t in (lost, kept)}
    assert rows[lost]["metric"] == pytest.approx(rows[kept]["metric"], rel=1e-5)
    for key in ("final_loss", "final_flow_loss"):
        if key in runs[kept]:
            assert runs[lost][key] == pytest.approx(runs[kept][key], rel=1e-5), key
    steps = [json.loads(line)["step"] for line in (out / "trial_runs" / lost / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, MAX_STEPS + 1, 2))  # the history holds each step once
    client = MlflowClient(summary["mlflow_tracking_uri"])
    children = client.search_runs([client.get_run(summary["mlflow_parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['mlflow_parent_run_id']}'")
    assert len(children) == 2 and [c.info.status for c in children] == ["FINISHED"] * 2
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "flow_loss")]
        assert sorted(steps) == list(range(2, MAX_STEPS + 1, 2))  # no step twice, none missing


def test_lost_node_costs_at_most_one_checkpoint_interval(tmp_path, mlflow_server, loopback_cluster):
    """Two one-worker trials on two nodes; one of their nodes is killed (SIGKILL, no grace) once both hold
    a checkpoint, and a replacement node joins: the interrupted trial starts again on a live node from
    its latest checkpoint on the shared search folder and ends exactly as the uninterrupted one."""
    cluster = loopback_cluster
    space = write_space(tmp_path / "space.yaml", [POINT, POINT], num_samples=2, max_concurrent=2, max_steps=MAX_STEPS,
                        scheduler={"type": "none"}, report_every=2, overrides={"run.ckpt_every": CKPT_EVERY})
    out = tmp_path / "search"  # the shared path: every node's trials write their folders here
    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lsep_tune.search", "--space", str(space), "--output", str(out),
                             "--mlflow-uri", mlflow_server.uri, "--address", cluster.address],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            trials = list(out.glob("trial_runs/*"))
            if len(trials) == 2 and all(checkpoint_steps(t) and last_step(t / "metrics.jsonl") < MAX_STEPS
                                        for t in trials):
                break
            assert proc.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the trials did not both reach a checkpoint")
        trial_node = alive_actors(cluster, "ImplicitFunc")[0]["Address"]["NodeID"]
        cluster.kill(next(n for n in cluster.nodes if n.node_id == trial_node))  # the node and its trial die at once
        killed_at = time.time()
        at_kill = {t.name: (last_step(t / "metrics.jsonl"), checkpoint_steps(t)[-1]) for t in trials}
        cluster.add_node(1)  # the lost node's replacement
        restart_s = None
        while proc.poll() is None and time.time() < deadline:
            restarted = json.loads((out / "restarts.json").read_text()) if (out / "restarts.json").exists() else {}
            for trial_id in restarted:
                if restart_s is None and last_step(out / "trial_runs" / trial_id / "metrics.jsonl") > at_kill[trial_id][0]:
                    restart_s = time.time() - killed_at  # back past where it was when its node died
            time.sleep(0.2)
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    printed = (tmp_path / "search.log").read_text()
    assert proc.returncode == 0, printed[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    rows = {row["id"]: row for row in summary["trials"]}
    assert sorted(row["restarts"] for row in rows.values()) == [0, 1], rows
    (lost,) = [trial_id for trial_id, row in rows.items() if row["restarts"] == 1]
    (kept,) = set(rows) - {lost}
    assert all(row["status"] == "completed" and row["step"] == MAX_STEPS for row in rows.values())
    lost_run = json.loads((out / "trial_runs" / lost / "summary.json").read_text())
    kept_run = json.loads((out / "trial_runs" / kept / "summary.json").read_text())
    step_at_kill, ckpt_at_kill = at_kill[lost]
    # Resumed from the latest checkpoint it had, on the replacement node: at most one interval lost.
    assert lost_run["start_step"] == ckpt_at_kill > 0 and step_at_kill - lost_run["start_step"] <= CKPT_EVERY
    assert kept_run["start_step"] == 0 and lost_run["final_step"] == kept_run["final_step"] == MAX_STEPS
    ends_as_the_uninterrupted_trial(out, summary, lost, kept)
    print(f"\nrestart cost: {step_at_kill - lost_run['start_step']} steps lost "
          f"(step {step_at_kill} at the kill, resumed at {lost_run['start_step']}), "
          f"{restart_s if restart_s is None else round(restart_s, 1)} s from the kill back to step {step_at_kill}+")

    import optuna

    study = optuna.load_study(study_name=summary["optuna_study"], storage=summary["optuna_storage"])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2  # the lost trial once
    assert "127.0.0.1:" in printed and "192.0.2" not in printed  # the table's trial locations: loopback nodes


def test_two_workers_on_two_nodes_train_the_one_node_model(tmp_path, loopback_cluster):
    """A Ray Train run whose two workers sit on two nodes (gloo between two raylets) ends with the model
    a run of the same global batch in one process trains (`--workers 0`, no worker group to start): the
    equivalence tests/test_distributed.py shows on one node."""
    import ray

    from tests.test_distributed import TINY, assert_close_states, final_state, run_cli

    cluster = loopback_cluster
    earlier = set(cluster.cluster.global_state.actor_table(None))  # the module's earlier tests' actors
    try:
        rc, two, _ = run_cli(TINY + ["--workers", "2", "--set", "data.batch_size=8", "--address", cluster.address],
                             tmp_path, "two")
        assert rc == 0 and two["world_size"] == 2 and two["final_step"] == 10
        workers = [a for actor_id, a in cluster.cluster.global_state.actor_table(None).items()
                   if a["ActorClassName"] == "RayTrainWorker" and actor_id not in earlier]
        nodes = {a["Address"]["NodeID"] for a in workers}
        # each worker node has one CPU and the head none: two workers, two nodes, both on loopback
        assert len(workers) == 2 and len(nodes) == 2 and {a["Address"]["IPAddress"] for a in workers} == {"127.0.0.1"}
        assert nodes <= {n.node_id for n in cluster.nodes}
        assert len(set(two["replica_digests"])) == 1  # both ranks hold the same parameters
        rc, one, _ = run_cli(TINY + ["--workers", "0", "--set", "data.batch_size=16"], tmp_path, "one")
        assert rc == 0 and one["world_size"] == 1
        assert_close_states(final_state(two), final_state(one), rtol=1e-4, atol=1e-5)
    finally:
        ray.shutdown()


def test_a_trial_failing_past_max_failures_ends_failed_and_the_search_goes_on(tmp_path, mlflow_server,
                                                                              loopback_cluster):
    """A trial that fails on every start (it diverges) is started again budget.max_failures times, then
    ends failed; the other trial, on the other node, finishes."""
    import optuna
    import ray

    from lsep_tune.search.__main__ import main
    from lsep_tune.search.searcher import penalty

    space = write_space(tmp_path / "space.yaml", [{**POINT, "optim.lr": 1e4}, POINT], num_samples=2,
                        max_concurrent=2, max_steps=8, scheduler={"type": "none"}, report_every=2)
    out = tmp_path / "search"
    try:
        rc = main(["--space", str(space), "--output", str(out), "--mlflow-uri", mlflow_server.uri,
                   "--address", loopback_cluster.address])
    finally:
        ray.shutdown()
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    by_status = {row["status"]: row for row in summary["trials"]}
    assert sorted(by_status) == ["completed", "failed"]
    assert by_status["failed"]["restarts"] == 1 and "diverged" in by_status["failed"]["error"]  # max_failures: 1
    assert by_status["completed"]["restarts"] == 0 and by_status["completed"]["step"] == 8
    study = optuna.load_study(study_name=summary["optuna_study"], storage=summary["optuna_storage"])
    # each trial once; the failed one as the searcher hears a failure: the worst value, once
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.value for t in study.trials)[-1] == penalty("min")


def test_a_lost_worker_of_a_two_worker_trial_costs_at_most_one_checkpoint_interval(tmp_path, mlflow_server,
                                                                                     loopback_cluster):
    """A two-worker trial whose workers sit on two nodes loses one of them (SIGKILL of its node, no grace):
    Ray Train starts its worker group again on a replacement node from the latest checkpoint on the
    shared path, within the same Tune trial, and the trial ends exactly as an uninterrupted one."""
    import yaml

    cluster = loopback_cluster  # three 1-CPU nodes: one for the trial's own process, one per worker
    space = write_space(tmp_path / "space.yaml", [POINT, POINT], num_samples=2, max_concurrent=1, max_steps=MAX_STEPS,
                        scheduler={"type": "none"}, report_every=2, overrides={"run.ckpt_every": CKPT_EVERY})
    spec = yaml.safe_load(space.read_text())
    spec["budget"].update(workers_per_trial=2, max_failures=1)
    space.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "search"
    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lsep_tune.search", "--space", str(space), "--output", str(out),
                             "--mlflow-uri", mlflow_server.uri, "--address", cluster.address],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:  # the first trial holds a checkpoint and is still training
            runs = list(out.glob("trial_runs/*"))
            # a whole checkpoint: a step folder appears as Ray Train starts copying into it
            ckpts = sorted(int(p.name.split("_")[-1]) for p in out.glob("trials/*/step_*") if whole(p / STATE_FILE))
            if runs and ckpts and last_step(runs[0] / "metrics.jsonl") < MAX_STEPS:
                break
            assert proc.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first trial did not reach a checkpoint")
        workers = {a["Address"]["NodeID"] for a in alive_actors(cluster, "RayTrainWorker")}
        trial_nodes = {a["Address"]["NodeID"] for a in alive_actors(cluster, "ImplicitFunc")}
        assert len(workers) == 2 and not workers & trial_nodes  # two workers on two nodes, apart from the trial
        (trial,) = [r.name for r in out.glob("trial_runs/*")]
        step_at_kill = last_step(out / "trial_runs" / trial / "metrics.jsonl")
        ckpt_at_kill = int(latest(out / "trials" / trial).name.split("_")[-1])
        lost = [n for n in cluster.nodes if n.node_id == sorted(workers)[-1]][0]
        cluster.kill(lost)  # one worker dies with its node; the other and the trial's process live on
        cluster.add_node(1)  # the lost node's replacement, where the worker group starts again
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    printed = (tmp_path / "search.log").read_text()
    assert proc.returncode == 0, printed[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["id"]: row for row in summary["trials"]}
    assert all(row["status"] == "completed" and row["step"] == MAX_STEPS for row in rows.values()), rows
    (kept,) = set(rows) - {trial}
    lost_run = json.loads((out / "trial_runs" / trial / "summary.json").read_text())
    kept_run = json.loads((out / "trial_runs" / kept / "summary.json").read_text())
    # the restarted worker group went on from the latest checkpoint: at most one interval lost
    assert 0 < lost_run["start_step"] and lost_run["start_step"] >= ckpt_at_kill
    assert step_at_kill - lost_run["start_step"] <= CKPT_EVERY and kept_run["start_step"] == 0
    ends_as_the_uninterrupted_trial(out, summary, trial, kept)
    print(f"\nworker restart cost: {step_at_kill - lost_run['start_step']} steps lost "
          f"(step {step_at_kill} at the kill, resumed at {lost_run['start_step']})")
