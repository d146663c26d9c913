"""`python -m lsep_tune.search`: search LSEP / SRA settings with Ray Tune + Optuna, tracked in MLflow.

With no arguments it runs the embedded digits space on a local Ray, on CPU, offline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lsep_tune.cluster import ends_local_ray
from lsep_tune.errors import InputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lsep_tune.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="digits", help="search-space YAML file or shipped name (default: digits)")
    p.add_argument("--num-samples", type=int, help="trials in total (overrides budget.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (overrides budget.max_concurrent)")
    p.add_argument("--output", help="search folder (default: runs/search-<space>-<time>; with --resume the latest)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///OUTPUT/mlflow.db)")
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
    from lsep_tune.files import require_writable_dir
    from lsep_tune.search.space import load_space

    for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent)):
        if value is not None and value < 1:
            raise InputError(flag, value, "expected a positive integer")
    space = load_space(args.space)
    if args.smoke:
        space = space.smoke()
    space = space.with_overrides(num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        check_local_budget(space)
    output = resolve_output(args, space.name)
    uri = args.mlflow_uri
    if args.resume and not uri:
        uri = json.loads((output / "search.json").read_text()).get("mlflow_tracking_uri")
    if uri:  # given (or remembered): its own mistakes are its own
        problem = tracking.check_uri(uri)
        if problem:
            raise InputError("--mlflow-uri", uri, problem)
    require_writable_dir(output, "--output")
    return space, output, uri or tracking.default_uri(output)


def check_local_budget(space) -> None:
    """A local Ray is sized so that max_concurrent trials fit; one trial alone must still fit the
    machine's cores, or it would wait on processes that never get a core."""
    need = space.budget.workers_per_trial * space.budget.cpus_per_worker
    have = os.cpu_count() or 1
    if need > have:
        raise InputError(space.source, "budget.workers_per_trial",
                         f"one trial needs {need:g} CPUs (workers_per_trial x cpus_per_worker), this machine "
                         f"has {have}; lower them or pass --address of a cluster")


def connect(args, space) -> None:
    from lsep_tune.search.runner import check_budget, local_cpus
    from lsep_tune.cluster import connect_ray

    args.started_ray = connect_ray(args.address, num_cpus=local_cpus(space))
    check_budget(space)


def main(argv: list[str] | None = None) -> int:
    return _main(parse_args(argv))


@ends_local_ray
def _main(args: argparse.Namespace) -> int:
    try:
        space, output, uri = prepare(args)  # everything checkable is checked before Ray starts
        connect(args, space)
    except InputError as err:
        print(f"error: {err.line({'address': '--address', 'storage': '--output'})}", file=sys.stderr)
        return 2

    from lsep_tune.search.report import print_summary
    from lsep_tune.search.runner import run_search
    from lsep_tune.tracking import ui_command

    summary = run_search(space, output, uri, resume=args.resume)
    print_summary(summary, output, ui_command(uri))
    return 0 if summary["best_trial"] else 1

if __name__ == "__main__":
    sys.exit(main())
