"""`python -m lsep_tune.train`: one training run, in this process or on Ray Train workers."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lsep_tune.config import ConfigError, load_config, preset_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lsep_tune.train", description=__doc__)
    src = p.add_argument_group("config (one of --preset, --config, or --resume alone)")
    src.add_argument("--preset", help=f"shipped preset: {', '.join(preset_names())}")
    src.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set objective.lsep.uncond_prob=0.8 (repeatable)")
    p.add_argument("--max-steps", type=int, help="shorthand for --set run.max_steps=N")
    p.add_argument("--output", help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--device", help="torch device for the in-process run (default: cuda if available)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace):
    """Config and output folder from the arguments; raises ConfigError on bad input."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ConfigError(f"--max-steps: {args.max_steps}: expected a positive integer")
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume: {run_dir}: expected a run folder with config.yaml")
        if args.output and Path(args.output) != run_dir:
            raise ConfigError("--output: a resumed run writes to its own folder; drop --output")
        if args.preset or args.config:
            cfg = load_config(args.preset, args.config, overrides)
        else:
            cfg = load_config(path=run_dir / "config.yaml", overrides=overrides)
        return cfg, run_dir
    if not (args.preset or args.config):
        raise ConfigError("config: give --preset NAME, --config FILE or --resume DIR")
    if args.preset and args.config:
        raise ConfigError("config: give only one of --preset and --config")
    cfg = load_config(args.preset, args.config, overrides)
    name = args.preset or Path(args.config).stem
    output = Path(args.output) if args.output else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, output


def check_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output: {output}: not writable ({err.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, output = resolve(args)
        check_output(output)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from lsep_tune.train.context import LocalContext
    from lsep_tune.train.loop import TrainingDiverged, train_loop

    ctx = LocalContext(output, cfg.run.keep_checkpoints, device=args.device,
                       resume_from=output if args.resume else None)
    try:
        summary = train_loop(cfg, ctx)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    print(json.dumps({k: summary[k] for k in ("final_step", "final_loss", "probe_acc", "checkpoint", "sample_grid")}))
    print(f"summary: {output / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
