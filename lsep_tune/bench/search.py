"""`bench search`: run a search with the project's own CLI and say where its trial slots went.

Each trial's loop reports wall seconds by stage (time_startup_s, time_train_s, time_eval_s,
time_checkpoint_s, time_report_s: see train.metrics.StageClock) with every result; Tune adds the
trial's own wall time (time_total_s). A trial's slot time is its time_total_s; what the loop did
not account for is start-up outside the loop (the trial's Ray Train worker group, imports, data).
The shares are of the summed slot time of all trials; the capacity view (search wall x slots)
is printed beside them, since idle slots cost a budget too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("train", "eval", "checkpoint", "report", "startup")


def last_results(output: Path) -> list[dict]:
    """The last result of every trial Tune recorded under the search folder."""
    found = []
    for path in sorted(output.rglob("result.json")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            found.append(json.loads(lines[-1]))
    return found


def shares(results: list[dict], wall_s: float, slots: int) -> dict:
    totals = {stage: sum(float(r.get(f"time_{stage}_s", 0.0)) for r in results) for stage in STAGES}
    slot_s = sum(float(r.get("time_total_s", 0.0)) for r in results)
    outside = max(0.0, slot_s - sum(totals.values()))
    in_loop = sum(totals.values())
    return {
        "trials": len(results),
        "slot_time_s": round(slot_s, 1),
        **{f"{stage}_s": round(v, 1) for stage, v in totals.items()},
        "startup_outside_loop_s": round(outside, 1),
        "train_share": round(totals["train"] / slot_s, 4) if slot_s else None,
        **{f"{stage}_share": round(v / slot_s, 4) if slot_s else None for stage, v in totals.items() if stage != "train"},
        "startup_outside_loop_share": round(outside / slot_s, 4) if slot_s else None,
        # What the share becomes when the start-up outside the loop is gone (one-worker trials that run
        # the loop inside the Tune trial, train.tune_context): an estimate, not a measurement.
        "train_share_without_outside_startup": round(totals["train"] / in_loop, 4) if in_loop else None,
        "search_wall_s": round(wall_s, 1),
        "slots": slots,
        "train_share_of_capacity": round(totals["train"] / (wall_s * slots), 4) if wall_s and slots else None,
    }


def run_search_bench(args) -> int:
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="lsep_bench_search_")) / "search"
    cmd = [sys.executable, "-m", "lsep_tune.search", "--space", args.space, "--output", str(output)]
    if args.smoke:
        cmd.append("--smoke")
    for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent)):
        if value is not None:
            cmd += [flag, str(value)]
    started = time.time()
    proc = subprocess.run(cmd, env=os.environ.copy(), stdout=sys.stderr if not args.json else subprocess.DEVNULL)
    wall = time.time() - started
    if proc.returncode == 2:
        return 2  # the search printed its one-line input error
    results = last_results(output)
    if not results:
        print(f"error: bench search: no trial results under {output} (search exit code {proc.returncode})",
              file=sys.stderr)
        return 1
    space_file = output / "space.yaml"
    slots = 1
    if space_file.exists():
        import yaml

        slots = int((yaml.safe_load(space_file.read_text()).get("budget") or {}).get("max_concurrent", 1))
    report = {"space": args.space, "smoke": args.smoke, "output": str(output), "search_exit_code": proc.returncode,
              **shares(results, wall, slots)}
    (output / "bench_search.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"train_share={report['train_share']:.3f} of {report['slot_time_s']:.0f} trial-slot seconds "
          f"({report['trials']} trials)")
    for stage in ("eval", "checkpoint", "report", "startup", "startup_outside_loop"):
        print(f"  {stage}: {report[f'{stage}_s']:.1f} s ({100 * report[f'{stage}_share']:.1f}%)")
    print(f"  without start-up outside the loop (estimate): train_share="
          f"{report['train_share_without_outside_startup']:.3f}")
    print(f"  capacity view: {report['train_share_of_capacity']:.3f} of {report['slots']} slots x "
          f"{report['search_wall_s']:.0f} s search wall")
    print(f"report: {output / 'bench_search.json'}")
    return 0
