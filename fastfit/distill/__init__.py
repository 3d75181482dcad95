"""The FitNets math: hint and KD losses (reference and fused dispatch), connectors (regressors), feature taps,
the per-stage student and teacher modules, and the recipes as plans of stages. Depends on config and kernels only.

A new loss goes in losses.py (its reference math, plus a kernel in kernels/ if it is worth fusing); a new recipe
is a preset in fastfit.config.RECIPE_PRESETS and a plan of stages in recipes.py.
"""

from fastfit.distill.connectors import build_connector
from fastfit.distill.losses import HintLoss, KDLoss, hint_loss_reference, kd_loss_reference

__all__ = ["HintLoss", "KDLoss", "build_connector", "hint_loss_reference", "kd_loss_reference"]
