"""`python -m lsep_tune.ablate`: the ablation a researcher runs first.

Named arms (no regularizer, LSEP, SRA, LSEP+SRA, or any configs an arms file gives) are each trained
on the same N seeds, in parallel as Tune trials on a local Ray or a cluster, through the search's
trial function (one nested MLflow run each, tagged `lsep_tune.role=ablation`). The output folder
gets, per metric, each arm's mean +/- std over seeds and its difference from the first arm paired
by seed with a 95% t-interval: `table.md`, `table.csv`, the per-seed values in `values.csv`, and
`bars.png`. The intervals are per comparison (no multiplicity correction): the table reports, it
does not pick a winner.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lsep_tune import cli
from lsep_tune.errors import InputError, OneLineParser, run_cli
from lsep_tune.search.stop import EXIT_STOPPED, SearchStopped, sigterm_stops_search

# The library half is imported by the functions that use it, once the flags are checked, so
# `python -m lsep_tune.ablate` answers --help and a bad flag before any of it loads: the arms file
# (lsep_tune.search.arms_file: pydantic and the config's registries, no torch, so a bad file is refused
# before torch too), then the tables and the run (lsep_tune.search.ablation: scipy, torch and Ray).


# ----- the command line: the only place that knows the flags ----------------------------------------

def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m lsep_tune.ablate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="digits", help="arms YAML file or shipped name (default: digits, "
                                                    "search_spaces/ablation-digits.yaml)")
    p.add_argument("--seeds", type=int, help="seeds per arm (overrides the file's seeds)")
    p.add_argument("--max-steps", type=int, help="training steps of every arm (overrides run.max_steps)")
    cli.add_output(p, "output folder (default: runs/ablation-<name>-<time>)")
    cli.add_mlflow_uri(p)
    cli.add_address(p)
    return p


# Neutral names in library errors -> the flags of this command.
FLAGS = {"arms": "--arms", "seeds": "--seeds", "max_steps": "--max-steps", "output": "--output",
         "mlflow_uri": "--mlflow-uri", "address": "--address"}


def prepare(args):
    """Everything checkable, before Ray starts and before anything is written."""
    if args.seeds is not None and args.seeds < 2:
        raise InputError("seeds", args.seeds, "expected 2 or more: a confidence interval needs 2 seeds")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError("max_steps", args.max_steps, "expected a positive integer")
    from lsep_tune import tracking
    from lsep_tune.search.arms_file import load_ablation  # see the note at the imports

    spec, arms, source = load_ablation(args.arms, args.seeds, args.max_steps)
    for arm in arms:  # a missing or mismatched dataset, before any run
        cli.check_data(arm.config)
    # a local Ray gets enough logical CPUs for max_concurrent runs, but one run must fit the real cores
    cli.check_trial_fits_here(spec.budget.resources, source, args.address)
    name = Path(source).stem.removeprefix("ablation-")
    output = Path(args.output) if args.output else cli.default_run_folder(f"ablation-{name}")
    if (output / "summary.json").exists():
        raise InputError("output", output, "holds an ablation already; choose another folder")
    given = cli.mlflow_uri(args.mlflow_uri)
    if given:  # the default store lies in the output folder, made once the run starts
        cli.check_mlflow(given)
    cli.check_output(output)
    uri = given or tracking.default_uri(output)
    return spec, arms, source, name, output, uri


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _ablate(build_parser().parse_args(argv)), FLAGS)


def _ablate(args: argparse.Namespace) -> int:
    spec, arms, source, name, output, uri = prepare(args)
    try:
        return _run(args, spec, arms, source, name, output, uri)
    except SearchStopped:  # (`ray job stop`, scancel, a deleted pod)
        print("ablation stopped (SIGTERM): its unfinished runs and its own MLflow run end KILLED; its tables "
              "were not written", flush=True)
        return EXIT_STOPPED


def _run(args, spec, arms, source, name, output, uri) -> int:
    with cli.RaySession() as ray_session:
        from lsep_tune.cluster import local_ray_cpus  # torch and Ray: only once the request passed its checks
        from lsep_tune.search.ablation import run_ablation
        from lsep_tune.tracking import ui_command

        ray_session.connect(args.address, num_cpus=local_ray_cpus(spec.budget.resources), trial=spec.budget.resources,
                            source=source)
        with sigterm_stops_search():  # after Ray's start: its driver installs a SIGTERM handler of its own
            summary = run_ablation(spec, arms, output, uri, name)
        print((output / "table.md").read_text())
        print(f"{len(arms)} arms x {len(summary['seeds'])} seeds, {summary['failed_runs']} failed, "
              f"{summary['wall_time_s']:.0f} s")
        print(f"tables: {output / 'table.md'}, {output / 'table.csv'}; chart: {output / 'bars.png'}")
        print(f"MLflow: {ui_command(uri, summary['mlflow_parent_run_id'])}")
        return 0 if summary["failed_runs"] < len(arms) * len(summary["seeds"]) else 1


if __name__ == "__main__":
    cli.exit_command(main())
