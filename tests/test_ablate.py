"""`python -m lsep_tune.ablate`: arms x seeds on a real local Ray, tables, chart and MLflow runs."""
import csv
import math
import os

import pytest
import yaml

from lsep_tune.ablate import main
from lsep_tune.errors import InputError
from lsep_tune.search.ablation import table_rows, write_tables
from lsep_tune.search.arms_file import load_ablation

# On a loaded shared machine a Ray Train worker group can take more than Ray's default 60 s to start;
# set before the module's local Ray starts, so its workers inherit it.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

TINY = {"model.name": "SiT-Tiny/2", "objective.lsep.encoder_depth": 2, "data.batch_size": 32,
        "sampling.steps": 2, "sampling.grid_images": 10, "run.max_steps": 20, "run.log_every": 10,
        "run.ckpt_every": 20, "run.eval_every": 0}


def arms_file(path, **changes):
    data = {"base": {"preset": "digits"}, "overrides": TINY,
            "arms": {"none": {"objective.lsep.enabled": False}, "lsep": {}},
            "metrics": ["flow_loss", "loss"], "seeds": 2,
            "budget": {"max_concurrent": 2, "workers_per_trial": 1, "cpus_per_worker": 1}}
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tables_hold_one_row_per_metric_and_arm_and_every_seed(tmp_path):
    values = {"fid": {"a": [10.0, 12.0, 11.0], "b": [8.0, 9.0, 9.5], "c": [10.0, math.nan, 12.0]},
              "flow_loss": {"a": [0.5, 0.6, 0.55], "b": [0.5, 0.61, 0.56], "c": [0.4, 0.5, 0.45]}}
    files = write_tables(values, [0, 1, 2], tmp_path, "test")
    rows = list(csv.DictReader(open(files["table.csv"])))
    assert len(rows) == 6 and [r["arm"] for r in rows[:3]] == ["a", "b", "c"]
    assert [int(r["n"]) for r in rows] == [3, 3, 2, 3, 3, 3]  # a failed seed has no value
    b = rows[1]
    assert float(b["mean"]) == pytest.approx(8.8333, abs=1e-3) and float(b["diff"]) == pytest.approx(-2.1667, abs=1e-3)
    # differences -2, -3, -1.5: sd 0.7638, half width 4.302653 * 0.7638 / sqrt(3) = 1.8974
    assert float(b["ci_low"]) == pytest.approx(-4.064, abs=2e-3) and float(b["ci_high"]) == pytest.approx(-0.2694, abs=2e-4)
    assert rows[0]["diff"] == ""  # the first arm is the reference
    per_seed = list(csv.DictReader(open(files["values.csv"])))
    assert len(per_seed) == 2 * 3 * 3 and {r["seed"] for r in per_seed} == {"0", "1", "2"}
    md = files["table.md"].read_text()
    assert md.count("\n| a |") == 2 and "## fid" in md and "## flow_loss" in md and "[-4.064, -0.2694]" in md
    assert files["bars.png"].stat().st_size > 1000
    assert table_rows(values)[2]["n"] == 2


def test_the_shipped_arms_and_bad_files(tmp_path):
    spec, arms, _ = load_ablation("digits")
    assert [a.name for a in arms] == ["none", "lsep", "sra", "lsep+sra"] and spec.seeds == 3
    assert [(a.config.objective.lsep.enabled, a.config.objective.sra.enabled) for a in arms] == [
        (False, False), (True, False), (False, True), (True, True)]
    assert load_ablation("digits", seeds=5, max_steps=7)[1][0].config.run.max_steps == 7
    bad = {
        "arms.lsep.optim.lrr": {"arms": {"none": {}, "lsep": {"optim.lrr": 1.0}}},
        "arms": {"arms": {"only": {}}},
        "metrics": {"metrics": ["fidd"]},
        "seeds": {"seeds": 1},
        "optim.lr": {"arms": {"none": {}, "neg": {"optim.lr": -1.0}}},
    }
    for field, change in bad.items():
        path = arms_file(tmp_path / "bad.yaml", **change)
        with pytest.raises(InputError) as err:
            load_ablation(str(path))
        assert f": {field}: " in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_arms_and_space_files_read_their_base_and_yaml_alike(tmp_path):
    """One base: resolver and one YAML loader for arms files and search spaces: the same fields blamed."""
    from lsep_tune.search.space import SpaceError, load_space

    space = {"base": {"config": "nope.yaml"}, "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}},
             "metric": "flow_loss", "budget": {"num_samples": 1}}
    for base, field, expectation in [({"config": "nope.yaml"}, "base.config", f"no such file {tmp_path / 'nope.yaml'}"),
                                     ({"preset": "nope"}, "base.preset", "unknown preset 'nope', expected one of")]:
        arms = arms_file(tmp_path / "arms.yaml", base=base)
        with pytest.raises(InputError) as err:
            load_ablation(str(arms))
        assert str(err.value).startswith(f"{arms}: {field}: {expectation}"), str(err.value)
        (tmp_path / "space.yaml").write_text(yaml.safe_dump({**space, "base": base}))
        with pytest.raises(SpaceError) as err:
            load_space(tmp_path / "space.yaml")
        assert str(err.value).startswith(f"{tmp_path / 'space.yaml'}: {field}: {expectation}"), str(err.value)
    (tmp_path / "broken.yaml").write_text("base: [")
    with pytest.raises(InputError, match=r": <file>: invalid YAML: "):
        load_ablation(str(tmp_path / "broken.yaml"))


def test_cli_bad_input_exits_2_before_anything(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--arms", str(arms_file(tmp_path / "a.yaml", seeds=1)), "--output", str(out)]) == 2
    assert main(["--arms", "nosuch", "--output", str(out)]) == 2
    assert main(["--arms", str(arms_file(tmp_path / "b.yaml")), "--seeds", "1", "--output", str(out)]) == 2
    big = arms_file(tmp_path / "big.yaml", budget={"workers_per_trial": 1, "cpus_per_worker": (os.cpu_count() or 1) * 8})
    assert main(["--arms", str(big), "--output", str(out)]) == 2
    assert main(["--arms", "digits", "--max-steps", "0", "--output", str(out), "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert err[0].startswith(f"error: {tmp_path / 'a.yaml'}: seeds: ")
    assert err[1].startswith("error: --arms: nosuch: no such file or shipped arms (digits, digits-budget)")
    assert err[2].startswith("error: --seeds: 1: expected 2 or more")  # the flag the user typed
    assert err[3].startswith(f"error: {big}: budget.workers_per_trial: ")
    assert err[4].startswith("error: command line: arguments: unrecognized arguments: --no-such-flag")
    assert not out.exists()
    import ray

    assert not ray.is_initialized()  # refused before Ray started


@pytest.mark.slow
def test_ablation_trains_arms_x_seeds_and_writes_the_table(tmp_path, ray_local, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "abl"
    assert main(["--arms", str(arms_file(tmp_path / "arms.yaml")), "--output", str(out),
                 "--mlflow-uri", mlflow_server.uri]) == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(r["metric"], r["arm"], r["n"]) for r in rows] == [
        ("flow_loss", "none", "2"), ("flow_loss", "lsep", "2"), ("loss", "none", "2"), ("loss", "lsep", "2")]
    # LSEP adds its probe loss to the total: lsep's loss exceeds its flow loss, none's equals it.
    per_seed = {(r["metric"], r["arm"], r["seed"]): float(r["value"]) for r in csv.DictReader(open(out / "values.csv"))}
    assert len(per_seed) == 8
    for seed in ("0", "1"):
        assert per_seed[("loss", "lsep", seed)] > per_seed[("flow_loss", "lsep", seed)]
        assert per_seed[("loss", "none", seed)] == pytest.approx(per_seed[("flow_loss", "none", seed)])
    assert (out / "bars.png").stat().st_size > 1000 and "## flow_loss" in (out / "table.md").read_text()

    import json

    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and {c.data.tags["lsep_tune.role"] for c in children} == {"ablation"}
    assert all(c.info.status == "FINISHED" and c.info.end_time for c in children)  # their true end state
    assert sorted((c.data.tags["lsep_tune.arm"], c.data.tags["lsep_tune.seed"]) for c in children) == [
        ("lsep", "0"), ("lsep", "1"), ("none", "0"), ("none", "1")]
    assert "ablation_lsep_flow_loss_ci_high" in parent.data.metrics and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")} >= {
        "ablation/table.md", "ablation/table.csv", "ablation/bars.png"}


@pytest.mark.slow
def test_a_sigterm_ends_the_ablation_and_its_runs_killed(tmp_path, ray_local, mlflow_server, monkeypatch, capsys):
    """`ray job stop`, scancel or a deleted pod send SIGTERM: the ablation ends with the shell's exit code
    for it, its open runs and its own MLflow run KILLED (not left RUNNING), no table written."""
    import signal

    from mlflow.tracking import MlflowClient

    from lsep_tune.search import ablation

    client = MlflowClient(mlflow_server.uri)

    def stopped_mid_run(arms, seeds, resources, paths, role):
        parent = client.get_run(paths.parent_run_id)
        client.create_run(parent.info.experiment_id, tags={"mlflow.parentRunId": paths.parent_run_id})  # a run mid-way
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to the command's own handler
        return {}

    monkeypatch.setattr(ablation, "run_arms", stopped_mid_run)
    out = tmp_path / "abl"
    assert main(["--arms", str(arms_file(tmp_path / "arms.yaml")), "--output", str(out),
                 "--mlflow-uri", mlflow_server.uri]) == 128 + 15
    assert "ablation stopped (SIGTERM)" in capsys.readouterr().out
    parent = client.search_runs([client.get_experiment_by_name("lsep_tune").experiment_id],
                                filter_string=f"tags.output = '{out.resolve()}'")
    assert len(parent) == 1 and parent[0].info.status == "KILLED" and parent[0].info.end_time
    children = client.search_runs([parent[0].info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert [c.info.status for c in children] == ["KILLED"]
    assert not (out / "table.md").exists()


def test_the_budget_arms_compare_the_digits_space_first_point_with_its_corners():
    from lsep_tune.search.space import load_space

    spec, arms, _ = load_ablation("digits-budget")
    space = load_space("digits")
    first = space.trial_config(space.points_to_evaluate[0])
    assert arms[0].name == "paper" and arms[0].config.objective == first.objective  # the reference
    assert arms[0].config.model == first.model and spec.seeds >= 3
    fast = arms[1].config.objective.lsep
    assert (fast.uncond_prob, fast.probe_lr, fast.crop_start, fast.weights_type, fast.weight) == (0.5, 0.1, None, "constant", 0.1)
    assert all(a.config.run.eval_every == 100 and a.config.run.max_steps == 500 for a in arms)
