"""`bench train`: time the project's own training step (train.step.Training) on synthetic latents.

Steps are timed after warm-up without adding a host sync: on a GPU each step records a CUDA event
and the durations are read after the last one; on a CPU the step is synchronous anyway. The
`--baseline` switch turns the optimisations off (LSEP reuse, fused AdamW, device-side metrics:
the metrics are read back after every step, as the loop did before), so both paths can be timed
with the same command.
"""
from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time

import numpy as np
import torch

from lsep_tune.bench.flops import device_peak, train_flops_per_image
from lsep_tune.config import Config, parse_override, set_path, validate
from lsep_tune.data.base import ArrayDataset
from lsep_tune.errors import InputError
from lsep_tune.objectives.objective import REGULARIZERS
from lsep_tune.train.context import LocalContext
from lsep_tune.train.step import Training


def parse_regularizers(text: str) -> tuple[str, ...]:
    """'none' | 'lsep' | 'lsep+sra' ... -> the names, checked against objectives.objective.REGULARIZERS."""
    if text == "none":
        return ()
    names = tuple(text.split("+"))
    for name in names:
        if name not in REGULARIZERS:
            raise InputError("--regularizers", text, f"{name!r} is not a regularizer here, expected 'none' or "
                             f"names from {', '.join(REGULARIZERS)} joined by '+'")
    return names


def bench_config(args, regularizers: tuple[str, ...], baseline: bool = False) -> Config:
    """The config of one benchmark: the defaults (the papers' settings), then the flags, then --set."""
    overrides = [f"model.name={args.model}", f"data.batch_size={args.batch}", f"run.precision={args.precision}",
                 f"run.compile={str(args.compile).lower()}", "data.kind=latents", "data.path=synthetic",
                 "run.max_steps=1000000000"]
    if args.input_size:
        overrides.append(f"model.input_size={args.input_size}")
    for name in REGULARIZERS:
        overrides.append(f"objective.{name}.enabled={str(name in regularizers).lower()}")
    if baseline:
        overrides += ["objective.lsep.reuse_main_pass=false", "optim.fused=false"]
    overrides += list(args.set or [])
    data: dict = {}
    for text in overrides:
        set_path(data, *parse_override(text))
    return validate(data, "bench train")


def synthetic_data(cfg: Config, n: int) -> ArrayDataset:
    """Random latents of the model's shape: the step's cost does not depend on the values."""
    rng = np.random.default_rng(0)
    m = cfg.model
    images = rng.standard_normal((n, m.in_channels, m.input_size, m.input_size), dtype=np.float32)
    extras = {}
    if cfg.objective.repa.enabled:  # encoder tokens as preprocess --encoder stores them, one per patch
        tokens = cfg.model.grid_size ** 2
        extras["repa_target"] = rng.standard_normal((n, tokens, cfg.objective.repa.encoder_dim), dtype=np.float32)
    return ArrayDataset(images, rng.integers(0, m.num_classes, n), scale=1.0, extras=extras)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class StepTimer:
    """Per-step wall times of the real step, without a host sync between steps on a GPU."""

    def __init__(self, training, baseline: bool):
        self.training, self.baseline = training, baseline
        self.cuda = training.device.type == "cuda"
        self.next_step = 0

    def run(self, steps: int) -> list[float]:
        tr = self.training
        if self.cuda:
            torch.cuda.synchronize(tr.device)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            events[0].record()
        marks = [time.perf_counter()]
        for i in range(steps):
            metrics = tr.step(self.next_step)
            self.next_step += 1
            if self.baseline:  # the straightforward loop: every step's metrics read back at once
                {k: v.item() for k, v in metrics.items()}
            if self.cuda:
                events[i + 1].record()
            marks.append(time.perf_counter())
        if self.cuda:
            torch.cuda.synchronize(tr.device)
            return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
        return [b - a for a, b in zip(marks, marks[1:])]


def build_training(cfg: Config, device: str | None, ctx=None):
    ctx = ctx or LocalContext(tempfile.mkdtemp(prefix="lsep_bench_"), keep_checkpoints=1, device=device,
                              progress=False)
    return Training(cfg, ctx, dataset=synthetic_data(cfg, max(4 * cfg.data.batch_size, 64)))


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # the process's peak RSS (Linux: KiB)


def measure(cfg: Config, args, baseline: bool = False) -> dict:
    """One configuration: build the real training state, warm up, time `args.steps` steps."""
    training = build_training(cfg, args.device)
    device = training.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(training, baseline)
    timer.run(args.warmup)
    times = timer.run(args.steps)
    ms = statistics.median(times) * 1e3
    flops = train_flops_per_image(cfg)
    images_per_s = cfg.data.batch_size / (ms / 1e3)
    name = device_name(device)
    peak = device_peak(name, cfg.run.precision) if device.type == "cuda" else None
    return {
        "model": cfg.model.name,
        "input_size": cfg.model.input_size,
        "batch": cfg.data.batch_size,
        "regularizers": "+".join(n for n in REGULARIZERS if getattr(cfg.objective, n).enabled) or "none",
        "precision": cfg.run.precision,
        "compile": cfg.run.compile,
        "path": "baseline" if baseline else "optimized",
        "device": name,
        "steps": args.steps,
        "warmup": args.warmup,
        "images_per_s": round(images_per_s, 3),
        "ms_per_step": round(ms, 3),
        "ms_per_step_min": round(min(times) * 1e3, 3),
        "ms_per_step_max": round(max(times) * 1e3, 3),
        "peak_mem_bytes": peak_memory(device),
        "flops_per_image": flops["total"],
        "flops_per_image_parts": {k: v for k, v in flops.items() if k != "total"},
        "mfu": round(flops["total"] * images_per_s / peak, 4) if peak else None,
        "peak_flops": peak,
    }


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result), flush=True)
        return
    mfu = "n/a (device peak unknown)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    print(f"{result['model']} {result['regularizers']} {result['precision']}"
          f"{' compile' if result['compile'] else ''} [{result['path']}] on {result['device']}: "
          f"{result['images_per_s']:.2f} images/s, {result['ms_per_step']:.1f} ms/step "
          f"(min {result['ms_per_step_min']:.1f}, max {result['ms_per_step_max']:.1f}), "
          f"peak memory {result['peak_mem_bytes'] / 2**20:.0f} MiB, "
          f"{result['flops_per_image'] / 1e9:.2f} GFLOP/image, MFU {mfu}", flush=True)

