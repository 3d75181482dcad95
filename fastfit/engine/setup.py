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
from fastfit.engine.lineage import append_history, config_changes
from fastfit.engine.metrics_log import MetricsLog
from fastfit.engine.run_state import Position, Run, step_seed
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


def _check_inputs_are_not_outputs(cfg: Config) -> None:
    """A weights file must not be the student.pt this run writes at its end (the run would destroy its input)."""
    written = (Path(cfg.run.output_dir) / "student.pt").resolve()
    for key, value in (("student_weights", cfg.model.student_weights), ("teacher_weights", cfg.model.teacher_weights)):
        if value and Path(value).resolve() == written:
            raise ConfigError(
                f"model.{key} {value} is the student.pt this run writes into run.output_dir "
                f"{cfg.run.output_dir}; copy it out of that folder first, or give this run another run.output_dir"
            )


def setup_run(cfg: Config, env: DistEnv) -> Run:
    """Everything a run needs before its first step. It writes nothing into the run folder: config.toml is written
    (write_config) only once a resume is accepted, so a refused one leaves the run's config as it was."""
    _check_run_switches(cfg)
    _check_inputs_are_not_outputs(cfg)
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
    metrics = MetricsLog(out, enabled=env.is_main, tensorboard=cfg.run.tensorboard)
    return Run(cfg, env, rt, data, student, teacher, connectors, stages, out, metrics)


def write_config(run: Run) -> None:
    """The resolved config as config.toml in the run folder (rank 0), once the run is accepted."""
    if run.env.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.toml").write_text(to_toml(run.cfg))


def restore(run: Run, path: Path) -> dict[str, list]:
    """Continue `run` from the checkpoint at `path` (a CheckpointError if it belongs to another config); returns
    the config changes accepted (dotted key → [checkpoint's value, now]), also added to run.config_history."""
    state = ckpt.load_checkpoint(path)
    current = run.cfg.to_dict()
    ckpt.check_same_config(state["config"], current, path)
    changes = config_changes(state["config"], current)
    run.load_state_dict(state)
    if changes:
        run.config_history.append({"global_step": run.position.global_step, "changes": changes})
    _reopen_extended_stage(run)
    p = run.position
    logger.info(
        "resumed from %s at stage %d epoch %d step %d (global step %d)", path, p.stage, p.epoch, p.step, p.global_step
    )
    return changes


def _reopen_extended_stage(run: Run) -> None:
    """A checkpoint at the end of a stage (or of the run) whose stage now has more epochs (optim.epochs raised on a
    finished run): continue that stage with its new epochs instead of skipping past it."""
    p = run.position
    if p.stage == 0 or p.epoch or p.step or p.stage > len(run.stages):
        return
    stage = run.stages[p.stage - 1]
    done = [h["epoch"] for h in run.history if h.get("stage") == stage.name and "epoch" in h]
    next_started = p.stage < len(run.stages) and any(h.get("stage") == run.stages[p.stage].name for h in run.history)
    if done and max(done) < stage.epochs and not next_started:
        run.position = Position(p.stage - 1, max(done), 0, p.global_step)
        logger.info(
            "stage %s now has %d epochs: training epochs %d-%d", stage.name, stage.epochs, max(done) + 1, stage.epochs
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
    append_history(run.out, {"event": "start", "set_aside": [str(p) for p in moved]})
