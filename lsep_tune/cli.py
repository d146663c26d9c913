"""The command-line layer that train, search and ablate share: their common flags, the default run
folder, the pre-flight checks and the Ray session.

A command refuses bad input in about a second, so this module and the parsers built with it import
no heavy library (torch, Ray, MLflow, Optuna): each check imports what it needs when it runs. A
command's order stays: parse, validate, pre-flight (data, MLflow, writable output, trial fits),
then `RaySession.connect`, then the work; a local Ray the session started ends with it.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

from lsep_tune.errors import InputError
from lsep_tune.files import require_writable_dir

ADDRESS_HELP = "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)"
MLFLOW_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlflow.db)"


# ----- the shared flags ---------------------------------------------------------------------------

def add_output(parser, help: str) -> None:
    """`--output`: each command says what its folder holds and its default."""
    parser.add_argument("--output", help=help)


def add_mlflow_uri(parser) -> None:
    parser.add_argument("--mlflow-uri", help=MLFLOW_HELP)


def mlflow_uri(flag: str | None, remembered: str | None = None) -> str | None:
    """The store a run tracks into: the flag, else the one a resumed run used, else MLflow's own
    $MLFLOW_TRACKING_URI (what a job's runtime env or a pod's Secret sets for the driver and its trials);
    None: the command's sqlite file in its output folder."""
    return flag or remembered or os.environ.get("MLFLOW_TRACKING_URI") or None


def add_address(parser) -> None:
    parser.add_argument("--address", help=ADDRESS_HELP)


def positive(flag: str, value: int | None) -> None:
    """An optional count flag, when given, is 1 or more."""
    if value is not None and value < 1:
        raise InputError(flag, value, "expected a positive integer")


# ----- the default run folder ---------------------------------------------------------------------

def default_run_folder(name: str) -> Path:
    """runs/<name>-<YYYYmmdd-HHMMSS>, relative to where the command runs."""
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----- pre-flight checks: each raises a one-line InputError before Ray, MLflow or output starts ----

def check_data(cfg) -> None:
    """The training data is there and fits the model of `cfg`."""
    from lsep_tune.data import check_available  # numpy and the data kinds: only when data is checked

    check_available(cfg.data, cfg=cfg)


def check_mlflow(uri: str, source: str = "mlflow_uri") -> None:
    """The tracking store answers (a server) or can be written (a local file); `source` names the flag."""
    from lsep_tune import tracking

    problem = tracking.check_uri(uri)
    if problem:
        raise InputError(source, uri, problem)


def check_output(output: str | Path) -> None:
    require_writable_dir(output, "output")


def check_trial_fits_here(trial, source: str, address: str | None) -> None:
    """On a local Ray, one `trial` (cluster.TrialResources) must fit this machine (a cluster is checked once joined)."""
    from lsep_tune.cluster import check_trial_fits, machine_resources, ray_address  # torch, for GPUs: off start-up

    if not ray_address(address):  # GPUs are counted (by torch) only for a trial that asks for some
        check_trial_fits(trial, source, machine_resources(gpus=trial.gpus_per_worker > 0), "this machine")


# ----- the Ray session ----------------------------------------------------------------------------

class RaySession:
    """A command's Ray cluster: joined (or started locally) when the command is ready for it, and a
    local Ray this session started is shut down when the `with` block ends, however it ends."""

    def __init__(self) -> None:
        self.started = False

    def connect(self, address: str | None, placement=None, *, num_cpus: int | None = None,
                trial=None, source: str = "") -> None:
        """Join `address` / $RAY_ADDRESS or start a local Ray (`num_cpus` logical CPUs); with
        `placement` a run's workers, with `trial` one trial (cluster.TrialResources), must fit the cluster then."""
        import ray  # Ray is imported only once a command has passed its checks

        from lsep_tune.cluster import check_trial_fits, connect_ray

        self.started = connect_ray(address, placement, num_cpus=num_cpus) or self.started
        if trial is not None:
            check_trial_fits(trial, source, ray.cluster_resources(), "the cluster")

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


# ----- the end of a command's process -------------------------------------------------------------

def exit_command(code: int):
    """End a command's process with `code`. Its objects are frozen out of the garbage collector first:
    the interpreter's last collections at exit would otherwise walk the whole heap torch, Ray and MLflow
    built (measured: 1.2 s of a bare import of the four, about 3 s of a search's exit), only for the
    process to end. atexit handlers and reference-counted finalizers still run; objects left in
    reference cycles are not collected, which the process's end makes moot. Only for `__main__`:
    frozen objects would stay uncollected in a longer-lived process that called a command's `main`."""
    gc.freeze()
    sys.exit(code)
