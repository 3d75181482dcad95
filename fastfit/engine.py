"""The one training loop every entry point uses: setup → (per stage) train_one_epoch → evaluate → save.

Reproducibility by construction: data order and augmentation are functions of (seed, epoch, index), and the
global RNG (dropout) is reseeded from (seed, rank, global step) before every step, so a run resumed from any
checkpoint — an epoch boundary or mid-epoch — continues exactly as the uninterrupted run would have. Mid-epoch
checkpoints also hold the partial loss meters, so logged means and epoch summaries match the uninterrupted run.

Losing nothing (docs/reliability.md): a preemption signal stops the run after the step with a checkpoint (exit
code 75); non-finite losses stop the run or are skipped (run.nonfinite); run.checkpoint_every_steps adds mid-epoch
checkpoints; a torchrun restart resumes from the newest checkpoint; a fresh run sets an earlier run's checkpoints
aside instead of mixing with them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastfit import checkpoint as ckpt
from fastfit.config import Config, ConfigError, to_toml
from fastfit.data import build_loaders
from fastfit.dist import DistEnv, all_reduce_sum, cleanup_distributed, is_peer_failure, restart_count, setup_distributed
from fastfit.distiller import build_connectors
from fastfit.models import build_model
from fastfit.preemption import PeerFailure, Preempted, StopSignals
from fastfit.recipes import build_stages
from fastfit.run_state import Log, Position, Run, export_student, save, step_seed, stop_for_preemption
from fastfit.runtime import Runtime, resolve_runtime
from fastfit.stage_runner import StageRunner

__all__ = [
    "train",
    "setup_run",
    "fit",
    "evaluate",
    "build_models",
    "per_rank_batch",
    "step_seed",
    "StageRunner",
    "Run",
    "Position",
    "restore",
]


def per_rank_batch(cfg: Config, env: DistEnv) -> int:
    if cfg.optim.batch_size % env.world_size:
        raise ConfigError(
            f"optim.batch_size {cfg.optim.batch_size} (global) is not divisible by the {env.world_size} "
            f"processes; use a multiple of {env.world_size}"
        )
    return cfg.optim.batch_size // env.world_size


def build_models(cfg: Config, rt: Runtime, needs_teacher: bool) -> tuple[nn.Module, nn.Module | None]:
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


def setup_run(cfg: Config, env: DistEnv, log: Log) -> Run:
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
        log(
            f"warning: model.teacher_weights is empty, so the teacher {cfg.model.teacher} is randomly initialized; "
            "distilling from it only makes sense for tests"
        )
    if env.distributed and cfg.run.sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    connectors = build_connectors(cfg, teacher, student).to(rt.device, memory_format=memory_format)
    out = Path(cfg.run.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
    return Run(cfg, env, rt, data, student, teacher, connectors, stages, out, log)


def restore(run: Run, path: Path) -> None:
    state = ckpt.load_checkpoint(path)
    ckpt.check_same_config(state["config"], run.cfg.to_dict(), path)
    run.student.load_state_dict(state["student"])
    run.connectors.load_state_dict(state["connectors"])
    run.position = Position(**state["position"])
    run.history = list(state.get("history", []))
    run.skipped_steps = int(state.get("skipped_steps", 0))
    run.restored = state
    if run.env.is_main:
        _truncate_metrics(run.out / "metrics.jsonl", run.position.global_step)
    run.log(
        f"resumed from {path} at stage {run.position.stage} epoch {run.position.epoch} step {run.position.step} "
        f"(global step {run.position.global_step})"
    )


def _truncate_metrics(path: Path, global_step: int) -> None:
    """Drop log lines written after the checkpoint (by a run killed later) and a line torn by the kill, so the
    resumed run's lines follow on exactly."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("global_step", 0) <= global_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


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


def _open_tensorboard(run: Run):
    if not (run.env.is_main and run.cfg.run.tensorboard):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run.out / "tensorboard"))


def fit(run: Run) -> dict[str, Any]:
    """Train every remaining stage from run.position; returns the run summary (also written as summary.json)."""
    cfg, started = run.cfg, time.perf_counter()
    run.writer = _open_tensorboard(run)
    teacher_metrics = None
    if run.teacher is not None and run.cfg.model.teacher_weights:
        teacher_metrics = evaluate(run.teacher, run.data.val, run.rt, run.env)
        run.log(
            f"teacher {cfg.model.teacher}: top-1 {teacher_metrics['top1']:.2f}  top-5 {teacher_metrics['top5']:.2f}"
        )
    restored = run.restored
    for index in range(run.position.stage, len(run.stages)):
        runner = StageRunner(run, index)
        if restored is not None and restored["optimizer_stage"] == index:
            runner.load_state(restored)  # a checkpoint at a stage boundary holds the finished stage's optimizer
        stage = runner.stage
        first_epoch = run.position.epoch if run.position.stage == index else 0
        for epoch in range(first_epoch, stage.epochs):
            start_step = run.position.step if (run.position.stage, run.position.epoch) == (index, epoch) else 0
            run.position = Position(index, epoch, start_step, run.position.global_step)
            record: dict[str, Any] = {
                "stage": stage.name,
                "epoch": epoch + 1,
                **runner.train_one_epoch(epoch, start_step),
            }
            if not stage.truncated and ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == stage.epochs):
                record.update(evaluate(run.student, run.data.val, run.rt, run.env))
            run.history.append(record)
            done_stage = epoch + 1 == stage.epochs
            run.position = Position(
                index + 1 if done_stage else index, 0 if done_stage else epoch + 1, 0, run.position.global_step
            )
            # Logged before the checkpoint: a crash in between re-runs the epoch, and resuming drops the line.
            runner._emit({"global_step": run.position.global_step, **record})
            save(run, runner)
            run.log(_describe(record))
            finished = done_stage and index + 1 == len(run.stages)
            if not finished and runner.agreement.agree()[0]:  # a signal during evaluation or the save
                stop_for_preemption(run)
        restored = None
    export_student(run)
    summary = {
        "student": cfg.model.student,
        "teacher": cfg.model.teacher or None,
        "recipe": cfg.recipe.name,
        "student_params": sum(p.numel() for p in run.student.parameters()),
        "teacher_params": sum(p.numel() for p in run.teacher.parameters()) if run.teacher is not None else None,
        "teacher_metrics": teacher_metrics,
        "final": next((h for h in reversed(run.history) if "top1" in h), None),
        "history": run.history,
        "wall_seconds": time.perf_counter() - started,
        "world_size": run.env.world_size,
        "backend": run.data.backend,
    }
    if run.env.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if run.writer is not None:
        run.writer.close()
    return summary


def _describe(record: dict[str, Any]) -> str:
    parts = [
        f"{record['stage']} epoch {record['epoch']}",
        f"loss {record.get('train_loss', float('nan')):.4f}",
        f"{record['train_img_s']:.0f} img/s",
    ]
    if "top1" in record:
        parts.append(f"top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}")
    return "  ".join(parts)


def _start_fresh(run: Run) -> None:
    """A run that does not resume: set an earlier run's checkpoints and log aside rather than mix with them."""
    if not run.env.is_main:
        return
    directory = run.out / "checkpoints"
    moved = [ckpt.set_aside(directory)] if ckpt.list_checkpoints(directory) else []
    if (run.out / "metrics.jsonl").is_file():
        moved.append(ckpt.set_aside(run.out / "metrics.jsonl"))
    if moved:
        run.log(
            f"{run.out} holds an earlier run; moved {', '.join(p.name for p in moved)} aside "
            "(to continue that run instead, pass --resume auto)"
        )


def train(cfg: Config, resume: str | None = None, log: Log | None = None) -> dict[str, Any]:
    """Run a config under the current torchrun environment (or as a single process).

    Raises Preempted after writing a checkpoint when a preemption signal arrives (the CLI exits with code 75).
    Under a torchrun restart (--max-restarts) the run resumes from the newest checkpoint even without --resume."""
    env = setup_distributed(cfg.run.device)
    log = log or (print if env.is_main else (lambda _msg: None))
    graceful = False
    try:
        with StopSignals(cfg.run.preemption_signals) as signals:
            run = setup_run(cfg, env, log)
            run.signals = signals
            if resume is None and restart_count() > 0:
                resume = "auto"
                log(f"torchrun restart {restart_count()}: resuming from the newest checkpoint in {run.out}")
            # None only for no --resume, or "auto" with no checkpoint yet; a missing file or folder raises.
            path = ckpt.resolve_resume(resume, run.out / "checkpoints") if resume else None
            if path is not None:
                restore(run, path)
            else:
                _start_fresh(run)
            summary = fit(run)
        graceful = True
        return summary
    except Preempted:
        graceful = True  # every rank stopped at the same step, past the same barrier
        raise
    except Exception as err:
        if env.distributed and is_peer_failure(err):
            # Give the launcher time to see the process that failed first (its error is the root cause to report);
            # torchrun stops this one meanwhile. Our signal handlers are already restored, so that ends it at once.
            time.sleep(5.0)
            raise PeerFailure(
                f"rank {env.rank} stopped because another process of the run failed first; its error "
                "is the one to read (torchrun prints it as the root cause)"
            ) from err
        raise
    finally:
        cleanup_distributed(graceful)
