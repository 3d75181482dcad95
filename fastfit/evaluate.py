"""`fastfit eval`: top-1/top-5 of trained weights on a config's validation set, under torchrun or alone."""

from __future__ import annotations

from typing import Any

from fastfit.config import Config
from fastfit.data import build_loaders
from fastfit.dist import cleanup_distributed, setup_distributed
from fastfit.engine import build_models, evaluate, per_rank_batch
from fastfit.models import load_weights
from fastfit.runtime import resolve_runtime


def evaluate_weights(cfg: Config, student_weights: str | None = None) -> dict[str, dict[str, Any]]:
    """Metrics for the student (its configured weights, or `student_weights`) and for the teacher when it has
    weights."""
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
