"""Tune's experiment state kept whole, so that `--resume` after a killed driver always finds one.

Tune saves its state (the trials, the searcher, the concurrency limiter, the callbacks) into a
staging folder on the driver, then copies that folder into the search folder in a background thread,
file by file, in place. A driver killed during the copy leaves a truncated or half-new set behind.
Tune's restore then fails on it and silently starts the experiment again with its concurrency limiter
still holding the trial it no longer runs: the resumed search waits forever (seen in CI: the searcher's
pickle cut short). `WholeState` saves the staged files as one zip right after each save, replaced in
one rename; `restore_whole_state` puts that set back before a resume and checks that every file reads.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

from ray import cloudpickle
from ray.tune import Callback
from ray.tune.callback import CallbackList
from ray.tune.execution.tune_controller import TuneController
from ray.tune.search import SearchGenerator, Searcher

from lsep_tune.errors import InputError

# The files of one save, by Tune's own name templates (one set per driver session): the trials' JSON,
# and pickles (the search generator's too, whatever its name ends with).
TRIALS_FILE = TuneController.CKPT_FILE_TMPL.format("*")
STATE_FILES = (TRIALS_FILE, *(t.CKPT_FILE_TMPL.format("*") for t in (SearchGenerator, Searcher, CallbackList)))


def state_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in STATE_FILES for p in folder.glob(pattern) if p.is_file())


def snapshot_path(experiment: Path) -> Path:
    """`tune/search` -> `tune/search.state.zip`, beside the folder Tune syncs into."""
    return experiment.with_name(experiment.name + ".state.zip")


class WholeState(Callback):
    """After each of Tune's saves (at the end of its step, and once more when the experiment ends),
    the staged state files as one zip beside the experiment folder, written only when they changed."""

    def __init__(self, experiment: Path):
        self.target = snapshot_path(experiment)
        self._saved: tuple = ()

    def on_step_end(self, iteration, trials, **info):
        self._snapshot(trials)

    def on_experiment_end(self, trials, **info):
        self._snapshot(trials)

    def _snapshot(self, trials) -> None:
        if not trials:  # nothing to resume yet
            return
        files = state_files(Path(trials[0].storage.experiment_driver_staging_path))
        stamp = tuple((p.name, st.st_mtime_ns, st.st_size) for p, st in ((p, p.stat()) for p in files))
        if not files or stamp == self._saved:
            return
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in files:
                archive.writestr(path.name, path.read_bytes())
        tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, self.target)
        self._saved = stamp


def restore_whole_state(experiment: Path) -> None:
    """Before `Tuner.restore`: the last whole set of state files in place of what the copy left, then
    every state file read once. A file that does not read is refused in one line: Tune would start
    the experiment over in the same folder (and hang on its stale limiter) instead of resuming it."""
    snapshot = snapshot_path(experiment)
    if snapshot.exists():
        with zipfile.ZipFile(snapshot) as archive:
            for stale in state_files(experiment):
                stale.unlink()
            archive.extractall(experiment)
    for path in state_files(experiment):
        try:
            data = path.read_bytes()
            json.loads(data) if path.match(TRIALS_FILE) else cloudpickle.loads(data)
        except Exception as err:  # noqa: BLE001 - any way a file fails to read is the same refusal
            raise InputError(path, "Tune experiment state", f"a complete file, not one cut short when the "
                             f"search's driver died ({type(err).__name__}); run the search again in a new "
                             f"--output folder") from None
