"""Many samples from a checkpoint: in this process, or on a pool of Ray actors.

Every chunk is drawn by `generate.generate_chunk`, so the images depend on the seed and the batch
size, not on the number of actors. Errors name the arguments of `generate_samples` (``workers``,
``num``...); the command line maps them to its flags.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lsep_tune import cluster
from lsep_tune import vae as vae_lib
from lsep_tune.checkpoint import Checkpoint, load_checkpoint
from lsep_tune.config import Config, validate
from lsep_tune.errors import InputError
from lsep_tune.files import atomic_write, require_writable_dir
from lsep_tune.models.sit import sit_from_config
from lsep_tune.sample.generate import (
    DEFAULT_BATCH,
    DEFAULT_SEED,
    SolverSettings,
    chunk_bounds,
    class_labels,
    generate_chunk,
    to_images,
)
from lsep_tune.sample.solvers import SOLVERS

SAMPLERS = {"ode": "ode-heun", **{mode: mode for mode in SOLVERS}}  # --sampler: the short names and every mode


@dataclass(frozen=True)
class Job:
    """Everything a worker needs besides the weights; plain data so it pickles into Ray."""

    settings: SolverSettings
    seed: int
    device: str


class ChunkSampler:
    """Builds the SiT (and VAE) once, then draws any chunk: runs in-process or as a Ray actor."""

    def __init__(self, config: dict, sit_state: dict, vae_payload, job: Job):
        self.cfg = validate(config, "checkpoint config")
        self.job = job
        self.device = torch.device(job.device)
        self.sit = sit_from_config(self.cfg.model)
        self.sit.load_state_dict(sit_state)
        self.sit.to(self.device).eval().requires_grad_(False)
        self.vae = None
        if vae_payload is not None:
            self.vae = vae_lib.from_payload(vae_payload).to(self.device)

    def run(self, chunk: int, start: int, stop: int) -> tuple[int, np.ndarray]:
        x = generate_chunk(self.sit, self.cfg, self.job.settings, self.job.seed, chunk, start, stop, self.device)
        return chunk, to_images(x, self.cfg, self.vae)


# --------------------------------------------------------------------------- checks

def _check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InputError(name, value, f"expected an integer >= {least}")
    return int(value)


def _settings(cfg: Config, sampler, steps, cfg_scale, guidance_interval) -> SolverSettings:
    """Caller choices over the checkpoint's sampling section, checked like the config checks them."""
    s = SolverSettings.from_config(cfg.sampling)
    mode = s.mode
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise InputError("sampler", sampler, "expected 'ode' (Heun ODE), 'sde' (Euler-Maruyama) or one of "
                             + ", ".join(m for m in SAMPLERS if m not in ("ode", "sde")))
        mode = SAMPLERS[sampler]
    steps = s.steps if steps is None else _check_int("steps", steps, SOLVERS[mode].min_steps)
    if cfg_scale is None:
        cfg_scale = s.cfg_scale
    elif not (np.isfinite(cfg_scale) and cfg_scale >= 1.0):
        raise InputError("cfg_scale", cfg_scale, "expected a number >= 1 (1 = no guidance)")
    interval = s.guidance_interval
    if guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in guidance_interval)
        except (TypeError, ValueError):
            raise InputError("guidance_interval", guidance_interval, "expected two numbers LO HI") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise InputError("guidance_interval", f"{lo:g} {hi:g}", "expected 0 <= LO <= HI <= 1 (times t in [0, 1])")
        interval = (lo, hi)
    return SolverSettings(mode, int(steps), float(cfg_scale), interval)


def _vae_payload(cfg: Config, vae: str | Path | None):
    """A latent model needs a local VAE (shipped to actors as config + weights); a pixel model none."""
    if not cfg.data.latent:
        if vae is not None:
            raise InputError("vae", vae, f"the checkpoint is a pixel model (data.kind {cfg.data.kind!r}); drop it")
        return None
    if vae is None:
        raise InputError("vae", "(not given)", "the checkpoint is a latent model (data.kind 'latents'); "
                                               "give a local diffusers AutoencoderKL folder to decode with")

    model = vae_lib.load_vae(vae)
    if vae_lib.latent_channels(model) != cfg.model.in_channels:
        raise InputError(vae, "latent_channels", f"the VAE has {vae_lib.latent_channels(model)} latent channels "
                                                 f"but the model samples {cfg.model.in_channels} (model.in_channels)")
    return vae_lib.to_payload(model)


def _ray_plan(workers: int, device: str | None, resources: dict[str, float]) -> tuple[cluster.Placement, str]:
    """(placement, device inside each actor): Ray hands each GPU actor its own cuda:0."""
    if device is None:
        use_gpu = resources.get("GPU", 0) >= 1
    else:
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            raise InputError("device", device, "expected cpu or cuda") from None
        if kind not in ("cpu", "cuda"):
            raise InputError("device", device, "Ray workers run on cpu or cuda")
        use_gpu = kind == "cuda"
    return cluster.Placement(workers, 1.0 if use_gpu else 0.0, 1.0), "cuda" if use_gpu else "cpu"


# --------------------------------------------------------------------------- running

def _run_local(ckpt: Checkpoint, vae_payload, job: Job, chunks, progress: bool) -> dict[int, np.ndarray]:
    worker = ChunkSampler(ckpt.config.to_dict(), ckpt.state, vae_payload, job)
    return {c: worker.run(c, start, stop)[1]
            for c, (start, stop) in enumerate(tqdm(chunks, desc="sample", unit="chunk", disable=not progress,
                                                   file=sys.stderr))}


def _run_ray(ckpt: Checkpoint, vae_payload, job: Job, chunks, workers: int, device: str | None,
             address: str | None, progress: bool) -> dict[int, np.ndarray]:
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized() and not cluster.ray_address(address):
        local = cluster.machine_resources()  # refuse before a local Ray starts
        cluster.check_placement(_ray_plan(workers, device, local)[0], local, "this machine")
    started_here = cluster.connect_ray(address, quiet=True)
    actors: list = []
    try:
        resources = ray.cluster_resources()
        placement, actor_device = _ray_plan(workers, device, resources)
        cluster.check_placement(placement, resources)
        remote = ray.remote(num_cpus=1, num_gpus=placement.gpus_per_worker)(ChunkSampler)
        refs = [ray.put(v) for v in (ckpt.config.to_dict(), ckpt.state, vae_payload)]
        job = Job(job.settings, job.seed, actor_device)
        actors = [remote.remote(*refs, job) for _ in range(min(workers, len(chunks)))]
        pool = ActorPool(actors)
        jobs = [(c, start, stop) for c, (start, stop) in enumerate(chunks)]
        results = pool.map_unordered(lambda actor, args: actor.run.remote(*args), jobs)
        return dict(tqdm(results, total=len(jobs), desc="sample", unit="chunk", disable=not progress,
                         file=sys.stderr))
    finally:
        for actor in actors:  # free their CPUs/GPUs at once, also when a chunk failed
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def generate_samples(
    checkpoint: str | Path | Checkpoint,
    num: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    batch: int = DEFAULT_BATCH,
    seed: int = DEFAULT_SEED,
    workers: int = 0,
    vae: str | Path | None = None,
    device: str | None = None,
    address: str | None = None,
    progress: bool = False,
    checkpoint_format: str = "lsep_tune",
    model: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of `num` class-balanced samples from the EMA weights.

    `checkpoint` is a path (ema_final.pt, state.pt, checkpoint folder) or a loaded `Checkpoint`
    (e.g. a training loop's in-memory EMA). Unset sampler settings come from the checkpoint's
    config; `sampler` is 'ode' (Heun) or 'sde' (Euler-Maruyama). `workers` 0 samples in this
    process; N >= 1 uses N Ray actors, joining `address` / $RAY_ADDRESS or a running Ray, else a
    local one started (and shut down) here. Bad input raises `InputError` before any worker starts.
    """
    num = _check_int("num", num, 1)
    batch = _check_int("batch", batch, 1)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 0)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, checkpoint_format, model)
    settings = _settings(ckpt.config, sampler, steps, cfg_scale, guidance_interval)
    vae_payload = _vae_payload(ckpt.config, vae)
    chunks = chunk_bounds(num, batch)
    if workers == 0:
        job = Job(settings, seed, str(cluster.local_device(device)))
        parts = _run_local(ckpt, vae_payload, job, chunks, progress)
    else:
        parts = _run_ray(ckpt, vae_payload, Job(settings, seed, "cpu"), chunks, workers, device, address, progress)
    images = np.concatenate([parts[c] for c in range(len(chunks))])
    return images, class_labels(num, ckpt.config.model.num_classes)


# --------------------------------------------------------------------------- output

def check_out(out: str | Path) -> Path:
    """The output must be a .npz path in a folder that is (or can be made) writable."""
    out = Path(out)
    if out.suffix != ".npz":
        raise InputError("out", out, "expected a file name ending in .npz (numpy would append it)")
    if out.is_dir():
        raise InputError("out", out, "is a folder; expected a file name ending in .npz")
    require_writable_dir(out.parent, "out")
    return out


def write_npz(out: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """ADM layout (arr_0 images, arr_1 labels), written atomically."""
    with atomic_write(out) as fh:
        np.savez(fh, arr_0=images, arr_1=labels)
    return Path(out)
