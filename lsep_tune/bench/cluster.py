"""`bench cluster`: what a large search costs its driver and its stores, on a simulated GPU cluster.

Each size runs in a fresh driver process (so its peak RSS is its own): `ray.cluster_utils.Cluster`
starts NODES Ray nodes on 127.0.0.1, each advertising SLOTS `gpu_slot` resources and one CPU; the
project's own search (search/runner.py `run_search`: Tune + Optuna + MLflow, the same callbacks)
runs SIZE tiny digits trials on them, each trial asking for SLOTS_PER_TRIAL slots instead of GPUs.
Writes are counted where they happen (bench/writes.py), trial starts and ends by a Tune callback.
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from lsep_tune.bench import writes
from lsep_tune.errors import InputError

SLOT = "gpu_slot"
LOOPBACK = "127.0.0.1"
# Ray 2.60 replaces a requested 127.0.0.1 by the machine's network address unless its multi-node switch
# (meant for Windows and macOS) is off; the driver of each size, and every Ray process it starts,
# gets it from the environment, so GCS, raylets and workers all bind loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TRIAL_CPU = 0.01  # a trial asks for slots; CPU must never be what limits the simulated cluster
NODE_CPUS = 1
NODE_OBJECT_STORE = 80 * 2**20  # Ray's minimum is 75 MiB
# Memory one tiny digits trial process holds (a Ray worker importing ray, torch, mlflow and lsep_tune:
# 1.0 GiB max RSS measured 2026-12-02, docs/PERFORMANCE.md), and one simulated node (raylet + its
# agents, an estimate); they size the default concurrency to half of what the machine has free.
TRIAL_RSS_BYTES = 2**30
NODE_RSS_BYTES = 200 * 2**20

# Every key of one size's result, documented (docs/PERFORMANCE.md repeats this table).
RESULT_KEYS = {
    "trials": "trials the search was asked for (num_samples)",
    "trials_started": "trials Tune started (on_trial_start)",
    "trials_finished": "trials that ended: complete (FINISHED or stopped by ASHA) plus errored",
    "trials_errored": "trials that ended in error",
    "max_concurrent": "budget.max_concurrent: trials at once",
    "concurrent_seen": "most trials running at the same time, from the start / end callbacks",
    "slot_capacity": "trials the simulated slots hold at once: nodes x slots_per_node // slots_per_trial",
    "search_wall_s": "wall seconds of run_search (Tuner fit, report, plots, MLflow parent run)",
    "driver_cpu_s": "driver process CPU seconds (user + system, all its threads) during run_search",
    "driver_cpu_s_per_trial": "driver_cpu_s / trials",
    "driver_peak_rss_bytes": "driver process peak RSS (getrusage ru_maxrss) at the end of the search",
    "driver_rss_before_bytes": "driver RSS just before run_search (Ray connected, cluster up)",
    "tune_experiment_state_bytes": "size of Tune's experiment_state-*.json, rewritten every TUNE_GLOBAL_CHECKPOINT_S",
    "tune_folder_bytes": "everything under the search's tune/ folder (experiment state and trial folders)",
    "tune_global_checkpoint_s": "TUNE_GLOBAL_CHECKPOINT_S the search ran with",
    "mlflow_writes": "SQL write statements (INSERT / UPDATE / DELETE) on the MLflow store, all processes",
    "mlflow_write_rows": "rows those statements sent (executemany counts each row)",
    "mlflow_write_commits": "MLflow store transactions that wrote",
    "mlflow_reads": "other SQL statements (SELECT ...) on the MLflow store",
    "mlflow_writes_driver": "the driver's share of mlflow_writes (parent run, trial runs made and ended)",
    "mlflow_writes_per_trial": "mlflow_writes / trials",
    "mlflow_writes_per_s": "mlflow_writes / search_wall_s",
    "mlflow_peak_writes_per_s": "MLflow write statements in the busiest wall-clock second",
    "optuna_writes": "SQL write statements on the Optuna store, all processes",
    "optuna_write_rows": "rows those statements sent",
    "optuna_write_commits": "Optuna store transactions that wrote",
    "optuna_reads": "other SQL statements on the Optuna store",
    "optuna_writes_driver": "the driver's share of optuna_writes (the searcher lives there)",
    "optuna_writes_per_trial": "optuna_writes / trials",
    "optuna_writes_per_s": "optuna_writes / search_wall_s",
    "optuna_peak_writes_per_s": "Optuna write statements in the busiest wall-clock second",
    "sched_delay_s": "free slot -> started trial: for each start after the first fill, seconds since the "
                     "trial end that freed its slot (ends and starts paired in order); median, p90, max, mean, n",
    "first_result_s": "started trial -> its first report to Tune (trial imports, model, first steps): median, p90, max, n",
    "trial_s": "started -> ended, per trial: median, p90, max, n",
    "output": "the size's folder (search, MLflow and Optuna stores, SQL logs)",
}
# Every top-level key of the report.
REPORT_KEYS = {
    "benchmark": "'cluster'",
    "date": "UTC time the benchmark started",
    "machine": "cpus (this process may use) and mem_total_bytes / mem_available_bytes at the start",
    "command": "the command line",
    "nodes": "simulated Ray nodes (one head + workers), all on 127.0.0.1",
    "slots_per_node": f"'{SLOT}' resources each node advertises",
    "slots_per_trial": f"'{SLOT}' resources each trial asks for",
    "max_concurrent": "trials at once (from --max-concurrent, else the machine's free memory)",
    "steps": "training steps per trial",
    "sizes": "the search sizes run, in trials",
    "results": "one object per size (keys in RESULT_KEYS)",
    "growth": "for each per-trial figure, its value at the largest size / at the smallest",
}
GROWTH_KEYS = ("driver_cpu_s_per_trial", "driver_peak_rss_bytes", "tune_experiment_state_bytes",
               "mlflow_writes_per_trial", "optuna_writes_per_trial")


def mem_info() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return {"mem_total_bytes": fields["MemTotal"], "mem_available_bytes": fields["MemAvailable"]}


def default_concurrency(nodes: int, capacity: int) -> int:
    """As many trials at once as half this machine's free memory holds, beside the nodes themselves."""
    room = mem_info()["mem_available_bytes"] // 2 - nodes * NODE_RSS_BYTES
    return max(1, min(capacity, room // TRIAL_RSS_BYTES))


def bench_space(trials: int, max_concurrent: int, steps: int):
    """The shipped digits space (its params, searcher, ASHA), shrunk to the cheapest real trial: the
    smallest model, `steps` steps, a tiny batch, no evaluation, a one-image grid, loss as the metric."""
    from lsep_tune.search.space import SearchSpace, load_space  # pydantic and the config: after the flags

    base = load_space("digits")
    data = base.to_dict()
    report = max(1, steps // 2)
    data["overrides"] = {
        "model.name": "SiT-Tiny/2", "data.batch_size": 8,
        "run.ckpt_every": steps, "run.keep_checkpoints": 1, "run.eval_every": 0, "run.final_eval_samples": 0,
        "sampling.grid_images": 1, "sampling.steps": 1,
    }
    data["metric"] = {"name": "loss", "mode": "min"}
    data["scheduler"] = {"type": "asha", "time_attr": "step", "grace_period": report, "reduction_factor": 2,
                         "max_t": steps}
    data["budget"].update(num_samples=trials, max_concurrent=max_concurrent, workers_per_trial=1,
                          cpus_per_worker=TRIAL_CPU, gpus_per_worker=0, max_steps=steps, max_failures=0,
                          time_budget_s=None)
    data["report_every"] = report
    data.pop("confirm", None)
    return SearchSpace(data, f"{base.source} (bench cluster)", ".")


class SlotClock(Callback):
    """Driver-side wall times of every trial's start, first result and end."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.first_result: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.errored: set[str] = set()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.first_result.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.setdefault(trial.trial_id, time.time())

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.setdefault(trial.trial_id, time.time())
        self.errored.add(trial.trial_id)


def spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p90": None, "max": None, "mean": None, "n": 0}
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3), "p90": round(ordered[math.ceil(0.9 * len(ordered)) - 1], 3),
            "max": round(ordered[-1], 3), "mean": round(statistics.fmean(ordered), 3), "n": len(ordered)}


def slot_delays(starts: list[float], ends: list[float]) -> list[float]:
    """Seconds from each freed slot to the start that took it: the starts before the first end filled
    the empty cluster; after that the k-th start waited on the k-th end."""
    starts, ends = sorted(starts), sorted(ends)
    fill = sum(1 for s in starts if not ends or s < ends[0])
    return [s - e for s, e in zip(starts[fill:], ends)]


def most_at_once(clock: SlotClock) -> int:
    events = sorted([(t, 1) for t in clock.started.values()] + [(t, -1) for t in clock.ended.values()])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_cluster(nodes: int, slots_per_node: int):
    """NODES Ray nodes on loopback, each with SLOTS gpu_slot resources and one CPU."""
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": LOOPBACK, "num_cpus": NODE_CPUS, "resources": {SLOT: slots_per_node},
            "object_store_memory": NODE_OBJECT_STORE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    for _ in range(nodes - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    return cluster


def measure(size: int, opts: dict, output: Path) -> dict:
    """One size, in this (fresh) process: cluster up, the search, the figures, cluster down."""
    import logging

    import ray
    from ray.tune import PlacementGroupFactory

    from lsep_tune.search.runner import run_search  # torch, MLflow: in the size's own process only
    from lsep_tune.tracking import default_uri

    output.mkdir(parents=True, exist_ok=True)
    sql_dir = output / "sql"
    os.environ[writes.ENV] = str(sql_dir)  # the nodes' processes inherit it
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    writes.install(sql_dir)
    space = bench_space(size, opts["max_concurrent"], opts["steps"])
    cluster = start_cluster(opts["nodes"], opts["slots_per_node"])
    try:
        ray.init(address=cluster.address, logging_level=logging.ERROR,
                 runtime_env={"worker_process_setup_hook": "lsep_tune.bench.writes.install_from_env",
                              "env_vars": {writes.ENV: str(sql_dir)}})
        clock = SlotClock()
        search_dir = output / "search"
        resources = PlacementGroupFactory([{"CPU": TRIAL_CPU, SLOT: opts["slots_per_trial"]}])
        rss_before = rss_now()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        run_search(space, search_dir, default_uri(search_dir), resources=resources, callbacks=(clock,))
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        t1 = time.time()
    finally:
        ray.shutdown()
        cluster.shutdown()
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    (output / "trial_events.json").write_text(json.dumps(  # the raw timeline, relative to the search's start
        {t: {"start": round(s - t0, 3), "first_result": round(clock.first_result.get(t, t0) - t0, 3),
             "end": round(clock.ended.get(t, t0) - t0, 3), "error": t in clock.errored}
         for t, s in clock.started.items()}, indent=1) + "\n")
    counted = writes.read(sql_dir, t0, t1)
    tune_dir = search_dir / "tune" / "search"
    result = {
        "trials": size,
        "trials_started": len(clock.started),
        "trials_finished": len(clock.ended),
        "trials_errored": len(clock.errored),
        "max_concurrent": opts["max_concurrent"],
        "concurrent_seen": most_at_once(clock),
        "slot_capacity": opts["nodes"] * opts["slots_per_node"] // opts["slots_per_trial"],
        "search_wall_s": round(wall, 2),
        "driver_cpu_s": round(cpu, 2),
        "driver_cpu_s_per_trial": round(cpu / size, 4),
        "driver_peak_rss_bytes": after.ru_maxrss * 1024,
        "driver_rss_before_bytes": rss_before,
        "tune_experiment_state_bytes": sum(f.stat().st_size for f in tune_dir.glob("experiment_state*.json")),
        "tune_folder_bytes": folder_bytes(search_dir / "tune"),
        "tune_global_checkpoint_s": float(os.environ["TUNE_GLOBAL_CHECKPOINT_S"]),
    }
    for store in ("mlflow", "optuna"):
        entry = counted.get(store) or {"writes": 0, "write_statements": 0, "commits": 0, "reads": 0,
                                       "by_pid": {}, "per_second": {}}
        n = entry["write_statements"]
        result.update({
            f"{store}_writes": n,
            f"{store}_write_rows": entry["writes"],
            f"{store}_write_commits": entry["commits"],
            f"{store}_reads": entry["reads"],
            f"{store}_writes_driver": entry["by_pid"].get(os.getpid(), 0),
            f"{store}_writes_per_trial": round(n / size, 3),
            f"{store}_writes_per_s": round(n / wall, 3) if wall else None,
            f"{store}_peak_writes_per_s": max(entry["per_second"].values(), default=0),
        })
    starts, ends = list(clock.started.values()), list(clock.ended.values())
    result["sched_delay_s"] = spread(slot_delays(starts, ends))
    result["first_result_s"] = spread([clock.first_result[t] - s for t, s in clock.started.items()
                                       if t in clock.first_result])
    result["trial_s"] = spread([clock.ended[t] - s for t, s in clock.started.items() if t in clock.ended])
    result["output"] = str(output)
    return {k: result[k] for k in RESULT_KEYS}


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise InputError("--sizes", text, "expected positive trial counts separated by commas, e.g. 50,100,200")
    return sizes


def check(args) -> list[int]:
    """Bad flags, before any folder or Ray starts."""
    sizes = parse_sizes(args.sizes)
    for flag in ("nodes", "slots_per_node", "slots_per_trial", "steps"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')}", getattr(args, flag), "expected a positive integer")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise InputError("--max-concurrent", args.max_concurrent, "expected a positive integer")
    if args.slots_per_trial > args.slots_per_node:
        raise InputError("--slots-per-trial", args.slots_per_trial,
                         f"expected at most --slots-per-node ({args.slots_per_node}): a trial sits on one node")
    if args.steps < 2:
        raise InputError("--steps", args.steps, "expected 2 or more (ASHA decides at the first of two reports)")
    bench_space(max(sizes), 1, args.steps)  # the space itself is valid
    return sizes


def growth(results: list[dict]) -> dict:
    if len(results) < 2:
        return {}
    first, last = results[0], results[-1]
    return {k: round(last[k] / first[k], 3) if first[k] else None for k in GROWTH_KEYS}


def run_cluster_bench(args) -> int:
    sizes = check(args)
    capacity = args.nodes * args.slots_per_node // args.slots_per_trial
    concurrency = args.max_concurrent or default_concurrency(args.nodes, capacity)
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="lsep_bench_cluster_"))
    opts = {"nodes": args.nodes, "slots_per_node": args.slots_per_node, "slots_per_trial": args.slots_per_trial,
            "max_concurrent": concurrency, "steps": args.steps}
    report = {
        "benchmark": "cluster",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": len(os.sched_getaffinity(0)), **mem_info()},
        "command": " ".join(["python -m lsep_tune.bench"] + list(args.argv)),
        **{k: opts[k] for k in ("nodes", "slots_per_node", "slots_per_trial", "max_concurrent", "steps")},
        "sizes": sizes,
        "results": [],
    }
    for size in sorted(sizes):
        folder = output / f"size-{size}"
        if folder.exists() and any(folder.iterdir()):
            raise InputError("--output", output, f"{folder} is not empty; choose another folder")
        print(f"bench cluster: {size} trials on {args.nodes} nodes x {args.slots_per_node} slots, "
              f"{args.slots_per_trial} per trial, {concurrency} at once -> {folder}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "lsep_tune.bench.cluster", str(size), str(folder),
                               json.dumps(opts)], env={**os.environ, **LOOPBACK_ENV}, stdout=subprocess.DEVNULL if args.json else sys.stderr)
        done = folder / "bench_cluster.json"
        if proc.returncode or not done.exists():
            print(f"error: bench cluster: the {size}-trial search failed (exit code {proc.returncode}); "
                  f"see {folder}", file=sys.stderr)
            return 1
        report["results"].append(json.loads(done.read_text()))
    report["growth"] = growth(report["results"])
    (output / "bench_cluster.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
        return 0
    for r in report["results"]:
        d = r["sched_delay_s"]
        print(f"{r['trials']} trials ({r['trials_finished']} ended, {r['trials_errored']} errored, "
              f"{r['concurrent_seen']} at once) in {r['search_wall_s']:.0f} s: "
              f"driver {r['driver_cpu_s_per_trial']:.3f} CPU-s/trial, peak RSS {r['driver_peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"Tune state {r['tune_experiment_state_bytes'] / 2**10:.0f} KiB, "
              f"MLflow {r['mlflow_writes_per_trial']:.1f} writes/trial ({r['mlflow_writes_per_s']:.1f}/s), "
              f"Optuna {r['optuna_writes_per_trial']:.1f} writes/trial ({r['optuna_writes_per_s']:.1f}/s), "
              f"slot -> start median {d['median']} s (p90 {d['p90']}, max {d['max']})")
    print(f"report: {output / 'bench_cluster.json'}")
    return 0


if __name__ == "__main__":  # one size in a fresh driver process: SIZE OUTPUT OPTIONS_JSON
    size_arg, folder_arg, opts_arg = sys.argv[1:4]
    figures = measure(int(size_arg), json.loads(opts_arg), Path(folder_arg))
    (Path(folder_arg) / "bench_cluster.json").write_text(json.dumps(figures, indent=2) + "\n")
