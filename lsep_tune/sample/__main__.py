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
the batch size but not on how many workers (Ray actors) drew the chunks, and with the default
seed and batch it holds the very images the in-training evaluation of N samples scored. Latent
models are decoded by a local diffusers AutoencoderKL (``--vae``). The file holds ``arr_0``
(uint8 NHWC images) and ``arr_1`` (int64 labels), and is written atomically. Bad input prints one
line, ``error: <what>: <field>: <expectation>``, to stderr and exits 2 before any worker starts.
"""
from __future__ import annotations

from lsep_tune import cli
from lsep_tune.errors import OneLineParser, run_cli
from lsep_tune.sample.options import (
    CHECKPOINT_FORMATS,
    DEFAULT_BATCH,
    DEFAULT_SEED,
    EMA_FILE,
    SAMPLER_NAMES,
    STATE_FILE,
)

# The arguments of generate_samples as this command line spells them.
FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "checkpoint", "num", "out", "sampler", "steps", "cfg_scale", "guidance_interval", "workers", "batch", "seed",
    "vae", "device", "address", "checkpoint_format")}


MODEL_URIS = ("models:/", "runs:/")  # --checkpoint may name an MLflow model (lsep_tune.mlflow_model)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m lsep_tune.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help=f"{EMA_FILE}, a {STATE_FILE}, a checkpoint folder, or an MLflow model URI "
                        "(models:/..., runs:/RUN_ID/model; store: $MLFLOW_TRACKING_URI)")
    p.add_argument("--checkpoint-format", default="lsep_tune", choices=CHECKPOINT_FORMATS,
                   help="layout of --checkpoint: lsep_tune's own, or a published one (converted on load)")
    p.add_argument("--model", help="published formats: model name when the file does not say (default SiT-XL/2)")
    p.add_argument("--input-size", type=int, help="published formats: latent side when the file does not say (32)")
    p.add_argument("--in-channels", type=int, help="published formats: input channels (default 4)")
    p.add_argument("--num-classes", type=int, help="published formats: classes when the file does not say (1000)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="ode = Heun, sde = Euler-Maruyama, as published "
                   "(ode-heun-full, sde-uniform: the earlier variants; default: checkpoint config)")
    p.add_argument("--steps", type=int, help="sampling steps (default: checkpoint config)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: checkpoint config)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for t in [LO, HI] (default: checkpoint config)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors; 0 samples in this process (default)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="samples per chunk; part of what the seed determines")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument("--device", help="torch device (default: cuda if available / if the Ray cluster has GPUs)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    return p


def _sample(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from lsep_tune.sample.batch import check_out, generate_samples, write_npz  # torch: after the flags

    out = check_out(args.out)
    checkpoint = args.checkpoint
    if checkpoint.startswith(MODEL_URIS):  # a logged MLflow model: its tracking store is $MLFLOW_TRACKING_URI
        from lsep_tune.mlflow_model import load_model

        checkpoint = load_model(checkpoint)
    images, labels = generate_samples(
        checkpoint, args.num, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
        guidance_interval=args.guidance_interval, batch=args.batch, seed=args.seed, workers=args.workers,
        vae=args.vae, device=args.device, address=args.address, progress=True,
        checkpoint_format=args.checkpoint_format,
        model={"name": args.model, "input_size": args.input_size, "in_channels": args.in_channels,
               "num_classes": args.num_classes},
    )
    write_npz(out, images, labels)
    n, h, w, c = images.shape
    print(f"wrote {out}: {n} images {h}x{w}x{c} (uint8), labels 0..{int(labels.max())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _sample(argv), FLAGS)


if __name__ == "__main__":
    cli.exit_command(main())
