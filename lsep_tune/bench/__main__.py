"""python -m lsep_tune.bench train|search|cluster: what a step, a search and a large search cost (see docs/PERFORMANCE.md)."""
from __future__ import annotations

import argparse
import sys

from lsep_tune import cli
from lsep_tune.errors import InputError, OneLineParser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m lsep_tune.bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="time the real training step on synthetic latents")
    t.add_argument("--model", default="SiT-B/2", help="SiT preset name (default: SiT-B/2)")
    t.add_argument("--input-size", type=int, help="latent side length (default: 32, i.e. 256px images)")
    t.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    t.add_argument("--steps", type=int, default=20, help="timed steps after warm-up (default: 20)")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3; more with --compile)")
    t.add_argument("--regularizers", nargs="+", default=["lsep"],
                   help="one or more sets, each 'none' or names joined by '+', e.g. none lsep lsep+sra; "
                        "one result per set (default: lsep)")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    t.add_argument("--compile", action="store_true", help="torch.compile the backbone (run.compile)")
    t.add_argument("--baseline", action="store_true",
                   help="the straightforward path: no LSEP reuse, no fused AdamW, metrics read back every step")
    t.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --compare on a CPU)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config override, e.g. "
                   "objective.lsep.encoder_depth=4 (repeatable)")
    t.add_argument("--compare", action="store_true",
                   help="print ray_over_inprocess and lsep_over_flow, measured side by side")
    t.add_argument("--repeats", type=int, default=3, help="alternating rounds for lsep_over_flow (default: 3)")
    t.add_argument("--json", action="store_true", help="one JSON object per configuration, one per line")

    s = sub.add_parser("search", help="run a search and report the share of trial-slot time spent training")
    s.add_argument("--space", default="digits", help="search-space YAML or shipped name (default: digits)")
    s.add_argument("--smoke", action="store_true", help="the space's smoke version (a few minutes)")
    s.add_argument("--num-samples", type=int)
    s.add_argument("--max-concurrent", type=int)
    s.add_argument("--output", help="search folder (default: a new temporary folder)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")

    c = sub.add_parser("cluster", help="a large search on a simulated multi-node GPU cluster: driver CPU and "
                                       "memory, Tune state, MLflow and Optuna writes, scheduling delay")
    c.add_argument("--sizes", default="50,100,200", help="search sizes in trials, comma-separated (default: 50,100,200)")
    c.add_argument("--nodes", type=int, default=16, help="simulated Ray nodes on 127.0.0.1 (default: 16)")
    c.add_argument("--slots-per-node", type=int, default=8, help="GPU slots each node advertises (default: 8)")
    c.add_argument("--slots-per-trial", type=int, default=8, help="GPU slots each trial asks for (default: 8)")
    c.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: what half this machine's free memory holds, at most the slots')")
    c.add_argument("--steps", type=int, default=4, help="training steps per trial (default: 4)")
    c.add_argument("--output", help="folder for every size's search (default: a new temporary folder)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def check(args: argparse.Namespace) -> None:
    if args.command != "train":
        return
    for flag in ("batch", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag}", getattr(args, flag), "expected a positive integer")
    if args.warmup < 0:
        raise InputError("--warmup", args.warmup, "expected 0 or more")
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads", args.threads, "expected a positive integer")
    if args.device and args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise InputError("--device", args.device, "expected cpu or cuda")
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device", args.device, "no CUDA device here")


def run_train(args) -> int:
    import torch  # torch and the training modules: kept off the command's start-up (--help)

    from lsep_tune.bench.compare import run_compare
    from lsep_tune.bench.train import bench_config, measure, parse_regularizers, print_result

    configs = [bench_config(args, parse_regularizers(r), args.baseline) for r in args.regularizers]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        return run_compare(args, configs)
    for cfg in configs:
        print_result(measure(cfg, args, args.baseline), args.json)
    return 0


def _bench(argv: list[str] | None) -> int:
    args = parse_args(argv)
    check(args)
    if args.command == "train":
        from lsep_tune.bench.train import bench_config, parse_regularizers  # torch: kept off start-up

        for r in args.regularizers:  # every configuration is checked before anything runs
            bench_config(args, parse_regularizers(r), args.baseline)
        return run_train(args)
    if args.command == "cluster":
        from lsep_tune.bench.cluster import run_cluster_bench

        return run_cluster_bench(args)
    from lsep_tune.bench.search import run_search_bench

    return run_search_bench(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _bench(argv))


if __name__ == "__main__":
    cli.exit_command(main())
