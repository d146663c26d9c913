"""The fast training step changes nothing the mathematics defines: LSEP reuse, device-side
metrics, fused AdamW and torch.compile give the same losses, gradients and states."""
import json

import pytest
import torch

from lsep_tune.config import load_config
from lsep_tune.objectives.randomness import Draws
from lsep_tune.train.context import LocalContext, TrainContext
from lsep_tune.train.loop import train_loop
from lsep_tune.train.metrics import MetricWindow, TrainingDiverged
from lsep_tune.train.step import Training, build_objective

TINY = ["model.name=SiT-Tiny/2", "objective.lsep.encoder_depth=2", "sampling.steps=2", "sampling.grid_images=10"]


def lsep_cfg(reuse: bool):
    return load_config(preset="digits", overrides=TINY + [
        "objective.flow.class_dropout_prob=0.3", "objective.lsep.uncond_prob=0.6",
        f"objective.lsep.reuse_main_pass={str(reuse).lower()}"])


def loss_and_grads(reuse: bool, x, y):
    torch.manual_seed(0)
    objective = build_objective(lsep_cfg(reuse))
    probe_batches = []
    original = objective.sit.forward

    def spy(x_, t, y_, return_depths=(), stop_at=None):
        if stop_at is not None:
            probe_batches.append(len(x_))
        return original(x_, t, y_, return_depths=return_depths, stop_at=stop_at)

    objective.sit.forward = spy
    loss, metrics = objective(x, y, Draws.for_step(7, 3, len(x), 0, len(x), "cpu"))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads, probe_batches


def test_the_in_process_contexts_are_train_contexts(tmp_path):
    """The loop reads its context's members directly (no getattr defaults): each context has them all.
    RayContext, which needs a Ray Train worker, is covered by the distributed tests running the loop."""
    from lsep_tune.train.tune_context import TuneContext

    assert isinstance(LocalContext(tmp_path / "a", keep_checkpoints=1, device="cpu"), TrainContext)
    assert isinstance(TuneContext(tmp_path / "b", keep_checkpoints=1, device="cpu"), TrainContext)
    assert not isinstance(object(), TrainContext)


def test_lsep_reuse_keeps_loss_and_every_gradient():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    loss_full, m_full, grads_full, batches_full = loss_and_grads(False, x, y)
    loss_reuse, m_reuse, grads_reuse, batches_reuse = loss_and_grads(True, x, y)
    # The full second pass sees the whole batch; with reuse only the samples whose labels differ.
    assert batches_full == [64] and len(batches_reuse) == 1 and 0 < batches_reuse[0] < 64
    torch.testing.assert_close(loss_reuse, loss_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_reuse["probe_acc"], m_full["probe_acc"])
    assert grads_reuse.keys() == grads_full.keys()
    assert any(n.startswith("sit.blocks.0.") for n in grads_full)  # the probe trains the backbone
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_reuse[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_metric_window_means_and_divergence_within_the_window():
    ctx = LocalContext.__new__(LocalContext)  # only all_reduce_mean / all_gather are used
    window = MetricWindow(check_grad_norm=True)
    for step, loss in enumerate([1.0, 3.0], start=1):
        window.add({"loss": torch.tensor(loss), "grad_norm": torch.tensor(0.5)}, step)
    assert window.close(ctx) == {"grad_norm": 0.5, "loss": 2.0}
    assert window.steps == 0
    for step, (loss, norm) in enumerate([(1.0, 1.0), (1.0, float("inf")), (float("nan"), 1.0), (1.0, 1.0)], 11):
        window.add({"loss": torch.tensor(loss), "grad_norm": torch.tensor(norm)}, step)
    with pytest.raises(TrainingDiverged) as err:
        window.close(ctx)
    assert err.value.step == 12  # the first non-finite value, not the window's end
    scaled = MetricWindow(check_grad_norm=False)  # fp16: an inf grad norm is the loss scaler's business
    scaled.add({"loss": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf"))}, 1)
    assert scaled.close(ctx)["loss"] == 1.0


def test_diverging_loop_ends_at_the_logging_boundary_without_checkpoint(tmp_path):
    cfg = load_config(preset="digits", overrides=TINY + ["optim.lr=1e4", "optim.grad_clip=0", "run.max_steps=40",
                                                         "run.log_every=5", "run.ckpt_every=5"])
    with pytest.raises(TrainingDiverged) as err:
        train_loop(cfg, LocalContext(tmp_path, keep_checkpoints=10, device="cpu"))
    step = err.value.step
    assert 1 <= step < 40
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        if (tmp_path / "metrics.jsonl").exists() else []
    assert all(s < step for s in logged)  # nothing past the divergence was reported or checkpointed
    saved = [int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*")] \
        if (tmp_path / "checkpoints").exists() else []
    assert all(s < step for s in saved)


def test_summary_and_metrics_account_for_time_by_stage(tmp_path):
    cfg = load_config(preset="digits", overrides=TINY + ["run.max_steps=4", "run.log_every=2", "run.ckpt_every=4"])
    summary = train_loop(cfg, LocalContext(tmp_path, keep_checkpoints=1, device="cpu"))
    stages = summary["time_s"]
    assert set(stages) == {"startup", "train", "eval", "checkpoint", "report"}
    assert stages["train"] > 0 and stages["checkpoint"] > 0 and stages["eval"] > 0  # final grid = eval stage
    assert sum(stages.values()) <= summary["wall_time_s"] + 0.05
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["time_train_s"] > 0 and logged[1]["time_train_s"] >= logged[0]["time_train_s"]


def one_step_state(cfg, tmp_path):
    tr = Training(cfg, LocalContext(tmp_path, keep_checkpoints=1, device="cpu", progress=False))
    metrics = [{k: v.item() for k, v in tr.step(s).items()} for s in range(2)]
    return metrics, {k: v.detach().clone() for k, v in tr.objective.state_dict().items()}, tr


def test_fused_adamw_matches_the_plain_one(tmp_path):
    base = ["run.precision=fp32"]
    plain_m, plain, tr = one_step_state(load_config(preset="digits", overrides=TINY + base), tmp_path / "a")
    assert bool(tr.optimizer.defaults.get("fused")) == (tr.device.type == "cuda")  # auto: fused where it is a GPU
    fused_m, fused, tr = one_step_state(load_config(preset="digits", overrides=TINY + base + ["optim.fused=true"]),
                                        tmp_path / "b")
    assert tr.optimizer.defaults["fused"]
    assert fused_m[1]["loss"] == pytest.approx(plain_m[1]["loss"], rel=1e-5)
    for name, value in plain.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_and_eager_steps_agree(tmp_path):
    # The LSEP probe pass on the whole batch (no reuse of the main pass for a subset of varying size):
    # a subset would make dynamo recompile the backbone with dynamic shapes, doubling inductor's build.
    base = ["run.precision=fp32", "objective.sra.enabled=true", "objective.sra.block_out_s=1",
            "objective.sra.block_out_t=3", "objective.lsep.reuse_main_pass=false"]
    eager_m, eager, _ = one_step_state(load_config(preset="digits", overrides=TINY + base), tmp_path / "eager")
    compiled_m, compiled, tr = one_step_state(load_config(preset="digits", overrides=TINY + base + ["run.compile=true"]),
                                              tmp_path / "compiled")
    assert tr.objective.sit._compiled_call_impl is not None  # the backbone really ran compiled
    for a, b in zip(eager_m, compiled_m):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert compiled.keys() == eager.keys()  # checkpoints keep the eager parameter names
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)
