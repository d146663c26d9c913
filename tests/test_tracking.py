"""tracking.py on its own, against a real MLflow store (a sqlite file): a run's params and tags, metrics
that a resumed run does not log twice, its end state, and the one-line problems of an unusable store."""
import socket

from lsep_tune import tracking


def test_a_run_keeps_each_metric_once_across_a_restart(tmp_path):
    uri = tracking.default_uri(tmp_path)
    parent = tracking.create_run(uri, {"a": 1}, {"kind": "search"}, "parent",
                                 artifact_location=tracking.artifact_location_for(uri, tmp_path))
    run_id = tracking.create_run(uri, {f"p{i}": i for i in range(150)}, {"k": 2}, "child", parent_run_id=parent)
    first = tracking.RunTracker(uri, run_id)
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step)
    again = tracking.RunTracker(uri, run_id)  # as after a restart from the checkpoint at step 2
    again.log_metrics({"loss": 9.0}, 2)  # already in MLflow: skipped
    again.log_metrics({"loss": 0.25, "final_fid": 5.0}, 4)
    again.log_metrics({"final_fid": 4.0}, 4)  # a metric's own high-water mark: logged once per step
    assert again.logged_through == 4
    again.set_tags({"best_trial": "t1"})
    (tmp_path / "note.txt").write_text("hi")
    again.log_artifact(tmp_path / "note.txt", "notes")
    again.finish("KILLED")
    client = tracking.client(uri)
    run = client.get_run(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [m.value for m in client.get_metric_history(run_id, "final_fid")] == [5.0]
    assert len(run.data.params) == 150 and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["k"] == "2" and run.data.tags["best_trial"] == "t1" and "torch.version" in run.data.tags
    assert run.info.status == "KILLED" and run.info.end_time
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert tracking.ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    # what a search on the default store prints: the command, then its run's page on `mlflow ui`
    page = tracking.runs_page(uri, run_id)
    assert page.startswith(tracking.LOCAL_UI)
    assert tracking.ui_command(uri, run_id) == f"mlflow ui --backend-store-uri {uri}, then open {page}"


def test_a_new_run_asks_the_store_once_before_its_first_metrics(tmp_path, monkeypatch):
    """Which steps a run already holds is read once per run, not once per metric: on an authenticated
    team server each request costs a password check (measured: 13 metrics, 6.6 s before the first step
    of a trial). Only a metric the run already holds (a restart) has its history read."""
    uri = tracking.default_uri(tmp_path)
    run_id = tracking.create_run(uri, {}, {}, "run")
    tracking.RunTracker(uri, run_id).log_metrics({"loss": 1.0}, 1)
    reads = []
    tracker = tracking.RunTracker(uri, run_id)  # a restart: "loss" has a history, the others do not
    for name in ("get_run", "get_metric_history"):
        real = getattr(tracker._client, name)
        monkeypatch.setattr(tracker._client, name, lambda *a, _real=real, _name=name: reads.append(_name) or _real(*a))
    tracker.log_metrics({f"m{i}": float(i) for i in range(12)} | {"loss": 0.5}, 1)  # step 1: loss logged before
    tracker.log_metrics({f"m{i}": float(i) for i in range(12)} | {"loss": 0.4}, 2)
    assert reads == ["get_run", "get_metric_history"]
    client = tracking.client(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.4)]
    assert [m.step for m in client.get_metric_history(run_id, "m3")] == [1, 2]


def test_an_unusable_store_is_one_line_and_an_outage_never_raises(tmp_path):
    (tmp_path / "file").write_text("")
    assert tracking.check_uri(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}").startswith("cannot create")
    assert tracking.check_uri("ftp://host/x") == "expected an http(s):// server, a sqlite:/// file or a local folder"
    assert tracking.check_uri(tracking.default_uri(tmp_path)) is None
    with socket.socket() as s:  # a free loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    away = f"http://127.0.0.1:{port}"
    assert tracking.check_uri(away, timeout=2).startswith("cannot reach the MLflow server")
    tracker = tracking.RunTracker(away, "0" * 32)
    tracker.log_metrics({"loss": 1.0}, 1)  # warns once, returns: training goes on
    tracker.finish("FINISHED")
    assert tracker.logged_through == 0
