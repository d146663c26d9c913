"""Search spaces: one YAML file says what a search tries, on which base config, for which metric, with what budget.

Everything is checked when the file is loaded, before any Ray worker starts: a bad file raises
`SpaceError`, whose str is one line `FILE: FIELD: expectation`. `SearchSpace.define_by_run` gives
Optuna (directly or through Ray Tune's `OptunaSearch`) a conditional space; `trial_config` turns
the sampled dotted values back into a validated `Config`. The format is documented in
search_spaces/README.md.
"""
from __future__ import annotations

import copy
import difflib
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, NoReturn

import yaml

import lsep_tune
from lsep_tune.config import Config, ConfigError, RunConfig, load_raw, preset_names, set_path, validate

SPACES_DIR = Path(lsep_tune.__file__).resolve().parents[1] / "search_spaces"

TOP_LEVEL_KEYS = (
    "description", "base", "overrides", "params", "metric", "searcher", "scheduler", "budget",
    "report_every", "seed", "points_to_evaluate", "confirm",
)
DISTRIBUTION_KEYS = {
    "uniform": ("low", "high", "step"),
    "loguniform": ("low", "high"),
    "int": ("low", "high", "step", "log"),
    "choice": ("values",),
}
SEARCHER_KEYS = {
    "tpe": ("seed", "n_startup_trials", "multivariate", "group", "constant_liar"),
    "random": ("seed",),
    "nsga2": ("seed", "population_size"),
}
SCHEDULER_KEYS = {
    "asha": ("time_attr", "grace_period", "reduction_factor", "max_t", "brackets"),
    "hyperband": ("time_attr", "max_t", "reduction_factor"),
    "none": (),
}
BUDGET_KEYS = (
    "num_samples", "max_concurrent", "workers_per_trial", "cpus_per_worker", "gpus_per_worker",
    "max_steps", "max_failures", "time_budget_s",
)
# What the trainer reports at each logging interval, and the direction in which each improves
# (None: neither direction is a mistake). A metric's group says when it is reported at all.
TRAIN_METRICS = {"loss": "min", "flow_loss": "min", "grad_norm": None, "lr": None, "train_cost": "min"}
LSEP_METRICS = {"lsep_ce": "min", "probe_acc": "max"}
SRA_METRICS = {"sra_loss": "min"}
EVAL_METRICS = {"fid": "min", "isc_mean": "max"}
DIRECTIONS = {**TRAIN_METRICS, **LSEP_METRICS, **SRA_METRICS, **EVAL_METRICS}
# Fields the space itself owns: searching them would change the budget, not the method.
OWNED_FIELDS = {"run.max_steps": "budget.max_steps", "run.log_every": "report_every"}
SMOKE_STEPS = 40
SMOKE_EVAL_SAMPLES = 100
_SENTINEL = "\x00"  # source name that lets _config_error split a ConfigError into (field, message)


class SpaceError(ConfigError):
    """Bad search space; `str(err)` is the one line to print (FILE: FIELD: expectation)."""


def _fail(source: str, field: str, expectation: str) -> NoReturn:
    raise SpaceError(f"{source}: {field}: {' '.join(str(expectation).split())}")


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps true apart from 1 and null apart from everything else."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if a is None or b is None:
        return a is b
    return a == b


def _show(value: Any) -> str:
    """A value as the YAML file spells it (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _validate_split(data: dict[str, Any]) -> tuple[Config | None, str, str]:
    """Validate a config dict; on failure give (None, field, message) instead of raising."""
    try:
        return validate(data, _SENTINEL), "", ""
    except ConfigError as err:
        rest = str(err)[len(_SENTINEL) + 2:]
        field, _, message = rest.partition(": ")
        return None, field, message


def _related(a: str, b: str) -> bool:
    """Same dotted field, or one is a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


@dataclass(frozen=True)
class Param:
    """One searched config field: its distribution and the conditions under which it is sampled."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    values: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (or Ray's suggest captor around one) for this param's value."""
        if self.type == "choice":
            return trial.suggest_categorical(self.path, list(self.values))
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.type == "loguniform")

    def normalize(self, value: Any) -> Any:
        """Integers given for a float domain become floats, as Optuna would return them."""
        if self.type in ("uniform", "loguniform") and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return any(_same(value, v) for v in self.values)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int":
            return isinstance(value, int) and self.low <= value <= self.high and (value - self.low) % self.step == 0
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-8

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice of {_show(self.values)}"
        text = f"{self.type} [{self.low}, {self.high}]"
        if self.step is not None and not (self.type == "int" and self.step == 1):
            text += f" step {self.step}"
        return text + (" (log)" if self.log else "")

    def probes(self) -> list[tuple[str, Any]]:
        """(field suffix, value) pairs checked against the config at load time: the domain's edges,
        each choice, and an interior fractional value (which an integer field rejects)."""
        if self.type == "choice":
            return [(f"values[{i}]", v) for i, v in enumerate(self.values)]
        probes: list[tuple[str, Any]] = [("low", self.low), ("high", self.high)]
        if self.type != "int" and self.step is None and self.high > self.low:
            if self.log:
                interior = self.low * (self.high / self.low) ** 0.37
            else:
                interior = self.low + 0.37 * (self.high - self.low)
            probes.append(("type", interior))
        return probes

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "choice":
            out["values"] = list(self.values)
        else:
            out.update(low=self.low, high=self.high)
            if self.type == "int" and (self.step != 1 or self.log):
                out["step"] = self.step
                out["log"] = self.log
            elif self.type == "uniform" and self.step is not None:
                out["step"] = self.step
        if self.when:
            out["when"] = {f: (list(v) if len(v) > 1 else v[0]) for f, v in self.when}
        return out


@dataclass(frozen=True)
class Budget:
    """How many trials, how many at once, what each trial gets, how long each trains."""

    num_samples: int
    max_concurrent: int
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_steps: int
    max_failures: int
    time_budget_s: float | None

    @property
    def resources_per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class _Reader:
    """Typed access to the raw YAML with one-line errors that name the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, expectation: str) -> NoReturn:
        _fail(self.source, field, expectation)

    def mapping(self, value: Any, field: str, allowed: tuple[str, ...] | None = None, what: str = "a mapping") -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(field, f"expected {what} (got {value!r})")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    where = f"{field}.{key}" if field != "<root>" else str(key)
                    self.fail(where, f"unknown key, expected one of {', '.join(allowed)}")
        return value

    def number(self, value: Any, field: str, *, integer: bool = False, minimum: float | None = None,
               above: float | None = None) -> int | float:
        """A number; numeric strings count, because YAML 1.1 reads `1e-4` (no dot) as a string."""
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                pass
        kind = "an integer" if integer else "a number"
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            self.fail(field, f"expected {kind} (got {value!r})")
        if minimum is not None and value < minimum:
            self.fail(field, f"expected {kind} >= {minimum} (got {value!r})")
        if above is not None and value <= above:
            self.fail(field, f"expected {kind} > {above} (got {value!r})")
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false (got {value!r})")
        return value


class SearchSpace:
    """A validated search space: base config, searched params, metric, searcher, scheduler, budget."""

    def __init__(self, data: Mapping[str, Any], source: str = "<space>", base_dir: str | Path = "."):
        self.source = source
        self._base_dir = Path(base_dir)
        r = _Reader(source)
        data = r.mapping(dict(data), "<root>", TOP_LEVEL_KEYS)
        self.description = data.get("description") or ""
        if not isinstance(self.description, str):
            r.fail("description", "expected a string")
        self.seed = r.number(data.get("seed", 0), "seed", integer=True)
        self._base_spec, base_raw, base_source = self._read_base(r, data.get("base"))
        base_cfg = self._validated(base_raw, base_source)
        fields = base_cfg.flat()
        self.overrides = self._read_overrides(r, data.get("overrides"), fields)

        with_overrides = copy.deepcopy(base_raw)
        for key, value in self.overrides.items():
            set_path(with_overrides, key, value)
        self.budget = self._read_budget(r, data.get("budget"), with_overrides)
        self.report_every = self._read_report_every(r, data, with_overrides)
        self._base_data = self._build_base(with_overrides)
        self._base_cfg = self._validated(self._base_data, None, blame=self._blame)
        self._base_flat = self._base_cfg.flat()

        self.params = self._read_params(r, data.get("params"), fields)
        self.order = self._resolve_order(r)
        for param in self.params.values():
            self._check_probes(r, param)
        metrics = self._read_metrics(r, data.get("metric"))
        self.metric_names = [name for name, _ in metrics]
        self.modes = [mode for _, mode in metrics]
        self.searcher_spec = self._read_searcher(r, data.get("searcher"))
        self.scheduler_spec = self._read_scheduler(r, data.get("scheduler"))
        self._check_evaluation(r)
        self.points_to_evaluate = self._read_points(r, data.get("points_to_evaluate"))
        self.confirm = self._read_confirm(data.get("confirm"))

    # ----- public API ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<space>", base_dir: str | Path = ".") -> "SearchSpace":
        return cls(data, source, base_dir)

    @property
    def name(self) -> str:
        return Path(self.source.split(" (")[0]).stem

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
                values[path] = param.suggest(trial)
        return values

    def trial_config(self, params: Mapping[str, Any]) -> Config:
        """Base config + sampled dotted values -> a validated Config (SpaceError if it is not valid)."""
        data = copy.deepcopy(self._base_data)
        for key, value in params.items():
            if key not in self.params:
                _fail(self.source, f"trial params.{key}", f"not a searched param (searched: {', '.join(self.params)})")
            if not self.params[key].contains(value):
                domain = self.params[key].describe()
                _fail(self.source, f"trial params.{key}", f"{_show(value)} is outside the domain {domain}")
            set_path(data, key, value)
        try:
            return validate(data, f"{self.source} (trial)")
        except ConfigError as err:
            raise SpaceError(str(err)) from None

    def sampler(self):
        """A fresh Optuna sampler for this space's searcher (samplers hold state: one per study)."""
        import optuna

        spec = dict(self.searcher_spec)
        kind = spec.pop("type")
        if kind == "tpe":
            with warnings.catch_warnings():  # `group` is opted into on purpose for conditional spaces
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(**spec)
        if kind == "random":
            return optuna.samplers.RandomSampler(**spec)
        return optuna.samplers.NSGAIISampler(**spec)

    def to_dict(self) -> dict[str, Any]:
        """The normalized space (defaults filled in, points completed): logged to MLflow, and parses back."""
        metric = [{"name": n, "mode": m} for n, m in zip(self.metric_names, self.modes)]
        return {
            "description": self.description,
            "base": dict(self._base_spec),
            "overrides": copy.deepcopy(self.overrides),
            "params": {path: p.spec() for path, p in self.params.items()},
            "metric": metric if self.multi_objective else metric[0],
            "searcher": dict(self.searcher_spec),
            "scheduler": dict(self.scheduler_spec),
            "budget": asdict(self.budget),
            "report_every": self.report_every,
            "seed": self.seed,
            "points_to_evaluate": copy.deepcopy(self.points_to_evaluate),
            **({"confirm": self.confirm.model_dump()} if self.confirm else {}),
        }

    def with_overrides(self, num_samples: int | None = None, max_concurrent: int | None = None) -> "SearchSpace":
        """A copy with command-line budget changes, validated like the file."""
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
        if "confirm" in data:  # the whole path, confirmation included, at its smallest
            seeds = data["confirm"]["seeds"]
            data["confirm"].update(top_k=1, seeds=2 if isinstance(seeds, int) else seeds[:2])
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
        if self._base_flat["data.kind"] == "digits" and self._base_flat["model.name"] != "SiT-Tiny/2":
            tiny = copy.deepcopy(data)
            tiny["overrides"]["model.name"] = "SiT-Tiny/2"
            try:
                return SearchSpace(tiny, source, self._base_dir)
            except SpaceError:
                pass  # the space needs more depth than SiT-Tiny/2 has: keep the base model
        return SearchSpace(data, source, self._base_dir)

    # ----- parsing ---------------------------------------------------------------------------

    def _read_base(self, r: _Reader, raw: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
        spec = r.mapping(raw, "base", ("preset", "config"), "{preset: NAME} or {config: PATH}")
        if len(spec) != 1:
            r.fail("base", "expected exactly one of preset: NAME or config: PATH (relative to this file)")
        if "preset" in spec:
            name = spec["preset"]
            if name not in preset_names():
                r.fail("base.preset", f"unknown preset {name!r}, expected one of {', '.join(preset_names())}")
            data, source = load_raw(preset=name)
            return {"preset": name}, copy.deepcopy(data), source
        if not isinstance(spec["config"], str) or not spec["config"]:
            r.fail("base.config", f"expected a path to a config YAML file (got {spec['config']!r})")
        path = Path(spec["config"])
        if not path.is_absolute():
            path = self._base_dir / path
        if not path.is_file():
            r.fail("base.config", f"no such file {path}")
        try:
            data, source = load_raw(path=path)
        except ConfigError as err:
            raise SpaceError(str(err)) from None
        return {"config": spec["config"]}, copy.deepcopy(data), source

    def _validated(self, data: dict[str, Any], source: str | None, blame=None) -> Config:
        """Validate; a failure blames `source` (the base file) or, via `blame`, a field of this file."""
        cfg, field, message = _validate_split(copy.deepcopy(data))
        if cfg is not None:
            return cfg
        if source is not None:
            raise SpaceError(f"{source}: {field}: {message}")
        _fail(self.source, blame(field), message)

    def _read_overrides(self, r: _Reader, raw: Any, fields: dict[str, Any]) -> dict[str, Any]:
        overrides = r.mapping(raw, "overrides", None, "a mapping of dotted config fields to values")
        for key in overrides:
            if key in OWNED_FIELDS:
                r.fail(f"overrides.{key}", f"set {OWNED_FIELDS[key]} instead: the space owns this field")
            if not isinstance(key, str) or key not in fields:
                r.fail(f"overrides.{key}", _not_a_field(str(key), fields))
        return dict(overrides)

    def _read_budget(self, r: _Reader, raw: Any, with_overrides: dict[str, Any]) -> Budget:
        b = r.mapping(raw, "budget", BUDGET_KEYS)
        if "num_samples" not in b:
            r.fail("budget.num_samples", "missing; expected the number of trials (an integer >= 1)")
        default_steps = with_overrides.get("run", {}).get("max_steps", RunConfig().max_steps)
        time_budget = b.get("time_budget_s")
        return Budget(
            num_samples=r.number(b["num_samples"], "budget.num_samples", integer=True, minimum=1),
            max_concurrent=r.number(b.get("max_concurrent", 1), "budget.max_concurrent", integer=True, minimum=1),
            workers_per_trial=r.number(b.get("workers_per_trial", 1), "budget.workers_per_trial", integer=True,
                                       minimum=1),
            cpus_per_worker=r.number(b.get("cpus_per_worker", 1), "budget.cpus_per_worker", above=0),
            gpus_per_worker=r.number(b.get("gpus_per_worker", 0), "budget.gpus_per_worker", minimum=0),
            max_steps=r.number(b.get("max_steps", default_steps), "budget.max_steps", integer=True, minimum=1),
            max_failures=r.number(b.get("max_failures", 0), "budget.max_failures", integer=True, minimum=0),
            time_budget_s=None if time_budget is None else r.number(time_budget, "budget.time_budget_s", above=0),
        )

    def _read_report_every(self, r: _Reader, data: Mapping[str, Any], with_overrides: dict[str, Any]) -> int:
        default = with_overrides.get("run", {}).get("log_every", RunConfig().log_every)
        every = r.number(data.get("report_every", default), "report_every", integer=True, minimum=1)
        if every > self.budget.max_steps:
            r.fail("report_every", f"expected <= budget.max_steps ({self.budget.max_steps}) (got {every})")
        return every

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

    def _read_params(self, r: _Reader, raw: Any, fields: dict[str, Any]) -> dict[str, Param]:
        specs = r.mapping(raw, "params", None, "a mapping of dotted config fields to distributions")
        if not specs:
            r.fail("params", "expected at least one searched field")
        params: dict[str, Param] = {}
        for path, spec in specs.items():
            path = str(path)
            if path in OWNED_FIELDS:
                r.fail(f"params.{path}", f"not searchable: the space sets it from {OWNED_FIELDS[path]}")
            if path not in fields:
                r.fail(f"params.{path}", _not_a_field(path, fields))
            params[path] = _read_param(r, path, spec)
        for param in params.values():
            for field, allowed in param.when:
                self._check_condition(r, params, param, field, allowed, fields)
        return params

    def _check_condition(self, r: _Reader, params: dict[str, Param], param: Param, field: str,
                         allowed: tuple[Any, ...], fields: dict[str, Any]) -> None:
        """A condition must read a real field and be able to hold, or its param is dead weight."""
        where = f"params.{param.path}.when.{field}"
        if field == param.path:
            r.fail(where, "a param cannot be conditioned on itself")
        if field not in fields:
            r.fail(where, _not_a_field(field, fields))
        if field in params:
            other = params[field]
            if other.type != "choice":
                r.fail(where, "conditions may refer to choice params or fixed config fields only "
                       f"({field} is searched as {other.type})")
            reachable = list(other.values) + ([self._base_flat[field]] if other.when else [])
            for value in allowed:
                if not any(_same(value, v) for v in reachable):
                    r.fail(where, f"{_show(value)} is never taken by {field} (its values: {_show(reachable)})")
        elif not any(_same(self._base_flat[field], v) for v in allowed):
            fixed = _show(self._base_flat[field])
            r.fail(where, f"never holds: {field} is fixed at {fixed} (base + overrides) and not searched")

    def _resolve_order(self, r: _Reader) -> list[str]:
        """Define-by-run order: each param after the params its conditions read; file order otherwise."""
        order: list[str] = []
        pending = list(self.params)
        while pending:
            ready = [p for p in pending if all(f in order for f, _ in self.params[p].when if f in self.params)]
            if not ready:  # every pending param waits on another pending one: walk to the loop
                walk = [pending[0]]
                while True:
                    nxt = next(f for f, _ in self.params[walk[-1]].when if f in pending)
                    if nxt in walk:
                        loop = walk[walk.index(nxt):] + [nxt]
                        r.fail(f"params.{loop[0]}.when", f"conditions form a cycle: {' -> '.join(loop)}")
                    walk.append(nxt)
            order.extend(ready)
            pending = [p for p in pending if p not in ready]
        return order

    def _active(self, param: Param, values: Mapping[str, Any]) -> bool:
        """Whether the conditions hold, reading sampled values first and the base config otherwise."""
        for field, allowed in param.when:
            current = values[field] if field in values else self._base_flat[field]
            if not any(_same(current, v) for v in allowed):
                return False
        return True

    def _check_probes(self, r: _Reader, param: Param) -> None:
        """Each edge (and an interior value) of the domain, with the param's conditions made true,
        must give a valid Config: type and range mistakes surface now, not in trial 17."""
        for suffix, value in param.probes():
            data = copy.deepcopy(self._base_data)
            for field, allowed in param.when:
                if not any(_same(self._base_flat[field], v) for v in allowed):
                    set_path(data, field, allowed[0])
            set_path(data, param.path, value)
            cfg, field, message = _validate_split(data)
            if cfg is None:
                where = f"params.{param.path}.{suffix}"
                if field == param.path and suffix == "type":
                    r.fail(where, f"{message}; an integer field needs type int")
                if field == param.path:
                    r.fail(where, message)
                r.fail(where, f"{_show(value)} makes the config invalid at {field}: {message}")

    def _read_metrics(self, r: _Reader, raw: Any) -> list[tuple[str, str]]:
        if raw is None:
            r.fail("metric", "missing; expected {name: fid, mode: min} or a list of such for multi-objective")
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            r.fail("metric", "expected at least one metric")
        metrics: list[tuple[str, str]] = []
        for i, item in enumerate(items):
            where = f"metric[{i}]" if isinstance(raw, list) else "metric"
            if isinstance(item, str):
                name, mode = item, None
            else:
                item = r.mapping(item, where, ("name", "mode"), "{name: METRIC, mode: min|max}")
                name, mode = item.get("name"), item.get("mode")
            if not isinstance(name, str):
                r.fail(f"{where}.name", f"expected a metric name (got {name!r})")
            why_not = self._metric_unavailable(name)
            if why_not:
                r.fail(f"{where}.name", why_not)
            natural = DIRECTIONS[name]
            if mode is None:
                if natural is None:
                    r.fail(f"{where}.mode", "missing; expected min or max")
                mode = natural
            if mode not in ("min", "max"):
                r.fail(f"{where}.mode", f"expected min or max (got {mode!r})")
            if natural and mode != natural:
                better = "lower" if natural == "min" else "higher"
                r.fail(f"{where}.mode", f"expected {natural}: {better} {name} is better")
            if name in [n for n, _ in metrics]:
                r.fail(f"{where}.name", f"{name} is listed twice")
            metrics.append((name, mode))
        return metrics

    def _metric_unavailable(self, name: str) -> str | None:
        """Why the trainer would not report `name` in every trial of this space (None: it would)."""
        if name in TRAIN_METRICS:
            return None
        for group, section in ((LSEP_METRICS, "lsep"), (SRA_METRICS, "sra")):
            if name in group:
                if self._always(f"objective.{section}.enabled", True):
                    return None
                return f"{name} is reported only when objective.{section}.enabled is true in every trial"
        if name in EVAL_METRICS:
            if "run.eval_every" not in self._base_flat or self._eval_every():
                return None
            return f"{name} is reported only with in-training evaluation: set overrides run.eval_every > 0"
        known = ", ".join(DIRECTIONS)
        return f"{name!r} is never reported by the trainer, expected one of {known}"

    def _always(self, field: str, value: Any) -> bool:
        param = self.params.get(field)
        if param is None:
            return _same(self._base_flat.get(field), value)
        return (param.type == "choice" and all(_same(v, value) for v in param.values)
                and (not param.when or _same(self._base_flat[field], value)))

    def _eval_every(self) -> int:
        """run.eval_every when every trial evaluates in training at that interval, else 0."""
        every = self._base_flat.get("run.eval_every") or 0
        return 0 if "run.eval_every" in self.params else every

    def _read_searcher(self, r: _Reader, raw: Any) -> dict[str, Any]:
        spec = r.mapping(raw, "searcher", None)
        kind = spec.get("type", "nsga2" if self.multi_objective else "tpe")
        if kind not in SEARCHER_KEYS:
            r.fail("searcher.type", f"unknown searcher {kind!r}, expected one of {', '.join(SEARCHER_KEYS)}")
        r.mapping(spec, "searcher", ("type",) + SEARCHER_KEYS[kind])
        if self.multi_objective and kind not in ("nsga2", "random"):
            r.fail("searcher.type", f"a multi-objective metric needs nsga2 or random (got {kind})")
        if not self.multi_objective and kind == "nsga2":
            r.fail("searcher.type", "nsga2 is for multi-objective metrics (a list under metric); use tpe or random")
        seed = r.number(spec.get("seed", self.seed), "searcher.seed", integer=True)
        out: dict[str, Any] = {"type": kind, "seed": seed}
        if kind == "tpe":
            if "n_startup_trials" in spec:
                out["n_startup_trials"] = r.number(spec["n_startup_trials"], "searcher.n_startup_trials",
                                                   integer=True, minimum=0)
            for key in ("multivariate", "group", "constant_liar"):
                if key in spec:
                    out[key] = r.boolean(spec[key], f"searcher.{key}")
            if out.get("group") and out.get("multivariate") is False:
                r.fail("searcher.group", "group needs multivariate TPE (multivariate: true)")
        elif kind == "nsga2":
            # Default: a population that lets about three generations run within num_samples.
            default = max(2, min(50, self.budget.num_samples // 3))
            out["population_size"] = r.number(spec.get("population_size", default), "searcher.population_size",
                                              integer=True, minimum=2)
        return out

    def _read_scheduler(self, r: _Reader, raw: Any) -> dict[str, Any]:
        spec = r.mapping(raw, "scheduler", None)
        kind = spec.get("type", "none")
        if kind not in SCHEDULER_KEYS:
            r.fail("scheduler.type", f"unknown scheduler {kind!r}, expected one of {', '.join(SCHEDULER_KEYS)}")
        r.mapping(spec, "scheduler", ("type",) + SCHEDULER_KEYS[kind])
        if kind == "none":
            return {"type": "none"}
        if self.multi_objective:
            r.fail("scheduler.type", f"a multi-objective search cannot stop trials on one metric: "
                   f"expected none (got {kind})")
        time_attr = spec.get("time_attr", "step")
        if time_attr != "step":
            r.fail("scheduler.time_attr", f"expected step (rungs count training steps; got {time_attr!r})")
        steps = self.budget.max_steps
        max_t = r.number(spec.get("max_t", steps), "scheduler.max_t", integer=True, minimum=1)
        if max_t > steps:
            r.fail("scheduler.max_t", f"expected <= budget.max_steps ({steps}) (got {max_t})")
        if kind == "hyperband":
            rf = r.number(spec.get("reduction_factor", 3), "scheduler.reduction_factor", above=1)
            if max_t < self.report_every:
                r.fail("scheduler.max_t", f"expected >= report_every ({self.report_every})")
            return {"type": kind, "time_attr": time_attr, "max_t": max_t, "reduction_factor": rf}
        if "grace_period" not in spec:
            r.fail("scheduler.grace_period", "missing; expected the steps every trial trains before it can be stopped")
        grace = r.number(spec["grace_period"], "scheduler.grace_period", integer=True, minimum=1)
        if grace < self.report_every:
            r.fail("scheduler.grace_period",
                   f"expected >= report_every ({self.report_every}): no report comes earlier (got {grace})")
        if grace > max_t:
            r.fail("scheduler.grace_period", f"expected <= max_t ({max_t}) (got {grace})")
        rf = r.number(spec.get("reduction_factor", 2), "scheduler.reduction_factor", above=1)
        brackets = r.number(spec.get("brackets", 1), "scheduler.brackets", integer=True, minimum=1)
        return {"type": kind, "time_attr": time_attr, "grace_period": grace, "reduction_factor": rf,
                "max_t": max_t, "brackets": brackets}

    def _check_evaluation(self, r: _Reader) -> None:
        """In-training evaluation runs only at report steps and is carried forward between runs, so its
        interval must be a multiple of report_every, and a scheduler ranking on it must see it fresh."""
        every = self._base_flat.get("run.eval_every") or 0
        if not every:
            return
        where = self._origins.get("run.eval_every", "base.run.eval_every")
        if every % self.report_every:
            r.fail(where, f"expected a multiple of report_every ({self.report_every}): "
                   f"evaluation runs only at report steps (got {every})")
        if not any(name in EVAL_METRICS for name in self.metric_names) or self.scheduler_spec["type"] == "none":
            return
        sched, steps = self.scheduler_spec, self.budget.max_steps
        if sched["type"] == "hyperband":
            if every != self.report_every:
                r.fail(where, "hyperband compares trials at any report: "
                       f"expected run.eval_every = report_every ({self.report_every})")
            return
        rungs = _asha_milestones(sched["grace_period"], sched["max_t"], sched["reduction_factor"], sched["brackets"])
        for milestone in rungs:
            seen_at = math.ceil(milestone / self.report_every - 1e-9) * self.report_every
            if seen_at < steps and seen_at % every:
                r.fail("scheduler.grace_period", f"the rung at step {milestone:g} is decided at step {seen_at}, "
                       f"where {self.metric_names[0]} is stale (run.eval_every {every}): "
                       "make rungs multiples of run.eval_every")

    def _read_confirm(self, raw: Any):
        """`confirm:` (lsep_tune.search.confirm.ConfirmConfig); a given baseline must be a valid point."""
        from lsep_tune.search.confirm import ConfirmConfig

        try:
            spec = ConfirmConfig.parse(raw, self.source)
        except ConfigError as err:
            raise SpaceError(str(err)) from None
        if spec is not None and isinstance(spec.baseline, dict):
            try:
                spec.baseline = self._read_points(_Reader(self.source), [spec.baseline])[0]
            except SpaceError as err:
                raise SpaceError(str(err).replace("points_to_evaluate[0]", "confirm.baseline", 1)) from None
        if spec is not None and isinstance(spec.seeds, list) and self.seed in spec.seeds:
            _fail(self.source, "confirm.seeds", f"{self.seed} is the search's seed; expected seeds the search never used")
        return spec

    def _read_points(self, r: _Reader, raw: Any) -> list[dict[str, Any]]:
        """Known-good points, completed: a searched param a point leaves out takes the base value."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            r.fail("points_to_evaluate", "expected a list of mappings of searched fields to values")
        points = []
        for i, point in enumerate(raw):
            where = f"points_to_evaluate[{i}]"
            point = r.mapping(point, where, None, "a mapping of searched fields to values")
            for key in point:
                if key not in self.params:
                    r.fail(f"{where}.{key}", f"not a searched param (searched: {', '.join(self.params)})")
            done: dict[str, Any] = {}
            for path in self.order:
                param = self.params[path]
                if not self._active(param, done):
                    if path in point:
                        conditions = ", ".join(f"{f} in {_show(v)}" for f, v in param.when)
                        r.fail(f"{where}.{path}", f"not sampled in this point: its condition ({conditions}) "
                               "does not hold")
                    continue
                given = path in point
                value = param.normalize(point[path] if given else self._base_flat[path])
                if not param.contains(value):
                    origin = "" if given else " (the base value, taken because the point leaves it out)"
                    r.fail(f"{where}.{path}", f"{_show(value)}{origin} is outside the domain {param.describe()}")
                done[path] = value
            data = copy.deepcopy(self._base_data)
            for path, value in done.items():
                set_path(data, path, value)
            cfg, field, message = _validate_split(data)
            if cfg is None:
                r.fail(f"{where}.{field}", message)
            points.append(done)
        return points


def _read_param(r: _Reader, path: str, spec: Any) -> Param:
    where = f"params.{path}"
    spec = r.mapping(spec, where, None, "a distribution like {type: uniform, low: 0.5, high: 1.0}")
    kind = spec.get("type")
    if kind not in DISTRIBUTION_KEYS:
        r.fail(f"{where}.type", f"unknown distribution {kind!r}, expected one of {', '.join(DISTRIBUTION_KEYS)}")
    r.mapping(spec, where, ("type", "when") + DISTRIBUTION_KEYS[kind])
    when = _read_when(r, where, spec.get("when"))
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            r.fail(f"{where}.values", f"expected a non-empty list (got {values!r})")
        for i, value in enumerate(values):
            if not _is_scalar(value):
                r.fail(f"{where}.values[{i}]", f"expected a number, string, true/false or null (got {value!r})")
            if any(_same(value, other) for other in values[:i]):
                r.fail(f"{where}.values[{i}]", f"{value!r} is listed twice")
        return Param(path, kind, values=tuple(values), when=when)
    integer = kind == "int"
    for key in ("low", "high"):
        if key not in spec:
            r.fail(f"{where}.{key}", f"missing; a {kind} distribution needs low and high")
    low = r.number(spec["low"], f"{where}.low", integer=integer)
    high = r.number(spec["high"], f"{where}.high", integer=integer)
    if low > high:
        r.fail(f"{where}.low", f"expected low <= high (got low {low}, high {high})")
    if kind == "loguniform" and low <= 0:
        r.fail(f"{where}.low", f"expected > 0 for a loguniform (log-scale) distribution (got {low})")
    if kind == "int":
        step = r.number(spec.get("step", 1), f"{where}.step", integer=True, minimum=1)
        log = r.boolean(spec.get("log", False), f"{where}.log")
        if (high - low) % step:
            r.fail(f"{where}.step", f"expected high - low ({high - low}) to be a multiple of the step {step}")
        if log and (step != 1 or low < 1):
            r.fail(f"{where}.log", "a log-scale int needs step 1 and low >= 1")
        return Param(path, kind, low=low, high=high, step=step, log=log, when=when)
    low, high = float(low), float(high)
    step = None
    if spec.get("step") is not None:
        step = float(r.number(spec["step"], f"{where}.step", above=0))
        k = (high - low) / step
        if abs(k - round(k)) > 1e-8:
            r.fail(f"{where}.step", f"expected high - low ({high - low:g}) to be a multiple of the step {step:g}")
    return Param(path, kind, low=low, high=high, step=step, log=kind == "loguniform", when=when)


def _read_when(r: _Reader, where: str, raw: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    conditions = r.mapping(raw, f"{where}.when", None, "a mapping of config fields to a value or a list of values")
    if not conditions:
        r.fail(f"{where}.when", "expected at least one condition")
    out = []
    for field, value in conditions.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values:
            r.fail(f"{where}.when.{field}", "expected a value or a non-empty list of values")
        for v in values:
            if not _is_scalar(v):
                r.fail(f"{where}.when.{field}", f"expected a number, string, true/false or null (got {v!r})")
        out.append((str(field), values))
    return tuple(out)


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


def _asha_milestones(grace: int, max_t: int, rf: float, brackets: int) -> list[float]:
    """The rungs Ray's ASHA places (async_hyperband._Bracket), every bracket."""
    out = []
    for s in range(brackets):
        n = int(math.log(max_t / grace) / math.log(rf) - s + 1)
        out.extend(grace * rf ** (k + s) for k in range(n))
    return sorted(set(out))


def space_names() -> list[str]:
    """Shipped spaces, by name (search_spaces/NAME.yaml in the checkout)."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) if SPACES_DIR.is_dir() else []


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
    try:
        text = path.read_text()
    except OSError as err:
        _fail(source, "<file>", f"cannot read: {err.strerror}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        _fail(source, "<file>", f"invalid YAML: {str(err).splitlines()[0]}")
    if not isinstance(data, dict):
        _fail(source, "<root>", "expected a mapping with base, params, metric, budget, ...")
    return SearchSpace(data, source, path.parent)
