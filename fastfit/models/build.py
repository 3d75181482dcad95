"""Teacher and student construction: torchvision classifiers or fastfit's small CNNs, by name, with optional
weights given as a torchvision weights name or a local checkpoint path (never downloaded by tests)."""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from fastfit.errors import ModelError
from fastfit.models.small_cnns import SMALL_MODELS


def available_models() -> list[str]:
    return sorted(SMALL_MODELS) + sorted(torchvision.models.list_models(module=torchvision.models))


def _plain_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict, a fastfit checkpoint / exported student, or the common {'state_dict': …} wrappers."""
    if isinstance(obj, dict):
        for key in ("student", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            # Strip wrappers that DDP and torch.compile put in front of parameter names.
            return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    raise ModelError(f"{path}: not a state_dict or fastfit checkpoint (found {type(obj).__name__})")


def _check_checksum(path: Path, role: str) -> None:
    """A fastfit checkpoint's `<name>.sha256` beside it, when there is one, must match (a flipped byte is refused)."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return
    recorded = sidecar.read_text(errors="replace").split()[:1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if not recorded or digest.hexdigest() != recorded[0].lower():
        raise ModelError(
            f"{role} weights {path} are corrupt: their sha256 differs from the one recorded in {sidecar.name} when "
            f"they were written; use an older checkpoint of {path.parent}"
        )


def load_weights(model: nn.Module, weights: str, role: str) -> None:
    """Load a weights file into `model` (strictly); a ModelError names what is missing or does not fit."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"{role} weights file {str(path)!r} does not exist; give a checkpoint path "
            "or a torchvision weights name such as IMAGENET1K_V1"
        )
    _check_checksum(path, role)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds here (EOFError, KeyError, UnpicklingError, RuntimeError…)
        raise ModelError(
            f"{role} weights {path} cannot be read as a PyTorch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); it is truncated, corrupt or not a "
            "checkpoint: give a fastfit checkpoint, an exported student.pt or a state_dict saved with torch.save"
        ) from err
    state = _plain_state_dict(loaded, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)}→{tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        raise ModelError(
            f"{role} weights {path} do not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape changes {reshaped[:5]} (are model.{role} and model.num_classes right?)"
        )
    model.load_state_dict(state)


def _looks_like_path(weights: str) -> bool:
    return any(sep in weights for sep in ("/", "\\")) or weights.endswith((".pt", ".pth", ".ckpt", ".bin"))


def build_model(
    name: str, num_classes: int, weights: str = "", kwargs: dict[str, Any] | None = None, role: str = "student"
) -> nn.Module:
    """A classifier by name.

    Args:
        name: a torchvision classifier (torchvision.models.list_models()) or one of fastfit's small CNNs.
        num_classes: the classifier's outputs (must match the weights' classes when weights are given).
        weights: "" (random initialization), a local file (a fastfit checkpoint, an exported student or a plain
            state_dict), or a torchvision weights name such as "IMAGENET1K_V2" (this downloads).
        kwargs: extra arguments for the model's constructor.
        role: "student" or "teacher", for messages.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ModelError: an unknown name or weights name, a missing file, or weights that do not fit the model.
    """
    kwargs = dict(kwargs or {})
    if name in SMALL_MODELS:
        model = _construct(SMALL_MODELS[name], name, role, num_classes=num_classes, **kwargs)
        if weights:
            if not _looks_like_path(weights) and not Path(weights).exists():
                raise ModelError(
                    f"{role} {name!r} is one of fastfit's small CNNs: its weights must be a checkpoint path, "
                    f"got {weights!r}"
                )
            load_weights(model, weights, role)
        return model
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(
            f"unknown model.{role} {name!r}; {hint}choose a torchvision classifier "
            f"(torchvision.models.list_models(), {len(available_models()) - len(SMALL_MODELS)} of them) "
            f"or one of fastfit's small CNNs ({', '.join(sorted(SMALL_MODELS))})"
        ) from None
    if weights and not _looks_like_path(weights) and not Path(weights).exists():
        # A torchvision weights name: 'IMAGENET1K_V2' or 'ResNet50_Weights.IMAGENET1K_V2'. This downloads.
        try:
            enum = torchvision.models.get_model_weights(name)
            member = enum[weights.split(".")[-1]]
        except (KeyError, ValueError):
            names = [w.name for w in torchvision.models.get_model_weights(name)]
            raise ModelError(
                f"model.{role}_weights {weights!r} is neither a file nor a torchvision weights name for "
                f"{name}; valid names: {', '.join(names)}"
            ) from None
        classes = len(member.meta["categories"])
        if classes != num_classes:
            raise ModelError(
                f"{name} weights {member.name} have {classes} classes but model.num_classes is {num_classes}"
            )
        return _construct(builder, name, role, weights=member, **kwargs)
    model = _construct(builder, name, role, weights=None, num_classes=num_classes, **kwargs)
    if weights:
        load_weights(model, weights, role)
    return model


def _construct(builder: Any, name: str, role: str, **kwargs: Any) -> nn.Module:
    """builder(**kwargs); an argument the constructor does not take is a ModelError naming model.<role>_kwargs."""
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise ModelError(
            f"model.{role}_kwargs do not fit {name}: {err}; remove or rename the key in model.{role}_kwargs"
        ) from err
