"""Input checks for the fused KD loss: shapes, dtypes, devices and scalar arguments only — nothing here reads tensor
values, so the op stays free of host syncs."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

REDUCTIONS = ("batchmean", "mean", "sum")
FORMS = ("kl", "ce")
# Triton decides at decoration time whether kernels run in its interpreter, so read the switch once, at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_kd_inputs(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing) -> None:
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected {name} as a non-empty (N, C) tensor, got {got}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"expected {name} in float32/bfloat16/float16, got {x.dtype}")
        if x.stride(1) != 1:
            raise ValueError(
                f"expected {name} with unit stride over classes (call .contiguous()), got strides {tuple(x.stride())}"
            )
    if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
        raise ValueError(
            f"expected student and teacher logits of one shape, dtype and device, got "
            f"{tuple(s.shape)} {s.dtype} {s.device} and {tuple(t.shape)} {t.dtype} {t.device}"
        )
    if s.device.type != "cuda" and not (s.device.type == "cpu" and INTERPRET):
        raise ValueError(f"expected CUDA tensors or TRITON_INTERPRET=1, got {s.device.type}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != s.shape[:1]:
            got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"expected labels as an int64 tensor of shape ({s.shape[0]},) or None, got {got}")
        if labels.device != s.device:
            raise ValueError(f"expected labels on the logits' device {s.device}, got {labels.device}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"expected temperature as a finite Python number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction in {REDUCTIONS}, got {reduction!r}")
    if form not in FORMS:
        raise ValueError(f"expected form in {FORMS}, got {form!r}")
    if not isinstance(tau_squared, bool):
        raise ValueError(f"expected tau_squared as a bool, got {tau_squared!r}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not (0.0 <= label_smoothing <= 1.0)
    ):
        raise ValueError(f"expected label_smoothing as a number in [0, 1], got {label_smoothing!r}")
