"""Input checks for the fused hint loss: which connectors it can fuse and which tensors it accepts. Shapes, dtypes
and devices only — nothing here reads tensor values, so the op stays free of host syncs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

KINDS = ("normalized_l2", "half_sq", "mse")  # = fastfit.distill.losses.HINT_KINDS; kernels import nothing from fastfit
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SHAPE = "nn.Sequential(Conv2d 1×1 [, BatchNorm2d] [, ReLU])"


def unpack_connector(connector: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, bool] | str:
    """(conv, bn or None, relu) for a connector the fused op reproduces exactly, else the reason it cannot."""
    name = type(connector).__name__
    if not isinstance(connector, nn.Sequential):
        return f"expected a connector of the form {_SHAPE}, got {name}; use HintLoss(fused=False) for it"
    layers = list(connector)
    kinds = [type(layer).__name__ for layer in layers]
    conv = layers[0] if layers else None
    if type(conv) is not nn.Conv2d:
        return f"expected {name} to start with an nn.Conv2d ({_SHAPE}), got [{', '.join(kinds)}]"
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    if geometry != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
        return (
            f"expected {name}'s Conv2d to be 1×1 with stride 1, padding 0, dilation 1, groups 1, got "
            f"kernel_size={conv.kernel_size}, stride={conv.stride}, padding={conv.padding}, "
            f"dilation={conv.dilation}, groups={conv.groups}; use HintLoss(fused=False) for it"
        )
    rest = layers[1:]
    bn = rest.pop(0) if rest and type(rest[0]) is nn.BatchNorm2d else None
    relu = bool(rest) and type(rest[0]) is nn.ReLU
    if relu:
        rest.pop(0)
    if rest:
        return (
            f"expected {name} to be {_SHAPE}, got [{', '.join(kinds)}] ({type(rest[0]).__name__} cannot be fused; "
            "SyncBatchNorm and other norms need HintLoss(fused=False))"
        )
    return conv, bn, relu


def _check_feature(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected the {name} to be a 4-D (N, C, H, W) tensor, got {got}")
    if x.dtype not in DTYPES:
        raise ValueError(f"expected the {name} in float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"expected a non-empty {name}, got shape {tuple(x.shape)}")


def _check_vector(v: Tensor | None, name: str, ct: int, device: torch.device) -> None:
    if v is None:
        return
    if v.shape != (ct,):
        raise ValueError(f"expected {name} of shape ({ct},) (one per regressor output channel), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"expected {name} on the student feature's device {device}, got {v.device}")
    if not v.dtype.is_floating_point:
        raise ValueError(f"expected {name} to be floating point, got {v.dtype}")


def check_hint_inputs(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    kind: str,
    batch_norm: bool,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
) -> None:
    if kind not in KINDS:
        raise ValueError(f"expected hint loss kind in {KINDS}, got {kind!r}")
    _check_feature(student, "student feature")
    _check_feature(teacher, "teacher feature")
    n, cs, h, w = student.shape
    if weight.dim() not in (2, 4) or weight.shape[1] != cs or (weight.dim() == 4 and weight.shape[2:] != (1, 1)):
        raise ValueError(
            f"expected a regressor weight of shape (Ct, {cs}) or (Ct, {cs}, 1, 1) for a student feature "
            f"with {cs} channels, got {tuple(weight.shape)}"
        )
    if weight.dtype not in DTYPES:
        raise ValueError(f"expected the regressor weight in float32, bfloat16 or float16, got {weight.dtype}")
    ct = weight.shape[0]
    if tuple(teacher.shape) != (n, ct, h, w):
        raise ValueError(
            f"expected a teacher feature of shape {(n, ct, h, w)} (the student's batch and spatial size, "
            f"the regressor's {ct} channels), got {tuple(teacher.shape)}"
        )
    for other, name in ((teacher, "teacher feature"), (weight, "regressor weight")):
        if other.device != student.device:
            raise ValueError(
                f"expected the {name} on the student feature's device {student.device}, got {other.device}"
            )
    for v, name in (
        (bias, "regressor bias"),
        (bn_weight, "BatchNorm weight"),
        (bn_bias, "BatchNorm bias"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ):
        _check_vector(v, name, ct, student.device)
    if not batch_norm and any(v is not None for v in (bn_weight, bn_bias, running_mean, running_var)):
        raise ValueError(
            "expected no BatchNorm parameters or running stats with batch_norm=False, got some; pass "
            "batch_norm=True to apply them"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("expected running_mean and running_var together (or neither), got only one of them")
    if batch_norm and (training or running_mean is None) and n * h * w < 2:
        raise ValueError(
            f"expected more than one value per channel for BatchNorm batch statistics, got N·H·W = "
            f"{n * h * w}; use a larger batch or eval mode with running stats"
        )
