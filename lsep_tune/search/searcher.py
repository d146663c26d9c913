"""The searcher and the scheduler a search space asks for, built from Ray's and Optuna's own classes.

Two small subclasses tell the libraries what our trials really do: a trial the scheduler stops is a
PRUNED Optuna trial (Ray would record it COMPLETE), its intermediate values are keyed by training
step (Ray keys them by report count), a failed trial is the worst value rather than a hole, and a
trial that reaches the last rung finishes by itself, so its final evaluation still runs.

To add a searcher: its options model and one line in search/schema.py's SEARCHERS.
"""
from __future__ import annotations

import warnings

import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from lsep_tune.search.schema import SEARCHERS
from lsep_tune.search.storage import open_storage

STUDY_NAME = "lsep_tune"


def make_sampler(spec: dict):
    """A fresh Optuna sampler (samplers hold state: one per study); the spec's keys are its arguments."""
    options = {k: v for k, v in spec.items() if k != "type"}
    with warnings.catch_warnings():  # TPE's `group` is opted into on purpose for conditional spaces
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return getattr(optuna.samplers, SEARCHERS[spec["type"]].sampler)(**options)


def penalty(mode: str) -> float:
    """What a failed trial tells the searcher: worse than anything a real trial can report."""
    return 1e12 if mode == "min" else -1e12


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, keeping Optuna's own trial states and step keys (see the module doc)."""

    def __init__(self, *, max_steps: int, modes: list[str], **kwargs):
        super().__init__(**kwargs)
        self._max_steps = max_steps
        self._metrics = kwargs["metric"] if isinstance(kwargs["metric"], list) else [kwargs["metric"]]
        self._modes = modes
        self._reported: dict[str, int] = {}  # trial id -> last step told to Optuna

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if all(m in result for m in self._metrics):  # a divergence report carries no metric
            self._reported[trial_id] = result["step"]
            try:
                super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: result["step"]})
            except optuna.exceptions.UpdateFinishedTrialError:
                # A search resumed after its driver died before Tune saved that this trial had ended:
                # Tune runs it again, it reports its end again, and the study keeps what it recorded.
                pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        worst = {m: penalty(mode) for m, mode in zip(self._metrics, self._modes)}
        if error:
            result, error = worst, False
        elif result is not None and any(m not in result for m in self._metrics):
            result = {**worst, **result}
        elif result is not None and result.get("step", self._max_steps) < self._max_steps:
            # Stopped early by the scheduler: its last value is an intermediate one, and with no final
            # value Ray tells Optuna the trial was PRUNED.
            if len(self._metrics) == 1 and self._reported.get(trial_id) != result["step"]:
                self.on_trial_result(trial_id, result)
            result = None
        super().on_trial_complete(trial_id, result, error)


def make_searcher(space, storage: str, study_name: str = STUDY_NAME):
    """The space's Optuna sampler behind Ray's searcher, its study in an RDB `storage`."""
    searcher = StudySearch(
        space=space.define_by_run,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=space.points_to_evaluate or None,
        sampler=space.sampler(),
        study_name=study_name,
        storage=open_storage(storage),
        max_steps=space.budget.max_steps,
        modes=list(space.modes),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.budget.max_concurrent)


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial past the last rung end by itself instead of stopping it at its last
    report: the final evaluation comes after that report, and a stopped trial would lose it."""

    def __init__(self, **kwargs):
        super().__init__(stop_last_trials=False, **kwargs)
        self._end = kwargs["max_t"]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get("step", 0) >= self._end else action


def make_scheduler(space):
    kwargs = {k: v for k, v in space.scheduler_spec.items() if k != "type"}  # Ray's own argument names
    kwargs.setdefault("time_attr", "step")
    kwargs.setdefault("max_t", space.budget.max_steps)
    kind = space.scheduler_spec.get("type", "none")
    if kind == "asha":
        return FinishingASHA(**kwargs)
    if kind == "hyperband":
        return HyperBandScheduler(**kwargs)
    return FIFOScheduler()
