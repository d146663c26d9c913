"""Every command answers --help, and refuses a bad flag, file or value, before a heavy library loads:
what the command imports is read from `python -X importtime`, not timed (timings on a shared machine lie)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "ray", "mlflow", "optuna", "diffusers", "torch_fidelity", "timm", "torchvision"}

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


# A search space that loads: each file below breaks one thing of it.
SPACE = """base: {preset: digits}
params:
  objective.lsep.uncond_prob: {type: uniform, low: 0.5, high: 1.0}
metric: {name: lsep_ce}
budget: {num_samples: 2}
"""
# An arms file that loads, likewise.
ARMS = """base: {preset: digits}
arms:
  none: {objective.lsep.enabled: false}
  lsep: {}
metrics: [flow_loss]
"""
FILES = {
    "config.yaml": "optim: {lr: -1}\n",
    "syntax.yaml": "base: {preset: digits\nparams: [\n",
    "budget.yaml": SPACE.replace("num_samples: 2", "num_samples: 0"),
    "domain.yaml": SPACE.replace("high: 1.0", "high: 2.0"),
    "metric.yaml": SPACE.replace("lsep_ce", "sra_loss"),
    "arms-seeds.yaml": ARMS + "seeds: 1\n",
    "arms-field.yaml": ARMS.replace("lsep: {}", "lsep: {optim.lrr: 1.0}"),
    "arms-lr.yaml": ARMS.replace("lsep: {}", "lsep: {optim.lr: abc}"),
    "arms-data.yaml": ARMS.replace("lsep: {}", "lsep: {data.kind: images, data.path: missing}"),
    "arms-workers.yaml": ARMS + "budget: {workers_per_trial: 100000}\n",
}
DIGITS = ["--preset", "digits", "--set"]
# (command, arguments, what the one line names): the config's, the data kinds', the model names', the
# solvers' and the regularizers' checks, a search space's name, file, YAML and values, and an arms
# file's name, file, YAML, values, arm configs, data and (CPU-only) trial size.
BAD_INPUT = [
    ("train", [*DIGITS, "optim.lr=abc"], "optim.lr: Input should be a valid number"),
    ("train", ["--config", "missing.yaml"], "missing.yaml: cannot read"),
    ("train", ["--config", "config.yaml"], "config.yaml: optim.lr: Input should be greater than 0"),
    ("train", [*DIGITS, "model.name=SiT-Q/9"], "model.name: unknown model 'SiT-Q/9'"),
    ("train", [*DIGITS, "model.input_size=32"], "model: digits data needs input_size"),
    ("train", [*DIGITS, "data.kind=images"], "data.kind 'images' needs data.path"),
    ("train", [*DIGITS, "data.kind=images", "--set", "data.path=missing"], "missing: data.path: no such folder"),
    ("train", [*DIGITS, "sampling.mode=bogus"], "sampling.mode: unknown sampler 'bogus'"),
    ("train", [*DIGITS, "sampling.mode=sde", "--set", "sampling.steps=1"], "the 'sde' sampler needs at least 2"),
    ("train", [*DIGITS, "objective.lsep.uncond_prob=2"], "objective.lsep.uncond_prob: Input should be less"),
    ("train", [*DIGITS, "objective.sra.block_out_t=99"], "objective.sra.block_out_t: block depth 99 is deeper"),
    ("search", ["--space", "nope"], "nope: <space>: not a file and not a shipped space"),
    ("search", ["--space", "missing.yaml"], "missing.yaml: <file>: cannot read"),
    ("search", ["--space", "syntax.yaml"], "syntax.yaml: <file>: invalid YAML"),
    ("search", ["--space", "budget.yaml"], "budget.yaml: budget.num_samples: expected >= 1"),
    ("search", ["--space", "domain.yaml"], "domain.yaml: params.objective.lsep.uncond_prob.high: Input should be"),
    ("search", ["--space", "metric.yaml"], "metric.yaml: metric.name: sra_loss is reported only when"),
    ("ablate", ["--arms", "nope"], "--arms: nope: no such file or shipped arms (digits"),
    ("ablate", ["--arms", "missing.yaml"], "missing.yaml: <file>: cannot read"),
    ("ablate", ["--arms", "syntax.yaml"], "syntax.yaml: <file>: invalid YAML"),
    ("ablate", ["--arms", "arms-seeds.yaml"], "arms-seeds.yaml: seeds: Input should be greater than or equal to 2"),
    ("ablate", ["--arms", "arms-field.yaml"], "arms-field.yaml: arms.lsep.optim.lrr: not a config field"),
    ("ablate", ["--arms", "arms-lr.yaml"], "arms-lr.yaml (arm lsep): optim.lr: Input should be a valid number"),
    ("ablate", ["--arms", "arms-data.yaml"], "missing: data.path: no such folder"),
    ("ablate", ["--arms", "arms-workers.yaml"], "budget.workers_per_trial: one trial needs more than this machine"),
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


@pytest.mark.parametrize("command,args,names", BAD_INPUT, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD_INPUT])
def test_a_bad_file_or_value_is_refused_before_any_heavy_library_loads(command, args, names, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    rc, message, imports = imported(command, args, tmp_path)
    assert rc == 2, message
    assert message.startswith("error: ") and len(message.splitlines()) == 1 and names in message, message
    assert not imports & HEAVY, f"{command} {' '.join(args)} imported {sorted(imports & HEAVY)}"


def test_the_torch_free_name_lists_agree_with_their_registries():
    from lsep_tune import checkpoint, config, evaluate, presets, published
    from lsep_tune.evaluation import DEFAULT_METRICS, default_cache_dir, in_training
    from lsep_tune.evaluation.extractors import SUPPORTED
    from lsep_tune.sample import generate, options
    from lsep_tune.sample.batch import SAMPLERS
    from lsep_tune.sample.solvers import SOLVERS
    from lsep_tune.search import space
    from lsep_tune.train.metrics import LOOP_METRICS

    assert options.SOLVER_NAMES == tuple(SOLVERS) and options.SAMPLER_NAMES == tuple(SAMPLERS)
    assert options.SOLVER_MIN_STEPS == {name: solver.min_steps for name, solver in SOLVERS.items()}
    assert (space.LOOP_METRICS, space.EVAL_METRICS, space.UNCERTAINTY_OF) == (
        LOOP_METRICS, in_training.EVAL_METRICS, in_training.UNCERTAINTY_OF)
    assert options.CHECKPOINT_FORMATS == published.FORMATS
    assert (options.EMA_FILE, options.STATE_FILE) == (checkpoint.EMA_FILE, checkpoint.STATE_FILE)
    assert (options.DEFAULT_SEED, options.DEFAULT_BATCH) == (generate.DEFAULT_SEED, generate.DEFAULT_BATCH)
    assert (evaluate.DEFAULT_METRICS, evaluate.SUPPORTED) == (tuple(DEFAULT_METRICS), tuple(SUPPORTED))
    assert evaluate.DEFAULT_CACHE_DIR == default_cache_dir()
    assert config.preset_names is presets.preset_names and "digits" in presets.preset_names()


def test_the_torch_free_regularizer_configs_are_the_modules_configs():
    from lsep_tune.objectives.configs import OBJECTIVE_METRICS, REGULARIZER_CONFIGS
    from lsep_tune.objectives.objective import REGULARIZERS, TrainObjective

    assert list(REGULARIZER_CONFIGS) == list(REGULARIZERS)
    assert {name: reg.Config for name, reg in REGULARIZERS.items()} == REGULARIZER_CONFIGS
    assert TrainObjective.metrics is OBJECTIVE_METRICS


def test_a_command_ends_with_its_code_its_objects_frozen_out_of_the_last_collections():
    """`cli.exit_command`, which ends the heavy commands' processes (train, search, ablate, sample,
    evaluate, preprocess, bench): the exit code passes through, atexit handlers still run, and by then
    the heap is frozen, so the interpreter's final collections skip it."""
    code = ("import atexit, gc; from lsep_tune import cli; "
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); cli.exit_command(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 3 and done.stdout.strip() == "frozen True", done.stdout + done.stderr
