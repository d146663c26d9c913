"""The training loop. It runs unchanged in one process or as a Ray Train worker: everything that
differs (DDP, reporting, checkpoint storage) is behind the context it is given.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from lsep_tune import published
from lsep_tune.checkpoint import EMA_FILE, save_ema
from lsep_tune.config import Config, dump_config
from lsep_tune.data.loader import StepBatches, load_dataset
from lsep_tune.evaluation.in_training import evaluate_samples
from lsep_tune.models import sit_from_config
from lsep_tune.objectives import Draws, TrainObjective
from lsep_tune.sample.grid import save_sample_grid


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite: the run (or search trial) has failed."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


# What the loop itself reports besides the objective's metrics (None: neither direction is better).
LOOP_METRICS = {"grad_norm": None, "lr": None, "train_cost": "min"}


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


def trim_metrics(path: Path, start_step: int, keep_last: bool = True) -> dict:
    """Drop records past the checkpoint a run resumes from: those steps are trained again. Without
    `keep_last` the checkpoint's own record goes too, and is returned for the run to report again."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= start_step]
    last = json.loads(kept[-1]) if kept else {}
    if not keep_last and last.get("step") == start_step:
        kept.pop()
    else:
        last = {}
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    last.pop("step", None)
    return last


def parameter_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class MetricWindow:
    """Sums of the step metrics since the last log, kept on the device: no host sync per step.

    A non-finite loss (or gradient norm without a loss scaler) is remembered with its step, so
    `close` ends the run as diverged at the first logging boundary after it: at most one window
    late, and before any checkpoint of the poisoned state is written.
    """

    def __init__(self, check_grad_norm: bool):
        self.check_grad_norm = check_grad_norm
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None
        self.steps = 0

    def add(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        if self.names is None:
            self.names = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in self.names])
        bad = ~torch.isfinite(values[self.names.index("loss")])
        if self.check_grad_norm:
            bad = bad | ~torch.isfinite(values[self.names.index("grad_norm")])
        step_tensor = torch.full((), step, dtype=torch.float32, device=values.device)
        if self.sums is None:
            self.sums, self.first_bad = values, torch.where(bad, step_tensor, torch.zeros_like(step_tensor))
        else:
            self.sums = self.sums + values
            self.first_bad = torch.where(bad & (self.first_bad == 0), step_tensor, self.first_bad)
        self.steps += 1

    def close(self, ctx) -> dict[str, float]:
        """Window means, averaged over ranks (one all-reduce, one sync); raises on divergence."""
        flag = (self.first_bad > 0).float().reshape(1)
        reduced = ctx.all_reduce_mean(torch.cat([flag, self.sums / self.steps])).tolist()
        names, first_bad = self.names, self.first_bad
        self.names, self.sums, self.first_bad, self.steps = None, None, None, 0
        if reduced[0] > 0:  # some rank saw a non-finite value: all ranks raise, at the earliest step
            step = int(min(s for s in ctx.all_gather(int(first_bad.item())) if s > 0))
            values = dict(zip(names, reduced[1:]))
            raise TrainingDiverged(f"non-finite loss {values['loss']} / grad norm {values['grad_norm']} at step "
                                   f"{step}", step)
        return dict(zip(names, reduced[1:]))


class Training:
    """Everything a run trains, and its one optimizer step: what `train_loop` repeats and what
    `python -m lsep_tune.bench train` times, so the benchmark measures the real step."""

    def __init__(self, cfg: Config, ctx, dataset=None):
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


class StageClock:
    """Wall seconds by stage (startup, train, eval, checkpoint, report): where a run or trial spends its time."""

    STAGES = ("startup", "train", "eval", "checkpoint", "report")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.mark = time.perf_counter()

    def charge(self, stage: str) -> None:
        """Add the time since the previous charge to `stage`."""
        now = time.perf_counter()
        self.seconds[stage] += now - self.mark
        self.mark = now

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": round(v, 3) for k, v in self.seconds.items()}


def train_loop(cfg: Config, ctx) -> dict:
    """Train `cfg` to cfg.run.max_steps; return the summary (also written by rank 0)."""
    started = time.time()
    clock = StageClock()
    tr = Training(cfg, ctx)
    device, start_step, optimizer = tr.device, tr.start_step, tr.optimizer
    objective, ema, scaler, teacher = tr.objective, tr.ema, tr.scaler, tr.teacher
    is_main = ctx.rank == 0
    out = Path(ctx.output_dir)
    # Resumed from its final checkpoint (the process died after it, or a search restarts a trial that
    # had ended before the driver recorded it), a run trains nothing; it reports that checkpoint's
    # record again below, so whoever waits on the run (a Tune trial, a scheduler) sees it reach the end.
    resumed_at_end = start_step >= cfg.run.max_steps
    final_record: dict[str, float] = {}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        final_record = trim_metrics(out / "metrics.jsonl", start_step, keep_last=not resumed_at_end)

    window = MetricWindow(check_grad_norm=not tr.use_scaler)
    last_metrics: dict[str, float] = {}
    last_ckpt: str | None = None
    last_eval: dict[str, float] = {}
    grid_path: str | None = None
    bar = tqdm(total=cfg.run.max_steps, initial=start_step, disable=not (is_main and getattr(ctx, "progress", False)),
               desc="train", dynamic_ncols=True)
    clock.charge("startup")

    for step in range(start_step, cfg.run.max_steps):
        _maybe_fail(cfg, ctx, step)
        window.add(tr.step(step), step + 1)

        done = step + 1
        bar.update(1)
        want_sample = cfg.run.sample_every and done % cfg.run.sample_every == 0
        want_ckpt = done % cfg.run.ckpt_every == 0 or done == cfg.run.max_steps
        want_log = done % cfg.run.log_every == 0 or want_ckpt
        if not (want_sample or want_log):
            continue
        if want_log:
            # The one host sync of the window; divergence ends the run here, before anything
            # (evaluation, checkpoint) is made from the state.
            last_metrics = window.close(ctx)
        clock.charge("train")
        if is_main and (want_sample or done == cfg.run.max_steps):
            grid_path = str(save_sample_grid(teacher, cfg, out / "samples" / f"grid_step_{done:08d}.png", device))
            ctx.log_artifact(grid_path, "samples")
            clock.charge("eval")
        if want_log:
            last_metrics["lr"] = optimizer.param_groups[0]["lr"]
            # Wall-clock seconds of training so far, restarts included: the cost side of a search.
            last_metrics["train_cost"] = tr.earlier_cost + time.time() - started
            every = cfg.run.eval_every
            if every and is_main and (done % every == 0 or done == cfg.run.max_steps):
                last_eval = {**evaluate_samples(teacher, cfg, device), "eval_step": done}
                clock.charge("eval")
            last_metrics.update(last_eval)  # carried forward, so every later report holds the metric
            bar.set_postfix({k: f"{last_metrics[k]:.4g}" for k in ("loss", "probe_acc") if k in last_metrics})
            if is_main and bar.disable and getattr(ctx, "echo_steps", True):
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
            folder = ctx.report({**last_metrics, **clock.metrics()}, done, train_state)
            if folder:
                last_ckpt = folder
            clock.charge("checkpoint" if want_ckpt else "report")
    bar.close()
    tr.batches.close()
    if resumed_at_end:
        last_metrics = final_record
        ctx.report(last_metrics, start_step)
        # Ended before (rank 0 decides for all, whatever storage the others see): its EMA, final
        # evaluation and summary stand.
        finished = out / "summary.json"
        if ctx.all_gather(is_main and finished.exists())[0]:
            return json.loads(finished.read_text()) if is_main else {}

    # Every rank's parameters and EMA should be bit-identical under DDP: a digest per rank shows it.
    digests = ctx.all_gather(parameter_digest(objective) + "-" + parameter_digest(ema.module))
    ema_path = None
    if is_main:
        ema_path = save_ema(out / EMA_FILE, max(cfg.run.max_steps, start_step), ema.module.sit.state_dict(),
                            cfg.to_dict())
        ctx.log_artifact(ema_path, "checkpoints")
    clock.charge("checkpoint")

    final_eval = None
    if is_main and cfg.run.final_eval_samples:
        final_eval = evaluate_samples(teacher, cfg, device, n=cfg.run.final_eval_samples)
        for cb in getattr(ctx, "callbacks", []):
            cb.log_metrics({f"final_{k}": v for k, v in final_eval.items()}, max(cfg.run.max_steps, start_step))
        clock.charge("eval")

    summary = {
        "final_step": max(cfg.run.max_steps, start_step),
        "start_step": start_step,
        "world_size": ctx.world_size,
        "global_batch": tr.local_batch * ctx.world_size * tr.accum,
        "final_metrics": last_metrics,
        "final_loss": last_metrics.get("loss"),
        "final_flow_loss": last_metrics.get("flow_loss"),
        "probe_acc": last_metrics.get("probe_acc"),
        "fid": last_metrics.get("fid"),
        "fid_std": last_metrics.get("fid_std"),
        "final_eval": final_eval,
        "checkpoint": last_ckpt,
        "sample_grid": grid_path,
        "ema_checkpoint": str(ema_path) if ema_path else None,
        "replica_digests": digests,
        "device": str(device),
        "wall_time_s": round(time.time() - started, 2),
        "time_s": {k: round(v, 3) for k, v in clock.seconds.items()},
    }
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
