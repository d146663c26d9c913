"""`python -m lsep_tune.train`: one training run, in this process or on Ray Train workers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lsep_tune import cli
from lsep_tune.errors import InputError, OneLineParser, run_cli
from lsep_tune.presets import preset_names


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m lsep_tune.train", description=__doc__)
    src = p.add_argument_group("config (one of --preset, --config, or --resume alone)")
    src.add_argument("--preset", help=f"shipped preset: {', '.join(preset_names())}")
    src.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set objective.lsep.uncond_prob=0.8 (repeatable)")
    p.add_argument("--max-steps", type=int, help="shorthand for --set run.max_steps=N")
    cli.add_output(p, "run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--device", help="torch device for the in-process run (default: cuda if available)")
    dist = p.add_argument_group("Ray Train")
    dist.add_argument("--workers", type=int, default=0, help="Ray Train workers; 0 runs in this process (default)")
    dist.add_argument("--gpus-per-worker", type=float, default=0.0)
    dist.add_argument("--cpus-per-worker", type=float, default=1.0)
    dist.add_argument("--storage", help="checkpoint storage: a folder, NFS path or s3:// / gs:// URI "
                                        "(default: OUTPUT/ray)")
    dist.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    cli.add_address(dist)
    cli.add_mlflow_uri(p)
    return p


# Neutral names in library errors -> the flags of this command.
FLAGS = {"override": "--set", "preset": "--preset", "output": "--output", "storage": "--storage",
         "workers": "--workers", "gpus_per_worker": "--gpus-per-worker", "address": "--address",
         "device": "--device"}


def resolve(args: argparse.Namespace):
    """Config, the name to blame for it, and the output folder; raises InputError on bad input."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        cli.positive("--max-steps", args.max_steps)
        overrides.append(f"run.max_steps={args.max_steps}")
    from lsep_tune.config import load_config  # pydantic and the config's registries: after the flags

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise InputError("--resume", run_dir, "expected a run folder with config.yaml")
        if args.output and Path(args.output) != run_dir:
            raise InputError("--output", args.output, "a resumed run writes to its own folder; drop --output")
        if args.preset or args.config:
            cfg = load_config(args.preset, args.config, overrides, overrides_name="--set")
        else:
            cfg = load_config(path=run_dir / "config.yaml", overrides=overrides, overrides_name="--set")
        return cfg, str(args.config or (f"preset {args.preset}" if args.preset else run_dir / "config.yaml")), run_dir
    if not (args.preset or args.config):
        raise InputError("command line", "config", "give --preset NAME, --config FILE or --resume DIR")
    if args.preset and args.config:
        raise InputError("command line", "config", "give only one of --preset and --config")
    cfg = load_config(args.preset, args.config, overrides, overrides_name="--set")
    name = args.preset or Path(args.config).stem
    output = Path(args.output) if args.output else cli.default_run_folder(name)
    return cfg, f"preset {args.preset}" if args.preset else str(args.config), output


def prepare(args: argparse.Namespace, ray_session: cli.RaySession):
    """Everything that can be wrong with the request fails here, before anything is written or started:
    cheap checks first, then the Ray cluster (a local Ray only once the machine can hold the run),
    then the MLflow store (which may create the output folder)."""
    from lsep_tune import tracking

    if args.workers < 0:  # a flag's own range first: no config read for it
        raise InputError("--workers", args.workers, "expected 0 (in-process) or more")
    cfg, source, output = resolve(args)
    from lsep_tune.cluster import Placement, check_storage, local_device  # torch: after the cheap checks

    cli.check_data(cfg)  # a missing or mismatched dataset: one line, before anything is created
    if cfg.run.init_from:  # a file that does not fit fails here, not on the workers
        from lsep_tune import published

        published.load(cfg.run.init_from, cfg.run.init_format, cfg.model.model_dump(), source="run.init_from")
    cli.check_output(output)
    if args.workers == 0:
        local_device(args.device)
    run_file = output / "run.json"
    previous = json.loads(run_file.read_text()) if args.resume and run_file.exists() else {}
    uri = cli.mlflow_uri(args.mlflow_uri, previous.get("mlflow_uri")) or tracking.default_uri(output)
    # A given store is checked before Ray starts; the default one lies in the output folder, which its
    # check may create, so that waits until Ray has accepted the run.
    given = uri != tracking.default_uri(output)
    if given:
        cli.check_mlflow(uri, "--mlflow-uri")
    placement = paths = None
    if args.workers > 0:
        from lsep_tune.train.distributed import RunPaths

        storage = args.storage or previous.get("storage") or str((output / "ray").resolve())
        check_storage(storage)
        placement = Placement(args.workers, args.gpus_per_worker, args.cpus_per_worker, args.max_failures)
        ray_session.connect(args.address, placement)
        paths = RunPaths(output=str(output.resolve()), storage=storage, name=previous.get("name", "train"),
                         mlflow_uri=uri, resume=bool(args.resume))
    if not given:
        cli.check_mlflow(uri, "--mlflow-uri")
    return cfg, output, uri, previous, placement, paths


def start_tracking(cfg, output: Path, uri: str, previous: dict, world_size: int, device: str) -> str:
    from lsep_tune import tracking

    if previous.get("mlflow_run_id"):
        return previous["mlflow_run_id"]
    from lsep_tune.data import identity

    try:
        run_id = tracking.create_run(
            uri, cfg.flat(), {"world_size": world_size, "device": device, "output": str(output.resolve())},
            run_name=output.name, artifact_location=tracking.artifact_location_for(uri, output),
        )
    except Exception as err:  # noqa: BLE001 - any store error is a setup error here
        gist = (str(err) or type(err).__name__).splitlines()[0][:200]
        raise InputError("--mlflow-uri", uri, f"cannot create a run ({gist})") from None
    try:
        tracking.log_dataset(uri, run_id, identity(cfg.data))
    except Exception as err:  # tracking never stops a run: it goes on without its dataset input
        print(f"warning: could not record the dataset of MLflow run {run_id} ({type(err).__name__}: {err})")
    return run_id


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _train(build_parser().parse_args(argv)), FLAGS)


def requested_device(args: argparse.Namespace, placement) -> str:
    from lsep_tune.cluster import local_device

    if placement is not None:
        return "cuda" if placement.gpus_per_worker else "cpu"
    return str(local_device(args.device))


def _train(args: argparse.Namespace) -> int:
    with cli.RaySession() as ray_session:
        return _train_in(args, ray_session)


def _train_in(args: argparse.Namespace, ray_session: cli.RaySession) -> int:
    cfg, output, uri, previous, placement, paths = prepare(args, ray_session)
    world = placement.workers if placement else 1
    run_id = start_tracking(cfg, output, uri, previous, world, requested_device(args, placement))
    output.mkdir(parents=True, exist_ok=True)
    record = {"mlflow_uri": uri, "mlflow_run_id": run_id}
    if paths:
        paths.mlflow_run_id = run_id
        record.update(storage=paths.storage, name=paths.name)
    (output / "run.json").write_text(json.dumps(record, indent=2) + "\n")

    from lsep_tune.tracking import RunTracker, ui_command
    from lsep_tune.train.metrics import TrainingDiverged

    try:
        if paths is None:
            summary = run_in_process(cfg, output, args, uri, run_id)
        else:
            summary = run_on_ray(cfg, placement, paths)
    except TrainingDiverged as err:
        RunTracker(uri, run_id).finish("FAILED")
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    summary.update(mlflow_tracking_uri=uri, mlflow_run_id=run_id)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    RunTracker(uri, run_id).finish("FINISHED")
    print(json.dumps({k: summary.get(k) for k in ("final_step", "final_loss", "probe_acc", "world_size", "checkpoint")}))
    print(f"summary: {output / 'summary.json'}")
    print(f"MLflow: {ui_command(uri, run_id)}")
    return 0


def run_in_process(cfg, output: Path, args, uri: str, run_id: str) -> dict:
    from lsep_tune.tracking import RunTracker
    from lsep_tune.train.context import LocalContext
    from lsep_tune.train.loop import train_loop

    ctx = LocalContext(output, cfg.run.keep_checkpoints, device=args.device,
                       resume_from=output if args.resume else None)
    ctx.callbacks.append(RunTracker(uri, run_id))
    try:
        return train_loop(cfg, ctx)
    finally:
        ctx.close()


def run_on_ray(cfg, placement, paths) -> dict:
    from lsep_tune.train.distributed import build_trainer, divergence
    from lsep_tune.train.metrics import TrainingDiverged

    result = build_trainer(cfg, placement, paths).fit()
    diverged = divergence(paths.output)
    if diverged:
        raise TrainingDiverged(diverged["error"], diverged["step"])
    summary_file = Path(paths.output) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else dict(result.metrics or {})
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path
    summary["storage"] = paths.checkpoint_root
    return summary


if __name__ == "__main__":
    cli.exit_command(main())
