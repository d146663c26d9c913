"""One typed config for a training run: YAML -> search space -> Tune trial -> every Ray Train worker.

Every knob a search may touch is a field here, with its default taken from the papers. Loading
errors become one line naming the file, the field and what was expected (`InputError`), so a
command line tool can print it and exit with code 2 before any worker starts. The registries it checks
against are read without torch (models.names, objectives.configs, the data kinds' checks,
sample.options), so that refusal comes before torch loads too.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from lsep_tune.data import DATASETS
from lsep_tune.errors import InputError
from lsep_tune.models.names import model_names, parse_model_name
from lsep_tune.objectives.configs import REGULARIZER_CONFIGS
from lsep_tune.presets import preset_names
from lsep_tune.sample.options import SOLVER_MIN_STEPS
from lsep_tune.schema import FieldError, StrictModel, explain, known


class ModelConfig(StrictModel):
    name: str = "SiT-XL/2"
    input_size: int = Field(32, gt=0, description="latent (or pixel) side length")
    in_channels: int = Field(4, gt=0)
    num_classes: int = Field(1000, gt=0)
    qk_norm: bool = False

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        return known("model", name, model_names())

    @model_validator(mode="after")
    def _divisible(self) -> "ModelConfig":
        if self.input_size % parse_model_name(self.name)["patch_size"]:
            raise ValueError(f"input_size {self.input_size} is not divisible by the patch size of {self.name}")
        return self

    @property
    def depth(self) -> int:
        return parse_model_name(self.name)["depth"]

    @property
    def grid_size(self) -> int:
        return self.input_size // parse_model_name(self.name)["patch_size"]


class DataConfig(StrictModel):
    kind: str = Field("latents", description="a name in data.DATASETS: digits, images or latents")
    path: str | None = Field(None, description="what the kind reads: for latents the output folder of "
                             "`python -m lsep_tune.preprocess`, for images a class-folder tree; digits need none")
    latent_scale: float = Field(0.18215, gt=0, description="SD-VAE scale applied to each posterior sample")
    vae_path: str | None = Field(None, description="local diffusers AutoencoderKL folder that decodes the latents")
    batch_size: int = Field(256, gt=0, description="global batch = batch_size x workers x grad_accum_steps")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return known("data kind", kind, DATASETS)

    @model_validator(mode="after")
    def _path_when_read(self) -> "DataConfig":
        hint = DATASETS[self.kind].path_hint
        if hint and not self.path:
            raise ValueError(f"data.kind {self.kind!r} needs data.path ({hint})")
        return self

    @property
    def latent(self) -> bool:
        """Whether samples are SD-VAE latents (decoded for FID, shown as channels in grids)."""
        return DATASETS[self.kind].latent


class FlowConfig(StrictModel):
    path_type: Literal["linear", "cosine"] = "linear"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    class_dropout_prob: float = Field(0.1, ge=0.0, le=1.0, description="label dropout for classifier-free guidance")


def _objective_config() -> type[StrictModel]:
    """`objective.flow` plus one section per registered regularizer (objectives.configs.REGULARIZER_CONFIGS)."""
    sections = {name: (config, config()) for name, config in REGULARIZER_CONFIGS.items()}
    return create_model("ObjectiveConfig", __base__=StrictModel, flow=(FlowConfig, FlowConfig()), **sections)


ObjectiveConfig = _objective_config()


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max grad norm; 0 disables clipping")
    grad_accum_steps: int = Field(1, ge=1)
    fused: bool | None = Field(None, description="fused AdamW kernel; null = wherever the device has one (CUDA)")


class EMAConfig(StrictModel):
    decay: float = Field(0.9999, ge=0.0, le=1.0)
    warmup: bool = Field(False, description="timm's EMA warm-up (decay ramps up early in training)")
    first_update: Literal["decay", "copy"] = Field(
        "decay", description="'decay': the EMA starts at the initial weights and every update, the first "
        "included, uses the decay (published); 'copy': timm's default, the first update copies the weights")


class SamplingConfig(StrictModel):
    mode: str = Field(
        "sde", description="a name in sample.solvers.SOLVERS: 'sde' and 'ode-heun' are the published samplers, "
        "'ode-euler', and 'ode-heun-full' / 'sde-uniform' the earlier variants")
    steps: int = Field(250, ge=1, description="'sde': grid points from 1 to 0.04, plus the last step to 0")
    cfg_scale: float = Field(1.0, ge=1.0)
    guidance_low: float = Field(0.0, ge=0.0, le=1.0, description="CFG only for t in [guidance_low, guidance_high]")
    guidance_high: float = Field(1.0, ge=0.0, le=1.0)
    grid_images: int = Field(16, ge=1, description="images in the sample-grid PNG")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        return known("sampler", mode, SOLVER_MIN_STEPS)

    @model_validator(mode="after")
    def _interval(self) -> "SamplingConfig":
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"guidance_low {self.guidance_low} > guidance_high {self.guidance_high}")
        least = SOLVER_MIN_STEPS[self.mode]
        if self.steps < least:
            raise FieldError("steps", f"the {self.mode!r} sampler needs at least {least} steps")
        return self


class RunConfig(StrictModel):
    max_steps: int = Field(400_000, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    compile: bool = Field(False, description="torch.compile the backbone (minutes of compilation, faster steps)")
    log_every: int = Field(100, ge=1)
    ckpt_every: int = Field(10_000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    sample_every: int = Field(0, ge=0, description="sample-grid PNG interval; 0 = only at the end")
    eval_every: int = Field(0, ge=0, description="in-training FID/IS interval (EMA samples); 0 = off")
    eval_samples: int = Field(1000, ge=2, description="samples per in-training evaluation")
    final_eval_samples: int = Field(0, ge=0, description="samples for one large evaluation at the end (50000 for "
                                    "the paper table); 0 = none")
    eval_reference: str = Field("digits", description="'digits', an ADM reference npz, an image folder or a stats file")
    eval_extractor_weights: str | None = Field(None, description="local feature-extractor weights (offline Inception)")
    init_from: str | None = Field(None, description="checkpoint whose weights start the run (fine-tuning); "
                                  "the EMA starts from them too")
    init_format: Literal["lsep_tune", "lsep", "sra", "repa", "sit"] = Field(
        "lsep_tune", description="layout of init_from: lsep_tune's own or a published one (lsep_tune.published)")
    fail_at_step: int | None = Field(None, ge=1, description="failure drill: the chosen rank exits at this step, once")
    fail_rank: int = Field(0, ge=0)


class Config(StrictModel):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(kind="latents", path="data/imagenet256-latents")
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    sampling: SamplingConfig = SamplingConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _fits_the_model(self) -> "Config":
        depth, grid = self.model.depth, self.model.grid_size
        # Checked whether or not a regularizer is on, so a search never samples an invalid point.
        for name in type(self.objective).model_fields:
            section = getattr(self.objective, name)
            if hasattr(section, "check"):
                try:
                    section.check(depth, grid)
                except FieldError as err:
                    raise FieldError(f"objective.{name}.{err.field}", f"{err} ({self.model.name})") from None
        DATASETS[self.data.kind].check_config(self)
        return self

    @model_validator(mode="after")
    def _evaluation_fits(self) -> "Config":
        if self.run.eval_every and self.data.latent and not self.data.vae_path:
            raise FieldError("data.vae_path", "in-training evaluation of a latent model needs the SD-VAE folder")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """{'objective.lsep.uncond_prob': 0.9, ...}: MLflow params and search-space keys."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _input_error(source: str, err: ValidationError) -> InputError:
    return InputError(source, *explain(err))


def validate(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _input_error(source, err) from None


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError("override", dotted, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'objective.lsep.uncond_prob=0.9' -> ('objective.lsep.uncond_prob', 0.9); values parse as YAML."""
    if "=" not in text:
        raise InputError("override", text, "expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError("override", text, "expected KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str | Path, source: str, expected: str, error: type[InputError] = InputError,
              file_field: str | None = "<file>", empty: dict | None = None) -> dict[str, Any]:
    """The mapping a YAML file of any kind (config, search space, arms) holds, or one `error` line naming
    `source`: unreadable or invalid under `file_field` (None: in the field's place), not a mapping
    under <root> with `expected`. An empty file reads as `empty` (None: not a mapping)."""
    def fail(problem: str, detail: str):
        return error(source, problem, detail) if file_field is None else error(source, file_field, f"{problem}: {detail}")

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise fail("cannot read", err.strerror) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise fail("invalid YAML", str(err).splitlines()[0]) from None
    if data is None and empty is not None:
        data = dict(empty)
    if not isinstance(data, dict):
        raise error(source, "<root>", expected)
    return data


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    return read_yaml(path, source, "expected a mapping of config sections", file_field=None, empty={})


def load_raw(preset: str | None = None, path: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The unvalidated dict of a preset or a YAML file, and the name to blame in errors."""
    if (preset is None) == (path is None):
        raise InputError("config", "source", "give exactly one of a preset name or a config file")
    if preset is not None:
        if preset not in preset_names():
            raise InputError("preset", preset, f"unknown preset, expected one of {', '.join(preset_names())}")
        source = f"preset {preset}"
        return _read_yaml(Path(str(resources.files("lsep_tune.presets") / f"{preset}.yaml")), source), source
    return _read_yaml(Path(path), str(path)), str(path)


def load_base(base: dict[str, str], base_dir: str | Path, source: str) -> tuple[dict[str, Any], str]:
    """The `base:` of a search space or an arms file, {preset: NAME} or {config: PATH} (relative to
    `base_dir`, the file's folder): a copy of its unvalidated config dict and the name to blame in its
    own errors. An unknown preset or a missing file names `source`'s base.preset / base.config."""
    if "preset" in base:
        if base["preset"] not in preset_names():
            raise InputError(source, "base.preset", f"unknown preset {base['preset']!r}, "
                                                    f"expected one of {', '.join(preset_names())}")
        data, name = load_raw(preset=base["preset"])
    else:
        path = Path(base["config"])
        if not path.is_absolute():
            path = Path(base_dir) / path
        if not path.is_file():
            raise InputError(source, "base.config", f"no such file {path}")
        data, name = load_raw(path=path)
    return copy.deepcopy(data), name


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overrides_name: str = "overrides",
) -> Config:
    """Preset or YAML file, then `a.b=value` overrides, then validation (one-line InputError).

    Errors in an overridden config name the source as "<file> (with <overrides_name>)", so a
    command line can say which of its flags carried the overrides."""
    data, source = load_raw(preset, path)
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value)
    if overrides:
        source = f"{source} (with {overrides_name})"
    return validate(data, source)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
