"""`fastfit demo`: FitNets end to end on real data (Fashion-MNIST JPEGs from the Debian package).

Four runs through the same engine as ImageNet training: the wide teacher, then the thin student alone, with KD only,
and as a FitNet (the paper's two stages, hints from the teacher of run 1). They are the study's rows for its
thin student with BatchNorm (fastfit/study/plan.py), with the learning rate and temperature the study chose on its
validation split (CHOSEN in plan.py), on one seed: the demo shows what one seed of the study shows, and its
report points to the study's table (mean ± std over 3 seeds) for the verdict. The demo trains on all 60k training
images and evaluates on the 10k test images; the study carves its validation split out of the training images.

Budgets: on a CPU, a class-balanced subset and a few epochs (the whole demo within 10 minutes on 2 cores: DALI's
CPU pipeline feeds it 3× faster than PIL workers did, which bought 16,000 images instead of 12,000 and a KD row);
on a GPU, all images and the configs' 15 epochs. The report folder gets summary.json, report.md and accuracy.png.
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
from fastfit.study.plan import CHOSEN, Budget, row_overrides, teacher_overrides

logger = logging.getLogger(__name__)

STUDENT = "thin-bn"
# role → (shipped config, the study's row; None: the teacher)
RUNS = (
    ("teacher", "demo_fmnist_teacher", None),
    ("student alone", "demo_fmnist_student", "alone"),
    ("KD only", "demo_fmnist_fitnet", "KD"),
    ("FitNet student", "demo_fmnist_fitnet", "FitNet"),
)
BUDGETS = {
    # Sized on 2 CPU cores: about 7 minutes for the four runs, evaluating on the full 10k test set.
    "cpu": Budget(24000, 3, 16000, 5, 1, 128, (), ()),
    "full": Budget(0, 15, 0, 15, 2, 256, (), ()),
}


def demo_overrides(row: str | None, budget: str) -> list[str]:
    plan = BUDGETS[budget]
    if row is None:
        return teacher_overrides(plan)
    chosen = CHOSEN[STUDENT]
    return row_overrides(row, STUDENT, chosen["lr"], chosen["temperature"], plan)


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

    def run_overrides(role: str, row: str | None) -> list[str]:
        overrides = [
            f"run.output_dir={_quoted(out / role.split()[0].lower())}",
            f"run.device={device}",
            f"run.progress={'true' if progress else 'false'}",
            *demo_overrides(row, budget),
        ]
        if row not in (None, "alone"):
            overrides += ["model.teacher=wide_cnn", f"model.teacher_weights={_quoted(teacher_weights)}"]
        return overrides

    for role, config_name, row in RUNS:  # every run's config first: a bad override must not cost the teacher's run
        load_config(config_name, [*run_overrides(role, row), *extra])
    for role, config_name, row in RUNS:
        overrides = run_overrides(role, row)
        cfg = load_config(config_name, [*overrides, *extra])
        logger.info("\n== %s: %s (%s) ==", role, cfg.model.student, cfg.recipe.name)
        summary = train(cfg)
        results[role] = {"config": config_name, "overrides": overrides, **summary}
        if row is None:
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
