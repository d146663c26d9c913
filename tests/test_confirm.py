"""Confirmation on fresh seeds: real Ray Tune trials through the search's trial function, real MLflow."""
import json
import math
import os

import pytest
import yaml

from lsep_tune.errors import InputError
from lsep_tune.search.arms import ROLE_TAG
from lsep_tune.search.confirm import ConfirmConfig, confirm_search, top_configurations
from lsep_tune.search.space import SearchSpace, SpaceError
from lsep_tune.stats import NO_DIFFERENCE

# On a loaded shared machine a Ray Train worker group can take more than Ray's default 60 s to start;
# set before the module's local Ray starts, so its workers inherit it.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

TINY = {
    "model.name": "SiT-Tiny/2", "objective.lsep.encoder_depth": 2, "data.batch_size": 32,
    "sampling.steps": 2, "sampling.grid_images": 10, "run.ckpt_every": 30, "run.eval_every": 0,
}


def tiny_space(points, confirm=None) -> SearchSpace:
    return SearchSpace({
        "base": {"preset": "digits"},
        "overrides": TINY,
        "params": {"optim.lr": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
                   # no effect on training: two configs that differ only here train the same model
                   "sampling.cfg_scale": {"type": "choice", "values": [1.0, 1.5]}},
        "metric": {"name": "flow_loss", "mode": "min"},
        "scheduler": {"type": "none"},
        "budget": {"num_samples": 2, "max_concurrent": 2, "workers_per_trial": 1, "cpus_per_worker": 1,
                   "max_steps": 30},
        "report_every": 10,
        "seed": 0,
        "points_to_evaluate": points,
        **({"confirm": confirm} if confirm is not None else {}),
    }, "tiny.yaml")


def search_paths(tmp_path, uri):
    from lsep_tune import tracking
    from lsep_tune.search.trials import SearchPaths

    parent = tracking.create_run(uri, {}, {"lsep_tune.kind": "search"}, run_name="search-test",
                                 experiment=f"confirm-{tmp_path.name}")
    return SearchPaths(tmp_path, uri, parent)


def row(trial_id, params, metric):
    """A search table row as the runner writes it (what confirmation reads from the search)."""
    return {"id": trial_id, "status": "completed", "params": params, "metric": metric, "step": 30, "error": None}


def test_confirm_key_of_a_space_file_and_fresh_seeds():
    c = tiny_space([], {"top_k": 2, "seeds": 3}).confirm
    assert c.baseline == "first_point" and c.fresh_seeds({0}) == [1000, 1001, 1002]
    assert tiny_space([]).confirm is None and "confirm" not in tiny_space([]).to_dict()
    space = tiny_space([], {"seeds": [5, 6], "baseline": {"optim.lr": 1e-3}})
    assert space.confirm.fresh_seeds({0}) == [5, 6]
    # a baseline mapping is completed like a known-good point: a param it leaves out takes the base value
    assert space.confirm.baseline == {"optim.lr": 1e-3, "sampling.cfg_scale": 1.0}
    logged = space.to_dict()
    assert logged["confirm"] == {"top_k": 2, "seeds": [5, 6], "baseline": {"optim.lr": 1e-3, "sampling.cfg_scale": 1.0}}
    assert SearchSpace(logged, "again.yaml").confirm == space.confirm  # parses back
    smoke = tiny_space([], {"top_k": 3, "seeds": [5, 6, 7]}).smoke().confirm
    assert (smoke.top_k, smoke.seeds) == (1, [5, 6])
    assert tiny_space([], {"top_k": 3, "seeds": 4}).smoke().confirm.seeds == 2
    for raw, field in (({"seeds": 1}, "confirm.seeds"), ({"top_k": 0}, "confirm.top_k"),
                       ({"topk": 2}, "confirm.topk"), ({"baseline": "best"}, "confirm.baseline"),
                       ({"seeds": [3, 3]}, "confirm.seeds"),
                       ({"baseline": {"optim.lr": 1.0}}, "confirm.baseline.optim.lr"),
                       ({"baseline": {"optim.lrr": 1e-3}}, "confirm.baseline.optim.lrr"),
                       ({"seeds": [0, 1]}, "confirm.seeds")):  # 0: the search's own training seed
        with pytest.raises(SpaceError) as err:
            tiny_space([], raw)
        assert str(err.value).startswith(f"tiny.yaml: {field}: ") and "\n" not in str(err.value), str(err.value)
    with pytest.raises(InputError, match="confirm.seeds: \\[0\\] were used by the search"):
        ConfirmConfig(seeds=[0, 1]).fresh_seeds({0}, "s.yaml")


def test_top_configurations_prefers_finished_trials_and_skips_duplicates():
    rows = [row("a", {"x": 1}, 5.0), row("b", {"x": 2}, 3.0), row("c", {"x": 2}, 2.0),
            {**row("d", {"x": 3}, 0.1), "step": 10}, {**row("e", {"x": 4}, None), "status": "failed"}]
    assert [r["id"] for r in top_configurations(rows, 3, "min")] == ["c", "a", "d"]
    assert [r["id"] for r in top_configurations(rows, 1, "max")] == ["a"]


def child_runs(uri, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client, client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_confirmation_names_the_good_configuration(tmp_path, ray_local, mlflow_server):
    """The baseline learns 100x too slowly: the confirmed winner is the other one, beyond noise."""
    space = tiny_space([{"optim.lr": 1e-3, "sampling.cfg_scale": 1.0}], None)
    settings = ConfirmConfig(top_k=1, seeds=3, baseline={"optim.lr": 1e-5, "sampling.cfg_scale": 1.0})
    paths = search_paths(tmp_path, mlflow_server.uri)
    rows = [row("good", {"optim.lr": 1e-3, "sampling.cfg_scale": 1.0}, 0.5)]
    out = confirm_search(space, rows, paths, settings)

    assert out["winner"] == "top1" and out["winner_params"]["optim.lr"] == 1e-3
    assert out["seeds"] == [1000, 1001, 1002]
    base, top = out["configs"]
    assert base["name"] == "baseline" and len(base["values"]) == 3 and all(math.isfinite(v) for v in base["values"])
    assert top["origin"] == "trial good" and top["search_metric"] == 0.5
    d = top["difference"]
    assert d["ci_high"] < 0 and top["beats_baseline"] and d["n"] == 3
    assert d["mean"] == pytest.approx(top["mean"] - base["mean"])
    assert out["verdict"].startswith("top1 beats the baseline on flow_loss")
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["optim"]["lr"] == 1e-3
    assert json.loads((tmp_path / "confirmation" / "confirmation.json").read_text())["winner"] == "top1"

    client, children = child_runs(mlflow_server.uri, paths.parent_run_id)
    assert len(children) == 6 and {c.data.tags[ROLE_TAG] for c in children} == {"confirmation"}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["run.seed"] for c in children) == ["1000", "1000", "1001", "1001", "1002", "1002"]
    parent = client.get_run(paths.parent_run_id)
    assert parent.data.metrics["confirm_top1_flow_loss_ci_high"] == pytest.approx(d["ci_high"])
    assert parent.data.tags["confirm.winner"] == "top1"
    arts = [a.path for a in client.list_artifacts(paths.parent_run_id, "confirmation")]
    assert "confirmation/confirmation.png" in arts


@pytest.mark.slow
def test_identical_configurations_keep_the_baseline(tmp_path, ray_local, mlflow_server):
    """The search's "best" differs from the baseline only where training never looks: no difference
    beyond noise, and best.yaml is the baseline, not the search's pick."""
    first = {"optim.lr": 1e-3, "sampling.cfg_scale": 1.0}
    space = tiny_space([first], None)
    paths = search_paths(tmp_path, mlflow_server.uri)
    rows = [row("lucky", {"optim.lr": 1e-3, "sampling.cfg_scale": 1.5}, 0.4), row("first", first, 0.6)]
    out = confirm_search(space, rows, paths, ConfirmConfig(top_k=2, seeds=2))

    assert [c["name"] for c in out["configs"]] == ["baseline", "top1"]  # "first" is the baseline itself
    base, top = out["configs"]
    assert base["origin"] == "points_to_evaluate[0]" and top["params"]["sampling.cfg_scale"] == 1.5
    assert not top["beats_baseline"] and top["difference"]["ci_low"] <= 0 <= top["difference"]["ci_high"]
    assert out["winner"] == "baseline" and out["verdict"].startswith(NO_DIFFERENCE)
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["sampling"]["cfg_scale"] == 1.0


def test_confirmation_runs_evaluate_at_the_end_only():
    """The search's ASHA rung evaluations are waste in a confirmation run, judged at max_steps alone."""
    from lsep_tune.search.confirm import end_only
    from lsep_tune.search.space import load_space

    space = load_space("digits")
    cfg = space.trial_config(space.points_to_evaluate[0])
    assert 0 < cfg.run.eval_every < cfg.run.max_steps  # the rung evaluation the search needs
    end = end_only(cfg)
    assert end.run.eval_every == cfg.run.max_steps == end.run.max_steps
    end.run.eval_every = cfg.run.eval_every
    assert end == cfg  # nothing else changes
    cfg.run.eval_every = 0  # a run that does not evaluate stays so
    assert end_only(cfg).run.eval_every == 0


def test_confirm_search_trains_end_only_configs_and_writes_the_searched_one(tmp_path, monkeypatch):
    """The wiring, without the training: the arms confirm_search hands to the runs evaluate at the end
    only, and best.yaml is the config the search trained (its rung evaluations included)."""
    from types import SimpleNamespace

    from lsep_tune.search import confirm as confirm_module
    from lsep_tune.search.space import load_space

    space = load_space("digits")
    trained = {}

    def runs(arms, seeds, resources, sub, metric, mode, max_steps=None):
        trained.update({a.name: a.config for a in arms})
        sub.output.mkdir(parents=True)
        return {"configs": [{"name": a.name, "origin": a.origin} for a in arms], "winner": "baseline"}

    monkeypatch.setattr(confirm_module, "confirm", runs)
    point = {**space.points_to_evaluate[0], "objective.lsep.uncond_prob": 0.6}
    rows = [{"id": "t1", "status": "completed", "step": space.budget.max_steps, "metric": 30.0, "params": point}]
    paths = SimpleNamespace(output=tmp_path, mlflow_uri="unused", parent_run_id="unused")
    confirm_search(space, rows, paths, space.confirm)
    assert set(trained) == {"baseline", "top1"}
    assert all(c.run.eval_every == c.run.max_steps == space.budget.max_steps for c in trained.values())
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["run"]["eval_every"] == space.base_config().run.eval_every < space.budget.max_steps
