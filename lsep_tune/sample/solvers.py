"""Samplers for a velocity model: Euler and Heun ODE, Euler-Maruyama SDE.

Time runs from t = 1 (noise) to t = 0 (data). Classifier-free guidance mixes the conditional and
the null-class velocity only while t lies inside the guidance interval [low, high]; outside it
the conditional velocity is used alone.

The default modes follow the samplers published with REPA, LSEP and SRA, so that an FID computed
here is the number their tables report:

- ``sde``: a grid of ``steps`` times from 1 down to 0.04, Euler-Maruyama between them with diffusion
  2t, then one noise-free step from 0.04 to 0 whose drift keeps the noise term, landing on
  x0_hat - 0.04 * eps_hat rather than on x0_hat.
- ``ode-heun``: ``steps`` uniform steps; the last is a plain Euler step (no corrector at t = 0), and
  whether guidance applies to a step's two evaluations is decided by the step's starting time.
- ``ode-euler``: ``steps`` uniform Euler steps.

Two earlier variants stay under explicit names, for comparison with runs made before:
``sde-uniform`` (``steps`` uniform steps to t = 0, diffusion 2 sigma_t, a last step with the
velocity alone) and ``ode-heun-full`` (the corrector on every step, guidance decided by the time
of each evaluation).

To add a sampler: write one `Solver` subclass here, add one line to SOLVERS and one to
options.SOLVER_MIN_STEPS (read without torch); `sampling.mode` and the sample command's `--sampler`
accept its name.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lsep_tune.objectives.flow import interpolant
from lsep_tune.schema import known

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t (N,), y (N,)) -> v

SDE_LAST_STEP = 0.04  # the published SDE grid ends here; the remaining step is noise-free


def in_interval(t: float, interval: tuple[float, float]) -> bool:
    return interval[0] <= t <= interval[1]


def guided_velocity(
    model: VelocityFn, x: torch.Tensor, t: float, y: torch.Tensor, cfg_scale: float,
    interval: tuple[float, float], null_class: int, guide_at: float | None = None,
) -> torch.Tensor:
    """The velocity at time t, guided when `guide_at` (t by default) lies inside `interval`."""
    n = x.shape[0]
    t_vec = torch.full((n,), t, device=x.device, dtype=x.dtype)
    if cfg_scale == 1.0 or not in_interval(t if guide_at is None else guide_at, interval):
        return model(x, t_vec, y)
    v = model(torch.cat([x, x]), torch.cat([t_vec, t_vec]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def _eps_from_velocity(x: torch.Tensor, v: torch.Tensor, t: float, path_type: str) -> torch.Tensor:
    """The noise estimate implied by v on the path: solve x = a x0 + s eps, v = a' x0 + s' eps."""
    a, s, da, ds = interpolant(torch.tensor(t, dtype=torch.float64), path_type)
    return (a * v - da * x) / float(a * ds - da * s)


def sde_drift(x: torch.Tensor, v: torch.Tensor, t: float, diffusion: float, path_type: str) -> torch.Tensor:
    """Reverse-time drift v - g^2/2 * score, with score = -eps_hat / sigma_t."""
    _, sigma, _, _ = interpolant(torch.tensor(t, dtype=torch.float64), path_type)
    return v + (0.5 * diffusion / float(sigma)) * _eps_from_velocity(x, v, t, path_type)


class Solver:
    """One way from t = 1 to t = 0: the times it visits and one step between two of them."""

    min_steps = 1

    def times(self, steps: int) -> list[float]:
        """The times visited, from 1 to 0 (steps + 1 of them); uniform unless a solver says otherwise."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()

    def step(self, v_fn, x: torch.Tensor, t_cur: float, t_next: float, last: bool, path_type: str,
             generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class EulerODE(Solver):
    def step(self, v_fn, x, t_cur, t_next, last, path_type, generator):
        return x - (t_cur - t_next) * v_fn(x, t_cur)


class HeunODE(Solver):
    """Published: the last step is plain Euler; guidance of both evaluations follows the step's start."""

    corrector_on_last = False
    guide_by_start = True

    def step(self, v_fn, x, t_cur, t_next, last, path_type, generator):
        h = t_cur - t_next
        v = v_fn(x, t_cur)
        if last and not self.corrector_on_last:
            return x - h * v
        x_pred = x - h * v
        return x - 0.5 * h * (v + v_fn(x_pred, t_next, t_cur if self.guide_by_start else None))


class HeunODEFull(HeunODE):
    """The earlier variant: a corrector on every step, each evaluation guided by its own time."""

    corrector_on_last = True
    guide_by_start = False


class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse SDE; a variant sets its diffusion and its noise-free last step."""

    def diffusion(self, t: float, path_type: str) -> float:
        raise NotImplementedError

    def last_step(self, x, v, h, t_cur, diffusion, path_type):
        raise NotImplementedError

    def step(self, v_fn, x, t_cur, t_next, last, path_type, generator):
        h = t_cur - t_next
        v = v_fn(x, t_cur)
        diffusion = self.diffusion(t_cur, path_type)
        if last:
            return self.last_step(x, v, h, t_cur, diffusion, path_type)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return x - h * sde_drift(x, v, t_cur, diffusion, path_type) + math.sqrt(diffusion * h) * z


class PublishedSDE(EulerMaruyama):
    """Grid 1 -> 0.04 then 0, diffusion 2t, a noise-free last step whose drift keeps the noise term."""

    min_steps = 2

    def times(self, steps: int) -> list[float]:
        if steps < self.min_steps:
            raise ValueError("the published SDE grid needs steps >= 2 (it ends with a step from 0.04 to 0)")
        return torch.linspace(1.0, SDE_LAST_STEP, steps, dtype=torch.float64).tolist() + [0.0]

    def diffusion(self, t: float, path_type: str) -> float:
        return 2 * t

    def last_step(self, x, v, h, t_cur, diffusion, path_type):
        return x - h * sde_drift(x, v, t_cur, diffusion, path_type)


class UniformSDE(EulerMaruyama):
    """The earlier variant: uniform steps to 0, diffusion 2 sigma_t, a last step on the velocity alone."""

    def diffusion(self, t: float, path_type: str) -> float:
        _, sigma, _, _ = interpolant(torch.tensor(t, dtype=torch.float64), path_type)
        return 2 * float(sigma)

    def last_step(self, x, v, h, t_cur, diffusion, path_type):
        return x - h * v


SOLVERS: dict[str, Solver] = {
    "ode-euler": EulerODE(),
    "ode-heun": HeunODE(),
    "sde": PublishedSDE(),
    "ode-heun-full": HeunODEFull(),
    "sde-uniform": UniformSDE(),
}


@torch.no_grad()
def sample(
    model: VelocityFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str = "ode-heun",
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int = 1000,
    path_type: str = "linear",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integrate from `noise` at t = 1 to data at t = 0 in `steps` steps (see the module doc)."""
    solver = SOLVERS[known("sampler", mode, SOLVERS)]
    ts = solver.times(steps)
    x = noise

    def v_fn(x_: torch.Tensor, t_: float, guide_at: float | None = None) -> torch.Tensor:
        return guided_velocity(model, x_, t_, y, cfg_scale, guidance_interval, null_class, guide_at)

    for i in range(steps):
        x = solver.step(v_fn, x, ts[i], ts[i + 1], i == steps - 1, path_type, generator)
    return x
