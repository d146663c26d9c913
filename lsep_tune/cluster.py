"""Where work runs: the local device, and the Ray cluster that train, sample and search share.

A request is checked against what it can get before anything starts: a local Ray is only started
once the machine is known to hold the request (a Ray that cannot place its workers would wait
forever), it is sized to the machine, never to the request, and it is shut down by whoever
started it. Errors name neutral fields (``workers``, ``address``, ``storage``); each command's
``__main__`` maps them to its flags.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lsep_tune.errors import InputError
from lsep_tune.files import require_writable_dir

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrialResources:
    """What one run or trial asks of the cluster, and how many such trials run at once: the one value
    that a search's and an ablation's budget (`.resources`) and `train --workers` hand to the placement
    checks, the trial function and Tune."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts of a Ray Train run
    max_concurrent: int = 1


Placement = TrialResources  # the name train/ and sample/ use for a Ray Train run's share


def local_device(name: str | None = None) -> torch.device:
    """The torch device for work in this process: `name`, else cuda when there is one."""
    import torch  # torch only where a device is asked for: a search space reads TrialResources without it

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError("device", name, "expected a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", name, "CUDA is not available on this machine")
    return device


def machine_resources(num_cpus: int | None = None, gpus: bool = True) -> dict[str, float]:
    """What a local Ray started here would offer: the CPUs this process may use and the visible GPUs;
    with `gpus` false (for a request of no GPUs) the CPUs alone, and torch is not imported."""
    cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if not gpus:
        return {"CPU": float(cpus)}
    import torch  # for the GPU count (see local_device)

    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_placement(placement: TrialResources, resources: dict[str, float], where: str = "the cluster") -> None:
    """Refuse a request that `resources` cannot hold all at once."""
    p = placement
    if p.workers < 1:
        raise InputError("workers", p.workers, "expected 1 or more for a Ray run")
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fit = int(have_cpu // p.cpus_per_worker) if p.cpus_per_worker else p.workers
    if p.gpus_per_worker:
        fit = min(fit, int(have_gpu // p.gpus_per_worker))
    if p.workers * p.cpus_per_worker > have_cpu:
        raise InputError("workers", p.workers, f"expected at most {fit}: {p.workers} workers x {p.cpus_per_worker:g} "
                                               f"CPUs need {p.workers * p.cpus_per_worker:g} CPUs, {where} has "
                                               f"{have_cpu:g}")
    if p.workers * p.gpus_per_worker > have_gpu:
        raise InputError("gpus_per_worker", p.gpus_per_worker,
                         f"{p.workers} workers x {p.gpus_per_worker:g} GPUs need "
                         f"{p.workers * p.gpus_per_worker:g} GPUs, {where} has {have_gpu:g} "
                         f"(at most {fit} such workers fit)")


TRIAL_DRIVER_CPU = 0.01  # a multi-worker trial's own process only waits on its TorchTrainer


def trial_resources(trial: TrialResources) -> dict[str, float]:
    """What a Tune trial's own process holds: a one-worker trial trains in it (the worker's CPUs and
    GPUs); a larger trial's process only waits on its TorchTrainer, whose workers ask for their own."""
    if trial.workers == 1:
        return {"cpu": trial.cpus_per_worker, "gpu": trial.gpus_per_worker}
    return {"cpu": TRIAL_DRIVER_CPU}


def local_ray_cpus(trial: TrialResources) -> int:
    """Logical CPUs for a local Ray: enough for max_concurrent trials even on a 2-core machine."""
    t = trial
    per_trial = trial_resources(t)["cpu"] + (t.workers * t.cpus_per_worker if t.workers > 1 else 0)
    return max(int(machine_resources()["CPU"]), math.ceil(t.max_concurrent * per_trial))


def check_trial_fits(trial: TrialResources, source: str, resources: dict[str, float], where: str) -> None:
    """One trial of a search's or ablation's budget must fit `resources` (this machine before a local
    Ray starts, the cluster once joined), or Tune would wait on it forever. Errors name the budget's
    field in the file `source`."""
    try:
        check_placement(trial, resources, where)
    except InputError as err:
        field = "budget.workers_per_trial" if err.source == "workers" else "budget.gpus_per_worker"
        raise InputError(source, field, f"one trial needs more than {where} has: {err.expectation}") from None


def ray_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS, else None (a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


LOOPBACK = "127.0.0.1"
# Ray 2.60 turns a requested 127.0.0.1 (ray.init's _node_ip_address, `ray start --node-ip-address`) into
# the machine's network address; only with clusters switched off (this variable, meant for Windows and
# macOS) does a node take the loopback address. A local Ray is one machine: nothing joins it from outside.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_ray():
    """Within it, a Ray started here binds 127.0.0.1 (node, GCS, raylet; the dashboard already does).

    Ray reads the switch when it is imported: its processes started now inherit the variable, and
    this process's copy of the constant is set for the start and put back after it."""
    from ray._private import ray_constants

    before_env, before = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield LOOPBACK
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before_env


def start_local_ray(num_cpus: int | None = None, **options) -> None:
    """A local Ray on loopback (see loopback_ray): what train, search and ablate start through connect_ray."""
    import ray

    with loopback_ray():
        # "local": a Ray of its own, even while another runs on this machine (without it, ray.init joins
        # the last `ray start` cluster here and refuses num_cpus)
        ray.init(address="local", num_cpus=num_cpus, dashboard_host=LOOPBACK, **options)


def is_loopback(address: str) -> bool:
    """`address` (host:port, as RAY_ADDRESS gives it) names a cluster on this machine's loopback."""
    import ipaddress

    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_ray(address: str | None, placement: Placement | None = None, *, num_cpus: int | None = None,
                quiet: bool = False) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS) or start a local Ray; True when this call
    started Ray here. With `placement`, a request a local Ray could not hold is refused before it
    starts, and any cluster is checked once joined."""
    import ray

    if ray.is_initialized():
        if placement is not None:
            check_placement(placement, ray.cluster_resources())
        return False
    address = ray_address(address)
    if placement is not None and not address:
        check_placement(placement, machine_resources(num_cpus), "this machine")
    level = logging.ERROR if quiet else logging.INFO
    # Ray Train V2 routes a worker's print() to its log and, with Ray's wrapped stdout, also to the
    # console: every line twice. Workers of a local Ray inherit this process's environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    try:
        if address:  # Ray would look for a loopback cluster on the network address; keep it on loopback
            with loopback_ray() if is_loopback(address) else contextlib.nullcontext():
                ray.init(address=address, logging_level=level)
        else:
            start_local_ray(num_cpus, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError("address", address or "(local)", f"cannot start or join a Ray cluster ({first})") from None
    if placement is not None:
        try:
            check_placement(placement, ray.cluster_resources())
        except InputError:
            ray.shutdown()
            raise
    return True


def check_storage(storage: str) -> None:
    """Checkpoint storage (a folder or a pyarrow URI such as s3://) must be usable before a run starts."""
    if "://" not in storage:
        require_writable_dir(storage, "storage")
        return
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        fs.create_dir(path, recursive=True)
    except Exception as err:  # noqa: BLE001 - any backend error means unusable storage
        raise InputError("storage", storage, f"not usable ({str(err).splitlines()[0]})") from None
