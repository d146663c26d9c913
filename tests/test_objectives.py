import copy
import math

import pytest
import torch

from lsep_tune.objectives.flow import flow_loss, interpolant, make_flow_batch
from lsep_tune.objectives.lsep import LSEP, crop_window_mask, step_weights
from lsep_tune.objectives.randomness import Draws
from lsep_tune.objectives.sra import alignment_loss
from lsep_tune.train.step import build_objective


def draws(n, step=0, seed=0):
    return Draws.for_step(seed, step, n, 0, n, "cpu")


def randomize_adaln(sit, std=0.05):
    for block in sit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=std)
    torch.nn.init.normal_(sit.final_layer.linear.weight, std=std)


def test_linear_path_input_and_target():
    x = torch.randn(64, 1, 8, 8)
    b = make_flow_batch(x, torch.zeros(64, dtype=torch.long), draws(64), "linear", "uniform", 0.0, 10)
    t = b.t.view(-1, 1, 1, 1)
    torch.testing.assert_close(b.x_t, (1 - t) * x + t * b.noise)
    torch.testing.assert_close(b.target, b.noise - x)
    assert b.t.min() >= 0 and b.t.max() < 1


def test_cosine_path_hand_values():
    a, s, da, ds = interpolant(torch.tensor([0.0, 0.5, 1.0]), "cosine")
    torch.testing.assert_close(a, torch.tensor([1.0, math.sqrt(0.5), 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s, torch.tensor([0.0, math.sqrt(0.5), 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(da, torch.tensor([0.0, -math.pi / 2 * math.sqrt(0.5), -math.pi / 2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ds, torch.tensor([math.pi / 2, math.pi / 2 * math.sqrt(0.5), 0.0]), atol=1e-6, rtol=0)


def test_flow_loss_is_per_sample_mse_averaged():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.stack([torch.full((1, 2, 2), 1.0), torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])])
    # sample 0: mean of 1s = 1; sample 1: 4 / 4 = 1 -> 1; change sample 1 to make it asymmetric
    pred[1, 0, 1, 1] = 2.0  # sample 1: (4 + 4) / 4 = 2
    assert flow_loss(pred, target).item() == pytest.approx(1.5)


def test_lognormal_times_and_class_dropout_rate():
    n = 20000
    b = make_flow_batch(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), draws(n), "linear", "lognormal", 0.1, 10)
    assert 0 < b.t.min() and b.t.max() < 1
    assert abs(b.t.median().item() - 0.5) < 0.02  # sigma = exp(N(0,1)) has median 1 -> t = 0.5
    assert abs((b.y_model == 10).float().mean().item() - 0.1) < 0.01


def test_crop_mask_windows_and_positions():
    top, left = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    mask = crop_window_mask(4, 2, top, left).view(3, 4, 4)
    assert mask.sum((1, 2)).tolist() == [4, 4, 4]
    assert mask[0, 0:2, 2:4].all() and mask[1, 1:3, 0:2].all() and mask[2, 2:4, 1:3].all()


def test_lsep_pool_draws_windows_in_range_and_positions_per_sample(digits_cfg):
    lsep = LSEP(digits_cfg.objective.lsep.model_copy(update={"crop_start": 2}), 8, 10, grid_size=4)
    tokens = torch.arange(16.0).view(1, 16, 1).repeat(512, 1, 1)  # token value = its grid index
    windows, positions = set(), set()
    for step in range(40):
        d = draws(512, step)
        pooled = lsep.pool(tokens, d)[:, 0]
        # Replay the same draws to learn the window and positions the pool used.
        d2 = draws(512, step)
        window = d2.randint_shared(2, 5)
        top = (d2.rand() * (4 - window + 1)).floor().long()
        left = (d2.rand() * (4 - window + 1)).floor().long()
        rows = top[:, None] + torch.arange(window)
        cols = left[:, None] + torch.arange(window)
        expected = (rows[:, :, None] * 4 + cols[:, None, :]).float().mean((1, 2))
        torch.testing.assert_close(pooled, expected)
        windows.add(window)
        positions |= set(zip(top.tolist(), left.tolist()))
        if window == 2:
            assert len(set(zip(top.tolist(), left.tolist()))) == 9  # every position, sample by sample
    assert windows == {2, 3, 4}


def test_no_crop_pools_the_whole_grid(digits_cfg):
    lsep = LSEP(digits_cfg.objective.lsep.model_copy(update={"crop_start": None}), 8, 10, grid_size=4)
    tokens = torch.randn(6, 16, 8)
    torch.testing.assert_close(lsep.pool(tokens, draws(6)), tokens.mean(1))


def test_step_weights_at_bin_edges():
    w = torch.linspace(0.0225, 0.03, 10)
    t = torch.tensor([0.0, 0.0999, 0.1, 0.45, 0.5, 0.9, 0.9999, 1.0])
    expected = torch.stack([w[0], w[0], w[1], w[4], w[5], w[9], w[9], w[9]])
    torch.testing.assert_close(step_weights(t, 0.0225, 0.03, 10), expected)


def test_lsep_probe_branch_drops_labels_at_uncond_prob(digits_cfg):
    cfg = digits_cfg.model_copy(deep=True)
    cfg.objective.flow.class_dropout_prob = 0.0
    cfg.objective.lsep.reuse_main_pass = False  # the whole probe batch through the second pass, to see its labels
    objective = build_objective(cfg)
    seen = []
    original = objective.sit.forward

    def spy(x, t, y, return_depths=(), stop_at=None):
        seen.append((stop_at, y.clone()))
        return original(x, t, y, return_depths=return_depths, stop_at=stop_at)

    objective.sit.forward = spy
    n = 4000
    y = torch.randint(0, 10, (n,))
    objective(torch.randn(n, 1, 8, 8), y, draws(n), teacher=None)
    (main_stop, y_main), (probe_stop, y_probe) = seen
    assert main_stop is None and torch.equal(y_main, y)
    assert probe_stop == cfg.objective.lsep.encoder_depth
    assert abs((y_probe == 10).float().mean().item() - 0.9) < 0.02
    assert torch.equal(y_probe[y_probe != 10], y[y_probe != 10])


def test_lsep_loss_weighting_constant_and_steps(digits_cfg):
    torch.manual_seed(0)
    cfg = digits_cfg.objective.lsep
    sit = build_objective(digits_cfg).sit
    for weights_type in ("constant", "steps"):
        lsep = LSEP(cfg.model_copy(update={"weights_type": weights_type, "crop_start": None}), sit.hidden_size, 10,
                    sit.grid_size)
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        batch = make_flow_batch(x, y, draws(32), "linear", "uniform", 0.0, 10)
        out = lsep(sit, batch, {}, draws(32, step=7), None)
        # Recompute by hand from the same draws.
        d = draws(32, step=7)
        y_probe = torch.where(d.rand() < cfg.uncond_prob, torch.full_like(y, 10), y)
        k = cfg.encoder_depth
        _, f = sit(batch.x_t, batch.t, y_probe, return_depths=(k,), stop_at=k)
        ce = torch.nn.functional.cross_entropy(lsep.probe(f[k].mean(1)), y, reduction="none")
        if weights_type == "constant":
            expected = cfg.weight * ce.mean()
        else:
            bins = (batch.t * 10).floor().clamp(max=9).long()
            expected = (torch.linspace(cfg.weight_start, cfg.weight_end, 10)[bins] * ce).mean()
        torch.testing.assert_close(out.loss, expected)
        assert 0.0 <= out.metrics["probe_acc"] <= 1.0


def test_probe_gradient_reaches_the_backbone(digits_cfg):
    cfg = digits_cfg.model_copy(deep=True)
    objective = build_objective(cfg)
    randomize_adaln(objective.sit)  # adaLN-Zero gates are 0 at init: open them
    lsep = objective.regularizers["lsep"]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    batch = make_flow_batch(x, y, draws(16), "linear", "uniform", 0.0, 10)
    lsep(objective.sit, batch, {}, draws(16), None).loss.backward()
    assert objective.sit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert objective.sit.blocks[-1].attn.qkv.weight.grad is None  # beyond encoder_depth: untouched


def sra_setup(digits_cfg, **update):
    cfg = digits_cfg.model_copy(deep=True)
    cfg.objective.lsep.enabled = False
    cfg.objective.sra.enabled = True
    for k, v in update.items():
        setattr(cfg.objective.sra, k, v)
    torch.manual_seed(0)
    objective = build_objective(cfg)
    randomize_adaln(objective.sit)
    teacher = copy.deepcopy(objective.sit).eval().requires_grad_(False)
    with torch.no_grad():  # the "EMA" teacher differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, objective, teacher


def test_sra_teacher_gets_less_noise_no_gradient_and_its_own_weights(digits_cfg):
    cfg, objective, teacher = sra_setup(digits_cfg)
    calls = []
    original = teacher.forward

    def spy(x, t, y, return_depths=(), stop_at=None):
        calls.append((x.clone(), t.clone(), y.clone(), stop_at, torch.is_grad_enabled()))
        return original(x, t, y, return_depths=return_depths, stop_at=stop_at)

    teacher.forward = spy
    n = 256
    x, y = torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))
    loss, metrics = objective(x, y, draws(n), teacher=teacher)
    loss.backward()
    (x_teacher, t_teacher, y_teacher, stop_at, grad_on), = calls
    batch = make_flow_batch(x, y, draws(n), "linear", "uniform", cfg.objective.flow.class_dropout_prob, 10)
    assert stop_at == cfg.objective.sra.block_out_t and not grad_on
    assert (t_teacher <= batch.t).all() and (batch.t - t_teacher <= cfg.objective.sra.t_max + 1e-6).all()
    assert (batch.t - t_teacher).mean() > 0.05  # less noise on average, not equal
    torch.testing.assert_close(x_teacher, batch.noised(t_teacher))  # same data, same noise sample
    assert torch.equal(y_teacher, batch.y_model)  # same (possibly dropped) labels
    assert all(p.grad is None for p in teacher.parameters())
    assert objective.regularizers["sra"].head.fc1.weight.grad is not None
    # The loss uses the teacher's weights: recompute it from the teacher by hand.
    with torch.no_grad():
        _, f_t = original(x_teacher, t_teacher, y_teacher, return_depths=(4,), stop_at=4)
        _, f_s = objective.sit(batch.x_t, batch.t, batch.y_model, return_depths=(2,), stop_at=2)
        expected = alignment_loss(objective.regularizers["sra"].head(f_s[2]), f_t[4], cfg.objective.sra)
    torch.testing.assert_close(metrics["sra_loss"], expected)
    with torch.no_grad():
        _, f_student_weights = objective.sit(x_teacher, t_teacher, y_teacher, return_depths=(4,), stop_at=4)
        other = alignment_loss(objective.regularizers["sra"].head(f_s[2]), f_student_weights[4], cfg.objective.sra)
    assert not torch.allclose(other, expected)


def test_sra_losses_and_cosine_axis():
    from lsep_tune.objectives.configs import SRAConfig

    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    per_token = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    per_channel = 1 - torch.nn.functional.cosine_similarity(s, t, dim=1)
    torch.testing.assert_close(alignment_loss(s, t, SRAConfig(loss_type="cos")), per_token.mean())
    torch.testing.assert_close(alignment_loss(s, t, SRAConfig(loss_type="cos", cos_axis="tokens")), per_channel.mean())
    torch.testing.assert_close(alignment_loss(s, t, SRAConfig(loss_type="l1")), (s - t).abs().mean())
    torch.testing.assert_close(alignment_loss(s, t, SRAConfig(loss_type="l2")), ((s - t) ** 2).mean())
    d = (s - t).abs()
    sml1 = torch.where(d < 0.05, 0.5 * d**2 / 0.05, d - 0.025).mean()
    torch.testing.assert_close(alignment_loss(s, t, SRAConfig(loss_type="sml1")), sml1)


@pytest.mark.parametrize("lsep,sra,repa", [(False, False, False), (True, False, False), (False, True, False),
                                            (True, True, False), (False, False, True), (True, False, True),
                                            (False, True, True)])
def test_regularizers_compose_from_config(digits_cfg, lsep, sra, repa):
    cfg = digits_cfg.model_copy(deep=True)
    cfg.objective.lsep.enabled = lsep
    cfg.objective.sra.enabled = sra
    extras = None
    if repa:  # LSEP+REPA and SRA+REPA compose from config, REPA's target arriving with the batch
        cfg.objective.repa.enabled = True
        cfg.objective.repa.encoder_depth, cfg.objective.repa.encoder_dim = 2, 12
        cfg.objective.repa.projector_dim = 16
        extras = {"repa_target": torch.randn(8, 16, 12)}  # a 4 x 4 grid of 12-channel encoder tokens
    objective = build_objective(cfg)
    assert set(objective.regularizers) == {n for n, on in (("lsep", lsep), ("sra", sra), ("repa", repa)) if on}
    loss, metrics = objective(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), draws(8),
                              teacher=copy.deepcopy(objective.sit).eval(), extras=extras)
    assert ("probe_acc" in metrics) == lsep and ("sra_loss" in metrics) == sra and ("repa_loss" in metrics) == repa
    if repa:
        assert metrics["repa_loss"] > 0
    extra = sum(v for k, v in metrics.items() if k == "sra_loss") if sra else 0
    if not (lsep or sra or repa):
        torch.testing.assert_close(loss.detach(), metrics["flow_loss"])
    else:
        assert loss.item() > metrics["flow_loss"].item() or extra == 0
    groups = objective.param_groups(0.0)
    if lsep:
        assert any(g.get("lr") == cfg.objective.lsep.probe_lr for g in groups)


def test_draws_do_not_depend_on_the_worker_split():
    whole = Draws.for_step(3, 5, 8, 0, 8, "cpu")
    a, b = Draws.for_step(3, 5, 8, 0, 4, "cpu"), Draws.for_step(3, 5, 8, 4, 4, "cpu")
    full_t, full_n = whole.rand(), whole.randn(2)
    torch.testing.assert_close(torch.cat([a.rand(), b.rand()]), full_t)
    torch.testing.assert_close(torch.cat([a.randn(2), b.randn(2)]), full_n)
    assert whole.randint_shared(0, 100) == a.randint_shared(0, 100) == b.randint_shared(0, 100)


# ------------------------------------------------------------------ published schedules and initialisation

def test_sra_epoch_decay_gives_the_published_weights():
    from lsep_tune.objectives.configs import SRAConfig
    from lsep_tune.objectives.sra import SRA

    # The published 256 px recipe: 0.2 through epoch 149, then 0.2 * 0.1^((epoch - 149) / 1000).
    cfg = SRAConfig(enabled=True, loss_type="sml1", weight=0.2, weight_schedule="epoch_decay")
    sra = SRA(cfg, 16, 10, 4)
    steps_per_epoch = 1281167 // 256  # ImageNet at global batch 256: 5004
    for epoch, expected in [(0, 0.2), (149, 0.2), (150, 0.2 * 0.1 ** 0.001), (649, 0.2 * 0.1 ** 0.5),
                            (1149, 0.02)]:
        sra.set_step(epoch * steps_per_epoch, steps_per_epoch)
        assert sra.weight() == pytest.approx(expected, rel=1e-12)
    sra.set_step(150 * steps_per_epoch - 1, steps_per_epoch)  # still epoch 149
    assert sra.weight() == 0.2
    constant = SRA(SRAConfig(enabled=True, weight=0.5), 16, 10, 4)
    constant.set_step(10**7, steps_per_epoch)
    assert constant.weight() == 0.5


def test_sra_scheduled_weight_scales_the_loss(digits_cfg):
    from lsep_tune.objectives.configs import SRAConfig
    from lsep_tune.objectives.sra import SRA

    cfg = SRAConfig(enabled=True, block_out_s=1, block_out_t=2, weight=0.2, weight_schedule="epoch_decay",
                    decay_start_epoch=0, decay_period_epochs=1.0)
    torch.manual_seed(0)
    obj = build_objective(digits_cfg)
    sra = SRA(cfg, obj.sit.hidden_size, 10, obj.sit.grid_size)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    batch = make_flow_batch(x, y, draws(4), "linear", "uniform", 0.1, obj.sit.null_class)
    _, feats = obj.sit(batch.x_t, batch.t, batch.y_model, return_depths=(1,))
    sra.set_step(0, 10)
    at_0 = sra(obj.sit, batch, feats, draws(4), obj.sit)
    sra.set_step(20, 10)  # epoch 2: two periods past the start -> 1/100
    at_2 = sra(obj.sit, batch, feats, draws(4), obj.sit)
    torch.testing.assert_close(at_2.loss, at_0.loss * 0.01)


def test_lsep_class_loss_decay_is_off_by_default_and_published_when_on(digits_cfg):
    from lsep_tune.objectives.configs import LSEPConfig

    off = LSEP(LSEPConfig(enabled=True, encoder_depth=1), 16, 10, 4)
    off.set_step(10**8, 5004)
    assert off.decay() == 1.0
    # The published intent, in steps at 5004 steps per epoch: from epoch 100, 10x down every 800 epochs.
    on = LSEP(LSEPConfig(enabled=True, encoder_depth=1, decay_start_step=100 * 5004, decay_period=800 * 5004),
              16, 10, 4)
    for epoch, expected in [(50, 1.0), (100, 1.0), (500, 0.1 ** 0.5), (900, 0.1), (1700, 0.01)]:
        on.set_step(epoch * 5004, 5004)
        assert on.decay() == pytest.approx(expected, rel=1e-12)


def test_heads_start_xavier_with_zero_biases_unless_asked_otherwise():
    from lsep_tune.objectives.configs import LSEPConfig, SRAConfig
    from lsep_tune.objectives.sra import SRA

    torch.manual_seed(0)
    d, classes = 256, 1000
    probe = LSEP(LSEPConfig(enabled=True), d, classes, 4).probe[1]
    head = SRA(SRAConfig(enabled=True), d, classes, 4).head
    bound = math.sqrt(6 / (d + classes))  # xavier-uniform bound of the probe's Linear
    assert probe.weight.abs().max() <= bound and probe.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(probe.bias) == 0
    for lin in (head.fc1, head.fc2):
        fan_in, fan_out = lin.weight.shape[1], lin.weight.shape[0]
        assert lin.weight.abs().max() > 0.9 * math.sqrt(6 / (fan_in + fan_out))
        assert torch.count_nonzero(lin.bias) == 0
    # nn.Linear's own init: kaiming-uniform weights (bound 1/sqrt(fan_in)), non-zero biases.
    torch_probe = LSEP(LSEPConfig(enabled=True, probe_init="torch"), d, classes, 4).probe[1]
    assert torch.count_nonzero(torch_probe.bias) > 0
    assert torch_probe.weight.abs().max() <= 1 / math.sqrt(d)


def test_ema_first_update_decays_from_the_initial_weights():
    from timm.utils import ModelEmaV3

    from lsep_tune.train.step import ema_step

    model = torch.nn.Linear(3, 3)
    init = copy.deepcopy(model.state_dict())
    published, copying = ModelEmaV3(model, decay=0.9999), ModelEmaV3(model, decay=0.9999)
    with torch.no_grad():
        model.weight.add_(1.0)
    published.update(model, step=ema_step(1, "decay"))
    copying.update(model, step=ema_step(1, "copy"))
    torch.testing.assert_close(published.module.weight, 0.9999 * init["weight"] + 0.0001 * model.weight)
    torch.testing.assert_close(copying.module.weight, model.weight)


def test_sra_smooth_l1_preset_is_the_published_recipe():
    from lsep_tune.config import load_config

    sra = load_config(preset="imagenet256-sit-xl2-sra-sml1").objective.sra
    assert (sra.block_out_s, sra.block_out_t, sra.loss_type, sra.smooth_l1_beta, sra.weight) == (8, 20, "sml1", 0.05, 0.2)
    assert (sra.weight_schedule, sra.decay_start_epoch, sra.decay_period_epochs) == ("epoch_decay", 149, 1000)
    assert load_config(preset="imagenet256-sit-xl2").objective.sra.block_out_t == 20
