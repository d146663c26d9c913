"""cluster.py on its own: a request is refused before anything starts when what it asks cannot be held,
and a trial's own process holds only what it trains with."""
import pytest

from lsep_tune.cluster import (
    TRIAL_DRIVER_CPU, Placement, check_placement, check_trial_fits, local_device, local_ray_cpus,
    machine_resources, ray_address, trial_resources,
)
from lsep_tune.errors import InputError
from lsep_tune.search.schema import Budget


def test_a_placement_that_does_not_fit_names_the_field_and_what_fits():
    check_placement(Placement(2, 0.0, 1.0), {"CPU": 2.0, "GPU": 0.0})
    with pytest.raises(InputError) as err:
        check_placement(Placement(3, 0.0, 1.0), {"CPU": 2.0}, "this machine")
    assert err.value.source == "workers" and "expected at most 2" in str(err.value) and "this machine has 2" in str(err.value)
    with pytest.raises(InputError) as err:
        check_placement(Placement(2, 1.0, 1.0), {"CPU": 8.0, "GPU": 1.0})
    assert err.value.source == "gpus_per_worker" and "at most 1 such workers fit" in str(err.value)
    with pytest.raises(InputError, match="expected 1 or more"):
        check_placement(Placement(0), {"CPU": 8.0})


def test_a_trial_holds_its_worker_or_only_waits_on_its_workers():
    one = Budget(num_samples=1, workers_per_trial=1, cpus_per_worker=2, gpus_per_worker=0.5)
    assert trial_resources(one.resources) == {"cpu": 2, "gpu": 0.5}
    two = Budget(num_samples=1, workers_per_trial=2, cpus_per_worker=1, max_concurrent=3)
    assert trial_resources(two.resources) == {"cpu": TRIAL_DRIVER_CPU}
    # a local Ray gets logical CPUs for every concurrent trial: 3 x (0.01 + 2 x 1)
    assert local_ray_cpus(two.resources) == max(int(machine_resources()["CPU"]), 7)


def test_a_trial_larger_than_the_cluster_blames_the_budget_field_of_its_file():
    big = Budget(num_samples=1, workers_per_trial=4, cpus_per_worker=1)
    with pytest.raises(InputError) as err:
        check_trial_fits(big.resources, "space.yaml", {"CPU": 2.0, "GPU": 0.0}, "the cluster")
    assert str(err.value).startswith("space.yaml: budget.workers_per_trial: one trial needs more than the cluster has")
    gpu = Budget(num_samples=1, gpus_per_worker=1)
    with pytest.raises(InputError, match="^space.yaml: budget.gpus_per_worker: "):
        check_trial_fits(gpu.resources, "space.yaml", {"CPU": 2.0, "GPU": 0.0}, "this machine")


def test_the_address_and_the_device(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_address(None) == "127.0.0.1:6379" and ray_address("127.0.0.1:1") == "127.0.0.1:1"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address(None) is None
    assert local_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="^device: tpu: expected a torch device"):
        local_device("tpu")
