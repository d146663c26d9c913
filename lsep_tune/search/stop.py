"""Stopping a search from outside: `ray job stop`, Slurm's `scancel`, a deleted pod all send SIGTERM.

Python's default for SIGTERM ends the driver on the spot: Tune's last experiment state is up to a
few seconds old, and every MLflow run stays RUNNING. Under `with sigterm_stops_search()`, SIGTERM is
Tune's own interrupt instead (the one Ctrl+C gives): Tune stops its trials, saves its state, and
`fit` returns; then `fit_or_stop` raises `SearchStopped`, and the search ends its runs KILLED on the
way out. Outside a Tuner run, SIGTERM raises `SearchStopped` at once. `--resume` continues it.
"""
from __future__ import annotations

import contextlib
import signal
import threading


EXIT_STOPPED = 128 + 15  # a stopped command's exit code: the shell's for one ended by SIGTERM


class SearchStopped(KeyboardInterrupt):
    """The search was asked to stop (SIGTERM). A KeyboardInterrupt, so no `except Exception` swallows it."""


_requested = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _requested.set()
    # Inside Tuner.fit, Tune's interrupt handler is on SIGUSR1 as well as SIGINT (Ray blocks SIGINT in a
    # job's driver, so SIGUSR1's copy is the one to use); fit_or_stop clears it around each run.
    tune_interrupt = signal.getsignal(signal.SIGUSR1)
    if callable(tune_interrupt):
        tune_interrupt(signum, frame)
    else:
        raise SearchStopped("SIGTERM")


@contextlib.contextmanager
def sigterm_stops_search():
    """SIGTERM stops the search in order while the block runs (main thread only, as Python's signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()  # the stop was this block's: a later run in the process (an ablation) goes on


def fit_or_stop(tuner):
    """`tuner.fit()`, unless SIGTERM ends it early: then Tune has stopped the trials and saved its state,
    and SearchStopped is raised instead of returning a partial ResultGrid."""
    if _requested.is_set():
        raise SearchStopped("SIGTERM")
    if threading.current_thread() is not threading.main_thread():  # no signals reach this run
        return tuner.fit()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune installs its own handler as the run starts
    try:
        results = tuner.fit()
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune leaves its handler behind; it is stale now
    if _requested.is_set():
        raise SearchStopped("SIGTERM")
    return results
