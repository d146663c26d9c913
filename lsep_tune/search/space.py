"""Search spaces: one YAML file says what a search tries, on which base config, for which metric, with what budget.

Everything is checked when the file is loaded, before any Ray worker starts: a bad file raises
`SpaceError`, whose str is one line `FILE: FIELD: expectation`. The file's shape is checked by the
pydantic models in schema.py; what needs the base config (fields, conditions, metrics, evaluation
steps, known-good points) is checked here. `SearchSpace.define_by_run` gives
Optuna (directly or through Ray Tune's `OptunaSearch`) a conditional space; `trial_config` turns
the sampled dotted values back into a validated `Config`. The format is documented in
search_spaces/README.md. Loading imports neither torch nor Optuna, so a bad file is refused before
either loads; Optuna comes in only with the sampler (`SearchSpace.sampler`).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, NoReturn

from pydantic import ValidationError

from lsep_tune.cluster import TrialResources
from lsep_tune.config import Config, RunConfig, load_base, read_yaml, set_path, validate
from lsep_tune.data import DATASETS
from lsep_tune.errors import InputError
from lsep_tune.objectives.configs import OBJECTIVE_METRICS, REGULARIZER_CONFIGS
from lsep_tune.schema import explain
from lsep_tune.search.schema import (
    PARAM, SCHEDULER, SEARCHER, TAGGED, ConfirmConfig, Metric, SpaceFile, contains, same, suggest,
)

# Shipped spaces are package data (search_spaces/ in the checkout, lsep_tune/search_spaces once installed).
SPACES_DIR = Path(str(resources.files("lsep_tune.search_spaces"))).resolve()

# Fields the space itself owns: searching them would change the budget, not the method.
OWNED_FIELDS = {"run.max_steps": "budget.max_steps", "run.log_every": "report_every"}
SMOKE_STEPS = 40
SMOKE_EVAL_SAMPLES = 100

# What the training loop and the in-training evaluation report, mirrored from train.metrics.LOOP_METRICS
# and evaluation.in_training (EVAL_METRICS, UNCERTAINTY_OF), whose modules import torch; tests/test_startup.py
# checks that they agree.
LOOP_METRICS = {"grad_norm": None, "lr": None, "train_cost": "min"}
EVAL_METRICS = {"fid": "min", "fid_std": None, "isc_mean": "max", "isc_std": None}
UNCERTAINTY_OF = {"fid_std": "fid", "isc_std": "isc_mean"}


class SpaceError(InputError):
    """Bad search space; `str(err)` is the one line to print (FILE: FIELD: expectation)."""


def _fail(source: str, field: str, expectation: str) -> NoReturn:
    raise SpaceError(source, field, expectation)


def _show(value: Any) -> str:
    """A value as the YAML file spells it (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True)
class Reported:
    """A metric the trainer reports: the direction in which it improves (None: neither is a mistake),
    when it is reported (always, only with a regularizer enabled, or only with in-training evaluation),
    and, for an uncertainty such as fid_std, the metric it belongs to (never an objective itself)."""

    direction: str | None
    regularizer: str | None = None
    evaluation: bool = False
    uncertainty_of: str | None = None


@cache
def reported_metrics() -> dict[str, Reported]:
    """Every metric a trial can report: the objective's and each registered regularizer's (read from
    objectives.configs), the training loop's and the in-training evaluation's (mirrored above)."""
    out = {name: Reported(d) for name, d in {**OBJECTIVE_METRICS, **LOOP_METRICS}.items()}
    for reg_name, config in REGULARIZER_CONFIGS.items():
        out.update({name: Reported(d, regularizer=reg_name) for name, d in config.metrics.items()})
    out.update({name: Reported(d, evaluation=True, uncertainty_of=UNCERTAINTY_OF.get(name))
                for name, d in EVAL_METRICS.items()})
    return out


def _validate_split(data: dict[str, Any]) -> tuple[Config | None, str, str]:
    """Validate a config dict; on failure give (None, field, message) instead of raising."""
    try:
        return Config.model_validate(data), "", ""
    except ValidationError as err:
        return None, *explain(err)


def _related(a: str, b: str) -> bool:
    """Same dotted field, or one is a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def describe(param) -> str:
    if param.type == "choice":
        return f"choice of {_show(param.values)}"
    text = f"{param.type} [{param.low}, {param.high}]"
    if param.step is not None and not (param.type == "int" and param.step == 1):
        text += f" step {param.step}"
    return text + (" (log)" if param.log else "")


def normalize(param, value: Any) -> Any:
    """Integers given for a float domain become floats, as Optuna would return them."""
    if param.type in ("uniform", "loguniform") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def probes(param) -> list[tuple[str, Any]]:
    """(field suffix, value) pairs checked against the config at load time: the domain's edges,
    each choice, and an interior fractional value (which an integer field rejects)."""
    if param.type == "choice":
        return [(f"values[{i}]", v) for i, v in enumerate(param.values)]
    lo, hi = param.low, param.high
    out: list[tuple[str, Any]] = [("low", lo), ("high", hi)]
    if param.type != "int" and param.step is None and hi > lo:
        out.append(("type", lo * (hi / lo) ** 0.37 if param.log else lo + 0.37 * (hi - lo)))
    return out


@dataclass(frozen=True)
class SearchTrials:
    """A search's trial builder (`search.trials.TrialBuilder`): the base config's data, the searched
    params' domains and what a trial asks of the cluster. Tune hands it to every trial, so it holds
    nothing else of the space (no searcher, scheduler, points or confirmation)."""

    source: str
    base_data: dict[str, Any]
    params: dict[str, Any]  # dotted field -> its schema.PARAM model (domain, conditions)
    resources: TrialResources

    def trial_config(self, params: Mapping[str, Any]) -> Config:
        """Base config + sampled dotted values -> a validated Config (SpaceError if it is not valid)."""
        data = copy.deepcopy(self.base_data)
        for key, value in params.items():
            if key not in self.params:
                _fail(self.source, f"trial params.{key}", f"not a searched param (searched: {', '.join(self.params)})")
            if not contains(self.params[key], value):
                domain = describe(self.params[key])
                _fail(self.source, f"trial params.{key}", f"{_show(value)} is outside the domain {domain}")
            set_path(data, key, value)
        try:
            return validate(data, f"{self.source} (trial)")
        except InputError as err:
            raise SpaceError(err.source, err.field, err.expectation) from None


class SearchSpace:
    """A validated search space: base config, searched params, metric, searcher, scheduler, budget."""

    def __init__(self, data: Mapping[str, Any], source: str = "<space>", base_dir: str | Path = "."):
        self.source = source
        self._base_dir = Path(base_dir)
        spec = self._parse(SpaceFile, data)
        self.description, self.seed = spec.description, spec.seed
        self._base_spec, base_raw, base_source = self._read_base(spec.base)
        fields = self._validated(base_raw, base_source).flat()
        self.overrides = self._read_overrides(spec.overrides, fields)

        with_overrides = copy.deepcopy(base_raw)
        for key, value in self.overrides.items():
            set_path(with_overrides, key, value)
        run = with_overrides.get("run", {})
        self.budget = spec.budget.model_copy(update={"max_steps": spec.budget.max_steps or run.get(
            "max_steps", RunConfig().max_steps)})
        self.report_every = spec.report_every or run.get("log_every", RunConfig().log_every)
        if self.report_every > self.budget.max_steps:
            self._fail("report_every", f"expected <= budget.max_steps ({self.budget.max_steps}) (got {self.report_every})")
        self._base_data = self._build_base(with_overrides)
        self._base_cfg = self._validated(self._base_data, None, blame=self._blame)
        self._base_flat = self._base_cfg.flat()

        self.params = self._read_params(spec.params, fields)
        self.order = self._resolve_order()
        for path in self.params:
            self._check_probes(path)
        metrics = self._read_metrics(spec.metric)
        self.metric_names = [name for name, _ in metrics]
        self.modes = [mode for _, mode in metrics]
        self.searcher_spec = self._read_searcher(spec.searcher)
        self.scheduler_spec = self._read_scheduler(spec.scheduler)
        self._check_evaluation()
        self.points_to_evaluate = self._read_points(spec.points_to_evaluate or [])
        self.confirm = self._read_confirm(spec.confirm)

    # ----- public API ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return Path(self.source.split(" (")[0]).stem

    @property
    def resources(self) -> TrialResources:
        """What each trial asks of the cluster (the budget's resource fields): what trial_main reads."""
        return self.budget.resources

    @property
    def multi_objective(self) -> bool:
        return len(self.metric_names) > 1

    @property
    def metric(self) -> str | list[str]:
        """The `metric` argument for OptunaSearch / TuneConfig: a name, or a list when multi-objective."""
        return list(self.metric_names) if self.multi_objective else self.metric_names[0]

    @property
    def mode(self) -> str | list[str]:
        return list(self.modes) if self.multi_objective else self.modes[0]

    def base_config(self) -> Config:
        """The base with overrides, report_every (-> run.log_every) and budget.max_steps (-> run.max_steps)."""
        return self._base_cfg.model_copy(deep=True)

    def define_by_run(self, trial) -> dict[str, Any]:
        """Sample every param whose conditions hold, conditions first; returns {dotted field: value}.

        Works with `optuna.Trial` and as `OptunaSearch(space=...)`, which calls it with a wrapper
        around the trial and uses the returned constants as the trial's config.
        """
        values: dict[str, Any] = {}
        for path in self.order:
            param = self.params[path]
            if self._active(param, values):
                values[path] = suggest(trial, path, param)
        return values

    def trial_config(self, params: Mapping[str, Any]) -> Config:
        """Base config + sampled dotted values -> a validated Config (SpaceError if it is not valid)."""
        return self.trials.trial_config(params)

    @property
    def trials(self) -> SearchTrials:
        """What a trial of this search needs of the space, and no more: what crosses to every trial."""
        return SearchTrials(self.source, self._base_data, self.params, self.resources)

    def sampler(self):
        """A fresh Optuna sampler for this space's searcher (samplers hold state: one per study)."""
        from lsep_tune.search.searcher import make_sampler  # Optuna and Ray: a space is checked without them

        return make_sampler(self.searcher_spec)

    def to_dict(self) -> dict[str, Any]:
        """The normalized space (defaults filled in, points completed): logged to MLflow, and parses back."""
        metric = [{"name": n, "mode": m} for n, m in zip(self.metric_names, self.modes)]
        return {
            "description": self.description,
            "base": self._portable_base(),
            "overrides": copy.deepcopy(self.overrides),
            "params": {path: p.model_dump(exclude_none=True) for path, p in self.params.items()},
            "metric": metric if self.multi_objective else metric[0],
            "searcher": dict(self.searcher_spec),
            "scheduler": dict(self.scheduler_spec),
            "budget": self.budget.model_dump(),
            "report_every": self.report_every,
            "seed": self.seed,
            "points_to_evaluate": copy.deepcopy(self.points_to_evaluate),
            **({"confirm": self.confirm.model_dump()} if self.confirm else {}),
        }

    def training_seeds(self) -> set[int]:
        """Every run.seed a trial of this search can train with (confirmation needs others)."""
        param = self.params.get("run.seed")
        if param is None:
            return {int(self._base_flat["run.seed"])}
        if param.type == "choice":
            return {int(v) for v in param.values}
        return set(range(int(param.low), int(param.high) + 1))

    def with_overrides(self, num_samples: int | None = None, max_concurrent: int | None = None) -> "SearchSpace":
        """A copy with command-line budget changes, validated like the file."""
        if num_samples is None and max_concurrent is None:
            return self
        data = self.to_dict()
        if num_samples is not None:
            data["budget"]["num_samples"] = num_samples
        if max_concurrent is not None:
            data["budget"]["max_concurrent"] = max_concurrent
        tag = " (with command-line budget)"
        source = self.source if self.source.endswith(tag) else self.source + tag
        return SearchSpace(data, source, self._base_dir)

    def smoke(self) -> "SearchSpace":
        """A shrunken copy for `--smoke`: 3 trials, 2 at once, 40 steps, scheduler and evaluation scaled.

        On the digits base the backbone becomes SiT-Tiny/2 when the space still fits it.
        """
        data = self.to_dict()
        old = self.budget.max_steps
        steps = min(old, SMOKE_STEPS)
        ratio = steps / old
        report = max(1, steps // 4)
        data["report_every"] = report
        data["budget"].update(num_samples=3, max_concurrent=2, max_steps=steps, time_budget_s=None)
        data["points_to_evaluate"] = data["points_to_evaluate"][:3]
        if "confirm" in data:  # the whole path, at its smallest: one candidate, two seeds
            seeds = data["confirm"]["seeds"]
            data["confirm"].update(top_k=1, seeds=seeds[:2] if isinstance(seeds, list) else 2)
        overrides = data["overrides"]
        unit = report
        eval_every = self._base_flat.get("run.eval_every") or 0
        if eval_every:
            unit = min(_round_to(eval_every * ratio, report), steps // report * report)
            overrides["run.eval_every"] = unit
            overrides["run.eval_samples"] = min(self._base_flat["run.eval_samples"], SMOKE_EVAL_SAMPLES)
        final = self._base_flat.get("run.final_eval_samples")
        if final:
            overrides["run.final_eval_samples"] = min(final, SMOKE_EVAL_SAMPLES)
        sched = data["scheduler"]
        if sched["type"] == "asha":
            sched["grace_period"] = min(_round_to(sched["grace_period"] * ratio, unit), steps // unit * unit)
            sched["max_t"] = steps
        elif sched["type"] == "hyperband":
            sched["max_t"] = steps
        source = f"{self.source} (smoke)"
        small = DATASETS[self._base_flat["data.kind"]].smoke_model
        if small and self._base_flat["model.name"] != small:
            tiny = copy.deepcopy(data)
            tiny["overrides"]["model.name"] = small
            try:
                return SearchSpace(tiny, source, self._base_dir)
            except SpaceError:
                pass  # the space needs more depth than the small model has: keep the base model
        return SearchSpace(data, source, self._base_dir)

    # ----- parsing ---------------------------------------------------------------------------

    def _fail(self, field: str, expectation: str) -> NoReturn:
        _fail(self.source, field, expectation)

    def _parse(self, model, raw: Any, where: str = "", noun: str = "type"):
        """Validate with pydantic (a model or a TypeAdapter); an error names the field in this file."""
        validate_one = getattr(model, "model_validate", None) or model.validate_python
        try:
            return validate_one(raw)
        except ValidationError as err:
            tag = raw.get("type") if isinstance(raw, dict) else None
            owner = TAGGED.get(tag, model if isinstance(model, type) else None)
            field, message = explain(err, worded=True, noun=noun, tag=tag, owner=owner)
            self._fail(".".join(p for p in (where, field if field != "<root>" else "") if p) or "<root>", message)

    def _portable_base(self) -> dict[str, Any]:
        """The base as the dump names it: a base config file by its absolute path, so that the dump in a
        search's folder (what --resume reloads) finds it wherever the folder is read from."""
        if "config" not in self._base_spec:
            return dict(self._base_spec)
        return {"config": str((self._base_dir / self._base_spec["config"]).resolve())}

    def _read_base(self, base) -> tuple[dict[str, Any], dict[str, Any], str]:
        spec = {"preset": base.preset} if base.preset is not None else {"config": base.config}
        try:
            data, source = load_base(spec, self._base_dir, self.source)
        except InputError as err:
            raise SpaceError(err.source, err.field, err.expectation) from None
        return spec, data, source

    def _validated(self, data: dict[str, Any], source: str | None, blame=None) -> Config:
        """Validate; a failure blames `source` (the base file) or, via `blame`, a field of this file."""
        cfg, field, message = _validate_split(copy.deepcopy(data))
        if cfg is not None:
            return cfg
        if source is not None:
            raise SpaceError(source, field, message)
        _fail(self.source, blame(field), message)

    def _read_overrides(self, overrides: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        for key in overrides:
            if key in OWNED_FIELDS:
                self._fail(f"overrides.{key}", f"set {OWNED_FIELDS[key]} instead: the space owns this field")
            if key not in fields:
                self._fail(f"overrides.{key}", _not_a_field(key, fields))
        return dict(overrides)

    def _build_base(self, with_overrides: dict[str, Any]) -> dict[str, Any]:
        """Base + overrides + the fields the space owns; remembers which key of the file set what."""
        base = copy.deepcopy(with_overrides)
        set_path(base, "run.max_steps", self.budget.max_steps)
        set_path(base, "run.log_every", self.report_every)
        if "run.seed" not in self.overrides:
            set_path(base, "run.seed", self.seed)
        self._origins = {key: f"overrides.{key}" for key in self.overrides}
        self._origins.update({"run.max_steps": "budget.max_steps", "run.log_every": "report_every"})
        if "run.seed" not in self.overrides:
            self._origins["run.seed"] = "seed"
        return base

    def _blame(self, field: str) -> str:
        """The key of this file responsible for a config field that failed validation."""
        for key, origin in self._origins.items():
            if _related(field, key):
                return origin
        return f"base.{field} (after overrides)"

    def _read_params(self, specs: dict[str, dict[str, Any]], fields: dict[str, Any]) -> dict[str, Any]:
        params = {}
        for path, spec in specs.items():
            if path in OWNED_FIELDS:
                self._fail(f"params.{path}", f"not searchable: the space sets it from {OWNED_FIELDS[path]}")
            if path not in fields:
                self._fail(f"params.{path}", _not_a_field(path, fields))
            params[path] = self._parse(PARAM, spec, f"params.{path}", "distribution")
        for path, param in params.items():
            for field, allowed in param.conditions:
                self._check_condition(params, path, field, allowed, fields)
        return params

    def _check_condition(self, params: dict[str, Any], path: str, field: str, allowed: tuple[Any, ...],
                         fields: dict[str, Any]) -> None:
        """A condition must read a real field and be able to hold, or its param is dead weight."""
        where = f"params.{path}.when.{field}"
        if field == path:
            self._fail(where, "a param cannot be conditioned on itself")
        if field not in fields:
            self._fail(where, _not_a_field(field, fields))
        if field in params:
            other = params[field]
            if other.type != "choice":
                self._fail(where, "conditions may refer to choice params or fixed config fields only "
                       f"({field} is searched as {other.type})")
            reachable = list(other.values) + ([self._base_flat[field]] if other.conditions else [])
            for value in allowed:
                if not any(same(value, v) for v in reachable):
                    self._fail(where, f"{_show(value)} is never taken by {field} (its values: {_show(reachable)})")
        elif not any(same(self._base_flat[field], v) for v in allowed):
            fixed = _show(self._base_flat[field])
            self._fail(where, f"never holds: {field} is fixed at {fixed} (base + overrides) and not searched")

    def _resolve_order(self) -> list[str]:
        """Define-by-run order: each param after the params its conditions read; file order otherwise."""
        order: list[str] = []
        pending = list(self.params)
        while pending:
            ready = [p for p in pending if all(f in order for f, _ in self.params[p].conditions if f in self.params)]
            if not ready:  # every pending param waits on another pending one: walk to the loop
                walk = [pending[0]]
                while True:
                    nxt = next(f for f, _ in self.params[walk[-1]].conditions if f in pending)
                    if nxt in walk:
                        loop = walk[walk.index(nxt):] + [nxt]
                        self._fail(f"params.{loop[0]}.when", f"conditions form a cycle: {' -> '.join(loop)}")
                    walk.append(nxt)
            order.extend(ready)
            pending = [p for p in pending if p not in ready]
        return order

    def _active(self, param, values: Mapping[str, Any]) -> bool:
        """Whether the conditions hold, reading sampled values first and the base config otherwise."""
        for field, allowed in param.conditions:
            current = values[field] if field in values else self._base_flat[field]
            if not any(same(current, v) for v in allowed):
                return False
        return True

    def _check_probes(self, path: str) -> None:
        """Each edge (and an interior value) of the domain, with the param's conditions made true,
        must give a valid Config: type and range mistakes surface now, not in trial 17."""
        param = self.params[path]
        for suffix, value in probes(param):
            data = copy.deepcopy(self._base_data)
            for field, allowed in param.conditions:
                if not any(same(self._base_flat[field], v) for v in allowed):
                    set_path(data, field, allowed[0])
            set_path(data, path, value)
            cfg, field, message = _validate_split(data)
            if cfg is None:
                where = f"params.{path}.{suffix}"
                if field == path and suffix == "type":
                    self._fail(where, f"{message}; an integer field needs type int")
                if field == path:
                    self._fail(where, message)
                self._fail(where, f"{_show(value)} makes the config invalid at {field}: {message}")

    def _read_metrics(self, raw: Any) -> list[tuple[str, str]]:
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            self._fail("metric", "expected at least one metric")
        metrics: list[tuple[str, str]] = []
        for i, item in enumerate(items):
            where = f"metric[{i}]" if isinstance(raw, list) else "metric"
            metric = self._parse(Metric, {"name": item} if isinstance(item, str) else item, where)
            why_not = self._metric_unavailable(metric.name)
            if why_not:
                self._fail(f"{where}.name", why_not)
            natural = reported_metrics()[metric.name].direction
            if metric.mode is None and natural is None:
                self._fail(f"{where}.mode", "missing; expected min or max")
            if natural and metric.mode not in (None, natural):
                better = "lower" if natural == "min" else "higher"
                self._fail(f"{where}.mode", f"expected {natural}: {better} {metric.name} is better")
            if metric.name in [n for n, _ in metrics]:
                self._fail(f"{where}.name", f"{metric.name} is listed twice")
            metrics.append((metric.name, metric.mode or natural))
        return metrics

    def _metric_unavailable(self, name: str) -> str | None:
        """Why the trainer would not report `name` in every trial of this space (None: it would)."""
        known = reported_metrics()
        if name not in known:
            objectives = [n for n, r in known.items() if not r.uncertainty_of]
            return f"{name!r} is never reported by the trainer, expected one of {', '.join(objectives)}"
        if known[name].uncertainty_of:
            return (f"{name} is the uncertainty of {known[name].uncertainty_of}, not an objective; "
                    f"expected {known[name].uncertainty_of}")
        section = known[name].regularizer
        if section and not self._always(f"objective.{section}.enabled", True):
            return f"{name} is reported only when objective.{section}.enabled is true in every trial"
        if known[name].evaluation and not ("run.eval_every" not in self._base_flat or self._eval_every()):
            return f"{name} is reported only with in-training evaluation: set overrides run.eval_every > 0"
        return None

    def _always(self, field: str, value: Any) -> bool:
        param = self.params.get(field)
        if param is None:
            return same(self._base_flat.get(field), value)
        return (param.type == "choice" and all(same(v, value) for v in param.values)
                and (not param.conditions or same(self._base_flat[field], value)))

    def _eval_every(self) -> int:
        """run.eval_every when every trial evaluates in training at that interval, else 0."""
        every = self._base_flat.get("run.eval_every") or 0
        return 0 if "run.eval_every" in self.params else every

    def _read_searcher(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The searcher's options as its Optuna sampler's arguments, the seed and defaults filled in."""
        default = "nsga2" if self.multi_objective else "tpe"
        searcher = self._parse(SEARCHER, {"type": default, **raw}, "searcher", "searcher")
        if self.multi_objective and searcher.type not in ("nsga2", "random"):
            self._fail("searcher.type", f"a multi-objective metric needs nsga2 or random (got {searcher.type})")
        if not self.multi_objective and searcher.type == "nsga2":
            self._fail("searcher.type", "nsga2 is for multi-objective metrics (a list under metric); use tpe or random")
        out = {"seed": self.seed, **searcher.model_dump(exclude_none=True)}
        if searcher.type == "nsga2":  # a population that lets about three generations run within num_samples
            out.setdefault("population_size", max(2, min(50, self.budget.num_samples // 3)))
        return {"type": out.pop("type"), **out}

    def _read_scheduler(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's options as Ray's argument names, max_t defaulting to budget.max_steps."""
        sched = self._parse(SCHEDULER, {"type": "none", **raw}, "scheduler", "scheduler")
        if sched.type == "none":
            return {"type": "none"}
        if self.multi_objective:
            self._fail("scheduler.type", "a multi-objective search cannot stop trials on one metric: "
                       f"expected none (got {sched.type})")
        steps = self.budget.max_steps
        max_t = sched.max_t or steps
        if max_t > steps:
            self._fail("scheduler.max_t", f"expected <= budget.max_steps ({steps}) (got {max_t})")
        first = getattr(sched, "grace_period", max_t)  # the earliest step a trial can be stopped at
        where = "scheduler.grace_period" if sched.type == "asha" else "scheduler.max_t"
        if first < self.report_every:
            self._fail(where, f"expected >= report_every ({self.report_every}): no report comes earlier (got {first})")
        if first > max_t:
            self._fail(where, f"expected <= max_t ({max_t}) (got {first})")
        return sched.model_dump() | {"max_t": max_t}

    def _check_evaluation(self) -> None:
        """In-training evaluation runs only at report steps and is carried forward between runs, so its
        interval must be a multiple of report_every, and a scheduler ranking on it must see it fresh."""
        every = self._base_flat.get("run.eval_every") or 0
        if not every:
            return
        where = self._origins.get("run.eval_every", "base.run.eval_every")
        if every % self.report_every:
            self._fail(where, f"expected a multiple of report_every ({self.report_every}): "
                   f"evaluation runs only at report steps (got {every})")
        if not any(reported_metrics()[n].evaluation for n in self.metric_names) or self.scheduler_spec["type"] == "none":
            return
        sched = self.scheduler_spec
        if sched["type"] == "hyperband":
            if every != self.report_every:
                self._fail(where, "hyperband compares trials at any report: "
                       f"expected run.eval_every = report_every ({self.report_every})")
            return
        # ASHA's rungs lie at grace_period x reduction_factor^k: all of them see a fresh evaluation when
        # grace_period is a multiple of run.eval_every and the reduction factor a whole number.
        grace, rf = sched["grace_period"], sched["reduction_factor"]
        if grace % every:
            self._fail("scheduler.grace_period", f"the rung at step {grace} is decided where {self.metric_names[0]} is "
                   f"stale (run.eval_every {every}): make grace_period a multiple of run.eval_every")
        if rf != int(rf):
            self._fail("scheduler.reduction_factor", f"expected a whole number when ranking on "
                   f"{self.metric_names[0]}: rungs at grace_period x {rf}^k would read a stale value")

    def _read_points(self, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Known-good points, completed: a searched param a point leaves out takes the base value."""
        return [self._read_point(point, f"points_to_evaluate[{i}]") for i, point in enumerate(raw)]

    def _read_point(self, point: dict[str, Any], where: str) -> dict[str, Any]:
        """One point of searched values, checked against the domains and the config, and completed."""
        for key in point:
            if key not in self.params:
                self._fail(f"{where}.{key}", f"not a searched param (searched: {', '.join(self.params)})")
        done: dict[str, Any] = {}
        for path in self.order:
            param = self.params[path]
            if not self._active(param, done):
                if path in point:
                    conditions = ", ".join(f"{f} in {_show(v)}" for f, v in param.conditions)
                    self._fail(f"{where}.{path}", f"not sampled in this point: its condition ({conditions}) "
                           "does not hold")
                continue
            given = path in point
            value = normalize(param, point[path] if given else self._base_flat[path])
            if not contains(param, value):
                origin = "" if given else " (the base value, taken because the point leaves it out)"
                self._fail(f"{where}.{path}", f"{_show(value)}{origin} is outside the domain {describe(param)}")
            done[path] = value
        data = copy.deepcopy(self._base_data)
        for path, value in done.items():
            set_path(data, path, value)
        cfg, field, message = _validate_split(data)
        if cfg is None:
            self._fail(f"{where}.{field}", message)
        return done

    def _read_confirm(self, raw: dict[str, Any] | None) -> ConfirmConfig | None:
        """`confirm:`, with a baseline mapping checked (and completed) like a known-good point and
        explicit seeds refused where the search trains with them."""
        if raw is None:
            return None
        confirm = self._parse(ConfirmConfig, raw, "confirm")
        if isinstance(confirm.baseline, dict):
            confirm = confirm.model_copy(update={"baseline": self._read_point(confirm.baseline, "confirm.baseline")})
        try:
            confirm.fresh_seeds(self.training_seeds(), self.source)
        except InputError as err:
            self._fail(err.field, err.expectation)
        return confirm


def _not_a_field(key: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    sections = {f.rsplit(".", 1)[0] for f in fields}
    if key in sections:
        example = next(f for f in fields if f.startswith(key + "."))
        return f"{key} is a section; name its fields, e.g. {example}"
    return f"not a config field{hint}"


def _round_to(value: float, unit: int) -> int:
    """The positive multiple of `unit` nearest to `value`."""
    return max(unit, unit * round(value / unit))


def space_names() -> list[str]:
    """Shipped spaces, by name (search_spaces/NAME.yaml in the checkout; ablation-*.yaml are arms files
    of `python -m lsep_tune.ablate`, not spaces)."""
    if not SPACES_DIR.is_dir():
        return []
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml") if not p.stem.startswith("ablation-"))


def resolve_space(path_or_name: str | Path) -> Path:
    """A YAML path as given, or a shipped space's name (`digits` -> search_spaces/digits.yaml)."""
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1 or path.exists():
        return path
    shipped = SPACES_DIR / f"{path_or_name}.yaml"
    if shipped.is_file():
        return shipped
    _fail(str(path_or_name), "<space>",
          f"not a file and not a shipped space, expected a YAML path or one of {', '.join(space_names())}")


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Read and validate a search space file (or a shipped space by name)."""
    path = resolve_space(path_or_name)
    shipped = path.resolve().parent == SPACES_DIR
    source = f"{SPACES_DIR.name}/{path.name}" if shipped else str(path)
    data = read_yaml(path, source, "expected a mapping with base, params, metric, budget, ...", SpaceError)
    return SearchSpace(data, source, path.parent)
