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


class Recorder:
    """An affine velocity v = a x + b that records each call's time and whether it was guided."""

    def __init__(self, a=0.3, b=0.1, null_class=9):
        self.a, self.b, self.null_class = a, b, null_class
        self.calls: list[tuple[float, bool]] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, t, y):
        assert torch.all(t == t[0])
        guided = bool((y == self.null_class).any())
        self.calls.append((float(t[0]), guided))
        self.inputs.append(x[: x.shape[0] // 2] if guided else x)
        # The null class gets another velocity, so guidance changes the result.
        return self.a * x + self.b + torch.where(y.view(-1, 1) == self.null_class, 0.5, 0.0).to(x.dtype)


def test_published_sde_grid_and_last_step_land_on_x0_hat_minus_004_eps_hat():
    rec = Recorder()
    noise = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)
    out = sample(rec, noise, y, mode="sde", steps=250, null_class=9, generator=torch.Generator().manual_seed(1))
    times = [t for t, _ in rec.calls]
    # 249 Euler-Maruyama steps on linspace(1, 0.04, 250), then one step from 0.04 to 0.
    assert len(times) == 250
    torch.testing.assert_close(torch.tensor(times, dtype=torch.float64),
                               torch.linspace(1.0, 0.04, 250, dtype=torch.float64))
    x = rec.inputs[-1]
    v = rec.a * x + rec.b
    # Linear path x = (1 - t) x0 + t eps, v = eps - x0, at t = 0.04 (hand-solved):
    x0_hat, eps_hat = x - 0.04 * v, x + 0.96 * v
    torch.testing.assert_close(out, x0_hat - 0.04 * eps_hat)


def test_uniform_sde_variant_keeps_the_velocity_only_last_step():
    rec = Recorder()
    noise = torch.randn(8, 1, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    out = sample(rec, noise, y, mode="sde-uniform", steps=10, null_class=9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.tensor([t for t, _ in rec.calls], dtype=torch.float64),
                               torch.linspace(1.0, 0.1, 10, dtype=torch.float64))
    x = rec.inputs[-1]
    torch.testing.assert_close(out, x - 0.1 * (rec.a * x + rec.b))


def test_published_sde_guides_exactly_the_steps_starting_inside_the_interval():
    rec = Recorder()
    y = torch.zeros(4, dtype=torch.long)
    sample(rec, torch.randn(4, 1, dtype=torch.float64), y, mode="sde", steps=250, cfg_scale=1.8,
           guidance_interval=(0.0, 0.7), null_class=9, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(1.0, 0.04, 250, dtype=torch.float64).tolist()
    assert [g for _, g in rec.calls] == [t <= 0.7 for t in grid]
    assert rec.calls[-1] == (pytest.approx(0.04), True)  # the last step is guided too


def test_published_heun_skips_the_last_corrector_and_guides_by_the_step_start():
    # Grid 1, .75, .5, .25, 0 with guidance on t <= 0.5.
    rec = Recorder()
    noise = torch.randn(4, 1, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    out = sample(rec, noise, y, mode="ode-heun", steps=4, cfg_scale=2.0, guidance_interval=(0.0, 0.5), null_class=9)
    expected = [(1.0, False), (0.75, False),  # step 1: predictor at 1, corrector at .75
                (0.75, False), (0.5, False),  # step 2 starts at .75: its corrector at .5 is not guided
                (0.5, True), (0.25, True),
                (0.25, True)]  # step 4: Euler only, no corrector at t = 0
    assert [(pytest.approx(t), g) for t, g in rec.calls] == expected
    x = rec.inputs[-1]
    v_cond, v_null = rec.a * x + rec.b, rec.a * x + rec.b + 0.5
    torch.testing.assert_close(out, x - 0.25 * (v_null + 2.0 * (v_cond - v_null)))


def test_full_heun_variant_runs_every_corrector_and_guides_by_its_own_time():
    rec = Recorder()
    y = torch.zeros(4, dtype=torch.long)
    sample(rec, torch.randn(4, 1, dtype=torch.float64), y, mode="ode-heun-full", steps=4, cfg_scale=2.0,
           guidance_interval=(0.0, 0.5), null_class=9)
    expected = [(1.0, False), (0.75, False), (0.75, False), (0.5, True), (0.5, True), (0.25, True),
                (0.25, True), (0.0, True)]
    assert [(pytest.approx(t), g) for t, g in rec.calls] == expected


def test_a_sampler_is_one_solver_class_plus_its_registry_lines(monkeypatch):
    """A solver registered in SOLVERS, and its min_steps in options.SOLVER_MIN_STEPS, is what `sample` runs
    and what `sampling.mode` accepts, steps checked."""
    from lsep_tune.config import load_config
    from lsep_tune.errors import InputError
    from lsep_tune.sample.options import SOLVER_MIN_STEPS
    from lsep_tune.sample.solvers import SOLVERS, Solver

    class Midpoint(Solver):
        min_steps = 3

        def step(self, v_fn, x, t_cur, t_next, last, path_type, generator):
            h = t_cur - t_next
            return x - h * v_fn(x - 0.5 * h * v_fn(x, t_cur), t_cur - 0.5 * h)

    monkeypatch.setitem(SOLVERS, "ode-midpoint", Midpoint())
    monkeypatch.setitem(SOLVER_MIN_STEPS, "ode-midpoint", Midpoint.min_steps)
    v = exact_velocity(torch.tensor([M]), torch.tensor([S]))
    noise = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(v, noise, torch.zeros(40000, dtype=torch.long), mode="ode-midpoint", steps=40, null_class=1)
    assert abs(x.mean().item() - M) < 0.02 and abs(x.std().item() - S) < 0.02
    assert load_config(preset="digits", overrides=["sampling.mode=ode-midpoint", "sampling.steps=3"]).sampling.steps == 3
    with pytest.raises(InputError, match="sampling.steps: the 'ode-midpoint' sampler needs at least 3 steps"):
        load_config(preset="digits", overrides=["sampling.mode=ode-midpoint", "sampling.steps=2"])
    with pytest.raises(InputError, match="unknown sampler 'ode-mid', expected one of .*ode-midpoint"):
        load_config(preset="digits", overrides=["sampling.mode=ode-mid"])
