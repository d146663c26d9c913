"""Every command answers --help, and refuses a bad flag or value, before a heavy library loads: what
the command imports is read from `python -X importtime`, not timed (timings on a shared machine lie)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "ray", "mlflow", "optuna", "diffusers", "torch_fidelity"}

CASES = [
    ("search", ["--help"], 0),
    ("search", ["--num-samples", "0"], 2),
    ("train", ["--help"], 0),
    ("train", ["--preset", "digits", "--max-steps", "0"], 2),
    ("train", ["--preset", "digits", "--workers", "-1"], 2),
    ("ablate", ["--help"], 0),
    ("ablate", ["--seeds", "1"], 2),
    ("sample", ["--help"], 0),
    ("sample", ["--checkpoint", "x.pt", "--num", "4", "--out", "x.npz", "--sampler", "bogus"], 2),
    ("evaluate", ["--help"], 0),
    ("evaluate", ["--samples", "x.npz"], 2),  # no --reference
    ("preprocess", ["--help"], 0),
    ("preprocess", ["--bogus"], 2),
    ("bench", ["--help"], 0),
    ("bench", ["train", "--batch", "0"], 2),
]


def imported(command: str, args: list[str], tmp_path) -> tuple[int, str, set[str]]:
    """The exit code, stderr and the top-level packages a command imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", f"lsep_tune.{command}", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    names = {line.rsplit("|", 1)[1].strip().split(".")[0]
             for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line}
    message = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    return done.returncode, message, names


@pytest.mark.parametrize("command,args,code", CASES, ids=[f"{c} {' '.join(a)}" for c, a, _ in CASES])
def test_help_and_a_bad_flag_answer_before_any_heavy_library_loads(command, args, code, tmp_path):
    rc, message, names = imported(command, args, tmp_path)
    assert rc == code, message
    if code == 2:
        assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    assert "lsep_tune" in names
    assert not names & HEAVY, f"{command} {' '.join(args)} imported {sorted(names & HEAVY)}"


def test_the_torch_free_name_lists_agree_with_their_registries():
    from lsep_tune import checkpoint, config, evaluate, presets, published
    from lsep_tune.evaluation import DEFAULT_METRICS, default_cache_dir
    from lsep_tune.evaluation.extractors import SUPPORTED
    from lsep_tune.sample import generate, options
    from lsep_tune.sample.batch import SAMPLERS
    from lsep_tune.sample.solvers import SOLVERS

    assert options.SOLVER_NAMES == tuple(SOLVERS) and options.SAMPLER_NAMES == tuple(SAMPLERS)
    assert options.CHECKPOINT_FORMATS == published.FORMATS
    assert (options.EMA_FILE, options.STATE_FILE) == (checkpoint.EMA_FILE, checkpoint.STATE_FILE)
    assert (options.DEFAULT_SEED, options.DEFAULT_BATCH) == (generate.DEFAULT_SEED, generate.DEFAULT_BATCH)
    assert (evaluate.DEFAULT_METRICS, evaluate.SUPPORTED) == (tuple(DEFAULT_METRICS), tuple(SUPPORTED))
    assert evaluate.DEFAULT_CACHE_DIR == default_cache_dir()
    assert config.preset_names is presets.preset_names and "digits" in presets.preset_names()
