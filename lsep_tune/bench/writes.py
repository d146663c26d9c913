"""Count the SQL statements MLflow's and Optuna's stores really execute, in every process of a search.

The listener sits on SQLAlchemy's `Engine` class, so it sees every engine either library makes (the
driver's Optuna RDBStorage, the driver's and every trial's MLflow SqlAlchemyStore). Each process
appends one line per statement to its own file in a shared folder (no locking, nothing lost when Ray
kills a trial's process): `time store kind n`, with store the database file's stem (mlflow,
optuna), kind `write` (INSERT / UPDATE / DELETE / REPLACE; n = rows sent, >1 for executemany),
`read` (anything else) or `commit` (a transaction that wrote, ended). Ray's trial processes install
it through the job's `worker_process_setup_hook` (`install_from_env`), the driver by `install`.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

ENV = "LSEP_BENCH_WRITES_DIR"
WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_state: dict = {}


def _store(conn) -> str:
    database = conn.engine.url.database or ""
    return Path(database).stem or conn.engine.url.get_backend_name()


def _emit(store: str, kind: str, n: int = 1) -> None:
    out = _state["file"]
    out.write(f"{time.time():.6f} {store} {kind} {n}\n")
    out.flush()


def _on_execute(conn, cursor, statement, parameters, context, executemany):
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
    store = _store(conn)
    if verb in WRITE_VERBS:
        conn.info["lsep_bench_wrote"] = True
        _emit(store, "write", len(parameters) if executemany and parameters else 1)
    else:
        _emit(store, "read")


def _on_commit(conn):
    if conn.info.pop("lsep_bench_wrote", False):
        _emit(_store(conn), "commit")


def _on_rollback(conn):
    conn.info.pop("lsep_bench_wrote", None)


def install(directory: str | Path) -> None:
    """Count this process's statements into `directory` (once per process)."""
    if _state.get("pid") == os.getpid():
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    Path(directory).mkdir(parents=True, exist_ok=True)
    _state.update(pid=os.getpid(), file=open(Path(directory) / f"sql-{os.getpid()}.log", "a", buffering=1))
    if not _state.get("listening"):
        event.listen(Engine, "before_cursor_execute", _on_execute)
        event.listen(Engine, "commit", _on_commit)
        event.listen(Engine, "rollback", _on_rollback)
        _state["listening"] = True


def install_from_env() -> None:
    """Ray's worker_process_setup_hook: count where $LSEP_BENCH_WRITES_DIR says (nothing if unset)."""
    directory = os.environ.get(ENV)
    if directory:
        install(directory)


def read(directory: str | Path, since: float = 0.0, until: float = float("inf")) -> dict:
    """Totals in [since, until] per store: writes (rows), write_statements, commits, reads, and the
    busiest second's write statements; `driver_pid`'s share is left to the caller (by file)."""
    totals: dict = defaultdict(lambda: {"writes": 0, "write_statements": 0, "commits": 0, "reads": 0,
                                        "by_pid": defaultdict(int), "per_second": defaultdict(int)})
    for path in Path(directory).glob("sql-*.log"):
        pid = int(path.stem.split("-", 1)[1])
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue  # a line being written as the process died
            t, store, kind, n = float(parts[0]), parts[1], parts[2], int(parts[3])
            if not since <= t <= until:
                continue
            entry = totals[store]
            if kind == "write":
                entry["writes"] += n
                entry["write_statements"] += 1
                entry["by_pid"][pid] += 1
                entry["per_second"][int(t)] += 1
            elif kind == "commit":
                entry["commits"] += 1
            else:
                entry["reads"] += 1
    return totals
