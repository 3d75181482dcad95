"""What the study trains: its students, its rows (methods), its budgets and the search grid.

Students:
  thin, BN      the demo's `fitnet_thin` (9 conv layers, 8–16 channels, BatchNorm): plain training works well.
  deep, no BN   `fitnet_thin` with 5 convs per stage (15 conv layers) and no BatchNorm, He-initialized: the FitNets
                paper's regime, a thin deep plain ReLU stack that plain SGD struggles to fit.
Rows, all from ONE teacher (`wide_cnn`, trained once on the study's training split): every method learns from the
same teacher, so the rows differ only by method, and the spread over seeds measures student training alone.
  alone    CE only.
  KD       CE + λ·H(P_T^τ, P_S^τ), λ 4 → 1 (the paper's second stage, without the hint stage).
  FitNet   the paper's two stages: hint training of the student up to its guided layer (stage2 → the teacher's
           stage2, convolutional regressor), then the KD row's objective.
  joint    MMRazor's style: CE + hint (normalized L2, weight 10, MMRazor's connector) + the KD row's KD, from the start.
Every row gets the same number of epochs in all (FitNet: hint epochs + KD epochs), the same images and its
student's learning rate chosen on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

STUDENTS = {
    "thin-bn": {"model.student": "fitnet_thin", "model.student_kwargs": "{depth_per_stage=3}"},
    "deep-nobn": {
        "model.student": "fitnet_thin",
        "model.student_kwargs": '{depth_per_stage=5, batch_norm=false, init="kaiming"}',
    },
}
ROWS = ("alone", "KD", "FitNet", "joint")
HINT = '{student="stage2", teacher="stage2", connector="paper", loss="mse", weight=1.0}'
JOINT_HINT = '{student="stage2", teacher="stage2", connector="mmrazor", loss="normalized_l2", weight=10.0}'


@dataclass(frozen=True)
class Budget:
    """Images and epochs of every run (the same for every row: a fair comparison)."""

    teacher_images: int  # 0: all
    teacher_epochs: int
    images: int  # student runs; 0: all
    epochs: int  # in all, per row
    hint_epochs: int  # FitNet's share of `epochs` spent in the hint stage
    batch_size: int
    lrs: tuple[float, ...]  # searched per student, for the student alone; every row uses the winner
    temperatures: tuple[float, ...]  # searched with the KD row


BUDGETS = {
    # Sized on 2 CPU cores: about 30 minutes for the teacher, the search and 3 seeds × 2 students × 4 rows.
    "cpu": Budget(24000, 4, 8000, 6, 1, 128, (0.02, 0.05, 0.1), (2.0, 4.0)),
    # For a GPU: all 50,000 training images and the demo configs' 15 epochs.
    "full": Budget(0, 15, 0, 15, 2, 256, (0.02, 0.05, 0.1), (2.0, 3.0, 4.0)),
}
# What the study's search chose on its validation split (docs/results/study_fmnist.json, "search"; a test keeps the
# two equal). The demo trains with these.
CHOSEN = {"thin-bn": {"lr": 0.05, "temperature": 4.0}, "deep-nobn": {"lr": 0.004, "temperature": 4.0}}
LR_DEEP_SCALE = 0.2  # the no-BN student's grid: plain deep ReLU stacks need smaller steps (0.1 diverges)


def lr_grid(student: str, budget: Budget) -> tuple[float, ...]:
    scale = LR_DEEP_SCALE if student == "deep-nobn" else 1.0
    return tuple(round(lr * scale, 6) for lr in budget.lrs)


def _schedule(budget: Budget, epochs: int) -> list[str]:
    milestone = max(1, round(epochs * 0.75))
    return [
        f"optim.epochs={epochs}",
        f"optim.milestones=[{milestone}]" if milestone < epochs else "optim.milestones=[]",
    ]


def teacher_overrides(budget: Budget) -> list[str]:
    return [
        "model.student=wide_cnn",
        "recipe.name=supervised",
        "optim.lr=0.05",
        f"optim.batch_size={budget.batch_size}",
        f"data.train_subset={budget.teacher_images}",
        *_schedule(budget, budget.teacher_epochs),
    ]


def row_overrides(row: str, student: str, lr: float, temperature: float, budget: Budget) -> list[str]:
    """The overrides (on the demo student's config) that make one run of the study."""
    kd = (
        f'recipe.kd={{temperature={temperature}, weight=4.0, weight_end=1.0, reduction="batchmean", '
        'tau_squared=false, form="ce"}'
    )
    common = [
        *(f"{key}={value}" for key, value in STUDENTS[student].items()),
        f"optim.lr={lr}",
        f"optim.batch_size={budget.batch_size}",
        f"data.train_subset={budget.images}",
    ]
    if row == "alone":
        return [*common, "recipe.name=supervised", *_schedule(budget, budget.epochs)]
    if row == "KD":
        return [*common, "recipe.name=mmrazor", "recipe.hints=[]", kd, *_schedule(budget, budget.epochs)]
    if row == "joint":
        return [*common, "recipe.name=mmrazor", f"recipe.hints=[{JOINT_HINT}]", kd, *_schedule(budget, budget.epochs)]
    if row == "FitNet":
        return [
            *common,
            "recipe.name=fitnets-paper",
            f"recipe.hints=[{HINT}]",
            kd,
            f"recipe.hint_epochs={budget.hint_epochs}",
            f"recipe.hint_lr={lr}",
            *_schedule(budget, budget.epochs - budget.hint_epochs),
        ]
    raise ValueError(f"unknown study row {row!r}; expected one of {ROWS}")
