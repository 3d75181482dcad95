"""Building a run from its config: the speed switches, loaders, teacher and student, connectors and stages, and
restoring a run from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fastfit.config import Config, to_toml
from fastfit.data import build_loaders
from fastfit.dist import DistEnv
from fastfit.distill.recipes import build_stages
from fastfit.distill.stage_model import build_connectors
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.metrics_log import MetricsLog
from fastfit.engine.run_state import Run, step_seed
from fastfit.engine.runtime import Runtime, resolve_runtime
from fastfit.errors import ConfigError
from fastfit.models import build_model

logger = logging.getLogger(__name__)


def per_rank_batch(cfg: Config, env: DistEnv) -> int:
    """optim.batch_size (global) split over the ranks; a ConfigError when it does not divide evenly."""
    if cfg.optim.batch_size % env.world_size:
        raise ConfigError(
            f"optim.batch_size {cfg.optim.batch_size} (global) is not divisible by the {env.world_size} "
            f"processes; use a multiple of {env.world_size}"
        )
    return cfg.optim.batch_size // env.world_size


def build_models(cfg: Config, rt: Runtime, needs_teacher: bool) -> tuple[nn.Module, nn.Module | None]:
    """The student (trainable) and, when needed, the teacher (eval mode, frozen), on the run's device and layout."""
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    m = cfg.model
    student = build_model(m.student, m.num_classes, m.student_weights, m.student_kwargs, role="student")
    student = student.to(rt.device, memory_format=memory_format)
    teacher = None
    if needs_teacher:
        teacher = build_model(m.teacher, m.num_classes, m.teacher_weights, m.teacher_kwargs, role="teacher")
        teacher = teacher.to(rt.device, memory_format=memory_format).eval().requires_grad_(False)
    return student, teacher


def _check_run_switches(cfg: Config) -> None:
    r = cfg.run
    for name, value, low in (
        ("run.log_interval", r.log_interval, 1),
        ("run.nonfinite_check_every", r.nonfinite_check_every, 1),
        ("run.checkpoint_every_steps", r.checkpoint_every_steps, 0),
    ):
        if value < low:
            raise ConfigError(f"{name} must be ≥ {low}, got {value}")


def setup_run(cfg: Config, env: DistEnv) -> Run:
    """Everything a run needs before its first step; rank 0 also writes the resolved config.toml."""
    _check_run_switches(cfg)
    rt = resolve_runtime(cfg, env.device)
    # Rank-independent: every rank builds identical models (a teacher without weights is not synced by DDP).
    torch.manual_seed(step_seed(cfg.run.seed, 0, -1))
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = build_loaders(cfg.data, env, per_rank_batch(cfg, env), cfg.run.seed, rt.channels_last)
    if len(data.classes) != cfg.model.num_classes:
        raise ConfigError(
            f"the dataset at {data.root} has {len(data.classes)} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={len(data.classes)}"
        )
    stages = build_stages(cfg)
    student, teacher = build_models(cfg, rt, any(s.uses_teacher for s in stages))
    if teacher is not None and not cfg.model.teacher_weights:
        logger.warning(
            "model.teacher_weights is empty, so the teacher %s is randomly initialized; distilling from it only "
            "makes sense for tests",
            cfg.model.teacher,
        )
    if env.distributed and cfg.run.sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    connectors = build_connectors(cfg, teacher, student).to(rt.device, memory_format=memory_format)
    out = Path(cfg.run.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
    metrics = MetricsLog(out, enabled=env.is_main, tensorboard=cfg.run.tensorboard)
    return Run(cfg, env, rt, data, student, teacher, connectors, stages, out, metrics)


def restore(run: Run, path: Path) -> None:
    """Continue `run` from the checkpoint at `path` (a CheckpointError if it belongs to another config)."""
    state = ckpt.load_checkpoint(path)
    ckpt.check_same_config(state["config"], run.cfg.to_dict(), path)
    run.load_state_dict(state)
    run.metrics.truncate_after(run.position.global_step)
    p = run.position
    logger.info(
        "resumed from %s at stage %d epoch %d step %d (global step %d)", path, p.stage, p.epoch, p.step, p.global_step
    )


def start_fresh(run: Run) -> None:
    """A run that does not resume: set an earlier run's checkpoints and log aside rather than mix with them."""
    if not run.env.is_main:
        return
    directory = run.out / "checkpoints"
    moved = [ckpt.set_aside(directory)] if ckpt.list_checkpoints(directory) else []
    if run.metrics.path.is_file():
        moved.append(ckpt.set_aside(run.metrics.path))
    if moved:
        logger.info(
            "%s holds an earlier run; moved %s aside (to continue that run instead, pass --resume auto)",
            run.out,
            ", ".join(p.name for p in moved),
        )
