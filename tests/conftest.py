import os

import pytest
import torch

# The cores shared out among pytest-xdist's workers (one thread each on two cores): a worker training
# in-process on two threads while the other worker's Ray processes hold a core waited on its OpenMP
# team (300 digits steps: 21 s alone, 190 s beside a cluster test, on a 2-core Xeon).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))

# One Ray token for every cluster the tests start, set here in the xdist controller so both workers
# inherit it: on a fresh machine there is no ~/.ray/auth_token, which `ray start --head` in token mode
# needs (it never writes one), and which two workers' first `ray.init()` would each write.
if "RAY_AUTH_TOKEN" not in os.environ:
    import secrets

    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


# The modules that take longest, longest first: their summed test durations in a run of the whole suite
# (2-core Intel Xeon, 2026-12-07: test_multinode 315 s ... test_sample 36 s). Refresh from --durations.
LONGEST_FIRST = ["test_multinode", "test_distributed", "test_search", "test_train", "test_postgres", "test_slurm",
                 "test_job", "test_tracking_mlflow", "test_confirm", "test_preprocess", "test_bench_cluster",
                 "test_evaluation", "test_train_step", "test_repa", "test_data", "test_ablate", "test_sample"]


def pytest_collection_modifyitems(session, config, items):
    """The longest modules first (each keeps its order), then the rest with slow tests, then the quick
    ones: the two xdist workers take a module at a time (pyproject's `--dist loadfile
    --no-loadscope-reorder`: xdist's default order, the modules with most tests first, ran the cluster
    modules last), so the quick modules fill the end and both workers finish together."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    place = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def rank(item) -> tuple[int, bool]:
        return place.get(item.path.stem, len(place)), item.path not in slow

    items.sort(key=rank)


@pytest.fixture
def digits_cfg():
    from lsep_tune.config import load_config

    return load_config(preset="digits")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for one test module (3 logical CPUs: two 1-CPU workers plus room to spare)."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_local_ray(monkeypatch):
    """Fail the test if anything starts a Ray in this process: for requests that must be refused first."""
    import ray

    ray.shutdown()  # whatever an earlier test of this process left running

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray was started for a request that should have been refused before it")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray


class MlflowServer:
    def __init__(self, root):
        import subprocess
        import sys

        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT,
            # as clusters/mlflow-server.sh starts it: no server-side job consumers (five processes, ~20 s of CPU)
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        self.wait()

    def wait(self, timeout: float = 120.0) -> None:
        import time
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {open(self.log.name).read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not answer /health in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and served artifacts, shared by every test
    of the session (each reads back only its own runs: by run id, parent run id or a model name of its own)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


class RayHead:
    """A real Ray cluster started by `ray start --head --block`, as a user starts one to submit jobs to.

    Every port is a free one and its temp dir its own, so it does not collide with a cluster already
    on the machine, and a later `ray.init()` of the tests does not find it (Ray records the running
    cluster in its temp dir). Its whole process group ends with the fixture (no `ray stop`, which
    would end every Ray here)."""

    def __init__(self, root, num_cpus: int = 3):
        import os
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        from lsep_tune.cluster import LOOPBACK, LOOPBACK_ENV

        self.temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit
        self.ray = str(Path(sys.executable).parent / "ray")
        # Ray 2.60: every `ray job` command needs the token mode; the loopback switch keeps the node on
        # 127.0.0.1 as clusters/README.md's one-machine recipe does; no 30 s drain on SIGTERM (nothing of
        # Ray Serve's to drain, as in clusters/slurm/search.sbatch)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", LOOPBACK_ENV: "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        gcs, dash = free_port(), free_port()
        self.gcs_port, self.dashboard = gcs, f"http://127.0.0.1:{dash}"
        ports = {"--port": gcs, "--dashboard-port": dash, "--ray-client-server-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--metrics-export-port": free_port()}
        self.log = open(root / "ray-head.log", "w")
        self.proc = subprocess.Popen(
            [self.ray, "start", "--head", "--block", "--num-cpus", str(num_cpus), "--node-ip-address", LOOPBACK,
             "--dashboard-host", LOOPBACK,
             "--disable-usage-stats", "--temp-dir", self.temp_dir, *[str(a) for kv in ports.items() for a in kv]],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.wait()

    def wait(self, timeout: float = 120.0) -> None:
        import subprocess
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {open(self.log.name).read()[-2000:]}")
            listed = subprocess.run([self.ray, "job", "list", "--address", self.dashboard], env=self.env,
                                    capture_output=True, text=True)
            if listed.returncode == 0:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray head's job server did not answer in time: {open(self.log.name).read()[-2000:]}")

    def submit(self, *entrypoint: str, timeout: float = 600.0):
        """`ray job submit` of `entrypoint`, waiting for its end: (returncode, everything it printed)."""
        import subprocess

        done = subprocess.run([self.ray, "job", "submit", "--address", self.dashboard, "--", *entrypoint],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    @property
    def address(self) -> str:
        """The GCS address a driver connects to (`--address`)."""
        return f"127.0.0.1:{self.gcs_port}"

    def kill(self) -> None:
        """The head machine is lost: `ray start` and every process under it (GCS, raylet, dashboard,
        workers and the trials on them) get SIGKILL at once, found before any is re-parented."""
        import os
        import signal

        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def stop(self) -> None:
        import os
        import shutil
        import signal

        if self.proc.poll() is None:
            # SIGTERM lets the nodes' processes end in order; what is left after 5 s gets SIGKILL
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except Exception:
                self.kill()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One `ray start` cluster (3 CPUs) for a module's submitted jobs and resumed searches: a job ends
    with its driver, and each test reads back only its own job, folder and runs. Not one per session:
    an idle head (its dashboard's nine processes, GCS, raylet, agents) keeps ~15% of a core busy, and
    an xdist worker's session outlasts its cluster tests by the rest of the suite."""
    head = RayHead(tmp_path_factory.mktemp("ray-head"))
    yield head
    head.stop()


@pytest.fixture
def ray_heads(tmp_path_factory):
    """Start `ray start` heads on demand (`ray_heads(num_cpus=2)`): a test that loses one starts another."""
    heads = []

    def start(num_cpus: int = 3) -> RayHead:
        heads.append(RayHead(tmp_path_factory.mktemp("ray-head"), num_cpus=num_cpus))
        return heads[-1]

    yield start
    for head in heads:
        head.stop()


def command_line(pid: int) -> str | None:
    """A process's command line, its arguments joined by spaces (None: it has ended)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children, their children, ...)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while being read
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LoopbackCluster:
    """Several Ray nodes on this machine, all on 127.0.0.1: Ray's own `cluster_utils.Cluster`, whose nodes
    are separate raylets (their own processes, object stores and workers) joined to one head's GCS.

    The head holds no CPUs, so every trial and worker is placed on a worker node, and a node can be
    lost (`kill`: SIGKILL of all its processes) without the cluster's state going with it. The
    temp dir is the cluster's own, so `ray.init()` elsewhere on the machine does not find it."""

    def __init__(self, worker_cpus: tuple[int, ...] = (1, 1)):
        import tempfile

        from ray.cluster_utils import Cluster

        # a loaded 2-core machine registers a raylet in more than Ray's default 10 s
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
        # every node sees the whole machine's memory: Ray's OOM killer would end these tests' trials for
        # what other processes on the machine use (the kernel's still ends a real runaway)
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        self.temp_dir = tempfile.mkdtemp(prefix="raycl-", dir="/tmp")  # short: Ray's socket paths must fit
        self.common = {"node_ip_address": "127.0.0.1", "temp_dir": self.temp_dir, "include_dashboard": False,
                       "object_store_memory": 80 * 1024 * 1024}
        self.nodes: list = []  # the live worker nodes
        # A raylet exits when its dashboard agent has not written its port within ~15 s (no setting
        # in Ray 2.60 changes it): on a loaded machine the agent's imports alone can take longer.
        for attempt in range(3):
            self.nodes = []
            try:
                self.cluster = Cluster(initialize_head=True,
                                       head_node_args={"num_cpus": 0, **self.ports(), **self.common})
                for cpus in worker_cpus:
                    self.add_node(cpus)
                break
            except Exception as err:
                if "timed out during startup" not in str(err) or attempt == 2:
                    self.stop()
                    raise
                if hasattr(self, "cluster"):
                    self.cluster.shutdown()
                    del self.cluster

    @staticmethod
    def ports() -> dict[str, int]:
        """Each node's agents on free ports given up front: a raylet that waits for its agent to pick one
        gives up after a few seconds on a loaded machine (metrics_agent_port file timeout)."""
        return {"dashboard_port": free_port(), "metrics_agent_port": free_port(), "metrics_export_port": free_port(),
                "dashboard_agent_listen_port": free_port(), "runtime_env_agent_port": free_port()}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, num_cpus: int = 1):
        """One more worker node (`nodes` lists the live ones), once the cluster has registered it."""
        node = self.cluster.add_node(num_cpus=num_cpus, **self.ports(), **self.common)
        self.cluster.wait_for_nodes()
        self.nodes.append(node)
        return node

    def kill(self, node) -> None:
        """The node is lost: its raylet and every process under it (its workers: trials, Train workers)
        get SIGKILL at once, no grace. `remove_node` alone kills the raylet, and a worker would train
        (and write checkpoints) for a few seconds more before it noticed, as no lost machine's does."""
        import signal

        from ray._private import ray_constants

        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for pid in [raylet, *descendants(raylet)]:  # found before the raylet dies and they are re-parented
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def stop(self) -> None:
        import shutil

        if hasattr(self, "cluster"):
            self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def _loopback_cluster():
    cluster = LoopbackCluster(worker_cpus=(1, 1, 1))
    yield cluster
    cluster.stop()


@pytest.fixture
def loopback_cluster(_loopback_cluster):
    """A head (no CPUs) and three 1-CPU worker nodes on 127.0.0.1, shared by a module's tests (a cluster
    costs a raylet start per node); the test may kill nodes and add replacements. One that lost a node
    and failed before replacing it leaves the next test a node short: it is made up here."""
    for _ in range(3 - len(_loopback_cluster.nodes)):
        _loopback_cluster.add_node(1)
    return _loopback_cluster
