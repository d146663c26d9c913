"""Score a sample file: ``python -m lsep_tune.evaluate --samples FILE.npz --reference REF [--json]``.

FILE.npz holds uint8 NHWC images under ``arr_0`` (the ADM layout our samplers write). REF is
``digits``, an ADM reference batch ``.npz``, an image folder or a statistics ``.npz``. With
``--json`` stdout carries exactly one JSON object (metric name -> value; non-finite values are
null); everything torch-fidelity or torch says goes to stderr. Bad input prints one line,
``error: <file>: <field>: <expectation>``, to stderr and exits 2.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys

from lsep_tune import cli
from lsep_tune.errors import OneLineParser, run_cli

# The evaluation package loads torch and torch-fidelity, so --help and a bad flag use these mirrors of
# its names (tests/test_startup.py checks that they agree): evaluation.DEFAULT_METRICS,
# evaluation.extractors.SUPPORTED and evaluation.default_cache_dir().
DEFAULT_METRICS = ("fid", "isc")
SUPPORTED = ("digits", "inception-v3-compat")
DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                 "lsep_tune", "reference_stats")

# How API argument names read on the command line, so messages name what the user typed.
FLAGS = {"metrics": "--metrics", "extractor": "--extractor", "extractor_weights": "--extractor-weights"}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m lsep_tune.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--samples", required=True, help="npz with uint8 NHWC images under arr_0")
    p.add_argument("--reference", required=True, help="'digits', reference-batch .npz, image folder, or statistics .npz")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated subset of fid,isc,kid,prc")
    p.add_argument("--extractor", default=None, help=f"one of {', '.join(SUPPORTED)} (default: by image size)")
    p.add_argument("--extractor-weights", default=None, help="local state dict for the extractor (torch.save)")
    p.add_argument("--cache-dir", default=None, help=f"reference statistics cache (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _evaluate(argv), FLAGS)


def _evaluate(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from lsep_tune.evaluation import compute_metrics, default_extractor, load_samples_npz, parse_metrics  # torch-fidelity: after the flags
    from lsep_tune.evaluation.extractors import check_extractor_name

    metrics = parse_metrics(args.metrics)
    if args.extractor is not None:
        check_extractor_name(args.extractor)
    samples = load_samples_npz(args.samples)
    # torch-fidelity and torch.hub print progress with print(); keep stdout for our result.
    with contextlib.redirect_stdout(sys.stderr):
        result = compute_metrics(
            samples, args.reference, metrics, args.extractor, args.extractor_weights, args.cache_dir,
            samples_name=args.samples,
        )
    if args.json:
        print(json.dumps({k: _finite_or_none(v) for k, v in result.items()}, allow_nan=False))
        return 0
    n, h, w, c = samples.shape
    extractor = args.extractor or default_extractor((h, w, c), args.reference)
    rows = [("samples", f"{args.samples} ({n} images, {h}x{w}x{c})"), ("reference", args.reference), ("extractor", extractor)]
    rows += [(k, f"{v:.6g}") for k, v in result.items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    cli.exit_command(main())
