"""Evaluation: top-1/top-5 and cross-entropy of a model over a validation loader (each sample once across ranks),
and `fastfit eval` — the same for trained weights on a config's validation set, under torchrun or alone."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastfit.config import Config
from fastfit.data import build_loaders
from fastfit.dist import DistEnv, all_reduce_sum, cleanup_distributed, setup_distributed
from fastfit.engine.runtime import Runtime, resolve_runtime
from fastfit.engine.setup import build_models, per_rank_batch
from fastfit.errors import ConfigError
from fastfit.models import load_weights


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, env: DistEnv) -> dict[str, float]:
    """Top-1/top-5 and CE over the whole val set (each sample once across ranks)."""
    was_training = model.training
    model.eval()
    device = rt.device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        with rt.autocast():
            logits = model(rt.model_input(images)).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack(
            [
                hits[:, 0].sum(),
                hits.any(dim=1).sum(),
                torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
                torch.tensor(labels.numel(), device=device),
            ]
        ).double()
    all_reduce_sum(sums, env)
    model.train(was_training)
    c1, c5, loss, n = sums.tolist()  # deliberate sync: once per evaluation
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "val_loss": loss / n, "val_samples": int(n)}


def evaluate_weights(cfg: Config, student_weights: str | None = None) -> dict[str, dict[str, Any]]:
    """Metrics for the student (its configured weights, or `student_weights`) and for the teacher when it has
    weights. A ConfigError when the student has no weights at all: a random network's accuracy is no result."""
    if not student_weights and not cfg.model.student_weights:
        raise ConfigError(
            f"no weights for the student {cfg.model.student}: evaluating a randomly initialized network measures "
            "nothing; pass --weights <checkpoint or student.pt> (fastfit eval) or set model.student_weights"
        )
    env = setup_distributed(cfg.run.device)
    try:
        rt = resolve_runtime(cfg, env.device)
        data = build_loaders(cfg.data, env, per_rank_batch(cfg, env), cfg.run.seed, rt.channels_last)
        student, teacher = build_models(cfg, rt, needs_teacher=bool(cfg.model.teacher and cfg.model.teacher_weights))
        if student_weights:
            load_weights(student, student_weights, "student")
        results = {f"student {cfg.model.student}": evaluate(student, data.val, rt, env)}
        if teacher is not None:
            results[f"teacher {cfg.model.teacher}"] = evaluate(teacher, data.val, rt, env)
        return results
    finally:
        cleanup_distributed()
