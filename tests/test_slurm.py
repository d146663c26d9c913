"""clusters/slurm/search.sbatch on a real Slurm: slurmctld + slurmd on 127.0.0.1, started here.

Debian 12's slurm-wlm is 22.05, older than the key-file `auth/slurm` plugin (23.11), so the
daemons authenticate with munge: a munged of this module's own, on its own socket and key.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import command_line, free_port

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "clusters" / "slurm" / "search.sbatch"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "munged", "mungekey")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def _missing() -> str | None:
    absent = [name for name in DAEMONS if not shutil.which(name)]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the single-node Slurm runs slurmd as root (SlurmUser=root)"
    return None


def _this_node() -> str:
    """The node line of slurm.conf, from what slurmd finds on this machine (its CPUs and memory)."""
    found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in found.split())
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(f"{k}={fields[k]}" for k in keep if k in fields)


class Slurm:
    """munged, slurmctld and slurmd in the foreground, each in its own process group, ended by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.short = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # node-local TMPDIRs of the jobs
        munge = root / "munge"
        munge.mkdir(mode=0o700)
        key, self.socket = munge / "munge.key", munge / "sock"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.socket}",
                               f"--pid-file={munge / 'pid'}", f"--log-file={munge / 'log'}",
                               f"--seed-file={munge / 'seed'}"])
        self._wait(lambda: self.socket.exists(), "munged's socket")
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        self.conf = root / "slurm.conf"
        self.conf.write_text("\n".join([
            "ClusterName=lseptest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=3600",  # keep ended jobs in scontrol for the asserts
            "KillWait=30",
            _this_node(),
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._start("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", "an idle node in sinfo")

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env=getattr(self, "env", None)))

    def _wait(self, ready, what: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited: {self.logs()}")
            if time.time() > deadline:
                raise RuntimeError(f"no {what} after {timeout:.0f} s: {self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.out")))

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env)

    def job(self, job_id: str) -> dict[str, str]:
        shown = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", shown))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in ENDED:
                return job
            time.sleep(1)
        self.run("scancel", job_id)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        """Cancel what is still queued or running (its trap then ends its Ray), then end the daemons."""
        if all(proc.poll() is None for proc in self.procs):
            self.run("scancel", "--me")
            deadline = time.time() + 90
            while self.run("squeue", "-h").stdout.strip() and time.time() < deadline:
                time.sleep(2)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.short, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def submit(slurm: Slurm, work: Path, *search_args: str) -> str:
    """sbatch of the shipped script on this one node: its CPUs, no GPUs, the venv of this test."""
    cpus = os.cpu_count() or 1
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LSEP_TUNE_SHARED": str(work), "TMPDIR": str(node_tmp(slurm, work))}
    done = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={cpus}", "--gpus-per-node=0",
                           "--time=30", f"--output={work / 'job.out'}", str(SBATCH), *search_args],
                          capture_output=True, text=True, env=env, check=True, cwd=work)
    return done.stdout.strip().split(";")[0]


def node_tmp(slurm: Slurm, work: Path) -> Path:
    """The node-local TMPDIR a job gets: short, as Ray's socket paths under it must fit 107 bytes."""
    short = slurm.short / f"{zlib.crc32(str(work).encode()):08x}"
    short.mkdir(exist_ok=True)
    return short


def ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that name `marker` (this job's Ray temp dir)."""
    lines = (command_line(int(proc.name)) for proc in Path("/proc").iterdir() if proc.name.isdigit())
    return [line for line in lines if line is not None and marker in line]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sbatch_runs_a_search_on_its_own_ray_and_stops_it(slurm, tmp_path):
    import json

    from tests.test_search import GOOD, write_space

    # a two-trial search of 20 flow-loss steps, no confirmation: what is checked is the script's Ray
    # around it, not the search (the smoke search with its confirmation took 3-4 of this test's minutes)
    space = write_space(tmp_path / "space.yaml", [GOOD], num_samples=2, max_steps=20, scheduler={"type": "none"},
                        report_every=10)
    job_id = submit(slurm, tmp_path, "--space", str(space), "--output", str(tmp_path / "search"))
    job = slurm.wait_job(job_id, timeout=1000)
    printed = (tmp_path / "job.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", printed[-4000:] + slurm.logs()
    assert "Ray cluster ready: 1 node(s)" in printed
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["best_trial"] and (tmp_path / "search" / "best.yaml").exists()
    assert summary["ray_address"].startswith("127.0.0.1:")  # the job's head, on loopback
    ray_tmp = node_tmp(slurm, tmp_path) / f"ray-{job_id}"
    assert not ray_tmp.exists() and not ray_processes(str(ray_tmp))  # the job's Ray is gone with it
    assert "did not stop within" not in printed  # stopped by the trap, nothing left for a SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scancel_stops_the_jobs_ray(slurm, tmp_path):
    job_id = submit(slurm, tmp_path, "--output", str(tmp_path / "search"))
    ray_tmp = node_tmp(slurm, tmp_path) / f"ray-{job_id}"
    out = tmp_path / "job.out"
    deadline = time.time() + 300
    while not (out.exists() and "Ray cluster ready" in out.read_text()):
        assert slurm.job(job_id).get("JobState") not in ENDED, out.read_text()[-3000:] if out.exists() else ""
        assert time.time() < deadline, "the job's Ray did not come up in 300 s"
        time.sleep(2)
    assert ray_processes(str(ray_tmp))
    slurm.run("scancel", job_id)
    job = slurm.wait_job(job_id, timeout=120)
    assert job["JobState"] == "CANCELLED"
    deadline = time.time() + 90  # Ray drains up to 30 s on SIGTERM, then the trap removes its temp dir
    while (ray_processes(str(ray_tmp)) or ray_tmp.exists()) and time.time() < deadline:
        time.sleep(1)
    assert not ray_processes(str(ray_tmp))
    assert not ray_tmp.exists(), "the job's trap did not clean up its Ray temp dir"
    # ended by its own SIGTERM handling within KillWait, not left to Slurm's SIGKILL
    assert "did not stop within" not in out.read_text(), out.read_text()[-3000:]
