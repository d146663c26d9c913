"""A trained configuration as an MLflow Model: its EMA weights and config, read back by the project's
own checkpoint loader.

A search logs its confirmed winner (or the kept baseline) this way on its parent run, so the model
appears under the run's "Logged models" and can be registered; `load_model(uri)` turns any model URI
(``models:/<model_id>``, ``models:/NAME/VERSION``, ``runs:/<run_id>/model``) back into the
`checkpoint.Checkpoint` that `sample.generate_samples` and ``python -m lsep_tune.sample`` take.
"""
from __future__ import annotations

import contextlib
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import mlflow.pyfunc

from lsep_tune import tracking
from lsep_tune.checkpoint import Checkpoint, load_checkpoint

MODEL_NAME = "model"  # the model's name on its run: runs:/<run_id>/model
CHECKPOINT = "checkpoint"  # the artifact key of ema_final.pt (which holds the config beside the weights)
ENV = "MLFLOW_TRACKING_URI"  # MLflow's default store, which set_tracking_uri also writes
CODE = Path(__file__).with_name("mlflow_model_code.py")  # models-from-code: the model is code, not a pickle
# What loading needs besides lsep_tune itself (installed from its repository, not from PyPI).
REQUIREMENTS = ("torch", "timm", "numpy", "pydantic", "pyyaml", "mlflow")


class SamplerModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour: loading goes through `checkpoint.load_checkpoint`; predict draws samples."""

    def load_context(self, context) -> None:
        self.checkpoint = load_checkpoint(context.artifacts[CHECKPOINT])

    def predict(self, context, model_input, params=None):
        """model_input: {"num": N, "seed": S}, or a DataFrame with those columns (first row): uint8
        NHWC images, class-balanced, the same as ``python -m lsep_tune.sample --num N --seed S``."""
        from lsep_tune.sample.batch import generate_samples  # the sampler (and Ray's actors): only to predict

        row = model_input.iloc[0].to_dict() if hasattr(model_input, "iloc") else dict(model_input)
        images, _ = generate_samples(self.checkpoint, int(row.get("num", 16)), seed=int(row.get("seed", 0)))
        return images


def _requirements() -> list[str]:
    pins = []
    for dist in REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    return pins


def log_model(uri: str, run_id: str, checkpoint_file: str | Path, registered_name: str | None = None) -> dict:
    """Log `checkpoint_file` (an ema_final.pt) as the model of run `run_id`, registered as
    `registered_name` when given; returns {"mlflow_model_uri": models:/<model_id>} and, when
    registered, "registered_model": models:/NAME/VERSION."""
    tracking.client(uri)  # the fast-fail settings for a server that has gone away
    with tracking_uri_set(uri):
        # log_model attaches the model to the active run; ending it here leaves the run FINISHED,
        # which the caller then sets to its final state anyway.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(CODE), artifacts={CHECKPOINT: str(checkpoint_file)},
                pip_requirements=_requirements(), registered_model_name=registered_name,
                tags={"lsep_tune.checkpoint": str(checkpoint_file)},
            )
    out = {"mlflow_model_uri": info.model_uri}
    if registered_name:
        out["registered_model"] = f"models:/{registered_name}/{info.registered_model_version}"
    return out


def load_model(model_uri: str, tracking_uri: str | None = None) -> Checkpoint:
    """The EMA weights and validated config behind an MLflow model URI, through the project's loader."""
    with tracking_uri_set(tracking_uri) if tracking_uri else contextlib.nullcontext():
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().checkpoint


@contextlib.contextmanager
def tracking_uri_set(uri: str):
    """MLflow's fluent API pointed at `uri` for the block. set_tracking_uri also writes
    $MLFLOW_TRACKING_URI, which the commands read as their default store: both are put back."""
    previous, env = mlflow.get_tracking_uri(), os.environ.get(ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = env
