"""Typed run configuration: dataclasses filled from a TOML file, recipe presets and dotted overrides.

Layering, lowest first: dataclass defaults → the recipe's preset (so `recipe.name = "mmrazor"` alone gives the
published recipe) → the TOML file → `key.path=value` overrides. Unknown keys and wrong types raise ConfigError
naming the key and what is allowed; the resolved config is a plain dict saved with every run and checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from fastfit.errors import ConfigError

logger = logging.getLogger(__name__)

Auto = Literal["auto"]


@dataclass
class HintConfig:
    student: str = "layer3"  # module path of the student's guided layer
    teacher: str = "layer3"  # module path of the teacher's hint layer
    connector: Literal["mmrazor", "paper"] = "mmrazor"
    loss: Literal["normalized_l2", "half_sq", "mse"] = "normalized_l2"
    weight: float = 10.0
    activation: Literal["relu", "none"] = "relu"  # the hint layer's nonlinearity, used by the paper regressor


@dataclass
class KDConfig:
    temperature: float = 4.0
    weight: float = 1.0  # λ at the start of the KD stage
    weight_end: float | None = None  # λ at its end (linear anneal per step); None keeps it constant
    reduction: Literal["batchmean", "mean", "sum"] = "batchmean"
    tau_squared: bool = True
    form: Literal["kl", "ce"] = "kl"  # "ce" is the paper's H(P_T^τ, P_S^τ)


@dataclass
class RecipeConfig:
    name: Literal["mmrazor", "fitnets-paper", "supervised"] = "supervised"
    ce_weight: float = 1.0
    hints: list[HintConfig] = field(default_factory=list)
    kd: KDConfig | None = None
    hint_epochs: int = 0  # fitnets-paper stage 1 length
    hint_lr: float | None = None  # stage-1 learning rate (constant); None uses optim.lr


@dataclass
class ModelConfig:
    teacher: str = ""  # torchvision classifier name or one of fastfit's small CNNs; "" = no teacher
    teacher_weights: str = ""  # torchvision weights name (e.g. IMAGENET1K_V2) or a checkpoint path
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student: str = "resnet18"
    student_weights: str = ""
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 1000


@dataclass
class OptimConfig:
    lr: float = 0.1  # for the global batch below
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4  # on weights of rank ≥ 2 only; biases and norm parameters get none
    epochs: int = 100
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    batch_size: int = 256  # global, split evenly across ranks
    label_smoothing: float = 0.0
    fused: bool | Auto = "auto"  # apex FusedSGD when importable, else torch's fused SGD (CUDA)


@dataclass
class DataConfig:
    dataset: Literal["imagefolder", "fashion-mnist"] = "imagefolder"
    root: str = ""  # folder holding train/ and val/ class folders ("" for fashion-mnist: cache)
    train_dir: str = "train"
    val_dir: str = "val"
    train_list: str = ""  # DALI only: a text file of "relative/path label" lines instead of train_dir
    val_list: str = ""
    # auto: DALI when importable (GPU decoding on CUDA, its CPU pipeline on a CPU), else torchvision
    backend: Literal["torchvision", "dali", "auto"] = "auto"
    image_size: int = 224
    val_resize: int = 256  # shorter side before the center crop; 0 = no resize
    augment: Literal["rrc", "pad-crop", "none"] = "rrc"
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rrc_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    workers: int | Auto = "auto"  # torchvision DataLoader workers per rank; auto: the rank's cores, at most 8
    train_subset: int = 0  # > 0: a fixed class-balanced subset of the training set
    val_subset: int = 0
    skip_bad: bool = False  # skip (and count) corrupt images instead of stopping
    dali_threads: int | Auto = "auto"  # auto: the rank's cores, at most 8
    dali_hw_decoder_load: float = 0.9


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool | Auto = "auto"  # auto: on for CUDA
    compile: bool | Auto = "auto"  # auto: on for CUDA
    compile_mode: Literal["default", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    cuda_graphs: bool = False  # replay the compiled teacher forward and student step as CUDA graphs
    fused_kernels: bool | Auto = "auto"  # auto: fused Triton losses on CUDA
    sync_bn: bool = False
    log_interval: int = 50
    eval_every: int = 1
    keep_checkpoints: int = 3
    checkpoint_every_steps: int = 0  # > 0: also checkpoint mid-epoch every N global steps (resume loses < N steps)
    max_steps_per_epoch: int = 0  # > 0 cuts epochs short (smoke tests, profiling)
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = True
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/Inf loss: stop with an error, or skip those steps
    nonfinite_check_every: int = 50  # steps between the non-finite checks (one host sync each; also at log steps)
    # How long a rank waits in a collective for the others before naming the ones that stopped answering and ending
    # the run (torchrun process groups); long enough for the slowest step, evaluation or checkpoint write.
    collective_timeout_s: float = 600.0
    # → checkpoint, exit 75 (SIGINT is Ctrl-C)
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The published recipes, applied beneath the user's file: MMRazor's config
# fitnets_backbone_logits_resnet50_resnet18_8xb32_in1k, and the FitNets paper's two stages (Romero et al., ICLR 2015,
# arXiv 1412.6550). The README's config table says where each value comes from.
RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    "mmrazor": {
        "recipe": {
            "ce_weight": 1.0,
            "hints": [
                {
                    "student": "layer3",
                    "teacher": "layer3",
                    "connector": "mmrazor",
                    "loss": "normalized_l2",
                    "weight": 10.0,
                },
                {
                    "student": "layer4",
                    "teacher": "layer4",
                    "connector": "mmrazor",
                    "loss": "normalized_l2",
                    "weight": 10.0,
                },
            ],
            "kd": {"temperature": 6.0, "weight": 10.0, "reduction": "mean", "tau_squared": True, "form": "kl"},
        }
    },
    "fitnets-paper": {
        "recipe": {
            "ce_weight": 1.0,
            "hint_epochs": 1,
            "kd": {
                "temperature": 3.0,
                "weight": 4.0,
                "weight_end": 1.0,
                "reduction": "batchmean",
                "tau_squared": False,
                "form": "ce",
            },
        }
    },
    "supervised": {"recipe": {"kd": None, "hints": []}},
}


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=0.05` → (["optim", "lr"], 0.05). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key.path=value (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; returns the value (ints widened to floats, tables to dataclasses)."""
    origin = get_origin(tp)
    if origin is Literal:
        if any(value == allowed and type(value) is type(allowed) for allowed in get_args(tp)):
            return value
        raise ConfigError(f"{where} must be one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arm in get_args(tp):
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if type(value) is tp:
            return value
    else:  # pragma: no cover - every annotation above is handled
        raise TypeError(f"unsupported annotation {tp} at {where}")
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys in [{where or 'top level'}]: {', '.join(allowed)}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in table.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; None leaves that side open to infinity (NaN and ±Inf are never allowed)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '≤'} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
ANY_FINITE = Range()
# step_seed() derives each step's torch seed as (seed·1000003 + rank)·1000000007 + step; it must fit in 64 bits.
MAX_SEED = 18_000

# Every int and float setting (and every number inside a list setting, written key[]) with the values that can
# work. "auto" and None are allowed where the field's type allows them and are not checked here.
RANGES: dict[str, Range] = {
    "recipe.ce_weight": AT_LEAST_0,
    "recipe.hints[].weight": AT_LEAST_0,
    "recipe.kd.temperature": POSITIVE,
    "recipe.kd.weight": AT_LEAST_0,
    "recipe.kd.weight_end": AT_LEAST_0,
    "recipe.hint_epochs": AT_LEAST_0,
    "recipe.hint_lr": POSITIVE,
    "model.num_classes": AT_LEAST_1,
    "optim.lr": POSITIVE,
    "optim.momentum": FRACTION,
    "optim.weight_decay": AT_LEAST_0,
    "optim.epochs": AT_LEAST_1,
    "optim.milestones[]": AT_LEAST_1,
    "optim.gamma": Range(0, 1, low_open=True),
    "optim.warmup_epochs": AT_LEAST_0,
    "optim.batch_size": AT_LEAST_1,
    "optim.label_smoothing": FRACTION,
    "data.image_size": AT_LEAST_1,
    "data.val_resize": AT_LEAST_0,
    "data.rrc_scale[]": Range(0, 1, low_open=True),
    "data.rrc_ratio[]": POSITIVE,
    "data.mean[]": ANY_FINITE,
    "data.std[]": POSITIVE,
    "data.workers": AT_LEAST_0,
    "data.train_subset": AT_LEAST_0,
    "data.val_subset": AT_LEAST_0,
    "data.dali_threads": AT_LEAST_1,
    "data.dali_hw_decoder_load": Range(0, 1),
    "run.seed": Range(0, MAX_SEED),
    "run.log_interval": AT_LEAST_1,
    "run.eval_every": AT_LEAST_1,
    "run.keep_checkpoints": AT_LEAST_0,
    "run.checkpoint_every_steps": AT_LEAST_0,
    "run.max_steps_per_epoch": AT_LEAST_0,
    "run.nonfinite_check_every": AT_LEAST_1,
    "run.collective_timeout_s": POSITIVE,
}


def numeric_settings(cfg: Config) -> list[tuple[str, str, Any]]:
    """(range key, shown key, value) for every number in `cfg` (list items and hints included, None and "auto"
    left out); the range key is the RANGES entry, the shown key names the exact place (e.g. data.std[1])."""
    found: list[tuple[str, str, Any]] = []

    def walk(node: Any, key: str, shown: str) -> None:
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(
                    getattr(node, f.name),
                    f"{key}.{f.name}" if key else f.name,
                    f"{shown}.{f.name}" if shown else f.name,
                )
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{key}[]", f"{shown}[{i}]")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            found.append((key, shown, node))

    walk(cfg, "", "")
    return found


def _default_of(key: str) -> Any:
    """The dataclass default of a RANGES key (a list key gives the whole default list)."""
    node: Any = Config(recipe=RecipeConfig(kd=KDConfig(), hints=[HintConfig()]))
    for part in key.split("."):
        node = getattr(node, part.removesuffix("[]"))
        if part.endswith("[]") and node and dataclasses.is_dataclass(node[0]):
            node = node[0]
    return node


def _out_of_range(shown: str, value: Any, allowed: Range, default: Any) -> ConfigError:
    rule = allowed.describe()
    if isinstance(value, float) and not math.isfinite(value) and allowed != ANY_FINITE:
        rule = f"a finite number {rule}"
    hint = f" (the default is {_toml_value(default)})" if default is not None else ""
    target = allowed.describe() if allowed == ANY_FINITE else f"a value {allowed.describe()}"
    return ConfigError(f"{shown} must be {rule}, got {value!r}; set it to {target}{hint}")


def _check_ranges(cfg: Config) -> None:
    for key, shown, value in numeric_settings(cfg):
        allowed = RANGES.get(key)
        if allowed is None:  # pragma: no cover - test_config checks that every numeric setting has a range
            raise TypeError(f"no allowed range for the numeric setting {key}; add it to fastfit.config.RANGES")
        if value not in allowed:
            raise _out_of_range(shown, value, allowed, _default_of(key))


def _check_pairs(cfg: Config) -> None:
    """Settings that are only meaningful together: schedules, crop ranges, normalization."""
    o, d = cfg.optim, cfg.data
    if any(b <= a for a, b in zip(o.milestones, o.milestones[1:], strict=False)):
        raise ConfigError(
            f"optim.milestones must be strictly increasing epoch numbers, got {o.milestones}; e.g. [30, 60, 90]"
        )
    late = [m for m in o.milestones if m >= o.epochs]
    if late:
        # Not an error: extending the run with more epochs later reaches them (a common way to train in parts).
        logger.warning(
            "optim.milestones %s are not before optim.epochs = %d, so the learning rate never decays there",
            late,
            o.epochs,
        )
    if o.warmup_epochs >= o.epochs:
        raise ConfigError(
            f"optim.warmup_epochs must be in [0, optim.epochs = {o.epochs}), got {o.warmup_epochs!r}; "
            "lower it or raise optim.epochs"
        )
    for key, pair, top in (("data.rrc_scale", d.rrc_scale, 1.0), ("data.rrc_ratio", d.rrc_ratio, None)):
        if len(pair) != 2 or pair[0] > pair[1]:
            bound = f"0 < min ≤ max ≤ {top:g}" if top is not None else "0 < min ≤ max"
            raise ConfigError(
                f"{key} must be [min, max] with {bound}, got {pair}; e.g. {_toml_value(_default_of(key))}"
            )
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) != 3:
            raise ConfigError(
                f"{key} needs 3 values (one per RGB channel), got {values}; e.g. {_toml_value(_default_of(key))}"
            )


def _validate(cfg: Config) -> None:
    _check_ranges(cfg)
    _check_pairs(cfg)
    r = cfg.recipe
    if r.name == "fitnets-paper":
        if not r.hints:
            raise ConfigError(
                "recipe fitnets-paper needs at least one [[recipe.hints]] (student guided layer → teacher hint layer)"
            )
        if r.kd is None:
            raise ConfigError("recipe fitnets-paper needs [recipe.kd] for its second stage")
    if r.name != "supervised" and not cfg.model.teacher:
        raise ConfigError(f"recipe {r.name} needs model.teacher (a model name), got an empty string")


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain dict, with the recipe preset applied beneath it."""
    name = tree.get("recipe", {}).get("name", RecipeConfig.name)
    if name not in RECIPE_PRESETS:
        raise ConfigError(f"recipe.name must be one of {', '.join(map(repr, RECIPE_PRESETS))}, got {name!r}")
    merged = deep_merge(RECIPE_PRESETS[name], tree)
    cfg = _build(Config, merged, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config: dataclass defaults → the recipe's preset → the TOML file → dotted overrides.

    Args:
        path: a TOML file, the name of a shipped config (`fastfit config list`), or None for defaults only.
        overrides: `key.path=value` strings; values are TOML (bare words are strings), e.g. "optim.lr=0.05".

    Returns:
        A validated Config.

    Raises:
        ConfigError: a missing file, invalid TOML, an unknown key, a wrong type or a value out of range; the
            message names the key and what is allowed.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from err
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {err.start}); TOML files are UTF-8: give a TOML "
                "config file, or re-save this one as UTF-8"
            ) from err
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(tree, keys, value)
    return config_from_dict(tree)


def shipped_configs_dir() -> Path:
    """The TOML recipes shipped with fastfit (fastfit/configs/, package data in a wheel)."""
    folder = Path(__file__).resolve().parent / "configs"
    if not folder.is_dir():
        raise ConfigError(f"fastfit's shipped configs are missing (looked in {folder}); reinstall fastfit")
    return folder


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or the name of a shipped config (`fitnets_r50_r18_in1k` or with .toml)."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    if len(path.parts) == 1:
        shipped = shipped_configs_dir() / name
        if shipped.is_file():
            return shipped
    available = sorted(p.stem for p in shipped_configs_dir().glob("*.toml"))
    raise ConfigError(
        f"config file {str(path)!r} not found; give a path or one of the shipped configs: {', '.join(available)}"
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML file that load_config reads back to an equal Config."""
    lines = ["# Resolved fastfit config (defaults, recipe preset, file and overrides applied)."]

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"\n[{name}]")
        for key, value in values.items():
            if value is None or (isinstance(value, dict) and key in ("kd",)):
                continue
            if isinstance(value, list) and value and isinstance(value[0], dict):
                continue
            lines.append(f"{key} = {_toml_value(value)}")

    tree = cfg.to_dict()
    for section in ("model", "optim", "data", "run"):
        table(section, tree[section])
    table("recipe", tree["recipe"])
    if tree["recipe"]["kd"] is not None:
        table("recipe.kd", tree["recipe"]["kd"])
    for hint in tree["recipe"]["hints"]:
        lines.append("\n[[recipe.hints]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in hint.items() if v is not None]
    return "\n".join(lines) + "\n"
