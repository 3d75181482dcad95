"""Schedules as pure functions of training progress, so a resumed run lands on exactly the same values."""

from __future__ import annotations

from fastfit.config import KDConfig, OptimConfig


def learning_rate(optim: OptimConfig, epoch_progress: float, constant: float | None = None) -> float:
    """LR at a fractional epoch: linear warm-up, then step decay by `gamma` at each milestone passed."""
    if constant is not None:
        return constant
    if optim.warmup_epochs > 0 and epoch_progress < optim.warmup_epochs:
        return optim.lr * (epoch_progress + 1e-8) / optim.warmup_epochs
    passed = sum(1 for milestone in optim.milestones if epoch_progress >= milestone)
    return optim.lr * optim.gamma**passed


def kd_weight(kd: KDConfig, stage_progress: float) -> float:
    """λ at a point of the KD stage (0 → 1): linear from kd.weight to kd.weight_end, or constant."""
    if kd.weight_end is None:
        return kd.weight
    progress = min(max(stage_progress, 0.0), 1.0)
    return kd.weight + (kd.weight_end - kd.weight) * progress
