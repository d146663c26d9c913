"""What an MLflow user looks for, read back from a real `mlflow server`: the link that opens the runs
table, the chosen model on the search's parent run (and in the registry), each training run's dataset
input, and the searched parameters as params of the trial runs."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from lsep_tune import mlflow_model, tracking
from lsep_tune.checkpoint import save_ema
from lsep_tune.config import load_config
from lsep_tune.data import identity
from lsep_tune.models.sit import sit_from_config
from tests.test_search import GOOD, TINY_OVERRIDES, child_runs, write_space


def tiny_config():
    return load_config("digits", overrides=[f"{k}={v}" for k, v in TINY_OVERRIDES.items()])


def runs_page(server_uri: str, experiment_id: str, view: str | None = None) -> str:
    page = f"{server_uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{page}&viewStateShareKey={view}" if view else page


def test_a_run_links_its_runs_table_records_its_data_and_its_model_loads_back(tmp_path, mlflow_server):
    cfg = tiny_config()
    run_id = tracking.create_run(mlflow_server.uri, cfg.flat(), {}, run_name="tiny")
    tracking.log_dataset(mlflow_server.uri, run_id, identity(cfg.data))

    client = tracking.client(mlflow_server.uri)
    run = client.get_run(run_id)
    assert tracking.ui_command(mlflow_server.uri, run_id) == \
        f"open {runs_page(mlflow_server.uri, run.info.experiment_id)} in a browser"
    tracking.share_runs_view(mlflow_server.uri, run_id, ["fid"], ["optim.lr"], ascending=True)
    assert tracking.ui_command(mlflow_server.uri, run_id) == \
        f"open {runs_page(mlflow_server.uri, run.info.experiment_id, run_id)} in a browser"  # its saved view
    view = json.loads(client.get_experiment(run.info.experiment_id).tags[f"mlflow.sharedViewState.{run_id}"])
    assert view == {"selectedColumns": ["attributes.`Models`", "attributes.`Dataset`", "metrics.`fid`", "params.`optim.lr`"],
                    "orderByKey": "metrics.`fid`", "orderByAsc": True}
    local = "sqlite:///x/mlflow.db"
    assert tracking.ui_command(local) == f"mlflow ui --backend-store-uri {local}"  # no run: no page to name

    (recorded,) = run.inputs.dataset_inputs
    digits = identity(cfg.data)
    assert recorded.dataset.name == digits.name
    assert recorded.dataset.digest == digits.digest and len(digits.digest) == 16
    assert json.loads(recorded.dataset.source)["uri"].endswith("digits.csv.gz")
    assert {t.key: t.value for t in recorded.tags}["mlflow.data.context"] == "train"

    torch.manual_seed(0)
    sit = sit_from_config(cfg.model)
    ema = save_ema(tmp_path / "ema_final.pt", 7, sit.state_dict(), cfg.to_dict())
    logged = mlflow_model.log_model(mlflow_server.uri, run_id, ema, registered_name="tiny-digits")
    assert logged["registered_model"] == "models:/tiny-digits/1"
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert logged["mlflow_model_uri"] == f"models:/{model.model_id}" and model.source_run_id == run_id
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    for uri in (logged["mlflow_model_uri"], f"runs:/{run_id}/model", logged["registered_model"]):
        back = mlflow_model.load_model(uri, mlflow_server.uri)
        assert back.step == 7 and back.config == cfg
        assert all(torch.equal(back.state[k], v) for k, v in sit.state_dict().items())


@pytest.mark.slow
def test_a_confirmed_search_leaves_its_winner_model_data_and_params_where_mlflow_users_look(tmp_path, mlflow_server):
    """A search with `confirm:`: the best trial and the baseline (the first point) are trained again on
    fresh seeds as nested runs of the search, summary.json holds the confirmation, best.yaml is its
    winner, the console prints the verdict; and MLflow holds what its users look for (one search for both)."""
    from lsep_tune.search.arms import ROLE_TAG

    space = write_space(tmp_path / "space.yaml", [{"optim.lr": 1e-8}, GOOD], num_samples=2, max_steps=20,
                        scheduler={"type": "none"}, report_every=10,
                        confirm={"top_k": 1, "seeds": [7, 8], "baseline": "first_point"})
    out = tmp_path / "search"
    done = subprocess.run([sys.executable, "-m", "lsep_tune.search", "--space", str(space), "--output", str(out),
                           "--mlflow-uri", mlflow_server.uri, "--register-model", "digits-search"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout
    summary = json.loads((out / "summary.json").read_text())
    client, parent, children = child_runs(summary)
    experiment = parent.info.experiment_id

    # The confirmation: both configurations on the given seeds, its verdict printed, best.yaml its winner.
    confirmed = summary["confirmation"]
    assert confirmed["seeds"] == [7, 8] and [x["name"] for x in confirmed["configs"]] == ["baseline", "top1"]
    base, top = confirmed["configs"]
    assert base["params"] == {"optim.lr": 1e-8, "objective.lsep.uncond_prob": 0.9}
    assert base["origin"] == "points_to_evaluate[0]" and top["origin"] == f"trial {summary['best_trial']}"
    assert top["params"] == summary["best_params"] and len(top["values"]) == 2
    assert {"mean", "ci_low", "ci_high"} <= set(top["difference"]) and confirmed["verdict"]
    assert f"confirmation: {confirmed['verdict']}" in printed
    chosen = next(x for x in confirmed["configs"] if x["name"] == confirmed["winner"])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["optim"]["lr"] == chosen["params"]["optim.lr"]
    assert summary["best_config"]["optim"]["lr"] == chosen["params"]["optim.lr"]
    confirmation = [r for r in children if r.data.tags.get(ROLE_TAG) == "confirmation"]
    assert len(children) == 2 + 4 and len(confirmation) == 4
    assert all(r.info.status == "FINISHED" and r.info.end_time for r in children)
    assert sorted(r.info.run_name for r in confirmation) == [
        "confirmation: baseline, seed 7", "confirmation: baseline, seed 8",
        "confirmation: top1, seed 7", "confirmation: top1, seed 8"]
    assert parent.info.status == "FINISHED" and "confirm_top1_flow_loss_ci_high" in parent.data.metrics
    assert parent.data.tags["confirm.winner"] == confirmed["winner"]

    # The printed line and the summary open the experiment on its runs table, in the view the search
    # saved: the metric and the searched parameters as columns, best first.
    assert summary["mlflow_runs_url"] == runs_page(mlflow_server.uri, experiment, parent.info.run_id)
    assert f"MLflow: open {summary['mlflow_runs_url']} in a browser" in printed
    view = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{parent.info.run_id}"])
    assert view["selectedColumns"][-3:] == ["metrics.`flow_loss`", "params.`optim.lr`", "params.`objective.lsep.uncond_prob`"]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`flow_loss`", True)

    # The confirmed winner is the parent run's model, registered, and samples again through our loader.
    (model,) = client.search_logged_models([experiment], filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert summary["mlflow_model_uri"] == f"models:/{model.model_id}"
    assert summary["registered_model"] == "models:/digits-search/1"
    version = client.get_model_version("digits-search", "1")
    assert (version.source, version.run_id) == (f"models:/{model.model_id}", parent.info.run_id)
    assert f"MLflow model: models:/{model.model_id}, registered as models:/digits-search/1" in printed
    back = mlflow_model.load_model(f"runs:/{parent.info.run_id}/model", mlflow_server.uri)
    assert back.config.optim.lr == best["optim"]["lr"] and back.config.run.seed == 7  # the winner's first seed
    assert "/confirmation/trial_runs/" in summary["model_checkpoint"]
    from lsep_tune.sample.batch import generate_samples

    images, labels = generate_samples(back, 10, steps=2)
    assert images.shape == (10, 8, 8, 1) and sorted(labels.tolist()) == list(range(10))
    assert confirmed["winner"] in ("baseline", "top1")

    # Every training run (search trials and confirmation runs) records the digits split it trained on.
    digits = identity(tiny_config().data)
    for child in children:
        (recorded,) = child.inputs.dataset_inputs
        assert (recorded.dataset.name, recorded.dataset.digest) == (digits.name, digits.digest)

    # The searched parameters are params of every search trial, under their own names.
    trials = [c for c in children if ROLE_TAG not in c.data.tags]
    assert len(trials) == 2
    for trial in trials:
        for name in ("optim.lr", "objective.lsep.uncond_prob"):
            assert trial.data.params[name] == trial.data.tags[f"searched.{name}"]
