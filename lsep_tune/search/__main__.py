"""`python -m lsep_tune.search`: search LSEP / SRA settings with Ray Tune + Optuna, tracked in MLflow.

With no arguments it runs the embedded digits space on a local Ray, on CPU, offline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lsep_tune.config import ConfigError
from lsep_tune.train.distributed import ends_local_ray


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
            raise ConfigError(f"--resume: {out}: expected a search folder with search.json")
        if not args.resume and (out / "search.json").exists():
            raise ConfigError(f"--output: {out}: holds a search already; add --resume or choose another folder")
        return out
    if args.resume:
        found = sorted(Path("runs").glob(f"search-{space_name}-*/search.json"))
        if not found:
            raise ConfigError(f"--resume: no earlier search of {space_name} under runs/; pass --output DIR")
        return found[-1].parent
    return Path("runs") / f"search-{space_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(args):
    from lsep_tune import tracking
    from lsep_tune.search.space import load_space

    space = load_space(args.space)
    if args.smoke:
        space = space.smoke()
    for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: {value}: expected a positive integer")
    space = space.with_overrides(num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    output = resolve_output(args, Path(space.source).stem)
    uri = args.mlflow_uri
    if args.resume and not uri:
        uri = json.loads((output / "search.json").read_text()).get("mlflow_tracking_uri")
    uri = uri or tracking.default_uri(output)
    problem = tracking.check_uri(uri)
    if problem:
        raise ConfigError(f"--mlflow-uri: {uri}: {problem}")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output: {output}: not writable ({err.strerror})") from None
    return space, output, uri


def connect(args, space) -> None:
    from lsep_tune.search.runner import check_budget, local_cpus
    from lsep_tune.train.distributed import connect_ray

    args.started_ray = connect_ray(args.address, num_cpus=local_cpus(space))
    check_budget(space)


def main(argv: list[str] | None = None) -> int:
    return _main(parse_args(argv))


@ends_local_ray
def _main(args: argparse.Namespace) -> int:
    try:
        space, output, uri = prepare(args)  # everything checkable is checked before Ray starts
        connect(args, space)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from lsep_tune.search.runner import run_search
    from lsep_tune.tracking import ui_command

    summary = run_search(space, output, uri, resume=args.resume)
    failed = sum(r["status"] == "failed" for r in summary["trials"])
    print(f"\n{len(summary['trials'])} trials ({failed} failed) in {summary['wall_time_s']:.0f} s")
    if summary["best_trial"]:
        best = summary["best_metric"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in best.items()) if isinstance(best, dict) else f"{best:.4g}"
        print(f"best {summary['metric']}: {shown} (trial {summary['best_trial']})")
        for key, value in sorted(summary["best_params"].items()):
            print(f"  {key} = {value}")
        if summary.get("confirmation"):
            print(f"confirmation: {summary['confirmation']['verdict']}")
        print(f"best config: {summary['best_yaml']}  (rerun: python -m lsep_tune.train --config {summary['best_yaml']})")
    else:
        print("no trial finished with a metric")
    print(f"summary: {output / 'summary.json'}")
    print(f"Optuna study: optuna-dashboard {summary['optuna_storage']}  (pip install optuna-dashboard)")
    print(f"MLflow: {ui_command(uri)}")
    return 0 if summary["best_trial"] else 1


if __name__ == "__main__":
    sys.exit(main())
