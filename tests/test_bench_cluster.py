"""`bench cluster`: its figures, small. The run itself is a benchmark (docs/PERFORMANCE.md), not a timed test."""
import json

import pytest

from lsep_tune.bench.__main__ import main
from lsep_tune.bench.cluster import REPORT_KEYS, RESULT_KEYS, growth, slot_delays, spread


def test_slot_delays_pair_each_freed_slot_with_the_start_that_took_it():
    # Two slots: trials start at 0 and 1; ends at 10 and 12 free slots taken at 11 and 15; the 5th waits on 14.
    assert slot_delays([0, 1, 11, 15, 16], [10, 12, 14, 20, 21]) == [1, 3, 2]
    assert slot_delays([0, 1], []) == []
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "p90": 3.0, "max": 3.0, "mean": 2.0, "n": 3}
    assert spread([])["n"] == 0


def test_growth_is_the_largest_size_over_the_smallest():
    small = {k: 2.0 for k in RESULT_KEYS}
    large = {k: 3.0 for k in RESULT_KEYS}
    assert set(growth([small, large]).values()) == {1.5}
    assert growth([small]) == {}


def test_sql_writes_are_counted_where_the_stores_make_them(tmp_path):
    import optuna

    from lsep_tune.bench import writes

    writes.install(tmp_path / "sql")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    counted = writes.read(tmp_path / "sql")["optuna"]
    assert counted["write_statements"] >= 3 * 3  # per trial at least: the trial, its param, its value
    assert counted["commits"] >= 3 and counted["reads"] > 0
    assert counted["writes"] >= counted["write_statements"]


@pytest.mark.parametrize("flags, source", [
    (["--sizes", "10,x"], "--sizes"),
    (["--sizes", "0"], "--sizes"),
    (["--nodes", "0"], "--nodes"),
    (["--slots-per-trial", "9"], "--slots-per-trial"),
    (["--steps", "1"], "--steps"),
    (["--max-concurrent", "0"], "--max-concurrent"),
])
def test_bad_flags_are_one_line_exit_2_before_anything_starts(capsys, tmp_path, no_local_ray, flags, source):
    out = tmp_path / "bench"
    assert main(["cluster", "--output", str(out)] + flags) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and source in captured.err
    assert not out.exists()


@pytest.mark.slow
def test_bench_cluster_reports_every_figure_of_a_small_simulated_cluster(capsys, tmp_path):
    # Two nodes of one slot each, trials of one slot, two at once: the third trial waits for a freed slot.
    assert main(["cluster", "--sizes", "3", "--nodes", "2", "--slots-per-node", "1", "--slots-per-trial", "1",
                 "--max-concurrent", "2", "--steps", "2", "--output", str(tmp_path / "b"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == set(REPORT_KEYS)
    assert report["sizes"] == [3] and report["nodes"] == 2 and report["growth"] == {}
    (r,) = report["results"]
    assert set(r) == set(RESULT_KEYS)
    assert r["trials"] == r["trials_started"] == r["trials_finished"] == 3 and r["trials_errored"] == 0
    assert r["slot_capacity"] == 2 and 1 <= r["concurrent_seen"] <= 2
    # driver_cpu_s is rounded to 0.01 s and the per-trial figure to 0.0001 s: a third of 0.005 apart at most
    assert r["driver_cpu_s"] > 0 and r["driver_cpu_s_per_trial"] == pytest.approx(r["driver_cpu_s"] / 3, abs=0.002)
    assert r["driver_peak_rss_bytes"] >= r["driver_rss_before_bytes"] > 0
    assert 0 < r["tune_experiment_state_bytes"] <= r["tune_folder_bytes"]
    # The trials' own processes write to MLflow (metrics), the driver to both stores.
    assert r["mlflow_writes"] > r["mlflow_writes_driver"] > 0
    assert r["mlflow_write_rows"] >= r["mlflow_writes"] and r["mlflow_write_commits"] > 0
    assert r["optuna_writes"] == r["optuna_writes_driver"] >= 3 * 3  # a trial, its params, its value
    for store in ("mlflow", "optuna"):
        assert r[f"{store}_writes_per_trial"] == pytest.approx(r[f"{store}_writes"] / 3, abs=1e-3)
        assert 0 < r[f"{store}_writes_per_s"] <= r[f"{store}_peak_writes_per_s"]
    delays = r["sched_delay_s"]
    assert 1 <= delays["n"] <= 2 and 0 <= delays["median"] <= delays["max"]  # the third trial waited
    assert 0 < r["first_result_s"]["median"] <= r["trial_s"]["max"] <= r["search_wall_s"]
    events = json.loads((tmp_path / "b" / "size-3" / "trial_events.json").read_text())
    assert len(events) == 3 and all(e["start"] <= e["first_result"] <= e["end"] for e in events.values())
