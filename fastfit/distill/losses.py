"""Distillation losses: the reference math (fp32, the oracle for the fused kernels and the CPU path) and the
modules the trainer uses, which dispatch to fastfit.kernels' fused Triton ops when asked.

Hint losses compare a regressor output y = r(v) with the teacher's hint feature u, per sample flattened:
  half_sq        ½ Σ (y − u)² / N                  (FitNets paper, per-sample sum, batch mean)
  normalized_l2  Σ (y/‖y‖ − u/‖u‖)² / N            (MMRazor L2Loss normalize=True; = mean_n 2 − 2 cos(y_n, u_n))
  mse            Σ (y − u)² / numel                (plain MSE)
KD compares temperature-softened distributions P^τ = softmax(z/τ), teacher detached, per row:
  kl             Σ_c P_T^τ (log P_T^τ − log P_S^τ)
  ce             −Σ_c P_T^τ log P_S^τ              (the paper's H(P_T^τ, P_S^τ))
reduced by `batchmean` (/N), `mean` (/(N·C), MMRazor) or `sum`, times τ² when tau_squared.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HINT_KINDS = ("normalized_l2", "half_sq", "mse")
KD_REDUCTIONS = ("batchmean", "mean", "sum")
KD_FORMS = ("kl", "ce")
_NORM_EPS = 1e-12  # an all-zero feature map (possible after ReLU) normalizes to zero instead of NaN


def hint_loss_reference(regressed: Tensor, teacher: Tensor, kind: str) -> Tensor:
    if kind not in HINT_KINDS:
        raise ValueError(f"expected hint loss kind in {HINT_KINDS}, got {kind!r}")
    if regressed.shape != teacher.shape:
        raise ValueError(
            f"expected the regressor output and teacher feature to match, got {tuple(regressed.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    n = regressed.shape[0]
    y = regressed.float().reshape(n, -1)
    u = teacher.detach().float().reshape(n, -1)
    if kind == "normalized_l2":
        y = y / y.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        return (y - u).pow(2).sum() / n
    if kind == "half_sq":
        return 0.5 * (y - u).pow(2).sum() / n
    return (y - u).pow(2).mean()


def kd_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: str = "batchmean",
    tau_squared: bool = True,
    form: str = "kl",
) -> Tensor:
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"expected KD reduction in {KD_REDUCTIONS}, got {reduction!r}")
    if form not in KD_FORMS:
        raise ValueError(f"expected KD form in {KD_FORMS}, got {form!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"expected student and teacher logits of one (N, C) shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    p_t = log_p_t.exp()
    per_element = p_t * (log_p_t - log_p_s) if form == "kl" else -p_t * log_p_s
    total = per_element.sum()
    if reduction == "batchmean":
        total = total / student_logits.shape[0]
    elif reduction == "mean":
        total = total / student_logits.numel()
    return total * temperature**2 if tau_squared else total


class KDLoss(nn.Module):
    """Temperature KD, optionally with the student's cross-entropy on hard labels from the same logits.

    Args:
        temperature: τ > 0; both distributions are softmax(logits / τ).
        reduction: "batchmean" (÷N), "mean" (÷N·C, MMRazor) or "sum".
        tau_squared: multiply by τ² (Hinton's gradient scaling; the FitNets paper's form has none).
        form: "kl" (KL(P_T ‖ P_S)) or "ce" (the paper's H(P_T^τ, P_S^τ); same gradient, differs by P_T's entropy).
        label_smoothing: for the cross-entropy on hard labels.
        fused: compute both from one Triton pass per row (fastfit.kernels.fused_kd_loss); needs CUDA or
            TRITON_INTERPRET=1.

    Forward: (student_logits (N, C), teacher_logits (N, C), labels (N,) int64 or None) → (kd, ce), scalar fp32
    tensors; ce is None without labels. The teacher's logits are detached.

    Raises:
        ValueError: an unknown reduction or form, or (from forward) logits of different or non-(N, C) shapes.
    """

    def __init__(
        self,
        temperature: float,
        reduction: str = "batchmean",
        tau_squared: bool = True,
        form: str = "kl",
        label_smoothing: float = 0.0,
        fused: bool = False,
    ):
        super().__init__()
        if reduction not in KD_REDUCTIONS or form not in KD_FORMS:
            raise ValueError(
                f"expected reduction in {KD_REDUCTIONS} and form in {KD_FORMS}, got {reduction!r}, {form!r}"
            )
        self.temperature = temperature
        self.reduction = reduction
        self.tau_squared = tau_squared
        self.form = form
        self.label_smoothing = label_smoothing
        self.fused = fused
        if fused:
            from fastfit.kernels import fused_kd_loss, fused_kd_objective  # only when asked: pulls in Triton

            self._fused_kd_loss = fused_kd_loss
            self._fused_kd_objective = fused_kd_objective

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None):
        if self.fused:
            return self._fused_kd_loss(
                student_logits,
                teacher_logits,
                labels,
                self.temperature,
                self.reduction,
                self.tau_squared,
                self.form,
                self.label_smoothing,
            )
        kd = kd_loss_reference(
            student_logits, teacher_logits, self.temperature, self.reduction, self.tau_squared, self.form
        )
        ce = None
        if labels is not None:
            ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=self.label_smoothing)
        return kd, ce

    def fused_objective(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, kd_weight: Tensor, ce_weight: float
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(kd_weight·kd + ce_weight·ce, kd, ce) with fused=True: one differentiable output whose student gradient
        the forward pass writes (fastfit.kernels.fused_kd_objective); kd and ce are for logging, ce None without
        labels or with ce_weight 0. kd_weight: a 0-dim fp32 tensor on the logits' device."""
        if not self.fused:
            raise ValueError("expected a KDLoss built with fused=True for fused_objective; call it directly instead")
        return self._fused_kd_objective(
            student_logits,
            teacher_logits,
            labels,
            kd_weight,
            ce_weight,
            self.temperature,
            self.reduction,
            self.tau_squared,
            self.form,
            self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, tau_squared={self.tau_squared}, "
            f"form={self.form!r}, fused={self.fused}"
        )


class HintLoss(nn.Module):
    """Connector (regressor) + hint loss. With fused=True (and a 1×1 connector) the regressor output never reaches
    memory.

    Args:
        connector: maps the student's guided-layer feature onto the teacher's hint shape (build_connector).
        kind: "normalized_l2" (MMRazor), "half_sq" (the paper's ½‖·‖²) or "mse" (see the module docstring).
        fused: use fastfit.kernels.fused_connector_hint_loss (a 1×1 conv [+ BatchNorm2d] [+ ReLU] connector only).

    Forward: (student_feature (N, Cs, H, W), teacher_feature (N, Ct, H', W')) → the scalar fp32 loss; the teacher
    feature is detached; BatchNorm running statistics update in training mode as the connector's own forward would.

    Raises:
        ValueError: an unknown kind, a connector the fused op cannot take, or mismatched shapes in forward.
    """

    def __init__(self, connector: nn.Module, kind: str, fused: bool = False):
        super().__init__()
        if kind not in HINT_KINDS:
            raise ValueError(f"expected hint loss kind in {HINT_KINDS}, got {kind!r}")
        self.connector = connector
        self.kind = kind
        self.fused = fused
        if fused:
            from fastfit.kernels import (
                fused_connector_hint_loss,
                supports_connector,
            )  # only when asked: pulls in Triton

            if not supports_connector(connector):
                raise ValueError(
                    f"expected a connector the fused hint op supports (1×1 conv [+ BatchNorm2d] [+ ReLU]), "
                    f"got {' → '.join(map(repr, connector.children())) or repr(connector)}; use fused=False for it"
                )
            self._fused_hint_loss = fused_connector_hint_loss

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        if self.fused:
            return self._fused_hint_loss(self.connector, student_feature, teacher_feature, self.kind)
        return hint_loss_reference(self.connector(student_feature), teacher_feature, self.kind)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, fused={self.fused}"
