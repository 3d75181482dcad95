"""The state one training run carries between its stages and checkpoints: where it stands (Position), what it
holds (Run), and writing it out (save, export_student, stop_for_preemption)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from fastfit import checkpoint as ckpt
from fastfit.config import Config
from fastfit.data import DataBundle
from fastfit.dist import DistEnv, control_barrier, gather_to_main
from fastfit.preemption import Preempted, StopSignals
from fastfit.recipes import Stage
from fastfit.runtime import Runtime

if TYPE_CHECKING:
    from fastfit.stage_runner import StageRunner

Log = Callable[[str], None]


@dataclass
class Position:
    """Where training stands: the next (stage, epoch within stage, step within epoch) to run."""

    stage: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Run:
    cfg: Config
    env: DistEnv
    rt: Runtime
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    connectors: nn.ModuleDict
    stages: list[Stage]
    out: Path
    log: Log
    position: Position = field(default_factory=Position)
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None
    restored: dict[str, Any] | None = None  # the checkpoint resumed from, until its stage has loaded it
    signals: StopSignals | None = None  # preemption requests (installed by train())
    skipped_steps: int = 0  # steps skipped for non-finite losses (run.nonfinite = "skip")


def step_seed(seed: int, rank: int, global_step: int) -> int:
    return (seed * 1_000_003 + rank) * 1_000_000_007 + global_step


def save(run: Run, runner: StageRunner) -> Path | None:
    """Every rank calls it (the per-rank loss meters are gathered); rank 0 writes."""
    meters = gather_to_main(runner.meters_state(), run.env)
    if not run.env.is_main:
        return None
    state = {
        "config": run.cfg.to_dict(),
        "student": run.student.state_dict(),
        "connectors": run.connectors.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "optimizer_stage": runner.index,
        "scaler": runner.scaler.state_dict(),
        "position": vars(run.position).copy(),
        "global_step": run.position.global_step,
        "history": run.history,
        "meters": meters,  # one entry per rank
        "skipped_steps": run.skipped_steps,
        "rng": {
            "scheme": "torch.manual_seed(step_seed(seed, rank, global_step)) before every step",
            "seed": run.cfg.run.seed,
        },
    }
    return ckpt.save_checkpoint(run.out / "checkpoints", state, run.cfg.run.keep_checkpoints)


def stop_for_preemption(run: Run) -> None:
    """After rank 0 saved the checkpoint of run.position: wait for it on every rank, then raise Preempted."""
    control_barrier(run.env)  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
    name = run.signals.requested if run.signals is not None and run.signals.requested else "a signal to another rank"
    path = ckpt.checkpoint_path(run.out / "checkpoints", run.position.global_step)
    raise Preempted(name, path, run.position)


def export_student(run: Run) -> Path | None:
    if not run.env.is_main:
        return None
    return ckpt.atomic_save(run.student.state_dict(), run.out / "student.pt")
