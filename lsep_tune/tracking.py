"""MLflow tracking: one run per training run (nested under a search's parent run when searching).

The driver creates the run and logs what is known up front (params, tags); rank 0 of the training
logs metrics and artifacts into that run id, also after a restart. A metric's steps already in
MLflow are skipped, so a run resumed from a checkpoint leaves no duplicated steps; each metric keeps
its own high-water mark, so a `final_*` metric logged at the last training step still arrives. Tracking is never
allowed to stop training: an outage warns once and the loop goes on.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

DEFAULT_EXPERIMENT = "lsep_tune"

# Fail fast when the server is away instead of retrying for minutes inside a training step.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def default_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


# `mlflow ui` serves here by default; MLflow 3 opens an experiment on its GenAI overview unless the
# page is asked for the runs tab of the machine-learning view (routes of MLflow 3.17's UI).
LOCAL_UI = "http://127.0.0.1:5000"
RUNS_VIEW = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"


# MLflow's UI keeps a shared runs-table view (its columns, its order) in an experiment tag named so,
# and opens it with `?viewStateShareKey=<suffix>`: the page a search prints shows its metrics and its
# searched parameters as columns, best first, instead of the default attribute columns.
VIEW_TAG = "mlflow.sharedViewState."
VIEW_PARAM = "viewStateShareKey"
DEFAULT_COLUMNS = ("attributes.`Models`", "attributes.`Dataset`")  # MLflow's defaults but Source, empty here


def runs_url(server: str, experiment_id: str, view: str | None = None) -> str:
    """The page that opens `experiment_id` on its runs table (as the saved view `view`, when given)."""
    url = f"{server.rstrip('/')}/{RUNS_VIEW.format(experiment_id=experiment_id)}"
    return f"{url}&{VIEW_PARAM}={view}" if view else url


def share_runs_view(uri: str, run_id: str, metrics: list[str], params: list[str], ascending: bool = True) -> None:
    """Save the runs-table view of `run_id`'s experiment under the run's id: the first metric, the other
    metrics and the params as columns, runs sorted on the first metric (`ascending` for a metric to
    minimize). `runs_page` links to it."""
    c = client(uri)
    experiment = c.get_run(run_id).info.experiment_id
    columns = [*DEFAULT_COLUMNS, *(f"metrics.`{m}`" for m in metrics), *(f"params.`{p}`" for p in params)]
    view = {"selectedColumns": columns}
    if metrics:
        view.update(orderByKey=f"metrics.`{metrics[0]}`", orderByAsc=ascending)
    c.set_experiment_tag(experiment, VIEW_TAG + run_id, json.dumps(view))


def runs_page(uri: str, run_id: str | None) -> str | None:
    """The address of the runs table of `run_id`'s experiment (for a local store, as `mlflow ui`
    serves it by default), opened on the run's saved view where it has one; None when the experiment
    cannot be read."""
    if not run_id:
        return None
    try:
        c = client(uri)
        experiment = c.get_run(run_id).info.experiment_id
        saved = VIEW_TAG + run_id in c.get_experiment(experiment).tags
    except Exception:  # noqa: BLE001 - a link is a convenience; the store's own errors surface elsewhere
        return None
    server = uri if uri.startswith(("http://", "https://")) else LOCAL_UI
    return runs_url(server, experiment, run_id if saved else None)


def ui_command(uri: str, run_id: str | None = None) -> str:
    """What to run or open to see the runs: with `run_id`, the address of its experiment's runs table."""
    page = runs_page(uri, run_id)
    if uri.startswith(("http://", "https://")):
        return f"open {page or uri} in a browser"
    command = f"mlflow ui --backend-store-uri {uri}"
    return f"{command}, then open {page}" if page else command


def check_uri(uri: str, timeout: float = 5.0) -> str | None:
    """None when the tracking store can be used, else what is wrong (for a one-line error)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    return f"{uri}/health answered HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            return f"cannot reach the MLflow server ({getattr(err, 'reason', err)})"
        return None
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"cannot create {folder} ({err.strerror})"
        return None if os.access(folder, os.W_OK) else f"{folder} is not writable"
    if uri.startswith(("file:", "/")) or "://" not in uri:
        return None
    return "expected an http(s):// server, a sqlite:/// file or a local folder"


def client(uri: str):
    for key, value in _FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str, artifact_location: str | None = None) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location)


def artifact_location_for(uri: str, output_dir: str | Path) -> str | None:
    """Local stores keep artifacts beside the database; a server decides for itself."""
    return None if uri.startswith(("http://", "https://")) else (Path(output_dir).resolve() / "mlartifacts").as_uri()


def version_tags() -> dict[str, str]:
    """Installed versions, read from package metadata (importing Ray just for a tag costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"python.version": sys.version.split()[0]}
    for dist in ("lsep_tune", "torch", "ray", "timm", "mlflow", "optuna", "torch-fidelity"):
        try:
            tags[f"{dist}.version"] = version(dist)
        except PackageNotFoundError:
            pass
    return tags


def create_run(uri: str, params: dict, tags: dict, run_name: str, experiment: str = DEFAULT_EXPERIMENT,
               parent_run_id: str | None = None, artifact_location: str | None = None) -> str:
    """Create a run with its params and tags; returns the run id. Raises when the store is away."""
    from mlflow.entities import Param

    c = client(uri)
    exp = experiment_id(c, experiment, artifact_location)
    all_tags = {**version_tags(), **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp, tags=all_tags, run_name=run_name)
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_dataset(uri: str, run_id: str, data, context: str = "train") -> None:
    """Record the run's training data (a data.DataIdentity) as an MLflow dataset input: its name,
    source and digest show in the runs table's Dataset column and on the run's page."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(resolve_dataset_source(data.source), name=data.name, digest=data.digest)
    tags = [InputTag("mlflow.data.context", context), InputTag("lsep_tune.num_samples", str(data.num_samples))]
    client(uri).log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])


class RunTracker:
    """Rank 0's handle on one MLflow run: metrics by global step, artifacts, and the end status."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)
        self._failing = False
        self._logged_through: dict[str, int] = {}  # metric -> last step in MLflow, read once per metric
        self._recorded: set[str] | None = None  # the metrics the run held when first read

    @property
    def logged_through(self) -> int:
        """The last step any metric of this run is known to be recorded at."""
        return max(self._logged_through.values(), default=0)

    def _last_step(self, key: str) -> int:
        if key in self._logged_through:
            return self._logged_through[key]
        if self._recorded is None:  # one request says which metrics have a history at all (a new run: none)
            run = self._call(self._client.get_run, self.run_id)
            if run is None:  # the store is away: try again next time
                return -1
            self._recorded = set(run.data.metrics)
        last = -1
        if key in self._recorded:  # a restarted run's metric: where its history ends
            history = self._call(self._client.get_metric_history, self.run_id, key)
            if history is None:  # the store is away: try again next time
                return -1
            last = max((m.step for m in history), default=-1)
        self._logged_through[key] = last
        return last

    def _call(self, fn, *args, default=None, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # tracking must never stop training
            if not self._failing:
                warnings.warn(f"MLflow tracking at {self.uri} failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); training goes on", stacklevel=2)
            self._failing = True
            return default
        if self._failing:
            print(f"MLflow tracking at {self.uri} works again", file=sys.stderr)
        self._failing = False
        return out

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        fresh = {k: v for k, v in metrics.items() if step > self._last_step(k)}  # not logged before a restart
        if not fresh:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in fresh.items()]
        if self._call(self._client.log_batch, self.run_id, metrics=batch, default=False) is not False:
            self._logged_through.update(dict.fromkeys(fresh, step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._call(self._client.set_tag, self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self._call(self._client.set_terminated, self.run_id, status)

    def close(self) -> None:
        pass
