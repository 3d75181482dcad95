"""`fastfit demo`: FitNets end to end on real data (Fashion-MNIST JPEGs from the Debian package).

Three runs through the same engine as ImageNet training: the wide teacher, the thin student alone, and the thin
student as a FitNet (paper recipe, hints from the teacher trained in run 1). The shipped demo configs hold the
full-scale settings used on a GPU; without one, a CPU budget (a class-balanced subset and fewer epochs) keeps the
whole demo within 10 minutes on 2 cores. The report folder gets summary.json, report.md and accuracy.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from fastfit.config import load_config
from fastfit.demo.report import write_report
from fastfit.engine.loop import train

logger = logging.getLogger(__name__)

RUNS = (
    ("teacher", "demo_fmnist_teacher"),
    ("student alone", "demo_fmnist_student"),
    ("FitNet student", "demo_fmnist_fitnet"),
)

# Sized on 2 CPU cores: the three runs take about 5 minutes together, evaluating on the full 10k test set.
# The teacher, the fastest model per image, gets twice the images so it has something to teach.
CPU_BUDGET = {
    "common": ["data.train_subset=12000", "optim.batch_size=128"],
    "teacher": ["data.train_subset=24000", "optim.epochs=3", "optim.milestones=[2]"],
    "student alone": ["optim.epochs=4", "optim.milestones=[3]"],
    "FitNet student": ["optim.epochs=4", "optim.milestones=[3]", "recipe.hint_epochs=1"],
}


def demo_overrides(role: str, budget: str) -> list[str]:
    if budget == "full":
        return []
    return CPU_BUDGET["common"] + CPU_BUDGET[role]


def run_demo(
    out: str | Path = "reports/demo",
    budget: str = "auto",
    device: str = "auto",
    extra: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    if budget == "auto":
        budget = "full" if (device != "cpu" and torch.cuda.is_available()) else "cpu"
    started = time.perf_counter()
    results: dict[str, Any] = {}
    teacher_weights = None

    def role_overrides(role: str) -> list[str]:
        return [
            f"run.output_dir={_quoted(out / role.split()[0].lower())}",
            f"run.device={device}",
            f"run.progress={'true' if progress else 'false'}",
            *demo_overrides(role, budget),
        ]

    for role, config_name in RUNS:  # every run's config first: a bad override must not cost the teacher's training
        load_config(config_name, [*role_overrides(role), *extra])
    for role, config_name in RUNS:
        overrides = role_overrides(role)
        if role == "FitNet student":
            overrides.append(f"model.teacher_weights={_quoted(teacher_weights)}")
        cfg = load_config(config_name, [*overrides, *extra])
        logger.info("\n== %s: %s (%s) ==", role, cfg.model.student, cfg.recipe.name)
        summary = train(cfg)
        results[role] = {"config": config_name, "overrides": overrides, **summary}
        if role == "teacher":
            teacher_weights = out / "teacher" / "student.pt"  # the engine exports the trained model here
    report = {
        "budget": budget,
        "device": "cuda" if (device != "cpu" and torch.cuda.is_available()) else "cpu",
        "wall_seconds": time.perf_counter() - started,
        "runs": results,
    }
    table = write_report(out, report)
    logger.info("\n%s", table)
    logger.info("\nreport: %s  plot: %s  data: %s", out / "report.md", out / "accuracy.png", out / "summary.json")
    return report


def _quoted(path: Path | None) -> str:
    return '"' + str(path).replace("\\", "/") + '"'
