"""A search-space file as pydantic models: types, ranges, unknown keys and the kind of each parameter,
searcher and scheduler are checked here (discriminated unions on `type`); what needs the base config
(fields, conditions, metrics, evaluation steps) is checked in space.py.

To add a searcher: a model here with its Optuna sampler's own argument names and the sampler's name
in optuna.samplers, and one line in SEARCHERS.

Nothing here imports Optuna: a space file is checked before Optuna (or torch) loads, and Optuna is
asked for values and samplers only once the search runs (`suggest`, searcher.make_sampler).
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, model_validator

from lsep_tune.cluster import TrialResources
from lsep_tune.errors import InputError
from lsep_tune.schema import FieldError

Scalar = Union[StrictBool, int, float, str, None]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----- parameters: each one the domain of an Optuna suggest_* call ------------------------------------

class _Param(Strict):
    when: dict[str, Union[Scalar, list[Scalar]]] | None = None

    @property
    def conditions(self) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        """((field, allowed values), ...): the param is sampled only when every field takes one of its values."""
        return tuple((f, tuple(v) if isinstance(v, list) else (v,)) for f, v in (self.when or {}).items())

    @model_validator(mode="after")
    def _check_when(self):
        if self.when is not None and not self.when:
            raise FieldError("when", "expected at least one condition")
        for field, value in (self.when or {}).items():
            if value == []:
                raise FieldError(f"when.{field}", "expected a value or a non-empty list of values")
        return self


class _Range(_Param):
    @model_validator(mode="after")
    def _check_range(self):
        if self.low > self.high:
            raise FieldError("low", f"expected low <= high (got low {self.low}, high {self.high})")
        return self


class Uniform(_Range):
    type: Literal["uniform"]
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: ClassVar[bool] = False

    @model_validator(mode="after")
    def _check_step(self):
        if self.step is not None:
            k = (self.high - self.low) / self.step
            if abs(k - round(k)) > 1e-8:  # Optuna would silently move `high` onto the grid
                raise FieldError("step", f"expected high - low ({self.high - self.low:g}) to be a multiple of "
                                 f"the step {self.step:g}")
        return self


class LogUniform(_Range):
    type: Literal["loguniform"]
    low: float
    high: float
    step: ClassVar[None] = None
    log: ClassVar[bool] = True

    @model_validator(mode="after")
    def _check_positive(self):
        if self.low <= 0:
            raise FieldError("low", f"expected > 0 for a loguniform (log-scale) distribution (got {self.low})")
        return self


class Int(_Range):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: StrictBool = False

    @model_validator(mode="after")
    def _check_grid(self):
        if (self.high - self.low) % self.step:
            raise FieldError("step", f"expected high - low ({self.high - self.low}) to be a multiple of the step {self.step}")
        if self.log and (self.step != 1 or self.low < 1):
            raise FieldError("log", "a log-scale int needs step 1 and low >= 1")
        return self


class Choice(_Param):
    type: Literal["choice"]
    values: list[Scalar] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_unique(self):
        for i, value in enumerate(self.values):
            if any(same(value, other) for other in self.values[:i]):
                raise FieldError(f"values[{i}]", f"{value!r} is listed twice")
        return self


Param = Annotated[Union[Uniform, LogUniform, Int, Choice], Field(discriminator="type")]
PARAM = TypeAdapter(Param)


def same(a: Any, b: Any) -> bool:
    """Equality that keeps true apart from 1 and null apart from everything else."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if a is None or b is None:
        return a is b
    return a == b


def suggest(trial, name: str, param: Param) -> Any:
    """Ask an Optuna trial (or Ray's suggest captor around one) for a value of `param`'s domain."""
    if param.type == "choice":
        return trial.suggest_categorical(name, list(param.values))
    if param.type == "int":
        return trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)


def contains(param: Param, value: Any) -> bool:
    """Whether `param`'s domain holds `value` (true is not 1; an int domain holds no 2.5)."""
    if param.type == "choice":
        return any(same(value, v) for v in param.values)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if param.type == "int" and not isinstance(value, int):
        return False
    if not param.low <= value <= param.high:
        return False
    if param.step is None:
        return True
    k = (value - param.low) / param.step
    return abs(k - round(k)) < 1e-8


# ----- searchers and schedulers: their fields are the libraries' own argument names ----------------

class TPE(Strict):
    sampler: ClassVar[str] = "TPESampler"  # in optuna.samplers
    type: Literal["tpe"]
    seed: int | None = None
    n_startup_trials: int | None = Field(None, ge=0)
    multivariate: StrictBool | None = None
    group: StrictBool | None = None
    constant_liar: StrictBool | None = None

    @model_validator(mode="after")
    def _check_group(self):
        if self.group and self.multivariate is False:
            raise FieldError("group", "group needs multivariate TPE (multivariate: true)")
        return self


class Random(Strict):
    sampler: ClassVar[str] = "RandomSampler"
    type: Literal["random"]
    seed: int | None = None


class NSGA2(Strict):
    sampler: ClassVar[str] = "NSGAIISampler"
    type: Literal["nsga2"]
    seed: int | None = None
    population_size: int | None = Field(None, ge=2)


SEARCHERS: dict[str, type[Strict]] = {
    "tpe": TPE,
    "random": Random,
    "nsga2": NSGA2,
}
Searcher = Annotated[Union[tuple(SEARCHERS.values())], Field(discriminator="type")]
SEARCHER = TypeAdapter(Searcher)


class ASHA(Strict):
    type: Literal["asha"]
    time_attr: Literal["step"] = "step"  # rungs count training steps
    grace_period: int = Field(ge=1, description="the steps every trial trains before it can be stopped")
    reduction_factor: float = Field(2, gt=1)
    max_t: int | None = Field(None, ge=1)
    brackets: int = Field(1, ge=1)


class HyperBand(Strict):
    type: Literal["hyperband"]
    time_attr: Literal["step"] = "step"
    max_t: int | None = Field(None, ge=1)
    reduction_factor: float = Field(3, gt=1)


class NoScheduler(Strict):
    type: Literal["none"]


Scheduler = Annotated[Union[ASHA, HyperBand, NoScheduler], Field(discriminator="type")]
SCHEDULER = TypeAdapter(Scheduler)


# ----- the file -------------------------------------------------------------------------------------

class Base(Strict):
    preset: str | None = None
    config: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.preset is None) == (self.config is None):
            raise FieldError("", "expected exactly one of preset: NAME or config: PATH (relative to this file)")
        return self


class Metric(Strict):
    name: str
    mode: Literal["min", "max"] | None = None


class Budget(Strict):
    """How many trials, how many at once, what each trial gets, how long each trains."""

    num_samples: int = Field(ge=1, description="the number of trials (an integer >= 1)")
    max_concurrent: int = Field(1, ge=1)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)  # default: the base config's run.max_steps
    max_failures: int = Field(0, ge=0)
    time_budget_s: float | None = Field(None, gt=0)

    @property
    def resources(self) -> TrialResources:
        return TrialResources(self.workers_per_trial, self.gpus_per_worker, self.cpus_per_worker,
                              self.max_failures, self.max_concurrent)


FRESH_SEED_OFFSET = 1000  # confirmation seeds start this far above the search's: never one it trained


class ConfirmConfig(Strict):
    """`confirm:`: after the search, the top configurations and a baseline trained again on fresh seeds
    (search/confirm.py)."""

    top_k: int = Field(2, ge=1, description="how many of the search's best configurations to train again")
    seeds: int | list[int] = Field(3, description="fresh training seeds: a count, or the seeds themselves")
    baseline: Literal["first_point", "base"] | dict[str, Any] = Field(
        "first_point", description="first_point: points_to_evaluate[0] (the base when there is none); "
                                   "base: the base config; or a mapping of searched fields to values")

    @model_validator(mode="after")
    def _enough_seeds(self):
        count = self.seeds if isinstance(self.seeds, int) else len(self.seeds)
        if count < 2:
            raise FieldError("seeds", f"a confidence interval needs at least 2 seeds (got {self.seeds})")
        if isinstance(self.seeds, list) and len(set(self.seeds)) != len(self.seeds):
            raise FieldError("seeds", f"expected different seeds (got {self.seeds})")
        return self

    def fresh_seeds(self, used: set[int], source: str = "confirm") -> list[int]:
        """The seeds to train: explicit ones (refused where the search trained with one), else
        `seeds` of them well above any seed the search used."""
        if isinstance(self.seeds, list):
            clash = sorted(set(self.seeds) & used)
            if clash:
                raise InputError(source, "confirm.seeds", f"{clash} were used by the search; expected fresh seeds")
            return list(self.seeds)
        start = max(used, default=0) + FRESH_SEED_OFFSET
        return list(range(start, start + self.seeds))


class SpaceFile(Strict):
    """The top level of a space file; `params`, `searcher` and `scheduler` are validated one by one
    (space.py), so that an error names the param and the kind of searcher or scheduler."""

    description: str = ""
    base: Base = Field(description="{preset: NAME} or {config: PATH}")
    overrides: dict[str, Any] = {}
    params: dict[str, dict[str, Any]] = Field(min_length=1, description="searched fields and their distributions")
    metric: Any = Field(description="{name: fid, mode: min} or a list of such for multi-objective")  # read as Metric
    searcher: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    budget: Budget = Field(description="at least num_samples")
    report_every: int | None = Field(None, ge=1)
    seed: int = 0
    points_to_evaluate: list[dict[str, Any]] | None = None
    confirm: dict[str, Any] | None = None  # read as ConfirmConfig, once the params are known


TAGGED = {cls.model_fields["type"].annotation.__args__[0]: cls
          for cls in (Uniform, LogUniform, Int, Choice, TPE, Random, NSGA2, ASHA, HyperBand, NoScheduler)}
