"""`python -m lsep_tune.clusters check FILE... [--space NAME|FILE]`: check deployment recipes (Ray
cluster-launcher YAML, KubeRay RayCluster / RayJob, Slurm sbatch) before a cluster is paid for.

Valid: one line per recipe, exit 0. Invalid: one line naming the file, the field and the
expectation, exit 2. With --space, also whether one trial of that search space fits the cluster.
"""
from __future__ import annotations

import argparse
import sys

from lsep_tune.errors import OneLineParser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m lsep_tune.clusters", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    check = commands.add_parser("check", help="check cluster files (exit 2 on the first problem)")
    check.add_argument("files", nargs="+", metavar="FILE", help="cluster recipe files (clusters/*.yaml, *.sbatch)")
    check.add_argument("--space", metavar="NAME|FILE",
                       help="a search space: also check that one of its trials fits the cluster described")
    return p.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    from lsep_tune.clusters.check import check

    for line in check(args.files, args.space):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
