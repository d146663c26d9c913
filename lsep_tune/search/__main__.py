"""`python -m lsep_tune.search`: search LSEP / SRA settings with Ray Tune + Optuna, tracked in MLflow.

With no arguments it runs the embedded digits space on a local Ray, on CPU, offline.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsep_tune import cli
from lsep_tune.errors import InputError, OneLineParser, run_cli
from lsep_tune.search.stop import EXIT_STOPPED, SearchStopped, sigterm_stops_search

DEFAULT_SPACE = "digits"
# Neutral names in library errors -> the flags of this command.
FLAGS = {"address": "--address", "storage": "--output", "output": "--output", "mlflow_uri": "--mlflow-uri",
         "optuna_storage": "--optuna-storage"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m lsep_tune.search", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="search-space YAML file or shipped name (default: digits; with --resume the "
                   "search's own, as its folder's space.yaml keeps it)")
    p.add_argument("--num-samples", type=int, help="trials in total (overrides budget.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (overrides budget.max_concurrent)")
    cli.add_output(p, "search folder (default: runs/search-<space>-<time>; with --resume the latest)")
    cli.add_mlflow_uri(p)
    p.add_argument("--optuna-storage", help="Optuna study's database, e.g. postgresql+psycopg://USER@HOST:5432/optuna "
                   "(default: sqlite:///OUTPUT/optuna.db; with --resume the search's own)")
    cli.add_address(p)
    p.add_argument("--resume", action="store_true", help="continue the search in --output (or the latest one)")
    p.add_argument("--register-model", metavar="NAME",
                   help="register the confirmed winner (or the kept baseline) as a version of model NAME "
                        "in the MLflow model registry")
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
    return cli.default_run_folder(f"search-{space_name}")


def prepare(args):
    """Everything checkable is checked here, before Ray starts and before anything is written."""
    from lsep_tune import tracking
    from lsep_tune.search.storage import resolve_storage

    cli.positive("--num-samples", args.num_samples)
    cli.positive("--max-concurrent", args.max_concurrent)
    from lsep_tune.search.space import load_space  # pydantic and the config's registries: after the flags

    if args.resume and args.space is None:  # the search goes on with the space it ran (--smoke included)
        output = resolve_output(args, DEFAULT_SPACE)
        saved = output / "space.yaml"
        space = load_space(str(saved) if saved.exists() else DEFAULT_SPACE)
    else:
        space = load_space(args.space or DEFAULT_SPACE)
        if args.smoke:
            space = space.smoke()
        output = resolve_output(args, space.name)
    space = space.with_overrides(num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    cli.check_data(space.base_config())  # a missing or mismatched dataset, before any trial
    # a local Ray is sized for max_concurrent trials; one must fit the machine
    cli.check_trial_fits_here(space.resources, space.source, args.address)
    state = json.loads((output / "search.json").read_text()) if args.resume else {}
    uri = cli.mlflow_uri(args.mlflow_uri, state.get("mlflow_tracking_uri"))
    if uri:  # given (or remembered): its own mistakes are its own
        cli.check_mlflow(uri)
    args.optuna_storage = resolve_storage(args.optuna_storage, output, state.get("optuna_storage"))
    cli.check_output(output)
    return space, output, uri or tracking.default_uri(output)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(parse_args(argv)), FLAGS)


def _main(args: argparse.Namespace) -> int:
    space, output, uri = prepare(args)  # everything checkable is checked before Ray starts
    try:
        return _search(args, space, output, uri)
    except SearchStopped:
        print(f"search stopped (SIGTERM): its unfinished trials' MLflow runs and the search's run end KILLED; "
              f"continue it with: python -m lsep_tune.search --output {output} --resume", flush=True)
        return EXIT_STOPPED


def _search(args: argparse.Namespace, space, output: Path, uri: str) -> int:
    with cli.RaySession() as ray_session:
        from lsep_tune.cluster import local_ray_cpus  # torch and Ray: only once the request passed its checks
        from lsep_tune.search.report import print_summary
        from lsep_tune.search.runner import run_search
        from lsep_tune.tracking import ui_command

        ray_session.connect(args.address, num_cpus=local_ray_cpus(space.resources), trial=space.resources,
                            source=space.source)
        with sigterm_stops_search():  # after Ray's start: its driver installs a SIGTERM handler of its own
            summary = run_search(space, output, uri, resume=args.resume, optuna_storage=args.optuna_storage,
                                 register_model=args.register_model)
        print_summary(summary, output, ui_command(uri, summary["mlflow_parent_run_id"]))
        return 0 if summary["best_trial"] else 1


if __name__ == "__main__":
    cli.exit_command(main())
