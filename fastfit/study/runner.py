"""`fastfit study fmnist`: the teacher, a search on the validation split, then 3 seeds × 2 students × 4 rows on test.

Resumable: every finished run leaves `result.json` in its folder (out/runs/<phase>/...), written atomically after
the run; running the command again skips those runs and resumes an interrupted one from its newest checkpoint.
So the study can be run in parts (`--phase search`, then `--phase final`), or stopped and started again.

Phases:
  search  seed 0, trained on the study's training split, top-1 on the validation split (split.py): per student,
          the student alone at each learning rate of the grid; then, at the chosen rate, the KD row at each
          temperature. The winners (highest validation top-1) are used by every row of the final phase.
  final   for each seed: per student, the four rows (plan.py), top-1 on the 10k test images.
The test set is read by the final phase only, and nothing is chosen from it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fastfit.config import load_config
from fastfit.engine.loop import train
from fastfit.errors import ConfigError
from fastfit.perf.measure import environment, write_results
from fastfit.study.plan import BUDGETS, ROWS, STUDENTS, Budget, lr_grid, row_overrides, teacher_overrides
from fastfit.study.report import results_table
from fastfit.study.split import VAL_PER_CLASS, ensure_study_split

logger = logging.getLogger(__name__)

PHASES = ("search", "final", "all")
SEARCH_SEED = 0


class Study:
    def __init__(self, out: Path, budget: Budget, device: str, extra: list[str], progress: bool, data: Path):
        self.out = out
        self.budget = budget
        self.device = device
        self.extra = extra
        self.progress = progress
        self.data = data
        self.walls: list[float] = []
        self.remaining = 0

    def run(self, name: str, config: str, overrides: list[str], seed: int, val_dir: str) -> dict[str, Any]:
        """One training run, or its recorded result when it finished before."""
        folder = self.out / "runs" / name
        done = folder / "result.json"
        if done.is_file():
            logger.info("skip %s (done)", name)
            self.remaining -= 1
            return json.loads(done.read_text())
        eta = f", about {statistics.mean(self.walls) * self.remaining / 60:.0f} min left" if self.walls else ""
        logger.info("\n== study run %s (%d to go%s) ==", name, self.remaining, eta)
        every = [
            'data.dataset="imagefolder"',  # the study's own folders, not the Fashion-MNIST export's train/val
            f'data.root="{self.data}"',
            'data.train_dir="train"',
            f'data.val_dir="{val_dir}"',
            f"run.seed={seed}",
            f'run.output_dir="{folder}"',
            f"run.device={self.device}",
            f"run.progress={'true' if self.progress else 'false'}",
            "run.tensorboard=false",
        ]
        cfg = load_config(config, [*overrides, *every, *self.extra])
        cfg.run.eval_every = cfg.optim.epochs  # one evaluation, at the end: the study reports final top-1 only
        started = time.perf_counter()
        summary = train(cfg, resume="auto")
        self.walls.append(time.perf_counter() - started)
        self.remaining -= 1
        result = {
            "name": name,
            "config": config,
            "overrides": overrides,
            "seed": seed,
            "eval_split": val_dir,
            **summary,
        }
        tmp = done.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        os.replace(tmp, done)
        return result


def _top1(result: dict[str, Any]) -> float:
    return (result.get("final") or {}).get("top1", float("nan"))


def _epochs(result: dict[str, Any]) -> int:
    return len([h for h in result["history"] if "train_seconds" in h])


def _compact(result: dict[str, Any], **extra) -> dict[str, Any]:
    return {
        "name": result["name"],
        "seed": result["seed"],
        "eval_split": result["eval_split"],
        "top1": _top1(result),
        "params": result["student_params"],
        "epochs": _epochs(result),
        "wall_seconds": result["wall_seconds"],
        "teacher_top1": (result.get("teacher_metrics") or {}).get("top1"),
        "overrides": result["overrides"],
        "history": result["history"],
        **extra,
    }


def run_study(
    out: str | Path = "reports/study",
    budget: str | Budget = "auto",
    device: str = "auto",
    seeds: tuple[int, ...] = (0, 1, 2),
    phase: str = "all",
    extra: list[str] | tuple[str, ...] = (),
    progress: bool = False,
    *,
    export: Path | None = None,
    val_per_class: int = VAL_PER_CLASS,
) -> dict[str, Any]:
    """Run (or finish) the study; returns the results written to out/study.json (and out/report.md).
    `export` and `val_per_class`: another Fashion-MNIST JPEG export and validation size (tests use small ones)."""
    if phase not in PHASES:
        raise ConfigError(f"unknown study phase {phase!r}; choose from {', '.join(PHASES)}")
    if not seeds:
        raise ConfigError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2")
    gpu = device != "cpu" and torch.cuda.is_available()
    if isinstance(budget, str):
        name = ("full" if gpu else "cpu") if budget == "auto" else budget
        if name not in BUDGETS:
            raise ConfigError(f"unknown study budget {budget!r}; choose from auto, {', '.join(BUDGETS)}")
        budget = BUDGETS[name]
    out = Path(out)
    for config_name in ("demo_fmnist_teacher", "demo_fmnist_student", "demo_fmnist_fitnet"):
        for seed in seeds:  # before the data export and the teacher: a bad override or seed costs nothing
            load_config(config_name, [*extra, f"run.seed={seed}"])
    study = Study(out, budget, device, list(extra), progress, ensure_study_split(out / "data", export, val_per_class))
    students = list(STUDENTS)
    search_runs = len(students) * (len(budget.lrs) + len(budget.temperatures))
    study.remaining = 1 + search_runs + (len(seeds) * len(students) * len(ROWS) if phase != "search" else 0)
    started = time.perf_counter()

    teacher = study.run("teacher", "demo_fmnist_teacher", teacher_overrides(budget), SEARCH_SEED, "val")
    teacher_weights = f'model.teacher_weights="{out / "runs" / "teacher" / "student.pt"}"'
    with_teacher = ["model.teacher=wide_cnn", teacher_weights]

    search: dict[str, Any] = {}
    chosen: dict[str, dict[str, float]] = {}
    for student in students:
        lrs = {}
        for lr in lr_grid(student, budget):
            overrides = row_overrides("alone", student, lr, budget.temperatures[0], budget)
            result = study.run(f"search/{student}/alone/lr{lr}", "demo_fmnist_student", overrides, SEARCH_SEED, "val")
            lrs[lr] = _compact(result, lr=lr)
        lr = max(lrs, key=lambda k: _top1_or_zero(lrs[k]["top1"]))
        temps = {}
        for tau in budget.temperatures:
            overrides = [*row_overrides("KD", student, lr, tau, budget), *with_teacher]
            result = study.run(f"search/{student}/KD/tau{tau}", "demo_fmnist_fitnet", overrides, SEARCH_SEED, "val")
            temps[tau] = _compact(result, temperature=tau)
        tau = max(temps, key=lambda k: _top1_or_zero(temps[k]["top1"]))
        chosen[student] = {"lr": lr, "temperature": tau}
        search[student] = {"lr": list(lrs.values()), "temperature": list(temps.values()), "chosen": chosen[student]}

    runs: list[dict[str, Any]] = []
    if phase != "search":
        for seed in seeds:
            for student in students:
                lr, tau = chosen[student]["lr"], chosen[student]["temperature"]
                for row in ROWS:
                    overrides = row_overrides(row, student, lr, tau, budget)
                    config = "demo_fmnist_student" if row == "alone" else "demo_fmnist_fitnet"
                    if row != "alone":
                        overrides = [*overrides, *with_teacher]
                    result = study.run(f"final/{student}/{row}/seed{seed}", config, overrides, seed, "test")
                    runs.append(_compact(result, student=student, row=row))

    report = {
        "budget": budget.__dict__,
        "device": "cuda" if gpu else "cpu",
        "seeds": list(seeds),
        "split": {k: v for k, v in json.loads((study.data / "split.json").read_text()).items() if k != "val_indices"},
        "teacher": _compact(teacher),
        "search": search,
        "runs": runs,
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    write_results(out / "study.json", report)
    table = results_table(report)
    (out / "report.md").write_text(f"# fastfit study: Fashion-MNIST\n\n{table}\n")
    logger.info("\n%s\n\nresults: %s", table, out / "study.json")
    return {"environment": environment(), **report}


def _top1_or_zero(value: float) -> float:
    return value if value == value else 0.0  # NaN (a diverged run) never wins
