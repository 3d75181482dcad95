"""Config: recipe presets, TOML + dotted overrides, errors that name the key, round trip, shipped recipes."""

import tomllib

import pytest

from fastfit.config import config_from_dict, load_config, parse_override, shipped_configs_dir, to_toml
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
        ("optim.batch_size=0", r"optim.batch_size = 0 is out of range: it must be finite and ≥ 1"),
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


OUT_OF_RANGE = [
    ("optim.lr=0.0", "optim.lr", "> 0"),
    ("optim.lr=nan", "optim.lr", "> 0"),
    ("optim.lr=inf", "optim.lr", "> 0"),
    ("optim.momentum=1.0", "optim.momentum", "< 1"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay", "≥ 0"),
    ("optim.epochs=0", "optim.epochs", "≥ 1"),
    ("optim.gamma=0.0", "optim.gamma", "> 0 and ≤ 1"),
    ("optim.gamma=1.5", "optim.gamma", "≤ 1"),
    ("optim.batch_size=-8", "optim.batch_size", "≥ 1"),
    ("optim.label_smoothing=1.0", "optim.label_smoothing", "< 1"),
    ("model.num_classes=0", "model.num_classes", "≥ 1"),
    ("data.image_size=0", "data.image_size", "≥ 1"),
    ("data.val_resize=-1", "data.val_resize", "≥ 0"),
    ("data.workers=-2", "data.workers", "≥ 0"),
    ("data.dali_threads=0", "data.dali_threads", "≥ 1"),
    ("data.train_subset=-5", "data.train_subset", "≥ 0"),
    ("data.dali_hw_decoder_load=1.5", "data.dali_hw_decoder_load", "≤ 1"),
    ("run.seed=-1", "run.seed", "≥ 0"),
    ("run.log_interval=0", "run.log_interval", "≥ 1"),
    ("run.eval_every=0", "run.eval_every", "≥ 1"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints", "≥ 0"),
    ("run.nonfinite_check_every=0", "run.nonfinite_check_every", "≥ 1"),
    ("run.collective_timeout_s=nan", "run.collective_timeout_s", "> 0"),
    ("recipe.ce_weight=-1.0", "recipe.ce_weight", "≥ 0"),
]


@pytest.mark.parametrize(("override", "key", "allowed"), OUT_OF_RANGE, ids=[o for o, _, _ in OUT_OF_RANGE])
def test_every_number_is_checked_for_range_and_finiteness_at_load(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"{key} = ") and allowed in message and f"set {key}=" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["recipe.name=mmrazor", "recipe.kd={temperature=0.0}"], r"recipe.kd.temperature = 0.0 is out of range"),
        (["recipe.name=mmrazor", 'recipe.hints=[{student="a", teacher="b", weight=-1.0}]'], r"hints\[0\].weight"),
        (["recipe.name=fitnets-paper", "recipe.hint_lr=-0.1"], r"recipe.hint_lr = -0.1"),
        (["optim.epochs=5", "optim.warmup_epochs=5.0"], r"warmup_epochs = 5.0 must be < optim.epochs = 5"),
        (["optim.milestones=[30, 30]"], r"strictly increasing"),
        (["optim.milestones=[0]"], r"strictly increasing epoch numbers ≥ 1"),
        (["data.rrc_scale=[0.5, 0.2]"], r"data.rrc_scale = \[0.5, 0.2\] must be two finite numbers 0 < low ≤ high"),
        (["data.rrc_scale=[0.5, 1.5]"], r"cannot exceed 1"),
        (["data.rrc_ratio=[0.0, 1.0]"], r"data.rrc_ratio"),
        (["data.std=[0.2, 0.0, 0.2]"], r"finite and > 0"),
        (["data.mean=[0.5, nan, 0.5]"], r"data.mean = .* must be finite"),
        (["data.mean=[0.5, 0.5]"], r"need 3 values"),
    ],
)
def test_cross_checks_name_the_keys_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.teacher=wide_cnn", *overrides])


def test_every_shipped_config_passes_the_range_checks():
    from fastfit.config import shipped_configs_dir

    for path in sorted(shipped_configs_dir().glob("*.toml")):
        load_config(path)
