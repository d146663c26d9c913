"""The training loop. It runs unchanged in one process or as a Ray Train worker: everything that
differs (DDP, reporting, checkpoint storage) is behind the `TrainContext` it is given; the step it
repeats is `train.step.Training`, its metric windows and stage clock are `train.metrics`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lsep_tune.checkpoint import EMA_FILE, save_ema
from lsep_tune.config import Config, dump_config
from lsep_tune.evaluation.in_training import evaluate_samples
from lsep_tune.sample.grid import save_sample_grid
from lsep_tune.train.context import TrainContext
from lsep_tune.train.metrics import MetricWindow, StageClock, trim_metrics
from lsep_tune.train.step import Training


def _maybe_fail(cfg: Config, ctx: TrainContext, step: int) -> None:
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


def parameter_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train_loop(cfg: Config, ctx: TrainContext) -> dict:
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
    bar = tqdm(total=cfg.run.max_steps, initial=start_step, disable=not (is_main and ctx.progress),
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
            if is_main and bar.disable and ctx.echo_steps:
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
        for cb in ctx.callbacks:
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
