"""`python -m lsep_tune.preprocess`: a class-folder image tree -> SD-VAE posterior shards + manifest.json.

Training draws z = mean + std * eps and a horizontal flip afresh at every step (as the LSEP and
REPA code do), so what is stored is the posterior (mean, std) of every image and of its mirror,
not one fixed latent. Images get the ADM centre crop, are encoded on Ray Data actors (GPUs where
the cluster has them) and come back in order to the driver, which writes one shard at a time: the
memory held is a few batches and one shard. A shard whose record matches the plan is skipped on a
rerun. An unreadable image is skipped, printed with its path and listed in the manifest.

Layout of OUT (every array memory-mappable, float16 posteriors):
  shard-00000.moments.npy   (n, 2, 2, C, h, w): [image, flip] x [mean, std]
  shard-00000.labels.npy    (n,) int64
  shard-00000.features.npy  (n, 2, T, D): the frozen encoder's patch tokens, only with --encoder
  shard-00000.json          the shard's record (what it was made from, its files' sizes and sha256)
  manifest.json             written last: num_images, resolution, latent_shape, classes, shards
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from lsep_tune import cli
from lsep_tune.data.digits import load_digits_split, to_uint8
from lsep_tune.data.images import IMAGE_SUFFIXES, adm_center_crop, scan_class_folders
from lsep_tune.data.latents import FORMAT, SHARD
from lsep_tune.errors import InputError, OneLineParser, run_cli
from lsep_tune.files import atomic_write, require_writable_dir

# ---------------------------------------------------------------------------------------------
# Reading the images


def read_and_crop(batch: dict, root: str, resolution: int) -> dict:
    """Ray Data task: paths -> uint8 (B, R, R, 3) crops; an unreadable file gets ok=False."""
    from PIL import Image


    images = np.zeros((len(batch["path"]), resolution, resolution, 3), dtype=np.uint8)
    ok = np.ones(len(batch["path"]), dtype=bool)
    for i, rel in enumerate(batch["path"]):
        try:
            with Image.open(os.path.join(root, rel)) as img:
                images[i] = adm_center_crop(img.convert("RGB"), resolution)
        except Exception:  # noqa: BLE001 - any decoder error means "unreadable": reported by the driver
            ok[i] = False
    return {**batch, "image": images, "ok": ok}


# ---------------------------------------------------------------------------------------------
# Models: loaded once on the driver (so a bad name fails before Ray), shipped to the actors


def load_vae_any(name_or_path: str):
    """A local AutoencoderKL folder, or a Hugging Face hub name (e.g. stabilityai/sd-vae-ft-ema)."""
    from lsep_tune import vae as vae_mod  # torch: kept off the command's start-up

    if Path(name_or_path).exists():
        return vae_mod.load_vae(name_or_path)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except Exception as err:  # noqa: BLE001 - hub and network errors alike
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError("vae", name_or_path, f"not a local AutoencoderKL folder and not loadable from the "
                                                f"hub ({first[:200]})") from None
    return vae.eval().requires_grad_(False)


def load_encoder(name: str, weights: str | None, resolution: int):
    """A timm ViT by name at `resolution` (timm resamples the position embedding when the weights were
    trained at another size, e.g. DINOv2's 518 -> 224 as REPA uses); weights from a local file or the hub."""
    import timm

    overlay = {"file": weights} if weights else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                                  img_size=resolution)
    except Exception as err:  # noqa: BLE001 - unknown names, non-ViTs, missing files and hub errors alike
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError("encoder", name, f"cannot build this timm ViT at {resolution}px with its weights "
                                            f"({first[:200]})") from None
    return model.eval().requires_grad_(False)


def encoder_input_spec(model, resolution: int) -> dict:
    """The encoder's input side and the normalisation it was trained with (timm's data config)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {"input_size": resolution, "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def encoder_patch_tokens(model, spec: dict, images_uint8):
    """uint8 (B, H, W, 3) -> the encoder's normalised patch tokens (B, T, D), prefix tokens dropped.

    As REPA: the crop is resized (bicubic) to the encoder's own resolution, e.g. 224 for a
    DINOv2 ViT-B/14 (16 x 16 = 256 tokens, the token count of SiT/2 on 32 x 32 latents).
    """
    import torch
    import torch.nn.functional as F

    param = next(model.parameters())
    x = torch.as_tensor(images_uint8).to(param.device).permute(0, 3, 1, 2).float() / 255.0
    size = spec["input_size"]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(spec["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], device=x.device).view(1, 3, 1, 1)
    tokens = model.forward_features(((x - mean) / std).to(param.dtype))
    return tokens[:, getattr(model, "num_prefix_tokens", 0):]


class Encode:
    """Ray Data actor: crops -> posterior (mean, std) of image and flip [+ encoder patch tokens]."""

    def __init__(self, vae_payload, encoder_payload=None):
        import ray
        import torch

        # Shipped as object references (one copy in the object store, not one per actor).
        vae_payload, encoder_payload = ray.get(vae_payload), ray.get(encoder_payload) if encoder_payload else None

        from lsep_tune.vae import from_payload  # torch: kept off the command's start-up

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = from_payload(vae_payload).to(self.device)
        self.encoder = self.spec = None
        if encoder_payload is not None:
            import timm

            name, state, self.spec = encoder_payload
            self.encoder = timm.create_model(name, pretrained=False, num_classes=0, img_size=self.spec["input_size"])
            self.encoder.load_state_dict(state)
            self.encoder = self.encoder.eval().requires_grad_(False).to(self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        images = batch.pop("image")
        both = np.stack([images, images[:, :, ::-1]], axis=1)  # (B, 2, R, R, 3): image, horizontal flip
        flat = both.reshape(-1, *both.shape[2:])
        with torch.no_grad():
            x = torch.as_tensor(flat).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            post = self.vae.encode(x).latent_dist
            moments = torch.stack([post.mean, post.std], dim=1)  # (2B, 2, C, h, w)
            batch["moments"] = moments.view(len(images), 2, *moments.shape[1:]).half().cpu().numpy()
            if self.encoder is not None:
                feats = encoder_patch_tokens(self.encoder, self.spec, flat)
                batch["features"] = feats.view(len(images), 2, *feats.shape[1:]).half().cpu().numpy()
        return batch


# ---------------------------------------------------------------------------------------------
# Shards


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_digest(items: list[tuple[str, int]], settings: dict) -> str:
    """What a shard is made from: its images, labels and the encoding settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rel, label in items:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def finished_record(out: Path, index: int, digest: str) -> dict | None:
    """The shard's record if it was completed from the same plan and its files are intact in size."""

    record_path = out / f"{SHARD.format(index)}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != digest:
        return None
    for name, meta in record["files"].items():
        path = out / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            return None
    return record


def write_shard(out: Path, index: int, digest: str, rows: list[dict], skipped: list[str]) -> dict:
    """Arrays first (each via a temporary name), the record last: a record means a complete shard."""

    stem = SHARD.format(index)
    arrays = {"moments": np.stack([r["moments"] for r in rows]) if rows else np.zeros((0,), np.float16),
              "labels": np.asarray([r["label"] for r in rows], dtype=np.int64)}
    if rows and "features" in rows[0]:
        arrays["features"] = np.stack([r["features"] for r in rows])
    files = {}
    for key, arr in arrays.items():
        name = f"{stem}.{key}.npy"
        with atomic_write(out / name) as f:
            np.save(f, arr)
        files[name] = {"bytes": (out / name).stat().st_size, "sha256": sha256_of(out / name)}
    record = {"index": index, "plan": digest, "num_images": len(rows), "files": files, "unreadable": skipped}
    with atomic_write(out / f"{stem}.json") as f:
        f.write((json.dumps(record, indent=1) + "\n").encode())
    return record


def write_manifest(out: Path, shards: list[dict], resolution: int, vae: str, images: str,
                   classes: dict[str, int], encoder: dict | None) -> dict:
    """manifest.json from the shard records; written last, so its presence means a complete dataset."""

    first = next((r for r in shards if r["num_images"]), None)
    if first is None:
        raise InputError(images, "--images", "no image could be read; see the paths listed above")
    stem = out / SHARD.format(first["index"])
    manifest = {
        "format": FORMAT,
        "num_images": sum(r["num_images"] for r in shards),
        "resolution": resolution,
        "latent_shape": list(np.load(f"{stem}.moments.npy", mmap_mode="r").shape[3:]),
        "latent_dtype": "float16",
        "layout": "moments (n, [image, flip], [mean, std], C, h, w); features (n, [image, flip], T, D)",
        "vae": vae,
        "images": images,
        "classes": classes,
        "encoder": encoder,
        "feature_shape": list(np.load(f"{stem}.features.npy", mmap_mode="r").shape[2:]) if encoder else None,
        "shards": [{"index": r["index"], "num_images": r["num_images"], "files": r["files"]} for r in shards],
        "unreadable": [p for r in shards for p in r["unreadable"]],
    }
    with atomic_write(out / "manifest.json") as f:
        f.write((json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


class ShardWriter:
    """Collects the in-order encoded rows of the pending shards and writes each when it is complete."""

    def __init__(self, out: Path, pending: dict[int, tuple[int, int, str]], shard_size: int, bar):
        self.out, self.pending, self.shard_size, self.bar = out, pending, shard_size, bar
        self.rows: dict[int, list[dict]] = {}
        self.seen: dict[int, int] = {}
        self.skipped: dict[int, list[str]] = {}
        self.records: dict[int, dict] = {}

    def add(self, batch: dict) -> None:
        for i in range(len(batch["index"])):
            index = int(batch["index"][i])
            shard = index // self.shard_size
            if batch["ok"][i]:
                row = {"label": int(batch["label"][i]), "moments": batch["moments"][i]}
                if "features" in batch:
                    row["features"] = batch["features"][i]
                self.rows.setdefault(shard, []).append((index, row))
            else:
                path = str(batch["path"][i])
                print(f"unreadable image, skipped: {path}", file=sys.stderr, flush=True)
                self.skipped.setdefault(shard, []).append(path)
            self.seen[shard] = self.seen.get(shard, 0) + 1
            self.bar.update(1)
            start, stop, digest = self.pending[shard]
            if self.seen[shard] == stop - start:
                rows = [row for _, row in sorted(self.rows.pop(shard, []), key=lambda r: r[0])]
                self.records[shard] = write_shard(self.out, shard, digest, rows, self.skipped.pop(shard, []))


# ---------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m lsep_tune.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="class-folder tree: one folder per class (sorted names -> labels 0..K-1)")
    p.add_argument("--out", help="output folder for the shards and manifest.json")
    p.add_argument("--resolution", type=int, choices=(256, 512), default=256)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL: hub name or "
                                                                      "local folder (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="encoder actors (default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per encoder actor (default: 1 when the Ray cluster has GPUs, else 0)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default: %(default)s)")
    p.add_argument("--encoder", help="also store this frozen timm encoder's patch tokens for REPA, e.g. "
                                     "vit_base_patch14_dinov2.lvd142m")
    p.add_argument("--encoder-weights", help="local weights file for --encoder (default: timm's hub)")
    p.add_argument("--encoder-resolution", type=int, default=224,
                   help="the encoder's input side (default: %(default)s: a DINOv2 ViT-B/14 then gives 16 x 16 = "
                        "256 tokens, the token count of SiT/2 at 256px)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--export-digits", metavar="DIR",
                   help="write the embedded digits (train split) as a class-folder tree of PNGs into DIR and exit")
    return p.parse_args(argv)


def export_digits(folder: Path) -> int:
    """The embedded digits as PNG class folders, so the whole ImageNet path can be tried offline."""
    from PIL import Image


    images, labels = load_digits_split("train")
    pixels = to_uint8(images)[..., 0]
    for i, (img, label) in enumerate(zip(pixels, labels.tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / str(label) / f"{i:05d}.png")
    return len(pixels)


def check_args(args) -> tuple[Path, Path, dict[str, int], list[tuple[str, int]]]:

    if not args.images or not args.out:
        raise InputError("preprocess", "--images/--out", "both are required (or --export-digits DIR)")
    root, out = Path(args.images), Path(args.out)
    if not root.is_dir():
        raise InputError(root, "--images", "not a folder; expected one sub-folder of images per class")
    class_map, items = scan_class_folders(root)
    if not items:
        raise InputError(root, "--images", f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class sub-folders")
    for flag in ("batch", "workers", "shard_size"):
        if getattr(args, flag) < 1:
            raise InputError("preprocess", f"--{flag.replace('_', '-')}", "expected a positive integer")
    if args.encoder_weights and not Path(args.encoder_weights).is_file():
        raise InputError(args.encoder_weights, "--encoder-weights", "no such file")

    require_writable_dir(out, "--out")
    return root, out, class_map, items


def run(args, ray_session) -> dict:
    """Encode every pending shard and write manifest.json; returns the manifest. Ray is joined
    through `ray_session` (a cli.RaySession) only when some shard is left to encode."""
    import ray
    from tqdm import tqdm

    from lsep_tune import vae as vae_mod  # torch: kept off the command's start-up

    root, out, class_map, items = check_args(args)
    vae = load_vae_any(args.vae)
    encoder_payload, encoder_info = None, None
    if args.encoder:
        encoder = load_encoder(args.encoder, args.encoder_weights, args.encoder_resolution)
        spec = encoder_input_spec(encoder, args.encoder_resolution)
        encoder_payload = (args.encoder, encoder.state_dict(), spec)
        encoder_info = {"name": args.encoder, "weights": args.encoder_weights or "timm hub", **spec}

    settings = {"format": FORMAT, "resolution": args.resolution, "vae": args.vae, "encoder": encoder_info}
    shards, pending = [], {}
    for index, start in enumerate(range(0, len(items), args.shard_size)):
        stop = min(start + args.shard_size, len(items))
        digest = plan_digest(items[start:stop], settings)
        record = finished_record(out, index, digest)
        shards.append(record)
        if record is None:
            pending[index] = (start, stop, digest)
    todo = sum(stop - start for start, stop, _ in pending.values())
    print(f"{len(items)} images in {len(class_map)} classes, {len(shards)} shards: "
          f"{len(shards) - len(pending)} already done, {todo} images to encode", flush=True)

    if pending:
        ray_session.connect(args.address)
        gpus = args.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # in order: the driver holds one shard at a time
        ctx.enable_progress_bars = False
        rows = [{"index": i, "path": items[i][0], "label": items[i][1]}
                for start, stop, _ in pending.values() for i in range(start, stop)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // args.batch, 1000)))
        ds = ds.map_batches(read_and_crop, batch_size=args.batch, fn_kwargs={"root": str(root.resolve()),
                                                                             "resolution": args.resolution})
        ds = ds.map_batches(Encode, batch_size=args.batch, num_gpus=gpus,
                            compute=ray.data.ActorPoolStrategy(size=args.workers),
                            fn_constructor_kwargs={"vae_payload": ray.put(vae_mod.to_payload(vae)),
                                                   "encoder_payload": ray.put(encoder_payload)
                                                   if encoder_payload else None})
        with tqdm(total=todo, desc="encode", unit="img", dynamic_ncols=True) as bar:
            writer = ShardWriter(out, pending, args.shard_size, bar)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
        for index, record in writer.records.items():
            shards[index] = record

    manifest = write_manifest(out, shards, resolution=args.resolution, vae=args.vae, images=str(root.resolve()),
                              classes=class_map, encoder=encoder_info)
    print(f"wrote {manifest['num_images']} images to {out / 'manifest.json'}"
          + (f"; {len(manifest['unreadable'])} unreadable image(s) skipped" if manifest["unreadable"] else ""))
    return manifest


# Neutral names in the loaders' errors -> the flags of this command.
FLAGS = {"vae": "--vae", "encoder": "--encoder", "address": "--address"}


def main(argv: list[str] | None = None) -> int:
    from lsep_tune.cli import RaySession

    def body(args):
        with RaySession() as ray_session:
            run(args, ray_session)
        return 0

    def command() -> int:
        args = parse_args(argv)
        if args.export_digits:
            n = export_digits(Path(args.export_digits))
            print(f"wrote {n} digits PNGs under {args.export_digits}")
            return 0
        return body(args)

    return run_cli(command, FLAGS)


if __name__ == "__main__":
    cli.exit_command(main())
