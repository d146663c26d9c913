"""`python -m lsep_tune.clusters check`: the shipped recipes pass, broken ones fail with one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The Ray recipes: clusters/*.yaml and the sbatch scripts (clusters/mlflow/ holds the tracking stack).
SHIPPED = sorted(str(p.relative_to(ROOT)) for pattern in ("*.yaml", "slurm/*.sbatch")
                 for p in (ROOT / "clusters").glob(pattern))
GPU_SPACE = "lsep-sit-b2-imagenet256"  # 8 workers x (8 CPUs, 1 GPU) per trial


def run_check(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "lsep_tune.clusters", "check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def check(capsys, monkeypatch):
    """The command's main() in this process (its imports paid once): returncode, stdout, stderr."""
    from lsep_tune.clusters.__main__ import main

    monkeypatch.chdir(ROOT)

    def call(*args: str) -> subprocess.CompletedProcess:
        rc = main(["check", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return call


def edited(tmp_path: Path, name: str, change) -> str:
    """A shipped YAML recipe with one change made, written beside the test."""
    doc = yaml.safe_load((ROOT / "clusters" / name).read_text())
    change(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def refused(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_every_shipped_cluster_file_passes_with_a_gpu_space():
    assert {"clusters/aws.yaml", "clusters/gcp.yaml", "clusters/kuberay-raycluster.yaml",
            "clusters/kuberay-rayjob.yaml", "clusters/slurm/search.sbatch"} <= set(SHIPPED)
    done = run_check(*SHIPPED, "--space", GPU_SPACE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(SHIPPED)
    for path, line in zip(SHIPPED, lines):
        assert line.startswith(f"{path}: ") and " ok: " in line
    assert all("one trial (8 x (8 CPUs, 1 GPUs)) fits" in line for line in lines if "PersistentVolumeClaim" not in line)


def test_help_is_fast_and_imports_neither_torch_nor_ray():
    probe = ("import sys\nfrom lsep_tune.clusters.__main__ import main\nrc = main(['check', '--help'])\n"
             "assert rc == 0 and 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--space NAME|FILE" in done.stdout


def test_launcher_without_head_node_type(tmp_path, check):
    path = edited(tmp_path, "aws.yaml", lambda doc: doc.pop("head_node_type"))
    assert refused(check(path)) == f"error: {path}: head_node_type: missing; expected a string"


def test_launcher_outside_rays_schema(tmp_path, check):
    path = edited(tmp_path, "gcp.yaml", lambda doc: doc["available_node_types"]["gpu8"].pop("node_config"))
    line = refused(check(path))
    assert line.startswith(f"error: {path}: available_node_types.gpu8: Ray's cluster-launcher schema: ")
    assert "'node_config' is a required property" in line


def test_gpu_space_against_a_worker_group_without_gpus(tmp_path, check):
    def no_gpus(doc):
        doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop(
            "nvidia.com/gpu")

    path = edited(tmp_path, "kuberay-raycluster.yaml", no_gpus)
    assert check(path).returncode == 0  # a CPU cluster is a cluster: only a GPU space needs GPUs
    line = refused(check(path, "--space", GPU_SPACE))
    assert line.startswith(f"error: {path}: spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits."
                           f"nvidia.com/gpu: one trial of search_spaces/{GPU_SPACE}.yaml must fit: "
                           "budget.gpus_per_worker: ")
    assert "8 workers x 1 GPUs need 8 GPUs, this cluster at its largest has 0" in line


def test_launcher_gpu_type_without_gpus(tmp_path, check):
    path = edited(tmp_path, "aws.yaml", lambda doc: doc["available_node_types"]["gpu8"]["resources"].update(GPU=0))
    line = refused(check(path, "--space", GPU_SPACE))
    assert line.startswith(f"error: {path}: available_node_types.gpu8.resources: one trial of ")


def test_kuberay_worker_without_the_shared_volume(tmp_path, check):
    def unmount(doc):
        worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        worker["containers"][0]["volumeMounts"] = [m for m in worker["containers"][0]["volumeMounts"]
                                                   if m["name"] != "shared"]

    path = edited(tmp_path, "kuberay-rayjob.yaml", unmount)
    assert refused(check(path)) == (
        f"error: {path}: spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMounts: "
        "expected the shared volume (PVC lsep-tune-shared) mounted at /shared as on the head: every pod must see "
        "the search folder")


def test_rayjob_search_folder_off_the_shared_volume(tmp_path, check):
    def local_output(doc):
        doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("/shared/searches", "/tmp/searches")

    path = edited(tmp_path, "kuberay-rayjob.yaml", local_output)
    assert refused(check(path)).startswith(f"error: {path}: spec.entrypoint: expected --output under the shared "
                                           "mount /shared")


def test_official_ray_image_needs_the_runtime_env(tmp_path, check):
    def official(doc):
        for c in (doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
                  + doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]):
            c["image"] = "rayproject/ray:2.60.0-py311-gpu"

    path = edited(tmp_path, "kuberay-rayjob.yaml", official)
    assert "rayproject/ray does not hold lsep_tune" in refused(check(path))
    runtime_env = 'pip: ["lsep_tune @ file:///shared/src/lsep_tune"]\n'
    installs = edited(tmp_path, "kuberay-rayjob.yaml",
                      lambda doc: (official(doc), doc["spec"].update(runtimeEnvYAML=runtime_env)))
    assert check(installs).returncode == 0
    launcher = edited(tmp_path, "aws.yaml", lambda doc: doc["docker"].update(image="rayproject/ray:2.60.0-py311-gpu"))
    assert refused(check(launcher)) == (
        f"error: {launcher}: docker.image: expected the lsep_tune image, or setup_commands that pip install the "
        "project on every node (rayproject/ray:2.60.0-py311-gpu lacks it)")


def test_slurm_script_without_a_trap_or_gpus(tmp_path, check):
    text = (ROOT / "clusters" / "slurm" / "search.sbatch").read_text()
    no_trap = tmp_path / "no-trap.sbatch"
    no_trap.write_text("\n".join(line for line in text.splitlines() if not line.startswith("trap ")))
    assert refused(check(str(no_trap))).startswith(f"error: {no_trap}: script: expected a trap ")
    cpu_only = tmp_path / "cpu.sbatch"
    cpu_only.write_text(text.replace("#SBATCH --gpus-per-node=8\n", ""))
    line = refused(check(str(cpu_only), "--space", GPU_SPACE))
    assert line.startswith(f"error: {cpu_only}: #SBATCH --gpus-per-node: one trial of ")


def test_not_a_recipe_and_unknown_space(tmp_path, check):
    other = tmp_path / "other.yaml"
    other.write_text("a: 1\n")
    assert refused(check(str(other))).startswith(f"error: {other}: kind: expected a Ray cluster-launcher YAML")
    assert "not a file and not a shipped space" in refused(check("clusters/aws.yaml", "--space", "nope"))


@pytest.mark.parametrize("bad", ["ReadWriteOnce"])
def test_shared_claim_must_be_read_write_many(tmp_path, bad, check):
    path = edited(tmp_path, "kuberay-shared.yaml", lambda doc: doc["spec"].update(accessModes=[bad]))
    assert refused(check(path)).startswith(f"error: {path}: spec.accessModes: expected ReadWriteMany")
