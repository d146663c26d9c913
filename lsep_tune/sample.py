"""Draw N class-balanced samples from a checkpoint's EMA model into an ADM-layout ``.npz``.

    python -m lsep_tune.sample --checkpoint PATH --num N --out FILE.npz [--sampler ode|sde]
        [--steps N] [--cfg-scale S] [--guidance-interval LO HI] [--workers N] [--batch B]
        [--seed S] [--vae PATH] [--device D] [--address ADDR]

PATH is ``ema_final.pt``, a checkpoint's ``state.pt`` or its folder; the model and the default
sampler settings come from the config stored in the checkpoint. ``--checkpoint-format
lsep|sra|repa|sit`` reads a published checkpoint instead (see ``lsep_tune.published``), with
``--model``, ``--input-size``, ``--in-channels`` and ``--num-classes`` where the file does not say. Sample i has label
``i % num_classes``. The N samples are cut into fixed chunks of ``--batch``; chunk c draws its
initial and SDE noise from a generator seeded by (seed, c), so the file depends on the seed and
the batch size but not on how many workers (Ray actors) drew the chunks. Latent models are decoded
by a local diffusers AutoencoderKL (``--vae``). The file holds ``arr_0`` (uint8 NHWC images) and
``arr_1`` (int64 labels), and is written atomically. Bad input prints one line,
``error: <what>: <field>: <expectation>``, to stderr and exits 2 before any worker starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lsep_tune.config import Config, ConfigError, validate
from lsep_tune.data.digits import to_uint8
from lsep_tune.models import create_model
from lsep_tune.sampling import sample
from lsep_tune.schema import InputError
from lsep_tune.train.checkpoint import STATE_FILE

EXIT_BAD_INPUT = 2
EMA_FILE = "ema_final.pt"
SAMPLERS = {"ode": "ode-heun", "sde": "sde", "ode-heun": "ode-heun", "ode-euler": "ode-euler",
            "ode-heun-full": "ode-heun-full", "sde-uniform": "sde-uniform"}
# How API argument names read on the command line, so messages name what the user typed.
_CLI_NAMES = {
    "checkpoint": "--checkpoint", "num": "--num", "sampler": "--sampler", "steps": "--steps",
    "cfg_scale": "--cfg-scale", "guidance_interval": "--guidance-interval", "workers": "--workers",
    "batch": "--batch", "seed": "--seed", "vae": "--vae", "device": "--device", "address": "--address",
    "out": "--out", "checkpoint_format": "--checkpoint-format",
}


class SampleError(InputError):
    """Bad sampling input, one line: ``<source>: <field>: <expectation>``."""


@dataclass
class Checkpoint:
    """A SiT's EMA weights (plain SiT keys) and the validated config it was trained with."""

    config: Config
    state: dict[str, torch.Tensor]
    step: int | None = None
    path: str | None = None


# --------------------------------------------------------------------------- checkpoints

def resolve_checkpoint_path(path: str | Path) -> Path:
    """A file as given; a folder -> its state.pt, else its ema_final.pt (a run folder)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(path, "path", f"not found; expected {EMA_FILE}, a {STATE_FILE} or a checkpoint folder")
    if path.is_dir():
        for name in (STATE_FILE, EMA_FILE):
            if (path / name).is_file():
                return path / name
        raise SampleError(path, STATE_FILE, f"expected a checkpoint folder holding {STATE_FILE} "
                                            f"(or a run folder holding {EMA_FILE})")
    return path


def _sit_weights(ema: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ema_final.pt holds SiT keys; state.pt holds the whole objective, the SiT under 'sit.'."""
    if any(k.startswith("sit.") for k in ema):
        return {k[len("sit."):]: v for k, v in ema.items() if k.startswith("sit.")}
    return dict(ema)


def _check_weights(cfg: Config, state: dict[str, torch.Tensor], source: str) -> None:
    """Compare keys and shapes with the configured model built on the meta device (no memory)."""
    m = cfg.model
    with torch.device("meta"):
        expected = create_model(m.name, input_size=m.input_size, in_channels=m.in_channels,
                                num_classes=m.num_classes, qk_norm=m.qk_norm).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
    if problems:
        raise SampleError(source, "ema", f"weights do not fit {m.name} from the stored config: " + ", ".join(problems))


def load_checkpoint(path: str | Path, fmt: str = "lsep_tune", model: dict | None = None) -> Checkpoint:
    """Read the EMA weights and config of ema_final.pt / state.pt (weights_only=True), or convert a
    published checkpoint (`fmt` lsep|sra|repa|sit; `model` fills in the architecture it does not say)."""
    file = resolve_checkpoint_path(path)
    if fmt != "lsep_tune":
        return _published_checkpoint(file, fmt, model)
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a truncated or foreign file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SampleError(file, "file", f"not a readable torch checkpoint (torch.load weights_only=True: {first})") from None
    if not isinstance(blob, dict):
        raise SampleError(file, "file", f"expected a dict with 'ema' and 'config', got {type(blob).__name__}")
    for key in ("ema", "config"):
        if not isinstance(blob.get(key), dict):
            raise SampleError(file, key, "missing; expected a training checkpoint (ema_final.pt or state.pt)")
    cfg = validate(blob["config"], source=f"{file} config")
    state = _sit_weights(blob["ema"])
    _check_weights(cfg, state, str(file))
    step = blob.get("step")
    return Checkpoint(cfg, state, int(step) if isinstance(step, int) else None, str(file))


def _published_checkpoint(file: Path, fmt: str, model: dict | None) -> Checkpoint:
    """A published file has no lsep_tune config: the model's defaults are the papers' sampling settings."""
    from lsep_tune import published
    from lsep_tune.data import digits

    try:
        conv = published.load(file, fmt, model)
    except published.PublishedError as err:
        raise SampleError(err.source, err.field, err.expectation) from None
    m = {"name": "SiT-XL/2", **conv.model}
    shape = (m.get("input_size", 32), m.get("in_channels", 4), m.get("num_classes", 1000))
    # The papers release latent models; a model of the embedded digits' shape samples as pixels.
    pixels = shape == (digits.IMAGE_SIZE, digits.CHANNELS, digits.NUM_CLASSES)
    cfg = validate({"model": m, **({"data": {"kind": "digits"}} if pixels else {})}, source=f"{file} ({fmt} layout)")
    return Checkpoint(cfg, conv.sit, conv.step, str(file))


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Settings:
    """Everything a worker needs besides the weights; plain data so it pickles into Ray."""

    mode: str
    steps: int
    cfg_scale: float
    guidance_interval: tuple[float, float]
    batch: int
    seed: int
    device: str


def chunk_bounds(num: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: fixed by (num, batch), never by the worker count."""
    return [(start, min(start + batch, num)) for start in range(0, num, batch)]


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed per (seed, chunk): SeedSequence mixing keeps nearby pairs unrelated."""
    words = np.random.SeedSequence([seed, chunk]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def class_labels(num: int, num_classes: int) -> np.ndarray:
    return np.arange(num, dtype=np.int64) % num_classes


class ChunkSampler:
    """Builds the SiT (and VAE) once, then draws any chunk: runs in-process or as a Ray actor."""

    def __init__(self, config: dict, sit_state: dict, vae_payload, settings: Settings):
        self.cfg = validate(config, "checkpoint config")
        self.settings = settings
        self.device = torch.device(settings.device)
        m = self.cfg.model
        self.sit = create_model(m.name, input_size=m.input_size, in_channels=m.in_channels,
                                num_classes=m.num_classes, qk_norm=m.qk_norm)
        self.sit.load_state_dict(sit_state)
        self.sit.to(self.device).eval().requires_grad_(False)
        self.vae = None
        if vae_payload is not None:
            from lsep_tune import vae as vae_lib

            self.vae = vae_lib.from_payload(vae_payload).to(self.device)

    @torch.no_grad()
    def run(self, chunk: int, start: int, stop: int) -> tuple[int, np.ndarray]:
        m, s = self.cfg.model, self.settings
        g = torch.Generator().manual_seed(chunk_seed(s.seed, chunk))
        noise = torch.randn((stop - start, m.in_channels, m.input_size, m.input_size), generator=g).to(self.device)
        y = torch.from_numpy(class_labels(stop, m.num_classes)[start:]).to(self.device)
        x = sample(self.sit.velocity, noise, y, mode=s.mode, steps=s.steps, cfg_scale=s.cfg_scale,
                   guidance_interval=s.guidance_interval, null_class=m.num_classes,
                   path_type=self.cfg.objective.flow.path_type, generator=g)
        if self.vae is not None:
            from lsep_tune import vae as vae_lib

            x = vae_lib.decode(self.vae, x, self.cfg.data.latent_scale)
        return chunk, to_uint8(x)


# --------------------------------------------------------------------------- checks

def _check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise SampleError(name, value, f"expected an integer >= {least}")
    return int(value)


def _settings(cfg: Config, sampler, steps, cfg_scale, guidance_interval) -> tuple[str, int, float, tuple[float, float]]:
    """CLI/API choices over the checkpoint's sampling section, checked like the config checks them."""
    s = cfg.sampling
    mode = s.mode
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise SampleError("sampler", sampler, "expected 'ode' (Heun ODE) or 'sde' (Euler-Maruyama)")
        mode = SAMPLERS[sampler]
    steps = s.steps if steps is None else _check_int("steps", steps, 2 if mode == "sde" else 1)
    if cfg_scale is None:
        cfg_scale = s.cfg_scale
    elif not (np.isfinite(cfg_scale) and cfg_scale >= 1.0):
        raise SampleError("cfg_scale", cfg_scale, "expected a number >= 1 (1 = no guidance)")
    if guidance_interval is None:
        interval = (s.guidance_low, s.guidance_high)
    else:
        try:
            lo, hi = (float(v) for v in guidance_interval)
        except (TypeError, ValueError):
            raise SampleError("guidance_interval", guidance_interval, "expected two numbers LO HI") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise SampleError("guidance_interval", f"{lo:g} {hi:g}", "expected 0 <= LO <= HI <= 1 (times t in [0, 1])")
        interval = (lo, hi)
    return mode, int(steps), float(cfg_scale), interval


def _local_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SampleError("device", device, "expected a torch device such as cpu, cuda or cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SampleError("device", device, "CUDA is not available on this machine")
    return str(dev)


def _ray_device(device: str | None, cluster: dict[str, float]) -> tuple[str, int]:
    """(device inside each actor, GPUs per actor): Ray hands each GPU actor its own cuda:0."""
    if device is None:
        return ("cuda", 1) if cluster.get("GPU", 0) >= 1 else ("cpu", 0)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SampleError("device", device, "expected cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise SampleError("device", device, "Ray workers run on cpu or cuda")
    return ("cuda", 1) if dev.type == "cuda" else ("cpu", 0)


def _check_placement(workers: int, gpus_each: int, cluster: dict[str, float]) -> None:
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    fit = int(cpus) if not gpus_each else int(min(cpus, gpus // gpus_each))
    if workers > fit:
        each = "1 CPU + 1 GPU" if gpus_each else "1 CPU"
        raise SampleError("workers", workers, f"expected at most {fit}: the Ray cluster has {cpus:g} CPUs and "
                                              f"{gpus:g} GPUs, and each worker needs {each}")


# --------------------------------------------------------------------------- running

def _run_local(ckpt: Checkpoint, vae_payload, settings: Settings, chunks, device: str | None,
               progress: bool) -> dict[int, np.ndarray]:
    settings = replace(settings, device=_local_device(device))
    worker = ChunkSampler(ckpt.config.to_dict(), ckpt.state, vae_payload, settings)
    out: dict[int, np.ndarray] = {}
    for c, (start, stop) in enumerate(tqdm(chunks, desc="sample", unit="chunk", disable=not progress, file=sys.stderr)):
        out[c] = worker.run(c, start, stop)[1]
    return out


def _run_ray(ckpt: Checkpoint, vae_payload, settings: Settings, chunks, workers: int, device: str | None,
             address: str | None, progress: bool) -> dict[int, np.ndarray]:
    import ray
    from ray.util import ActorPool

    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SampleError("address", address or os.environ.get("RAY_ADDRESS", "(local)"),
                              f"cannot start or join a Ray cluster: {first}") from None
    actors: list = []
    try:
        cluster = ray.cluster_resources()
        actor_device, gpus_each = _ray_device(device, cluster)
        _check_placement(workers, gpus_each, cluster)
        settings = replace(settings, device=actor_device)
        remote = ray.remote(num_cpus=1, num_gpus=gpus_each)(ChunkSampler)
        config_ref = ray.put(ckpt.config.to_dict())
        state_ref = ray.put(ckpt.state)
        vae_ref = ray.put(vae_payload)
        actors = [remote.remote(config_ref, state_ref, vae_ref, settings) for _ in range(min(workers, len(chunks)))]
        pool = ActorPool(actors)
        out: dict[int, np.ndarray] = {}
        jobs = [(c, start, stop) for c, (start, stop) in enumerate(chunks)]
        results = pool.map_unordered(lambda actor, job: actor.run.remote(*job), jobs)
        for c, images in tqdm(results, total=len(jobs), desc="sample", unit="chunk", disable=not progress,
                              file=sys.stderr):
            out[c] = images
        return out
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
    batch: int = 64,
    seed: int = 0,
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
    local one started (and shut down) here. Bad input raises `SampleError` or `ConfigError`
    before any worker starts.
    """
    num = _check_int("num", num, 1)
    batch = _check_int("batch", batch, 1)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 0)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, checkpoint_format, model)
    cfg = ckpt.config
    mode, n_steps, scale, interval = _settings(cfg, sampler, steps, cfg_scale, guidance_interval)

    vae_payload = None
    if cfg.data.kind == "latents":
        if vae is None:
            raise SampleError("vae", "(not given)", "the checkpoint is a latent model (data.kind 'latents'); "
                                                    "give a local diffusers AutoencoderKL folder to decode with")
        from lsep_tune import vae as vae_lib

        try:
            model = vae_lib.load_vae(vae)
        except vae_lib.VAEError as err:
            raise SampleError(err.source, err.field, err.expectation) from None
        if vae_lib.latent_channels(model) != cfg.model.in_channels:
            raise SampleError(vae, "latent_channels",
                              f"the VAE has {vae_lib.latent_channels(model)} latent channels but the model "
                              f"samples {cfg.model.in_channels} (model.in_channels)")
        vae_payload = vae_lib.to_payload(model)
        del model
    elif vae is not None:
        raise SampleError("vae", vae, f"the checkpoint is a pixel model (data.kind {cfg.data.kind!r}); drop --vae")

    chunks = chunk_bounds(num, batch)
    settings = Settings(mode, n_steps, scale, interval, batch, seed, "cpu")
    if workers == 0:
        parts = _run_local(ckpt, vae_payload, settings, chunks, device, progress)
    else:
        parts = _run_ray(ckpt, vae_payload, settings, chunks, workers, device, address, progress)
    images = np.concatenate([parts[c] for c in range(len(chunks))])
    return images, class_labels(num, cfg.model.num_classes)


# --------------------------------------------------------------------------- output

def check_out(out: str | Path) -> Path:
    """The output must be a .npz path whose nearest existing folder is writable."""
    out = Path(out)
    if out.suffix != ".npz":
        raise SampleError("out", out, "expected a file name ending in .npz (numpy would append it)")
    if out.is_dir():
        raise SampleError("out", out, "is a folder; expected a file name ending in .npz")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SampleError("out", out, f"cannot write into {parent}")
    return out


def write_npz(out: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """ADM layout (arr_0 images, arr_1 labels), via a temporary file and a rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, arr_0=images, arr_1=labels)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line in our format, still with exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: command line: arguments: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m lsep_tune.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help=f"{EMA_FILE}, a {STATE_FILE}, or a checkpoint folder")
    p.add_argument("--checkpoint-format", default="lsep_tune", choices=("lsep_tune", "lsep", "sra", "repa", "sit"),
                   help="layout of --checkpoint: lsep_tune's own, or a published one (converted on load)")
    p.add_argument("--model", help="published formats: model name when the file does not say (default SiT-XL/2)")
    p.add_argument("--input-size", type=int, help="published formats: latent side when the file does not say (32)")
    p.add_argument("--in-channels", type=int, help="published formats: input channels (default 4)")
    p.add_argument("--num-classes", type=int, help="published formats: classes when the file does not say (1000)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), help="ode = Heun, sde = Euler-Maruyama, as published "
                   "(ode-heun-full, sde-uniform: the earlier variants; default: checkpoint config)")
    p.add_argument("--steps", type=int, help="sampling steps (default: checkpoint config)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: checkpoint config)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for t in [LO, HI] (default: checkpoint config)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors; 0 samples in this process (default)")
    p.add_argument("--batch", type=int, default=64, help="samples per chunk; part of what the seed determines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument("--device", help="torch device (default: cuda if available / if the Ray cluster has GPUs)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # usage errors (already printed as one line) and --help
        return int(done.code or 0)
    try:
        out = check_out(args.out)
        images, labels = generate_samples(
            args.checkpoint, args.num, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
            guidance_interval=args.guidance_interval, batch=args.batch, seed=args.seed, workers=args.workers,
            vae=args.vae, device=args.device, address=args.address, progress=True,
            checkpoint_format=args.checkpoint_format,
            model={"name": args.model, "input_size": args.input_size, "in_channels": args.in_channels,
                   "num_classes": args.num_classes},
        )
    except SampleError as err:
        source = _CLI_NAMES.get(err.source, err.source)
        print(f"error: {source}: {err.field}: {err.expectation}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_npz(out, images, labels)
    n, h, w, c = images.shape
    print(f"wrote {out}: {n} images {h}x{w}x{c} (uint8), labels 0..{int(labels.max())}")
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__, so Ray ships ChunkSampler by reference to its module.
    from lsep_tune import sample as _sample

    sys.exit(_sample.main())
