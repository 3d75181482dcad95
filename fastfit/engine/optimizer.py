"""The optimizer: SGD with momentum, the fastest implementation the device has, and weight decay by parameter rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastfit.config import OptimConfig
from fastfit.engine.runtime import Runtime


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels (rank ≥ 2) only; never on biases or norm parameters."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for _, param in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    named: Iterable[tuple[str, nn.Parameter]], optim: OptimConfig, runtime: Runtime, needs_found_inf: bool = False
):
    """SGD with momentum: apex FusedSGD when importable on CUDA, else torch's fused SGD on CUDA, else foreach.
    needs_found_inf: the step must accept GradScaler-style `found_inf` (a device-side skip): torch's fused SGD."""
    groups = param_groups(named, optim.weight_decay)
    if needs_found_inf:
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=True)
    if runtime.fused_optimizer:
        if runtime.device.type == "cuda":
            try:
                from apex.optimizers import FusedSGD  # optional: a source build of NVIDIA apex

                return FusedSGD(
                    groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, set_grad_none=True
                )
            except ImportError:
                pass
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=True)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
