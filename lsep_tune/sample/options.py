"""The sampling command line's choices and defaults, kept without torch so that
``python -m lsep_tune.sample --help`` and a bad flag answer before torch loads. Each list mirrors a
registry that needs torch (tests/test_startup.py checks that they agree)."""
from __future__ import annotations

# solvers.SOLVERS, in its order; --sampler also takes the short name "ode" (Heun).
SOLVER_NAMES = ("ode-euler", "ode-heun", "sde", "ode-heun-full", "sde-uniform")
SAMPLER_NAMES = ("ode", *SOLVER_NAMES)
CHECKPOINT_FORMATS = ("lsep_tune", "lsep", "sra", "repa", "sit")  # published.FORMATS: lsep_tune's own, or a published layout
EMA_FILE, STATE_FILE = "ema_final.pt", "state.pt"  # checkpoint.EMA_FILE, checkpoint.STATE_FILE
DEFAULT_SEED = 0  # generate.DEFAULT_SEED
DEFAULT_BATCH = 64  # generate.DEFAULT_BATCH
