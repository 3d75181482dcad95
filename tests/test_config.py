"""Config: recipe presets, TOML + dotted overrides, errors that name the key, round trip, shipped recipes."""

import dataclasses
import math
import tomllib
import types
import typing

import pytest

from fastfit.config import (
    RANGES,
    Config,
    Range,
    config_from_dict,
    load_config,
    numeric_settings,
    parse_override,
    shipped_configs_dir,
    to_toml,
)
from fastfit.errors import ConfigError


def test_mmrazor_preset_is_the_published_recipe():
    cfg = load_config(None, ["recipe.name=mmrazor", "model.teacher=resnet50"])
    hints = cfg.recipe.hints
    assert [(h.student, h.teacher, h.connector, h.loss, h.weight) for h in hints] == [
        ("layer3", "layer3", "mmrazor", "normalized_l2", 10.0),
        ("layer4", "layer4", "mmrazor", "normalized_l2", 10.0),
    ]
    kd = cfg.recipe.kd
    assert (kd.temperature, kd.weight, kd.reduction, kd.tau_squared, kd.form) == (6.0, 10.0, "mean", True, "kl")
    assert cfg.recipe.ce_weight == 1.0


def test_paper_preset_anneals_lambda_4_to_1_at_tau_3_without_tau_squared():
    cfg = load_config(
        None,
        ["recipe.name=fitnets-paper", "model.teacher=resnet50", 'recipe.hints=[{student="layer2", teacher="layer2"}]'],
    )
    kd = cfg.recipe.kd
    assert (kd.temperature, kd.weight, kd.weight_end, kd.tau_squared, kd.form) == (3.0, 4.0, 1.0, False, "ce")


def test_shipped_imagenet_config_equals_mmrazor_schedule():
    cfg = load_config("fitnets_r50_r18_in1k")
    assert (cfg.model.teacher, cfg.model.student, cfg.model.num_classes) == ("resnet50", "resnet18", 1000)
    o = cfg.optim
    assert (o.epochs, o.batch_size, o.lr, o.momentum, o.weight_decay, o.milestones, o.gamma) == (
        100,
        256,
        0.1,
        0.9,
        1e-4,
        [30, 60, 90],
        0.1,
    )
    d = cfg.data
    assert (d.augment, d.image_size, d.hflip, d.val_resize) == ("rrc", 224, True, 256)
    assert d.rrc_scale == [0.08, 1.0] and d.rrc_ratio == pytest.approx([3 / 4, 4 / 3])
    assert cfg.recipe.name == "mmrazor" and len(cfg.recipe.hints) == 2 and cfg.recipe.kd.reduction == "mean"


@pytest.mark.parametrize("path", sorted(p.name for p in shipped_configs_dir().glob("*.toml")))
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_overrides_parse_toml_values_and_bare_strings():
    assert parse_override("optim.lr=0.05") == (["optim", "lr"], 0.05)
    assert parse_override("optim.milestones=[1, 2]") == (["optim", "milestones"], [1, 2])
    assert parse_override("data.root=/data/imagenet") == (["data", "root"], "/data/imagenet")
    assert parse_override("run.compile=false") == (["run", "compile"], False)
    with pytest.raises(ConfigError, match=r"is not key.path=value"):
        parse_override("optim.lr")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"unknown config key optim.lrr; allowed keys in \[optim\]: lr, momentum"),
        ("bogus.x=1", r"unknown config key bogus; allowed keys in \[top level\]: model, recipe, optim, data, run"),
        ('optim.lr="fast"', r"optim.lr must be float, got 'fast' \(str\)"),
        ("optim.epochs=1.5", r"optim.epochs must be int, got 1.5"),
        ("run.compile=maybe", r"run.compile must be bool or 'auto', got 'maybe'"),
        ("recipe.name=kd", r"recipe.name must be one of 'mmrazor', 'fitnets-paper', 'supervised', got 'kd'"),
        ("data.backend=ffcv", r"data.backend must be one of 'torchvision' \| 'dali' \| 'auto', got 'ffcv'"),
        ("optim.batch_size=0", r"optim.batch_size must be ≥ 1, got 0; set it to a value ≥ 1 \(the default is 256\)"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_recipes_needing_a_teacher_or_hints_say_so():
    with pytest.raises(ConfigError, match=r"recipe mmrazor needs model.teacher"):
        load_config(None, ["recipe.name=mmrazor"])
    with pytest.raises(ConfigError, match=r"fitnets-paper needs at least one \[\[recipe.hints\]\]"):
        load_config(None, ["recipe.name=fitnets-paper", "model.teacher=resnet50"])


def test_missing_config_file_lists_shipped_configs(tmp_path):
    with pytest.raises(
        ConfigError, match=r"not found; give a path or one of the shipped configs: .*fitnets_r50_r18_in1k"
    ):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad)


def test_file_then_overrides_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 0.2\nepochs = 7\n")
    cfg = load_config(path, ["optim.lr=0.3"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.3, 7)


# Settings the plain defaults leave unset (None), given so that every RANGES key has a value to check.
WITH_OPTIONALS = ["recipe.name=mmrazor", "model.teacher=resnet50", "recipe.hint_lr=0.01", "recipe.kd.weight_end=1.0"]
EXPLICIT_AUTO = ["data.workers=2", "data.dali_threads=2"]


def _edge_values(allowed: Range) -> tuple[list[float], list[float]]:
    """(values just inside, values just outside) of `allowed`, from its bounds alone."""
    inside, outside = [], [math.nan, math.inf, -math.inf]
    for bound, is_open, step in ((allowed.low, allowed.low_open, -1), (allowed.high, allowed.high_open, 1)):
        if bound is None:
            continue
        (outside if is_open else inside).append(bound)
        outside.append(bound + step * 0.5)
    return inside, outside


def _numeric_fields(cls: type, prefix: str) -> set[str]:
    """Every int/float field of the config dataclasses, from their annotations (list items as key[])."""
    keys = set()
    for name, tp in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for arm in arms:
            if typing.get_origin(arm) is list:
                (item,) = typing.get_args(arm)
                if dataclasses.is_dataclass(item):
                    keys |= _numeric_fields(item, f"{key}[].")
                elif item in (int, float):
                    keys.add(f"{key}[]")
            elif dataclasses.is_dataclass(arm):
                keys |= _numeric_fields(arm, f"{key}.")
            elif arm in (int, float):
                keys.add(key)
    return keys


def test_every_numeric_setting_has_an_allowed_range():
    keys = _numeric_fields(Config, "")
    assert keys == set(RANGES), f"missing ranges: {keys - set(RANGES)}; stale ranges: {set(RANGES) - keys}"
    found = {key for key, _, _ in numeric_settings(load_config(None, [*WITH_OPTIONALS, *EXPLICIT_AUTO]))}
    assert found == keys, "numeric_settings must reach every numeric field the range check is meant to see"


def _override(key: str, value: float) -> list[str]:
    """An override setting `key` (list items and hints through their whole list) to `value`, plus what it needs."""
    literal = {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan" if math.isnan(value) else repr(value))
    defaults = config_from_dict({})
    if key == "recipe.hints[].weight":
        return [*WITH_OPTIONALS, f'recipe.hints=[{{student="layer3", teacher="layer3", weight={literal}}}]']
    if key.endswith("[]"):
        name = key[:-2]
        section, field_name = name.split(".")
        items = list(getattr(getattr(defaults, section), field_name))
        if name == "optim.milestones":
            return [*WITH_OPTIONALS, f"optim.milestones=[{literal}]", "optim.epochs=200"]
        items[0] = literal
        if name == "data.rrc_scale":  # keep min ≤ max: vary both ends together
            items = [literal, literal]
        if name == "data.rrc_ratio":
            items = [literal, literal]
        return [*WITH_OPTIONALS, f"{name}=[{', '.join(map(str, items))}]"]
    extra = ["optim.warmup_epochs=0"] if key == "optim.epochs" else []
    return [*WITH_OPTIONALS, *extra, f"{key}={literal}"]


def _is_int_setting(key: str) -> bool:
    values = {k: v for k, _, v in numeric_settings(load_config(None, [*WITH_OPTIONALS, *EXPLICIT_AUTO]))}
    return isinstance(values[key], int)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_range_accepts_its_bounds_and_rejects_values_beyond_them_naming_key_value_and_range(key):
    allowed = RANGES[key]
    inside, outside = _edge_values(allowed)
    is_int = _is_int_setting(key)
    for value in inside:
        value = int(value) if is_int else float(value)
        load_config(None, _override(key, value))
    for value in outside:
        if is_int and not math.isfinite(value):
            continue  # TOML has no non-finite integers; the type check refuses them first
        if is_int:
            value = math.floor(value) if value < (allowed.low or 0) + 0.75 else math.ceil(value)
        with pytest.raises(ConfigError) as err:
            load_config(None, _override(key, value))
        message = str(err.value)
        shown = key.replace("[]", "[0]")
        assert message.startswith(f"{shown} must be"), message
        assert allowed.describe() in message and "set it to" in message, message
        assert (repr(value) if math.isfinite(value) else str(value)) in message, message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.milestones=[30, 30]"], r"optim.milestones must be strictly increasing epoch numbers, got \[30, 30\]"),
        (["optim.milestones=[60, 30]"], r"strictly increasing"),
        (["optim.epochs=4", "optim.warmup_epochs=4"], r"optim.warmup_epochs must be in \[0, optim.epochs = 4\)"),
        (["data.rrc_scale=[0.9, 0.2]"], r"data.rrc_scale must be \[min, max\] with 0 < min ≤ max ≤ 1"),
        (["data.rrc_scale=[0.2]"], r"data.rrc_scale must be \[min, max\]"),
        (["data.rrc_ratio=[2.0, 0.5]"], r"data.rrc_ratio must be \[min, max\] with 0 < min ≤ max"),
        (["data.mean=[0.5, 0.5]"], r"data.mean needs 3 values \(one per RGB channel\), got \[0.5, 0.5\]"),
        (["data.std=[0.2, 0.2, 0.2, 0.2]"], r"data.std needs 3 values"),
        (["data.std=[0.2, -0.2, 0.2]"], r"data.std\[1\] must be > 0, got -0.2"),
        (["run.seed=18001"], r"run.seed must be in \[0, 18000\], got 18001"),
        (["data.workers=-1"], r"data.workers must be ≥ 0, got -1"),
        (["optim.lr=nan"], r"optim.lr must be a finite number > 0, got nan; set it to a value > 0 \(the default"),
        (["optim.milestones=[0]"], r"optim.milestones\[0\] must be ≥ 1, got 0"),
        (["data.rrc_scale=[0.5, 1.5]"], r"data.rrc_scale\[1\] must be in \(0, 1\], got 1.5"),
        (["data.mean=[0.5, nan, 0.5]"], r"data.mean\[1\] must be a finite number, got nan"),
        (["recipe.name=fitnets-paper", "recipe.hint_lr=-0.1"], r"recipe.hint_lr must be > 0, got -0.1"),
        (
            ["run.collective_timeout_s=-5"],
            r"run.collective_timeout_s must be > 0, got -5.0; .*\(the default is 600.0\)",
        ),
    ],
)
def test_settings_that_only_work_together_are_checked_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_auto_and_unset_values_are_not_range_checked():
    cfg = load_config(None, ["data.workers=auto", "data.dali_threads=auto"])
    assert (cfg.data.workers, cfg.recipe.hint_lr, cfg.recipe.kd) == ("auto", None, None)


def test_a_milestone_at_or_after_the_last_epoch_is_a_warning_not_an_error(caplog):
    cfg = load_config(None, ["optim.epochs=10", "optim.milestones=[5, 10]"])
    assert cfg.optim.milestones == [5, 10]
    assert "optim.milestones [10] are not before optim.epochs = 10" in caplog.text


def test_the_largest_allowed_seed_still_gives_every_step_a_valid_torch_seed():
    import torch

    from fastfit.config import MAX_SEED
    from fastfit.engine.run_state import step_seed

    torch.manual_seed(step_seed(MAX_SEED, 4095, 10**12))  # 4096 ranks, 10¹² steps
    with pytest.raises((RuntimeError, ValueError)):  # why there is a bound: a larger seed overflows 64 bits
        torch.manual_seed(step_seed(MAX_SEED + 500, 0, 0))
