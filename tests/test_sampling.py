"""Samplers against an exact velocity field: data N(m, s^2) joined to noise N(0, 1) by the linear path."""
import pytest
import torch

from lsep_tune.sample.solvers import guided_velocity, sample

M, S = 2.0, 0.5


def exact_velocity(mean, std):
    """v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mean, std^2) per class (tensors indexed by label)."""

    def v(x, t, y):
        m, s = mean[y].view(-1, 1), std[y].view(-1, 1)
        t = t.view(-1, 1).double()
        var_t = (1 - t) ** 2 * s**2 + t**2
        cov = t - (1 - t) * s**2
        return (-m + cov / var_t * (x.double() - (1 - t) * m)).to(x.dtype)

    return v


@pytest.mark.parametrize("mode,steps,tol", [("ode-euler", 200, 0.03), ("ode-heun", 40, 0.02), ("sde", 250, 0.04)])
def test_samplers_reach_the_target_gaussian(mode, steps, tol):
    g = torch.Generator().manual_seed(0)
    n = 40000
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    v = exact_velocity(torch.tensor([M]), torch.tensor([S]))
    x = sample(v, noise, y, mode=mode, steps=steps, null_class=1, generator=g)
    assert abs(x.mean().item() - M) < tol
    assert abs(x.std().item() - S) < tol


def test_sde_adds_noise_and_ode_does_not():
    v = exact_velocity(torch.tensor([M]), torch.tensor([S]))
    noise = torch.randn(16, 1, dtype=torch.float64)
    y = torch.zeros(16, dtype=torch.long)
    a = sample(v, noise, y, mode="ode-heun", steps=10, null_class=1)
    b = sample(v, noise, y, mode="ode-heun", steps=10, null_class=1)
    torch.testing.assert_close(a, b)
    s1 = sample(v, noise, y, mode="sde", steps=10, null_class=1, generator=torch.Generator().manual_seed(1))
    s2 = sample(v, noise, y, mode="sde", steps=10, null_class=1, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(s1, s2)


def test_cfg_only_inside_the_guidance_interval():
    # class 0 -> N(2, .5^2); null class 1 -> N(-1, 1): guidance pushes samples beyond class 0's mean.
    v = exact_velocity(torch.tensor([M, -1.0]), torch.tensor([S, 1.0]))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    y = torch.zeros(4000, dtype=torch.long)
    plain = sample(v, noise, y, mode="ode-heun", steps=20, null_class=1)
    # An interval that no step time falls into: identical to the conditional model alone.
    outside = sample(v, noise, y, mode="ode-heun", steps=20, cfg_scale=4.0, guidance_interval=(0.51, 0.54), null_class=1)
    torch.testing.assert_close(outside, plain)
    guided = sample(v, noise, y, mode="ode-heun", steps=20, cfg_scale=4.0, guidance_interval=(0.0, 1.0), null_class=1)
    assert guided.mean().item() > plain.mean().item() + 0.5
    partial = sample(v, noise, y, mode="ode-heun", steps=20, cfg_scale=4.0, guidance_interval=(0.0, 0.3), null_class=1)
    assert plain.mean().item() < partial.mean().item() < guided.mean().item()


def test_guided_velocity_mixes_cond_and_null():
    def model(x, t, y):
        return torch.where(y.view(-1, 1) == 9, torch.full_like(x, 1.0), torch.full_like(x, 3.0))

    x = torch.zeros(2, 1)
    out = guided_velocity(model, x, 0.5, torch.tensor([0, 1]), 2.0, (0.0, 1.0), null_class=9)
    torch.testing.assert_close(out, torch.full_like(x, 1.0 + 2.0 * (3.0 - 1.0)))
    out = guided_velocity(model, x, 0.9, torch.tensor([0, 1]), 2.0, (0.0, 0.7), null_class=9)
    torch.testing.assert_close(out, torch.full_like(x, 3.0))
