"""The sampling command line's choices and defaults, and the solvers the config's `sampling` section
may name, kept without torch so that ``python -m lsep_tune.sample --help``, a bad flag and a bad config
answer before torch loads. Each list mirrors a registry that needs torch (tests/test_startup.py checks
that they agree)."""
from __future__ import annotations

# solvers.SOLVERS, in its order, with each solver's min_steps; --sampler also takes the short name "ode" (Heun).
SOLVER_MIN_STEPS = {"ode-euler": 1, "ode-heun": 1, "sde": 2, "ode-heun-full": 1, "sde-uniform": 1}
SOLVER_NAMES = tuple(SOLVER_MIN_STEPS)
SAMPLER_NAMES = ("ode", *SOLVER_NAMES)
CHECKPOINT_FORMATS = ("lsep_tune", "lsep", "sra", "repa", "sit")  # published.FORMATS: lsep_tune's own, or a published layout
EMA_FILE, STATE_FILE = "ema_final.pt", "state.pt"  # checkpoint.EMA_FILE, checkpoint.STATE_FILE
DEFAULT_SEED = 0  # generate.DEFAULT_SEED
DEFAULT_BATCH = 64  # generate.DEFAULT_BATCH
