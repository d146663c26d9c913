"""Samplers for a velocity model: Euler and Heun ODE, Euler-Maruyama SDE.

Time runs from t = 1 (noise) to t = 0 (data). Classifier-free guidance mixes the conditional and
the null-class velocity only while t lies inside the guidance interval [low, high]; outside it
the conditional velocity is used alone.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lsep_tune.objectives.flow import interpolant

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t (N,), y (N,)) -> v


def guided_velocity(
    model: VelocityFn, x: torch.Tensor, t: float, y: torch.Tensor, cfg_scale: float,
    interval: tuple[float, float], null_class: int,
) -> torch.Tensor:
    n = x.shape[0]
    t_vec = torch.full((n,), t, device=x.device, dtype=x.dtype)
    if cfg_scale == 1.0 or not (interval[0] <= t <= interval[1]):
        return model(x, t_vec, y)
    v = model(torch.cat([x, x]), torch.cat([t_vec, t_vec]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def _eps_from_velocity(x: torch.Tensor, v: torch.Tensor, t: float, path_type: str) -> torch.Tensor:
    """The noise estimate implied by v on the path: solve x = a x0 + s eps, v = a' x0 + s' eps."""
    a, s, da, ds = interpolant(torch.tensor(t, dtype=torch.float64), path_type)
    return (a * v - da * x) / float(a * ds - da * s)


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
    """Integrate from `noise` at t = 1 to data at t = 0 in `steps` uniform steps."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise
    v_fn = lambda x_, t_: guided_velocity(model, x_, t_, y, cfg_scale, guidance_interval, null_class)  # noqa: E731
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        h = t_cur - t_next
        v = v_fn(x, t_cur)
        if mode == "ode-euler":
            x = x - h * v
        elif mode == "ode-heun":
            x_pred = x - h * v
            x = x - 0.5 * h * (v + v_fn(x_pred, t_next))
        elif mode == "sde":
            if i == steps - 1:
                x = x - h * v  # the last step is the mean (ODE) step: the output carries no fresh noise
            else:
                # Reverse SDE with diffusion g^2 = 2 sigma_t: drift v - g^2/2 * score = v + eps_hat.
                _, sigma, _, _ = interpolant(torch.tensor(t_cur, dtype=torch.float64), path_type)
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                x = x - h * (v + _eps_from_velocity(x, v, t_cur, path_type)) + math.sqrt(2 * float(sigma) * h) * z
        else:
            raise ValueError(f"unknown sampling mode {mode!r}")
    return x
