"""`python -m lsep_tune.search`: search LSEP / SRA settings with Ray Tune + Optuna, tracked in MLflow.

With no arguments it runs the embedded digits space on a local Ray, on CPU, offline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lsep_tune.cluster import ends_local_ray
from lsep_tune.errors import InputError, OneLineParser, run_cli

# Neutral names in library errors -> the flags of this command.
FLAGS = {"address": "--address", "storage": "--output", "output": "--output", "mlflow_uri": "--mlflow-uri",
         "optuna_storage": "--optuna-storage"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m lsep_tune.search", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="digits", help="search-space YAML file or shipped name (default: digits)")
    p.add_argument("--num-samples", type=int, help="trials in total (overrides budget.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (overrides budget.max_concurrent)")
    p.add_argument("--output", help="search folder (default: runs/search-<space>-<time>; with --resume the latest)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///OUTPUT/mlflow.db)")
    p.add_argument("--optuna-storage", help="Optuna study's database, e.g. postgresql+psycopg://USER@HOST:5432/optuna "
                   "(default: sqlite:///OUTPUT/optuna.db; with --resume the search's own)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the search in --output (or the latest one)")
    p.add_argument("--smoke", action="store_true", help="shrink the space to a 2-3 minute check of the whole path")
    return p.parse_args(argv)


def resolve_output(args, space_name: str) -> Path:
    if args.output:
        out = Path(args.output)
        if args.resume and not (out / "search.json").exists():
            raise InputError("--resume", out, "expected a search folder with search.json")
        if not args.resume and (out / "search.json").exists():
            raise InputError("--output", out, "holds a search already; add --resume or choose another folder")
        return out
    if args.resume:
        found = sorted(Path("runs").glob(f"search-{space_name}-*/search.json"))
        if not found:
            raise InputError("--resume", space_name, "no earlier search of it under runs/; pass --output DIR")
        return found[-1].parent
    return Path("runs") / f"search-{space_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(args):
    """Everything checkable is checked here, before Ray starts and before anything is written."""
    from lsep_tune import tracking
    from lsep_tune.cluster import check_trial_fits, machine_resources, ray_address
    from lsep_tune.data import check_available
    from lsep_tune.files import require_writable_dir
    from lsep_tune.search.space import load_space
    from lsep_tune.search.storage import resolve_storage

    for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent)):
        if value is not None and value < 1:
            raise InputError(flag, value, "expected a positive integer")
    space = load_space(args.space)
    if args.smoke:
        space = space.smoke()
    space = space.with_overrides(num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    base = space.base_config()
    check_available(base.data, cfg=base)  # a missing or mismatched dataset, before any trial
    if not ray_address(args.address):  # a local Ray is sized for max_concurrent trials; one must fit the machine
        check_trial_fits(space.budget, space.source, machine_resources(), "this machine")
    output = resolve_output(args, space.name)
    uri = args.mlflow_uri
    state = json.loads((output / "search.json").read_text()) if args.resume else {}
    if args.resume and not uri:
        uri = state.get("mlflow_tracking_uri")
    if uri:  # given (or remembered): its own mistakes are its own
        problem = tracking.check_uri(uri)
        if problem:
            raise InputError("mlflow_uri", uri, problem)
    args.optuna_storage = resolve_storage(args.optuna_storage, output, state.get("optuna_storage"))
    require_writable_dir(output, "output")
    return space, output, uri or tracking.default_uri(output)


def connect(args, space) -> None:
    import ray

    from lsep_tune.cluster import check_trial_fits, connect_ray, local_ray_cpus

    args.started_ray = connect_ray(args.address, num_cpus=local_ray_cpus(space.budget))
    check_trial_fits(space.budget, space.source, ray.cluster_resources(), "the cluster")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(parse_args(argv)), FLAGS)


@ends_local_ray
def _main(args: argparse.Namespace) -> int:
    space, output, uri = prepare(args)  # everything checkable is checked before Ray starts
    connect(args, space)

    from lsep_tune.search.report import print_summary
    from lsep_tune.search.runner import run_search
    from lsep_tune.tracking import ui_command

    summary = run_search(space, output, uri, resume=args.resume, optuna_storage=args.optuna_storage)
    print_summary(summary, output, ui_command(uri))
    return 0 if summary["best_trial"] else 1


if __name__ == "__main__":
    sys.exit(main())
