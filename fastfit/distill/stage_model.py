"""The student side and the teacher side of one training stage, as modules DDP can wrap and torch.compile can trace.

Connectors are built once per run from the tapped shapes (a dry forward, so users never type channel counts)
and shared by the stages that use them; the student's parameters are shared with its FX extractors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastfit.config import Config, HintConfig
from fastfit.distill.connectors import build_connector
from fastfit.distill.losses import HintLoss, KDLoss
from fastfit.distill.recipes import Stage
from fastfit.distill.taps import LOGITS, build_extractor, check_tap_paths, infer_shapes


def hint_key(index: int) -> str:
    return f"hint{index}"


def build_connectors(cfg: Config, teacher: nn.Module | None, student: nn.Module) -> nn.ModuleDict:
    hints = cfg.recipe.hints
    if not hints:
        return nn.ModuleDict()
    check_tap_paths(student, [h.student for h in hints], "student", cfg.model.student)
    check_tap_paths(teacher, [h.teacher for h in hints], "teacher", cfg.model.teacher)
    student_shapes = infer_shapes(
        build_extractor(student, sorted({h.student for h in hints}), logits=False),
        cfg.data.image_size,
        _device_of(student),
    )
    teacher_shapes = infer_shapes(
        build_extractor(teacher, sorted({h.teacher for h in hints}), logits=False),
        cfg.data.image_size,
        _device_of(teacher),
    )
    return nn.ModuleDict(
        {
            hint_key(i): build_connector(
                h.connector,
                student_shapes[h.student],
                teacher_shapes[h.teacher],
                h.activation,
                where=f"recipe.hints[{i}] ({h.student} → {h.teacher})",
            )
            for i, h in enumerate(hints)
        }
    )


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def fusable(connector: nn.Module) -> bool:
    """Whether the fused hint op covers this connector (1×1 ones); others, e.g. k×k paper regressors, run unfused."""
    from fastfit.kernels import supports_connector

    return supports_connector(connector)


class TeacherModel(nn.Module):
    """The frozen teacher's taps for one stage: hint features and/or logits, nothing past the last one needed."""

    def __init__(self, teacher: nn.Module, hints: list[HintConfig], stage: Stage):
        super().__init__()
        paths = sorted({h.teacher for h in hints}) if stage.use_hints else []
        self.extractor = build_extractor(teacher, paths, logits=stage.use_kd)
        self.eval()

    def train(self, mode: bool = True):  # the teacher stays in eval mode whatever the caller asks
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.extractor(images)


class StageModel(nn.Module):
    """Student forward + connectors + losses for one stage; returns (total loss, unweighted terms, logits)."""

    def __init__(
        self,
        cfg: Config,
        stage: Stage,
        student: nn.Module,
        connectors: nn.ModuleDict,
        fused_kd: bool = False,
        fused_hint: bool = False,
    ):
        super().__init__()
        recipe = cfg.recipe
        self.stage = stage
        self.hints = list(recipe.hints) if stage.use_hints else []
        paths = sorted({h.student for h in self.hints})
        self.extractor = build_extractor(student, paths, logits=not stage.truncated)
        self.hint_losses = nn.ModuleList(
            HintLoss(connectors[hint_key(i)], h.loss, fused=fused_hint and fusable(connectors[hint_key(i)]))
            for i, h in enumerate(self.hints)
        )
        self.kd = None
        if stage.use_kd:
            kd = recipe.kd
            self.kd = KDLoss(
                kd.temperature,
                kd.reduction,
                kd.tau_squared,
                kd.form,
                label_smoothing=cfg.optim.label_smoothing,
                fused=fused_kd,
            )
        self.ce_weight = recipe.ce_weight
        self.label_smoothing = cfg.optim.label_smoothing

    def forward(self, images: Tensor, labels: Tensor, teacher_out: dict[str, Tensor], kd_weight: Tensor):
        features = self.extractor(images)
        logits = features.get(LOGITS)
        terms: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        for hint, loss_fn in zip(self.hints, self.hint_losses, strict=True):
            value = loss_fn(features[hint.student], teacher_out[hint.teacher])
            terms[f"hint/{hint.student}"] = value
            total = total + hint.weight * value
        ce = None
        if self.kd is not None and self.kd.fused:
            # One fused output for λ·kd + w·ce: its gradient is written by the forward pass, and the backward is
            # free when that output's upstream gradient is 1 (a plain loss.backward(), no GradScaler).
            ce_weight = self.ce_weight if self.stage.use_ce else 0.0
            labels_ce = labels if self.stage.use_ce else None
            objective, terms["kd"], ce = self.kd.fused_objective(
                logits, teacher_out[LOGITS], labels_ce, kd_weight.float(), ce_weight
            )
            total = total + objective
            if self.stage.use_ce:
                if ce is None:  # a zero ce_weight: the objective has no ce term; logged all the same
                    ce = F.cross_entropy(logits.detach().float(), labels, label_smoothing=self.label_smoothing)
                terms["ce"] = ce
            return total, terms, logits
        if self.kd is not None:
            kd, ce = self.kd(logits, teacher_out[LOGITS], labels if self.stage.use_ce else None)
            terms["kd"] = kd
            total = total + kd_weight * kd
        if self.stage.use_ce:
            if ce is None:
                ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            terms["ce"] = ce
            total = total + self.ce_weight * ce
        return total, terms, logits
