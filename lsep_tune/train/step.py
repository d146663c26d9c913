"""One optimizer step and everything it trains: the model and its regularizers, the optimizer, the
EMA teacher, the precision. `train_loop` repeats it, and `python -m lsep_tune.bench train` times
this same step, so the benchmark measures what a run does.
"""
from __future__ import annotations

import contextlib

import torch
from timm.utils import ModelEmaV3

from lsep_tune import published
from lsep_tune.config import Config
from lsep_tune.data.loader import StepBatches, load_dataset
from lsep_tune.models.sit import sit_from_config
from lsep_tune.objectives.objective import TrainObjective
from lsep_tune.objectives.randomness import Draws
from lsep_tune.train.context import TrainContext


def build_objective(cfg: Config) -> TrainObjective:
    return TrainObjective(sit_from_config(cfg.model), cfg.objective)


def load_initial_weights(cfg: Config, objective: TrainObjective) -> None:
    """run.init_from: the backbone, and the regularizer heads the file has under a known name."""
    conv = published.load(cfg.run.init_from, cfg.run.init_format, cfg.model.model_dump(), source="run.init_from")
    objective.sit.load_state_dict(conv.sit)
    own = objective.state_dict()
    heads = {k: v for k, v in conv.heads.items() if k in own and own[k].shape == v.shape}
    objective.load_state_dict(heads, strict=False)


def ema_step(done: int, first_update: str) -> int:
    """The step timm's EMA is told: at 1 it copies the weights, from 2 on it uses the decay.

    'decay' shifts by one so that the first update already decays from the initial weights, as the
    published scripts do (their EMA is a copy of the model before training).
    """
    return done + 1 if first_update == "decay" else done


def build_optimizer(cfg: Config, objective: TrainObjective, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; its fused kernel (one launch for all parameters) wherever the device has one."""
    o = cfg.optim
    fused = o.fused if o.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(objective.param_groups(o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                             fused=fused or None)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Training:
    """Everything a run trains, and its one optimizer step: what `train_loop` repeats and what
    `python -m lsep_tune.bench train` times, so the benchmark measures the real step."""

    def __init__(self, cfg: Config, ctx: TrainContext, dataset=None):
        self.cfg, self.ctx = cfg, ctx
        device = self.device = ctx.device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

        objective = build_objective(cfg)
        if cfg.run.init_from:
            load_initial_weights(cfg, objective)  # before the EMA copies the weights
        self.objective = objective = objective.to(device)
        self.ema = ModelEmaV3(objective, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        self.ema.requires_grad_(False)
        self.optimizer = build_optimizer(cfg, objective, device)
        self.use_scaler = cfg.run.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_scaler)

        self.start_step, self.earlier_cost = 0, 0.0
        state = ctx.resume_state()
        if state is not None:
            objective.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.start_step = int(state["step"])
            self.earlier_cost = float(state.get("train_cost", 0.0))
        if cfg.run.compile:
            # In place, so parameter names (checkpoints, EMA, DDP) stay those of the eager module.
            objective.sit.compile()
        self.model = ctx.prepare(objective)
        self.teacher = self.ema.module.sit
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.accum = cfg.optim.grad_accum_steps
        self.local_batch = cfg.data.batch_size
        data = dataset if dataset is not None else load_dataset(
            cfg.data, features=cfg.objective.repa.enabled, image_size=cfg.model.input_size)
        self.batches = StepBatches(data, cfg.run.seed, self.local_batch, ctx.world_size, ctx.rank, self.accum)
        # For epoch-based schedules (SRA's published decay): an epoch is one pass over the data.
        self.steps_per_epoch = max(1, len(data) // (self.local_batch * ctx.world_size * self.accum))
        self.pin = device.type == "cuda"

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """Train step `step` (0-based); return its metrics as device tensors, without a host sync."""
        cfg, ctx, device, accum = self.cfg, self.ctx, self.device, self.accum
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        model.train()
        optimizer.zero_grad(set_to_none=True)
        self.objective.set_step(step, self.steps_per_epoch)
        step_metrics: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            x, y, extras = self.batches.batch(step, micro)
            if self.pin:  # pinned host memory: the copy is queued, the host does not wait for the device
                x, y = x.pin_memory(), y.pin_memory()
                extras = {k: v.pin_memory() for k, v in extras.items()}
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            extras = {k: v.to(device, non_blocking=True) for k, v in extras.items()}
            draws = Draws.for_step(cfg.run.seed, step, self.local_batch * ctx.world_size * accum,
                                   (micro * ctx.world_size + ctx.rank) * self.local_batch, self.local_batch, device)
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast_for(cfg.run.precision, device):
                loss, metrics = model(x, y, draws, teacher=self.teacher, extras=extras)
            scaler.scale(loss / accum).backward()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v.float() / accum

        scaler.unscale_(optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        step_metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, max_norm).detach().float()
        scaler.step(optimizer)
        scaler.update()
        self.ema.update(self.objective, step=ema_step(step + 1, cfg.ema.first_update))
        return step_metrics
