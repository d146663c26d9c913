"""The training loop. It runs unchanged in one process or as a Ray Train worker: everything that
differs (DDP, reporting, checkpoint storage) is behind the context it is given.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from lsep_tune.config import Config, dump_config
from lsep_tune.data.loader import StepBatches, load_dataset
from lsep_tune.models import create_model
from lsep_tune.objectives import Draws, TrainObjective
from lsep_tune.train.samples import evaluate_samples, save_sample_grid


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite: the run (or search trial) has failed."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


def build_objective(cfg: Config) -> TrainObjective:
    m = cfg.model
    sit = create_model(m.name, input_size=m.input_size, in_channels=m.in_channels,
                       num_classes=m.num_classes, qk_norm=m.qk_norm)
    return TrainObjective(sit, cfg.objective)


def build_optimizer(cfg: Config, objective: TrainObjective) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(objective.param_groups(o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _maybe_fail(cfg: Config, ctx, step: int) -> None:
    """Failure drill: the chosen rank dies once at the chosen step (a marker file makes it once)."""
    run = cfg.run
    if run.fail_at_step != step or ctx.rank != run.fail_rank:
        return
    marker = Path(ctx.output_dir) / f".failure_drill_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("the failure drill fired here\n")
    print(f"failure drill: rank {ctx.rank} exits at step {step}", flush=True)
    os._exit(17)


def trim_metrics(path: Path, start_step: int) -> None:
    """Drop records past the checkpoint a run resumes from: those steps are trained again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= start_step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def parameter_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train_loop(cfg: Config, ctx) -> dict:
    """Train `cfg` to cfg.run.max_steps; return the summary (also written by rank 0)."""
    started = time.time()
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    objective = build_objective(cfg).to(device)
    ema = ModelEmaV3(objective, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
    ema.requires_grad_(False)
    optimizer = build_optimizer(cfg, objective)
    use_scaler = cfg.run.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_step, earlier_cost = 0, 0.0
    state = ctx.resume_state()
    if state is not None:
        objective.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        earlier_cost = float(state.get("train_cost", 0.0))
    model = ctx.prepare(objective)

    accum = cfg.optim.grad_accum_steps
    local_batch = cfg.data.batch_size
    dataset = load_dataset(cfg.data, features=cfg.objective.repa.enabled, image_size=cfg.model.input_size)
    batches = StepBatches(dataset, cfg.run.seed, local_batch, ctx.world_size, ctx.rank, accum)
    is_main = ctx.rank == 0
    out = Path(ctx.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        trim_metrics(out / "metrics.jsonl", start_step)

    params = [p for g in optimizer.param_groups for p in g["params"]]
    teacher = ema.module.sit
    window: dict[str, float] = {}
    window_steps = 0
    last_metrics: dict[str, float] = {}
    last_ckpt: str | None = None
    last_eval: dict[str, float] = {}
    grid_path: str | None = None
    bar = tqdm(total=cfg.run.max_steps, initial=start_step, disable=not (is_main and getattr(ctx, "progress", False)),
               desc="train", dynamic_ncols=True)

    for step in range(start_step, cfg.run.max_steps):
        _maybe_fail(cfg, ctx, step)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            x, y, extras = batches.batch(step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            extras = {k: v.to(device, non_blocking=True) for k, v in extras.items()}
            draws = Draws.for_step(cfg.run.seed, step, local_batch * ctx.world_size * accum,
                                   (micro * ctx.world_size + ctx.rank) * local_batch, local_batch, device)
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast_for(cfg.run.precision, device):
                loss, metrics = model(x, y, draws, teacher=teacher, extras=extras)
            scaler.scale(loss / accum).backward()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v.float() / accum

        scaler.unscale_(optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        step_metrics["grad_norm"] = grad_norm.detach().float()
        # One small all-reduce per step: exact logged means, and every rank agrees on divergence.
        names = sorted(step_metrics)
        reduced = ctx.all_reduce_mean(torch.stack([step_metrics[k].to(device) for k in names])).tolist()
        values = dict(zip(names, reduced))
        if not math.isfinite(values["loss"]) or (not use_scaler and not math.isfinite(values["grad_norm"])):
            raise TrainingDiverged(
                f"non-finite loss {values['loss']} / grad norm {values['grad_norm']} at step {step + 1}", step + 1)
        scaler.step(optimizer)
        scaler.update()
        ema.update(objective, step=step + 1)

        done = step + 1
        bar.update(1)
        for k, v in values.items():
            window[k] = window.get(k, 0.0) + v
        window_steps += 1
        want_sample = cfg.run.sample_every and done % cfg.run.sample_every == 0
        if is_main and (want_sample or done == cfg.run.max_steps):
            grid_path = str(save_sample_grid(teacher, cfg, out / "samples" / f"grid_step_{done:08d}.png", device))
            ctx.log_artifact(grid_path, "samples")
        want_ckpt = done % cfg.run.ckpt_every == 0 or done == cfg.run.max_steps
        if done % cfg.run.log_every == 0 or want_ckpt:
            last_metrics = {k: v / window_steps for k, v in window.items()}
            last_metrics["lr"] = optimizer.param_groups[0]["lr"]
            # Wall-clock seconds of training so far, restarts included: the cost side of a search.
            last_metrics["train_cost"] = earlier_cost + time.time() - started
            every = cfg.run.eval_every
            if every and is_main and (done % every == 0 or done == cfg.run.max_steps):
                last_eval = {**evaluate_samples(teacher, cfg, device), "eval_step": done}
            last_metrics.update(last_eval)  # carried forward, so every later report holds the metric
            window, window_steps = {}, 0
            bar.set_postfix({k: f"{last_metrics[k]:.4g}" for k in ("loss", "probe_acc") if k in last_metrics})
            if is_main and bar.disable:
                shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(last_metrics.items()))
                print(f"step {done}/{cfg.run.max_steps} {shown}", flush=True)
            train_state = None
            if want_ckpt:
                train_state = {
                    "step": done,
                    "model": objective.state_dict(),
                    "ema": ema.module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "config": cfg.to_dict(),
                    "world_size": ctx.world_size,
                    "train_cost": last_metrics["train_cost"],
                }
            folder = ctx.report(last_metrics, done, train_state)
            if folder:
                last_ckpt = folder
    bar.close()
    batches.close()

    # Every rank's parameters and EMA should be bit-identical under DDP: a digest per rank shows it.
    digests = ctx.all_gather(parameter_digest(objective) + "-" + parameter_digest(ema.module))
    ema_path = None
    if is_main:
        ema_path = out / "ema_final.pt"
        torch.save({"step": max(cfg.run.max_steps, start_step), "ema": ema.module.sit.state_dict(),
                    "config": cfg.to_dict()}, ema_path)
        ctx.log_artifact(ema_path, "checkpoints")

    final_eval = None
    if is_main and cfg.run.final_eval_samples:
        final_eval = evaluate_samples(teacher, cfg, device, n=cfg.run.final_eval_samples)
        for cb in getattr(ctx, "callbacks", []):
            cb.log_metrics({f"final_{k}": v for k, v in final_eval.items()}, max(cfg.run.max_steps, start_step))

    summary = {
        "final_step": max(cfg.run.max_steps, start_step),
        "start_step": start_step,
        "world_size": ctx.world_size,
        "global_batch": local_batch * ctx.world_size * accum,
        "final_metrics": last_metrics,
        "final_loss": last_metrics.get("loss"),
        "final_flow_loss": last_metrics.get("flow_loss"),
        "probe_acc": last_metrics.get("probe_acc"),
        "fid": last_metrics.get("fid"),
        "final_eval": final_eval,
        "checkpoint": last_ckpt,
        "sample_grid": grid_path,
        "ema_checkpoint": str(ema_path) if ema_path else None,
        "replica_digests": digests,
        "device": str(device),
        "wall_time_s": round(time.time() - started, 2),
    }
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
