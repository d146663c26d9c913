"""Search-space files: every shipped space validates, Optuna samples inside the domains and respects
the conditions, and each kind of mistake is one line naming the file and the field."""
import pickle

import optuna
import pytest
import yaml

from lsep_tune.config import load_config
from lsep_tune.errors import InputError
from lsep_tune.search.space import SPACES_DIR, SearchSpace, SpaceError, load_space, space_names

optuna.logging.set_verbosity(optuna.logging.WARNING)
L = "objective.lsep."
SHIPPED = ["digits", "lsep-sit-b2-imagenet256", "lsep-sit-xl2-imagenet256", "sra-sit-b2-imagenet256",
           "lsep-sra-sit-xl2-imagenet256", "lsep-repa-sit-xl2-imagenet256"]


def digits_data():
    return yaml.safe_load((SPACES_DIR / "digits.yaml").read_text())


def write(tmp_path, data, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def in_domain(param, value):
    """Independent of Param.contains: the raw YAML spec decides."""
    if param.type == "choice":
        return any(value is v or (value == v and type(value) is type(v)) for v in param.values)
    if param.type == "int":
        return isinstance(value, int) and param.low <= value <= param.high and (value - param.low) % param.step == 0
    return isinstance(value, float) and param.low <= value <= param.high


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_validates(name):
    assert set(SHIPPED) <= set(space_names())
    text = (SPACES_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# Estimated cost: ~") or text.startswith("# Estimated cost: 0 GPU-hours")
    space = load_space(name)
    assert space.source == f"search_spaces/{name}.yaml"
    cfg = space.base_config()
    assert cfg.run.max_steps == space.budget.max_steps and cfg.run.log_every == space.report_every
    assert space.metric == "fid" and space.mode == "min" and cfg.run.eval_every > 0
    assert cfg.run.eval_every % space.report_every == 0
    assert space.scheduler_spec["type"] == "asha"
    assert space.scheduler_spec["grace_period"] % cfg.run.eval_every == 0
    assert space.points_to_evaluate, "the papers' setting is tried first"
    for point in space.points_to_evaluate:
        trial = space.trial_config(point).flat()
        assert all(trial[k] == v for k, v in point.items())
    smoke = space.smoke()
    assert smoke.budget.max_steps == 40 and smoke.budget.num_samples == 3


def test_a_trial_gets_the_trial_builder_not_the_space():
    """What Tune pickles into every trial: base config data, the params' domains and the resources; it
    builds the same configs as the space and refuses a value outside a domain the same way."""
    space = load_space("digits")
    builder = pickle.loads(pickle.dumps(space.trials))
    assert set(vars(builder)) == {"source", "base_data", "params", "resources"}
    assert builder.resources == space.resources
    for point in space.points_to_evaluate:
        assert builder.trial_config(point) == space.trial_config(point)
    with pytest.raises(SpaceError, match="outside the domain"):
        builder.trial_config({"objective.lsep.uncond_prob": 7.0})
    assert len(pickle.dumps(builder)) < len(pickle.dumps(space)) / 2


def test_paper_points_first():
    xl_space = load_space("lsep-sit-xl2-imagenet256")
    xl = xl_space.trial_config(xl_space.points_to_evaluate[0])
    preset = load_config(preset="imagenet256-sit-xl2").objective.lsep
    assert xl.objective.lsep == preset  # the paper's best XL setting, exactly
    sra = load_space("sra-sit-b2-imagenet256")
    first = sra.trial_config(sra.points_to_evaluate[0]).objective
    assert (first.sra.enabled, first.lsep.enabled, first.sra.t_max, first.sra.loss_type, first.sra.weight) == (
        True, False, 0.2, "cos", 0.5)
    digits = load_space("digits").points_to_evaluate[0]
    assert digits[L + "uncond_prob"] == 0.9 and digits[L + "weights_type"] == "steps"


def test_base_config_maps_the_space_fields():
    space = load_space("digits")
    cfg = space.base_config()
    assert (cfg.run.max_steps, cfg.run.log_every, cfg.run.seed) == (300, 50, 0)
    assert (cfg.run.eval_every, cfg.run.eval_samples, cfg.sampling.steps, cfg.ema.warmup) == (150, 1000, 16, True)
    cfg.run.max_steps = 1  # a copy: the space keeps its own
    assert space.base_config().run.max_steps == 300


def test_define_by_run_samples_inside_domains_and_respects_conditions():
    space = load_space("digits")
    study = optuna.create_study(direction="minimize", sampler=space.sampler())
    branches = set()
    for i in range(40):
        trial = study.ask()
        values = space.define_by_run(trial)
        assert values == trial.params  # every sampled value went through Optuna under its dotted name
        for key, value in values.items():
            assert in_domain(space.params[key], value), (key, value)
        steps = values[L + "weights_type"] == "steps"
        branches.add(steps)
        assert (L + "weight_start" in values) == steps and (L + "weight_end" in values) == steps
        assert (L + "weight" in values) == (not steps)
        cfg = space.trial_config(values)
        flat = cfg.flat()
        assert all(flat[k] == v for k, v in values.items())
        base = space.base_config().flat()
        assert all(flat[k] == base[k] for k in flat if k not in values)  # the rest stays the base
        study.tell(trial, flat[L + "uncond_prob"] + (i % 3))
    assert branches == {True, False}


def test_define_by_run_orders_conditions_before_their_params(tmp_path):
    data = digits_data()
    # The condition's param comes last in the file; it must still be sampled first.
    data["params"] = {
        L + "weight": {"type": "uniform", "low": 0.01, "high": 0.02, "when": {L + "weights_type": "constant"}},
        L + "weights_type": {"type": "choice", "values": ["constant", "steps"]},
    }
    data["points_to_evaluate"] = [{L + "weights_type": "constant", L + "weight": 0.015}, {L + "weights_type": "steps"}]
    space = load_space(write(tmp_path, data))
    assert space.order == [L + "weights_type", L + "weight"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for point in space.points_to_evaluate:
        study.enqueue_trial(point)
    assert space.define_by_run(study.ask()) == {L + "weights_type": "constant", L + "weight": 0.015}
    assert space.define_by_run(study.ask()) == {L + "weights_type": "steps"}


def test_points_leave_out_params_at_their_base_value(tmp_path):
    data = digits_data()
    data["points_to_evaluate"] = [{}, {L + "uncond_prob": 0.6, L + "weights_type": "constant"}]
    space = load_space(write(tmp_path, data))
    preset = load_config(preset="digits").objective.lsep
    assert space.points_to_evaluate[0] == {
        L + "uncond_prob": preset.uncond_prob, L + "probe_lr": preset.probe_lr, L + "crop_start": preset.crop_start,
        L + "weights_type": "steps", L + "weight_start": preset.weight_start, L + "weight_end": preset.weight_end}
    second = space.points_to_evaluate[1]
    assert second[L + "uncond_prob"] == 0.6 and second[L + "weight"] == preset.weight
    assert L + "weight_start" not in second


def test_through_ray_optuna_search_without_a_cluster():
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("digits")
    searcher = OptunaSearch(space=space.define_by_run, metric=space.metric, mode=space.mode,
                            points_to_evaluate=space.points_to_evaluate, sampler=space.sampler())
    configs = [searcher.suggest(f"trial_{i}") for i in range(4)]
    assert configs[0] == space.points_to_evaluate[0]  # dotted keys survive Ray's unflatten ("/" only)
    for config in configs:
        space.trial_config(config)
    searcher.on_trial_complete("trial_0", {"fid": 300.0, "step": 240})
    assert pickle.loads(pickle.dumps(space)).define_by_run  # Tune checkpoints its searcher by pickling

    multi = {**digits_data(), "metric": [{"name": "fid", "mode": "min"}, {"name": "train_cost"}],
             "searcher": {"type": "nsga2"}, "scheduler": {"type": "none"}}
    mo = SearchSpace(multi, "mo.yaml", SPACES_DIR)
    assert isinstance(mo.sampler(), optuna.samplers.NSGAIISampler) and mo.mode == ["min", "min"]
    mo_search = OptunaSearch(space=mo.define_by_run, metric=mo.metric, mode=mo.mode, sampler=mo.sampler())
    mo.trial_config(mo_search.suggest("a"))
    mo_search.on_trial_complete("a", {"fid": 3.0, "train_cost": 10.0})


def test_sampler_follows_the_searcher_and_its_seed():
    space = load_space("digits")
    assert isinstance(space.sampler(), optuna.samplers.TPESampler)
    first = []
    for _ in range(2):
        study = optuna.create_study(sampler=space.sampler())  # a fresh sampler per study, same seed
        first.append(space.define_by_run(study.ask()))
    assert first[0] == first[1]
    random = SearchSpace({**digits_data(), "searcher": {"type": "random", "seed": 3}}, "r.yaml", SPACES_DIR)
    assert isinstance(random.sampler(), optuna.samplers.RandomSampler) and random.searcher_spec["seed"] == 3


def test_smoke_shrinks_and_stays_valid():
    space = load_space("digits")
    smoke = space.smoke()
    cfg = smoke.base_config()
    assert (smoke.budget.num_samples, smoke.budget.max_concurrent, smoke.budget.max_steps) == (3, 2, 40)
    assert cfg.model.name == "SiT-Tiny/2" and cfg.run.max_steps == 40 and smoke.report_every == 10
    assert cfg.run.eval_every == 20 and cfg.run.eval_samples == 100
    assert smoke.scheduler_spec == {**space.scheduler_spec, "grace_period": 20, "max_t": 40}
    assert smoke.params == space.params and smoke.points_to_evaluate == space.points_to_evaluate
    assert smoke.source.endswith("(smoke)")
    # A space that needs more blocks than SiT-Tiny/2 has keeps the digits model.
    deep = digits_data()
    deep["overrides"]["model.name"] = "SiT-Digits/2"  # 6 blocks; the shipped base is SiT-Tiny/2 already
    deep["params"][L + "encoder_depth"] = {"type": "int", "low": 3, "high": 6}
    deep["points_to_evaluate"][0][L + "encoder_depth"] = 3  # the base's 2 is outside the searched range
    assert SearchSpace(deep, "deep.yaml", SPACES_DIR).smoke().base_config().model.name == "SiT-Digits/2"


def test_with_overrides_and_to_dict_round_trip():
    space = load_space("lsep-sit-b2-imagenet256")
    more = space.with_overrides(num_samples=32, max_concurrent=4)
    assert (more.budget.num_samples, more.budget.max_concurrent) == (32, 4) and space.budget.num_samples == 16
    with pytest.raises(SpaceError, match=r"\(with command-line budget\): budget.max_concurrent: "):
        space.with_overrides(max_concurrent=0)
    logged = yaml.safe_load(yaml.safe_dump(space.to_dict(), sort_keys=False))  # as logged to MLflow
    again = SearchSpace(logged, space.source, SPACES_DIR)
    assert again.to_dict() == space.to_dict()
    assert again.params == space.params and again.order == space.order


def test_base_config_file_relative_to_the_space(tmp_path):
    cfg = load_config(preset="digits").to_dict()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(yaml.safe_dump(cfg))
    data = {**digits_data(), "base": {"config": "configs/mine.yaml"}}
    assert load_space(write(tmp_path, data)).base_config().model.name == "SiT-Tiny/2"
    cfg["objective"]["lsep"]["crop_start"] = 9
    (tmp_path / "configs" / "mine.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SpaceError) as err:  # the base file's own mistake names the base file
        load_space(write(tmp_path, data))
    assert str(err.value).startswith(f"{tmp_path / 'configs' / 'mine.yaml'}: objective.lsep.crop_start: ")


def cond(path, **spec):
    return lambda d: d["params"].__setitem__(path, spec)


BAD = [
    ("unknown top-level key", lambda d: d.update(trials=4), "trials", "unknown key"),
    ("unknown distribution", lambda d: d["params"][L + "uncond_prob"].update(type="normal"),
     f"params.{L}uncond_prob.type", "unknown distribution 'normal'"),
    ("low > high", lambda d: d["params"][L + "uncond_prob"].update(low=0.9, high=0.5),
     f"params.{L}uncond_prob.low", "expected low <= high"),
    ("loguniform at 0", lambda d: d["params"][L + "probe_lr"].update(low=0.0),
     f"params.{L}probe_lr.low", "> 0 for a loguniform"),
    ("domain outside the field's range", lambda d: d["params"][L + "uncond_prob"].update(high=1.5),
     f"params.{L}uncond_prob.high", "less than or equal to 1"),
    ("crop larger than the grid", cond(L + "crop_start", type="choice", values=[2, 5]),
     f"params.{L}crop_start.values[1]", "larger than the token grid (4)"),
    ("uniform on an integer field", cond(L + "encoder_depth", type="uniform", low=2, high=4),
     f"params.{L}encoder_depth.type", "integer field needs type int"),
    ("param that is not a config field", cond(L + "uncond_prb", type="uniform", low=0.1, high=0.2),
     f"params.{L}uncond_prb", "not a config field (did you mean objective.lsep.uncond_prob?)"),
    ("condition on a missing field", lambda d: d["params"][L + "weight"].update(when={L + "weights_kind": "constant"}),
     f"params.{L}weight.when.{L}weights_kind", "not a config field"),
    ("condition value never taken", lambda d: d["params"][L + "weight"].update(when={L + "weights_type": "linear"}),
     f"params.{L}weight.when.{L}weights_type", "'linear' is never taken"),
    ("condition on a fixed field that never holds",
     cond("objective.sra.t_max", type="uniform", low=0.1, high=0.3, when={"objective.sra.enabled": True}),
     "params.objective.sra.t_max.when.objective.sra.enabled", "never holds"),
    ("metric the trainer never reports", lambda d: d.update(metric={"name": "accuracy", "mode": "max"}),
     "metric.name", "'accuracy' is never reported by the trainer"),
    ("an uncertainty as the objective", lambda d: d.update(metric={"name": "fid_std", "mode": "min"}),
     "metric.name", "fid_std is the uncertainty of fid, not an objective"),
    ("metric of a disabled regularizer", lambda d: d.update(metric={"name": "sra_loss"}),
     "metric.name", "objective.sra.enabled is true in every trial"),
    ("fid without evaluation", lambda d: d["overrides"].update({"run.eval_every": 0}),
     "metric.name", "in-training evaluation"),
    ("wrong direction", lambda d: d.update(metric={"name": "fid", "mode": "max"}),
     "metric.mode", "lower fid is better"),
    ("unknown searcher", lambda d: d.update(searcher={"type": "bayesopt"}), "searcher.type", "unknown searcher"),
    ("unknown scheduler", lambda d: d.update(scheduler={"type": "pbt"}), "scheduler.type", "unknown scheduler"),
    ("multi-objective with ASHA", lambda d: d.update(metric=["fid", "train_cost"], searcher={"type": "nsga2"}),
     "scheduler.type", "multi-objective"),
    ("multi-objective with TPE", lambda d: d.update(metric=["fid", "train_cost"], scheduler={"type": "none"}),
     "searcher.type", "needs nsga2 or random"),
    ("max_concurrent < 1", lambda d: d["budget"].update(max_concurrent=0), "budget.max_concurrent", ">= 1"),
    ("point names an unknown param", lambda d: d["points_to_evaluate"][0].update({L + "encoder_depth": 3}),
     f"points_to_evaluate[0].{L}encoder_depth", "not a searched param"),
    ("point outside the domain", lambda d: d["points_to_evaluate"][0].update({L + "uncond_prob": 0.3}),
     f"points_to_evaluate[0].{L}uncond_prob", "outside the domain uniform [0.5, 1.0]"),
    ("point sets an inactive param", lambda d: d["points_to_evaluate"][0].update({L + "weight": 0.02}),
     f"points_to_evaluate[0].{L}weight", "condition"),
    ("point that is not a valid config", lambda d: (
        d["params"].update({"sampling.guidance_low": {"type": "uniform", "low": 0.0, "high": 1.0},
                            "sampling.guidance_high": {"type": "uniform", "low": 0.0, "high": 1.0}}),
        d["points_to_evaluate"][0].update({"sampling.guidance_low": 0.8, "sampling.guidance_high": 0.5})),
     "points_to_evaluate[0].sampling", "guidance_low 0.8 > guidance_high 0.5"),
    ("override makes the base invalid", lambda d: d["overrides"].update({L + "crop_start": 7}),
     f"overrides.{L}crop_start", "larger than the token grid"),
    ("override of a field the space owns", lambda d: d["overrides"].update({"run.max_steps": 10}),
     "overrides.run.max_steps", "budget.max_steps"),
    ("evaluation off the report steps", lambda d: d["overrides"].update({"run.eval_every": 75}),
     "overrides.run.eval_every", "multiple of report_every (50)"),
    ("rungs that would read a stale fid", lambda d: d["overrides"].update({"run.eval_every": 300}),
     "scheduler.grace_period", "stale"),
    ("grace period before the first report", lambda d: d["scheduler"].update(grace_period=25),
     "scheduler.grace_period", ">= report_every (50)"),
    ("conditions in a cycle", lambda d: d["params"].update({
        "objective.sra.loss_type": {"type": "choice", "values": ["cos", "l1"], "when": {L + "weights_type": "steps"}},
        L + "weights_type": {"type": "choice", "values": ["constant", "steps"],
                             "when": {"objective.sra.loss_type": "cos"}}}),
     f"params.{L}weights_type.when", "cycle"),
    ("unknown preset", lambda d: d.update(base={"preset": "cifar10"}), "base.preset", "unknown preset"),
]


@pytest.mark.parametrize("what,mutate,field,expectation", BAD, ids=[b[0] for b in BAD])
def test_bad_space_is_one_line_naming_file_and_field(tmp_path, what, mutate, field, expectation):
    data = digits_data()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    text = str(err.value)
    assert isinstance(err.value, InputError) and len(text.splitlines()) == 1
    assert text.startswith(f"{path}: {field}: "), text
    assert expectation in text, text


def test_load_space_names_and_files(tmp_path):
    with pytest.raises(SpaceError, match=r"^no-such-space: <space>: .*one of .*digits"):
        load_space("no-such-space")
    bad = tmp_path / "broken.yaml"
    bad.write_text("params: [unclosed\n")
    with pytest.raises(SpaceError, match=rf"^{bad}: <file>: invalid YAML"):
        load_space(bad)
    assert load_space(SPACES_DIR / "digits.yaml").source == "search_spaces/digits.yaml"


def test_trial_config_rejects_what_the_space_cannot_produce():
    space = load_space("digits")
    with pytest.raises(SpaceError, match=r"trial params.objective.lsep.encoder_depth: not a searched param"):
        space.trial_config({L + "encoder_depth": 2})
    with pytest.raises(SpaceError, match=r"trial params.objective.lsep.uncond_prob: 0.2 is outside"):
        space.trial_config({L + "uncond_prob": 0.2})
    # A combination whose values are each fine can still be invalid: one line naming the field.
    data = digits_data()
    data["params"] = {"sampling.guidance_low": {"type": "uniform", "low": 0.0, "high": 1.0},
                      "sampling.guidance_high": {"type": "uniform", "low": 0.0, "high": 1.0}}
    data.pop("points_to_evaluate")
    pair = SearchSpace(data, "pair.yaml", SPACES_DIR)
    with pytest.raises(SpaceError, match=r"^pair.yaml \(trial\): sampling: guidance_low 0.9 > guidance_high 0.1$"):
        pair.trial_config({"sampling.guidance_low": 0.9, "sampling.guidance_high": 0.1})


def test_asha_rungs_line_up_with_evaluations():
    data = digits_data()
    # The 240-step layout these rungs are written for: reports every 40 steps, FID every 80.
    data.update(report_every=40)
    data["budget"]["max_steps"] = 240
    data["overrides"]["run.eval_every"] = 80
    data["scheduler"] = {"type": "asha", "grace_period": 80, "reduction_factor": 3}
    space = SearchSpace(data, "rf3.yaml", SPACES_DIR)  # rungs 80 (and 240 = the end): fresh fid
    assert space.scheduler_spec == {"type": "asha", "time_attr": "step", "grace_period": 80,
                                    "reduction_factor": 3, "max_t": 240, "brackets": 1}
    data["scheduler"]["brackets"] = 2  # bracket 1 puts its first rung at 240 = the end: fine
    SearchSpace(data, "b2.yaml", SPACES_DIR)
    data["scheduler"] = {"type": "asha", "grace_period": 40, "reduction_factor": 2}  # rung 40: stale
    with pytest.raises(SpaceError, match=r"rung at step 40 .* stale"):
        SearchSpace(data, "g40.yaml", SPACES_DIR)
    data["scheduler"] = {"type": "hyperband"}
    with pytest.raises(SpaceError, match=r"overrides.run.eval_every: hyperband"):
        SearchSpace(data, "hb.yaml", SPACES_DIR)
    data["overrides"]["run.eval_every"] = 40
    hb = SearchSpace(data, "hb.yaml", SPACES_DIR)
    assert hb.scheduler_spec == {"type": "hyperband", "time_attr": "step", "max_t": 240, "reduction_factor": 3}


def test_readme_example_is_a_valid_space(tmp_path):
    text = (SPACES_DIR / "README.md").read_text()
    example = text.split("## An example", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    space = load_space(path)
    assert space.points_to_evaluate[0][L + "weight_start"] == 0.0225


@pytest.mark.slow
def test_shipped_spaces_are_package_data_of_a_non_editable_install(tmp_path):
    """`pip install .` (not editable) ships the spaces: an installed lsep_tune finds them from any folder."""
    import subprocess
    import sys
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: pip builds in the source folder and leaves build/ there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for name in ("lsep_tune", "search_spaces"):  # lsep_tune/search_spaces stays a link, as in git
        shutil.copytree(root / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(source), "--no-deps", "--no-build-isolation",
                    "--target", str(target), "-q"], check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import lsep_tune; from lsep_tune.search.space import load_space, space_names; "
            "print(lsep_tune.__file__); print(*[load_space(n).source for n in space_names()])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}, check=True).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert out[1].split() == [f"search_spaces/{name}.yaml" for name in sorted(SHIPPED)]
    # The installed command finds a shipped space by name from that folder and runs up to its data
    # pre-flight (the ImageNet latents are not here): the wheel's CLI, spaces and presets at work.
    cli = subprocess.run([sys.executable, "-m", "lsep_tune.search", "--space", "lsep-sit-b2-imagenet256",
                          "--output", str(elsewhere / "out")], capture_output=True, text=True, cwd=elsewhere,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)})
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert cli.stderr.strip() == ("error: data/imagenet256-latents: data.path: no such folder; create it with "
                                  "python -m lsep_tune.preprocess --images IMAGE_FOLDER --out data/imagenet256-latents")
