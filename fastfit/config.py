"""Typed run configuration: dataclasses filled from a TOML file, recipe presets and dotted overrides.

Layering, lowest first: dataclass defaults → the recipe's preset (so `recipe.name = "mmrazor"` alone gives the
published recipe) → the TOML file → `key.path=value` overrides. Unknown keys and wrong types raise ConfigError
naming the key and what is allowed; the resolved config is a plain dict saved with every run and checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from fastfit.errors import ConfigError

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


# Every numeric setting's allowed range: key → (low, low included, high, high included); None = unbounded.
# Checked at load, before any data is read, so a value that cannot work never costs an epoch.
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "model.num_classes": (1, True, None, False),
    "optim.lr": (0, False, None, False),
    "optim.momentum": (0, True, 1, False),
    "optim.weight_decay": (0, True, None, False),
    "optim.epochs": (1, True, None, False),
    "optim.gamma": (0, False, 1, True),
    "optim.warmup_epochs": (0, True, None, False),
    "optim.batch_size": (1, True, None, False),
    "optim.label_smoothing": (0, True, 1, False),
    "data.image_size": (1, True, None, False),
    "data.val_resize": (0, True, None, False),
    "data.workers": (0, True, None, False),
    "data.train_subset": (0, True, None, False),
    "data.val_subset": (0, True, None, False),
    "data.dali_threads": (1, True, None, False),
    "data.dali_hw_decoder_load": (0, True, 1, True),
    "run.seed": (0, True, None, False),
    "run.log_interval": (1, True, None, False),
    "run.eval_every": (1, True, None, False),
    "run.keep_checkpoints": (0, True, None, False),
    "run.checkpoint_every_steps": (0, True, None, False),
    "run.max_steps_per_epoch": (0, True, None, False),
    "run.nonfinite_check_every": (1, True, None, False),
    "run.collective_timeout_s": (0, False, None, False),
    "recipe.ce_weight": (0, True, None, False),
    "recipe.hint_epochs": (0, True, None, False),
    "recipe.hint_lr": (0, False, None, False),
    "recipe.kd.temperature": (0, False, None, False),
    "recipe.kd.weight": (0, True, None, False),
    "recipe.kd.weight_end": (0, True, None, False),
}


def _range_text(low, low_in, high, high_in) -> str:
    left = "unbounded" if low is None else f"{'≥' if low_in else '>'} {low}"
    right = "" if high is None else f" and {'≤' if high_in else '<'} {high}"
    return left + right


def _in_range(value: float, low, low_in, high, high_in) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above = low is None or (value >= low if low_in else value > low)
    below = high is None or (value <= high if high_in else value < high)
    return above and below


def _lookup(cfg: Config, key: str):
    node: Any = cfg
    for part in key.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def _check_numbers(cfg: Config) -> None:
    """Each numeric value finite and in its range, then the cross-checks between values."""
    checks = [(key, _lookup(cfg, key), bounds) for key, bounds in _RANGES.items()]
    checks += [(f"recipe.hints[{i}].weight", h.weight, (0, True, None, False)) for i, h in enumerate(cfg.recipe.hints)]
    for key, value, bounds in checks:
        if value is None or value == "auto":
            continue
        if not _in_range(value, *bounds):
            raise ConfigError(
                f"{key} = {value} is out of range: it must be finite and {_range_text(*bounds)}; "
                f"set {key}=<a value in that range>"
            )
    optim, data = cfg.optim, cfg.data
    if optim.warmup_epochs >= optim.epochs:
        raise ConfigError(
            f"optim.warmup_epochs = {optim.warmup_epochs} must be < optim.epochs = {optim.epochs} "
            "(the warm-up would never end); lower it or raise optim.epochs"
        )
    steps = optim.milestones
    if any(m < 1 for m in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ConfigError(
            f"optim.milestones = {steps} must be strictly increasing epoch numbers ≥ 1, e.g. [30, 60, 90]"
        )
    for key, pair, high in (("data.rrc_scale", data.rrc_scale, 1.0), ("data.rrc_ratio", data.rrc_ratio, None)):
        if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or not 0 < pair[0] <= pair[1]:
            raise ConfigError(f"{key} = {pair} must be two finite numbers 0 < low ≤ high, e.g. {key}=[0.08, 1.0]")
        if high is not None and pair[1] > high:
            raise ConfigError(f"{key} = {pair}: the area fraction cannot exceed 1; e.g. {key}=[0.08, 1.0]")
    if len(data.mean) != 3 or len(data.std) != 3:
        raise ConfigError(f"data.mean and data.std need 3 values (RGB), got {data.mean} and {data.std}")
    if not all(math.isfinite(v) for v in data.mean) or not all(math.isfinite(v) and v > 0 for v in data.std):
        raise ConfigError(
            f"data.mean = {data.mean} must be finite and data.std = {data.std} finite and > 0 (it divides the pixels)"
        )


def _validate(cfg: Config) -> None:
    _check_numbers(cfg)
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
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from err
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
