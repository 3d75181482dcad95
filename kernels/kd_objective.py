"""The trainer's whole KD + CE objective as one differentiable output, its gradient written by the forward pass.

    objective, kd, ce = fused_kd_objective(student_logits, teacher_logits, labels, kd_weight, ce_weight,
                                           temperature, reduction, tau_squared, form, label_smoothing=0.0)

objective = kd_weight·kd + ce_weight·ce. Because there is one output, the forward can write G = d(objective)/ds
for an upstream gradient of exactly 1 (loss.backward() of a sum, no GradScaler) while it has the row in registers;
the backward is one check-and-fix launch that returns at once in that case and otherwise recomputes G from the
logits. Traffic and the reasoning are in the comment opening kd_loss._kd_loss_fwd_kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kd_loss import (
    IGNORE_INDEX,
    INTERPRET,
    STATS,
    _device_guard,
    _forward,
    _grad_rows,
    _kd_scale,
    _launch_shape,
    _load_row_stats,
)
from .kd_loss_checks import check_kd_inputs


@triton.jit
def _kd_objective_bwd_kernel(
    s_ptr,  # (N, C) student logits, unit stride over classes
    t_ptr,  # (N, C) teacher logits
    y_ptr,  # (N,) int64 labels; a placeholder without labels
    stats_ptr,  # (N, STATS) fp32: the forward's row statistics
    out_ptr,  # (N, C) in/out: the forward's G, rewritten when its bet does not hold (or RECOMPUTE)
    grad_ptr,  # () fp32: the objective's upstream gradient, read on the device (no host sync)
    kd_weight_ptr,  # () fp32: the objective's weight of kd
    n_valid_ptr,  # () fp32: the forward's count of rows with a label
    N,  # rows
    C_VEC,  # classes / VEC
    s_stride_vec,  # student row stride / VEC
    t_stride_vec,  # teacher row stride / VEC
    y_stride,  # label stride
    inv_tau,  # 1 / temperature
    eps,  # label smoothing ε
    kd_grad_scale,  # kd_scale / τ
    ce_weight,  # the objective's weight of ce
    VEC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_LABELS: tl.constexpr,  # the objective has a ce term
    RECOMPUTE: tl.constexpr,  # out_ptr holds no G yet (a second backward into a fresh buffer): always write
    EMULATE: tl.constexpr,
):
    # The forward wrote G for g = 1 and n_valid = N. Every program checks that bet (8 B read) and returns when it
    # holds; else it rewrites its rows with the exact gradient, scales g·kd_weight·kd_scale/τ and g·ce_weight/n_valid
    # on ignored-label-aware rows — from s and t, never from G, so a second backward (retain_graph) is exact too.
    g = tl.load(grad_ptr)
    redo = g != 1.0
    n_valid = 1.0
    if HAS_LABELS:
        n_valid = tl.load(n_valid_ptr)
        redo = redo | (n_valid != N)
    if RECOMPUTE:
        redo = redo | True
    if redo:
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        m_s, log_d_a, m_t, log_d_b, log_d_1 = _load_row_stats(stats_ptr, rows64, row_ok, HAS_LABELS)
        g_kd = g * tl.load(kd_weight_ptr) * kd_grad_scale
        y = tl.zeros((ROWS,), tl.int64)
        row_scale = tl.zeros((ROWS,), tl.float32)
        if HAS_LABELS:
            y = tl.load(y_ptr + rows64 * y_stride, mask=row_ok, other=IGNORE_INDEX)
            row_scale = tl.where(y != IGNORE_INDEX, g * ce_weight / n_valid, 0.0)
        _grad_rows(
            s_ptr, t_ptr, out_ptr, rows64, row_ok, y, m_s, log_d_a, m_t, log_d_b, log_d_1, g_kd, row_scale,
            C_VEC * VEC, s_stride_vec * VEC, t_stride_vec * VEC, inv_tau, eps, BLOCK_C, HAS_LABELS, EMULATE,
        )  # fmt: skip


def _objective_backward(
    grad_s, s, t, labels, stats, grad, kd_weight, n_valid, ce_weight, temperature, reduction, tau_squared,
    label_smoothing, recompute,
):  # fmt: skip
    n, c = s.shape
    has_labels = labels is not None
    vec, block_c, rows, warps = _launch_shape(c, s.stride(0), t.stride(0))
    y, y_stride = (labels, labels.stride(0)) if has_labels else (stats, 0)
    with _device_guard(s.device):
        _kd_objective_bwd_kernel[(triton.cdiv(n, rows),)](
            s,
            t,
            y,
            stats,
            grad_s,
            grad,
            kd_weight,
            n_valid,
            n,
            c // vec,
            s.stride(0) // vec,
            t.stride(0) // vec,
            y_stride,
            1.0 / temperature,
            label_smoothing,
            _kd_scale(n, c, temperature, reduction, tau_squared) / temperature,
            float(ce_weight),
            VEC=vec,
            ROWS=rows,
            BLOCK_C=block_c,
            HAS_LABELS=has_labels,
            RECOMPUTE=recompute,
            EMULATE=INTERPRET,
            num_warps=warps,
        )


@torch.library.custom_op("fastfit::kd_objective_fwd", mutates_args=())
def _kd_objective_fwd_op(
    s: Tensor,
    t: Tensor,
    labels: Optional[Tensor],
    kd_weight: Tensor,
    ce_weight: float,
    temperature: float,
    reduction: str,
    tau_squared: bool,
    form: str,
    label_smoothing: float,
    emit_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kd, ce, n_valid, stats, objective, grad = _forward(
        s, t, labels, temperature, reduction, tau_squared, form, label_smoothing, kd_weight, ce_weight, emit_grad
    )
    return objective, kd, ce, n_valid, stats, grad


@_kd_objective_fwd_op.register_fake
def _(s, t, labels, kd_weight, ce_weight, temperature, reduction, tau_squared, form, label_smoothing, emit_grad):
    scalar = lambda: s.new_empty((), dtype=torch.float32)  # noqa: E731
    stats = s.new_empty((s.shape[0], STATS), dtype=torch.float32)
    grad = s.new_empty(tuple(s.shape) if emit_grad else (0,))  # new_empty: contiguous
    return scalar(), scalar(), scalar(), scalar(), stats, grad


@torch.library.custom_op("fastfit::kd_objective_bwd", mutates_args=("grad_s",))
def _kd_objective_bwd_op(
    grad_s: Tensor,
    s: Tensor,
    t: Tensor,
    labels: Optional[Tensor],
    stats: Tensor,
    grad: Tensor,
    kd_weight: Tensor,
    n_valid: Tensor,
    ce_weight: float,
    temperature: float,
    reduction: str,
    tau_squared: bool,
    label_smoothing: float,
    recompute: bool,
) -> None:
    _objective_backward(
        grad_s, s, t, labels, stats, grad, kd_weight, n_valid, ce_weight, temperature, reduction, tau_squared,
        label_smoothing, recompute,
    )  # fmt: skip


@_kd_objective_bwd_op.register_fake
def _(grad_s, s, t, labels, stats, grad, kd_weight, n_valid, ce_weight, *_scalars):
    return None


def _setup_context(ctx, inputs, output):
    s, t, labels, kd_weight, ce_weight, temperature, reduction, tau_squared, _form, label_smoothing, _emit = inputs
    _objective, kd, ce, n_valid, stats, grad = output
    ctx.mark_non_differentiable(kd, ce, n_valid, stats, grad)
    ctx.scalars = (ce_weight, temperature, reduction, tau_squared, label_smoothing)
    ctx.save_for_backward(s, t, labels, stats, kd_weight, n_valid)
    # G is rewritten in place by the backward: kept as an attribute, not a saved tensor, whose version check would
    # refuse a second backward. Non-differentiable, so it holds no reference back to this node.
    ctx.grad_buffer = grad
    ctx.backwards = 0


def _backward(ctx, grad_objective, *_unused):
    s, t, labels, stats, kd_weight, n_valid = ctx.saved_tensors
    # The first backward fixes the forward's G in place and returns it. A later one (retain_graph) must not rewrite
    # a gradient the caller may still hold: it recomputes into a fresh buffer.
    first = ctx.backwards == 0 and ctx.grad_buffer.numel() > 0
    ctx.backwards += 1
    grad_s = ctx.grad_buffer if first else torch.empty_like(s, memory_format=torch.contiguous_format)
    grad = grad_objective.float()  # a no-op for the fp32 objective
    _kd_objective_bwd_op(grad_s, s, t, labels, stats, grad, kd_weight, n_valid, *ctx.scalars, not first)
    return (grad_s,) + (None,) * 10


_kd_objective_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_kd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    kd_weight: Tensor,
    ce_weight: float,
    temperature: float,
    reduction: str = "batchmean",
    tau_squared: bool = True,
    form: str = "kl",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """kd_weight·KD + ce_weight·CE as one output, its student gradient written during the forward pass.

    Args:
        student_logits, teacher_logits, labels, temperature, reduction, tau_squared, form, label_smoothing: as
            fused_kd_loss's.
        kd_weight: 0-dim fp32 tensor on the logits' device (the step's λ, read by the kernels: no host sync).
        ce_weight: a Python number; 0 or labels None: the objective has no cross-entropy term.

    Returns:
        (objective, kd, ce): 0-dim fp32 tensors; only the objective is differentiable (kd and ce are for logging);
        ce is None without a cross-entropy term. When the student logits need a gradient, the forward also writes
        it (one N × C buffer kept until backward); the backward is then free when the objective's upstream gradient
        is exactly 1 and no label is −100, and otherwise recomputes it from the logits (as fused_kd_loss would).

    Raises:
        ValueError: as fused_kd_loss, or kd_weight not a 0-dim float32 tensor on the logits' device, or ce_weight
            not a finite Python number.
    """
    check_kd_inputs(student_logits, teacher_logits, labels, temperature, reduction, tau_squared, form, label_smoothing)
    if not isinstance(kd_weight, Tensor) or kd_weight.shape != () or kd_weight.dtype != torch.float32:
        got = f"{tuple(kd_weight.shape)} {kd_weight.dtype}" if isinstance(kd_weight, Tensor) else repr(kd_weight)
        raise ValueError(f"expected kd_weight as a 0-dim float32 tensor, got {got}")
    if kd_weight.device != student_logits.device:
        raise ValueError(f"expected kd_weight on the logits' device {student_logits.device}, got {kd_weight.device}")
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or ce_weight != ce_weight:
        raise ValueError(f"expected ce_weight as a Python number, got {ce_weight!r}")
    if ce_weight == 0:
        labels = None
    emit_grad = student_logits.requires_grad and torch.is_grad_enabled()
    objective, kd, ce, _n_valid, _stats, _grad = _kd_objective_fwd_op(
        student_logits,
        teacher_logits.detach(),
        labels,
        kd_weight.detach(),
        float(ce_weight),
        float(temperature),
        reduction,
        tau_squared,
        form,
        float(label_smoothing),
        emit_grad,
    )
    return objective, kd, ce if labels is not None else None
