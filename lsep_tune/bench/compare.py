"""`bench train --compare`: two ratios measured side by side in one run.

ray_over_inprocess: steady-state steps/s of the same training step under Ray Train (one worker)
  over in this process; the in-process figure is timed before and after the Ray run and averaged.
lsep_over_flow: ms/step with LSEP over flow matching alone, timed in alternating rounds so that
  load from other processes falls on both; the analytic FLOPs ratio is printed beside it.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from lsep_tune.bench.flops import train_flops_per_image
from lsep_tune.bench.train import StepTimer, bench_config, build_training, synthetic_data
from lsep_tune.cluster import start_local_ray
from lsep_tune.config import validate
from lsep_tune.train.distributed import RayContext, RunPaths
from lsep_tune.train.step import Training


def ray_worker(payload: dict) -> None:
    """One Ray Train worker: the same Training and timer as in process, times written to a file."""
    cfg = validate(payload["config"], "bench config")
    folder = payload["folder"]
    ctx = RayContext(RunPaths(output=folder, storage=folder, name="bench"))
    training = Training(cfg, ctx, dataset=synthetic_data(cfg, max(4 * cfg.data.batch_size, 64)))
    timer = StepTimer(training, baseline=False)
    timer.run(payload["warmup"])
    times = timer.run(payload["steps"])
    if ctx.rank == 0:
        Path(folder, "times.json").write_text(json.dumps({"times": times, "threads": torch.get_num_threads()}))


def time_under_ray(cfg, args) -> list[float]:
    import ray

    gpu = torch.cuda.is_available() and args.device != "cpu"
    started_here = not ray.is_initialized()
    if started_here:
        start_local_ray(max(2, args.threads or 1), include_dashboard=False, configure_logging=False,
                        log_to_driver=False)
    try:
        return _time_one_worker(cfg, args, gpu)
    finally:
        if started_here:  # a failed run must not leave a Ray behind for whoever comes next
            ray.shutdown()


def _time_one_worker(cfg, args, gpu: bool) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder = tempfile.mkdtemp(prefix="lsep_bench_ray_")
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"config": cfg.to_dict(), "folder": folder, "steps": args.steps, "warmup": args.warmup},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu,
                                     resources_per_worker={"CPU": args.threads or 1, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name="bench", storage_path=folder),
    )
    trainer.fit()
    return json.loads(Path(folder, "times.json").read_text())["times"]


def ratio_line(name: str, ratios: list[float], extra: str = "") -> str:
    spread = f"min {min(ratios):.3f} max {max(ratios):.3f} over {len(ratios)}"
    return f"{name}={statistics.median(ratios):.3f} ({spread}){extra}"


def run_compare(args, configs) -> int:
    """Print `ray_over_inprocess=R` and `lsep_over_flow=R analytic=A`, each with its spread."""
    if not torch.cuda.is_available() or args.device == "cpu":
        # A Ray worker with one CPU runs torch on one thread: the in-process side must match it.
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
    cfg = configs[0]
    inproc = StepTimer(build_training(cfg, args.device), baseline=False)
    inproc.run(args.warmup)
    before = statistics.median(inproc.run(args.steps))
    ray_s = statistics.median(time_under_ray(cfg, args))
    after = statistics.median(inproc.run(args.steps))
    ray_ratios = [b / ray_s for b in (before, after)]  # steps/s ratio = in-process time / Ray time
    print(ratio_line("ray_over_inprocess", ray_ratios,
                     f" in-process {1e3 * before:.1f}/{1e3 * after:.1f} ms/step, Ray {1e3 * ray_s:.1f} ms/step"),
          flush=True)

    flow_cfg = bench_config(args, (), args.baseline)
    lsep_cfg = bench_config(args, ("lsep",), args.baseline)
    timers = {"flow": StepTimer(build_training(flow_cfg, args.device), args.baseline),
              "lsep": StepTimer(build_training(lsep_cfg, args.device), args.baseline)}
    for t in timers.values():
        t.run(args.warmup)
    ratios = []
    for _ in range(args.repeats):
        ms = {name: statistics.median(t.run(args.steps)) for name, t in timers.items()}
        ratios.append(ms["lsep"] / ms["flow"])
    flops = train_flops_per_image(lsep_cfg)
    analytic = flops["total"] / flops["flow"]
    print(ratio_line("lsep_over_flow", ratios, f" analytic={analytic:.3f}"), flush=True)
    if args.json:
        print(json.dumps({"ray_over_inprocess": statistics.median(ray_ratios),
                          "lsep_over_flow": statistics.median(ratios), "lsep_over_flow_analytic": analytic,
                          "ray_over_inprocess_all": ray_ratios, "lsep_over_flow_all": ratios,
                          "model": cfg.model.name, "batch": cfg.data.batch_size, "threads": args.threads}), flush=True)
    return 0
