"""Recipes as plans of training stages.

- fitnets-paper (Romero et al. 2015): stage 1 "hint" trains the student up to its guided layer(s) plus the
  regressors on the hint loss alone; stage 2 "kd" trains the whole student on CE + λ·H(P_T^τ, P_S^τ), λ annealed
  linearly (4 → 1 by default), τ = 3.
- mmrazor (backbone & logits): one "joint" stage, CE + Σ weight·L2(hint) + weight·KL(τ) from the start.
- supervised: one stage of plain cross-entropy (the teacher itself, or the student alone as a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastfit.config import Config


@dataclass(frozen=True)
class Stage:
    name: str  # "hint" | "kd" | "joint" | "supervised"
    epochs: int
    use_hints: bool
    use_kd: bool
    use_ce: bool
    truncated: bool  # the student runs only up to its guided layers (no logits)
    constant_lr: float | None  # a fixed learning rate instead of optim's schedule

    @property
    def uses_teacher(self) -> bool:
        return self.use_hints or self.use_kd


def build_stages(cfg: Config) -> list[Stage]:
    recipe = cfg.recipe
    epochs = cfg.optim.epochs
    if recipe.name == "supervised":
        return [Stage("supervised", epochs, False, False, True, False, None)]
    if recipe.name == "mmrazor":
        return [Stage("joint", epochs, bool(recipe.hints), recipe.kd is not None, True, False, None)]
    stages = []
    if recipe.hint_epochs > 0:
        stages.append(Stage("hint", recipe.hint_epochs, True, False, False, True, recipe.hint_lr or cfg.optim.lr))
    stages.append(Stage("kd", epochs, False, True, True, False, None))
    return stages
