"""What one training run holds between its stages and checkpoints: where it stands (Position) and what it is made
of (Run), with the run's part of a checkpoint (Run.state_dict / load_state_dict).

Who changes a Run: the loop (fastfit.engine.loop) moves it from epoch to epoch and stage to stage and appends to
its history; the stage runner moves it from step to step and counts skipped steps. Everything else only reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fastfit.config import Config
from fastfit.data import DataBundle
from fastfit.dist import DistEnv
from fastfit.distill.recipes import Stage
from fastfit.engine.metrics_log import MetricsLog
from fastfit.engine.preemption import StopSignals
from fastfit.engine.runtime import Runtime


@dataclass
class Position:
    """Where training stands: the next (stage, epoch within stage, step within epoch) to run."""

    stage: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Run:
    """The models, data and progress of one run (every rank holds its own)."""

    cfg: Config
    env: DistEnv
    rt: Runtime
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    connectors: nn.ModuleDict
    stages: list[Stage]
    out: Path
    metrics: MetricsLog
    position: Position = field(default_factory=Position)
    history: list[dict[str, Any]] = field(default_factory=list)
    restored: dict[str, Any] | None = None  # the checkpoint resumed from, until its stage has loaded it
    signals: StopSignals | None = None  # preemption requests (installed by train())
    skipped_steps: int = 0  # steps skipped for non-finite losses (run.nonfinite = "skip")
    # Config changes accepted on resume: [{"global_step": g, "changes": {"optim.epochs": [2, 3]}}, …]
    config_history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """The run's part of a checkpoint: config, weights, position and history (the stage runner adds its own)."""
        return {
            "config": self.cfg.to_dict(),
            "student": self.student.state_dict(),
            "connectors": self.connectors.state_dict(),
            "position": asdict(self.position),
            "global_step": self.position.global_step,
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "config_history": self.config_history,
            "rng": {
                "scheme": "torch.manual_seed(step_seed(seed, rank, global_step)) before every step",
                "seed": self.cfg.run.seed,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's run part; the stage runner of `state["optimizer_stage"]` loads the rest."""
        self.student.load_state_dict(state["student"])
        self.connectors.load_state_dict(state["connectors"])
        self.position = Position(**state["position"])
        self.history = list(state.get("history", []))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.config_history = list(state.get("config_history", []))
        self.restored = state


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The global RNG seed before a step: a function of (seed, rank, step), so a resumed run draws the same."""
    return (seed * 1_000_003 + rank) * 1_000_000_007 + global_step
