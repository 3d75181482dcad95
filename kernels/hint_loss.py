"""Fused FitNets hint loss: a 1×1 regressor (conv ± bias, optional BatchNorm, optional ReLU) and the hint loss in one
GEMM pass whose regressor output never reaches memory.

    supports_connector(connector) -> bool
    fused_connector_hint_loss(connector, student_feature, teacher_feature, kind) -> 0-dim fp32 loss
    fused_hint_loss(student, teacher, weight, bias=None, *, kind, batch_norm=False, bn_weight=None, bn_bias=None,
                    running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1, eps=1e-5,
                    training=True, relu=False) -> 0-dim fp32 loss

Math, with X the (M = N·H·W, Cs) student rows, A = X Wᵀ, U the teacher rows (M, Ct). Conv bias and BatchNorm fold
into one per-channel affine P = A·a + e:  no BN: a = 1, e = b;  running stats: a = γ/√(σ²_run + ε),
e = β + (b − μ_run)·a;  batch stats: a = γ/√(var_A + ε), e = β − mean_A·a (b cancels), with mean_A, var_A from
the moments of X (hint_loss_stats). Z = relu(P) (or P) is compared with U per sample (see fastfit.distill.losses).
Backward, D = dL/dP (hint_loss_tiles):  dβ = Σ_m D,  dγ = Σ_m D·x̂,  and with batch statistics
dY = a⊙(D − Σ_m D/M − x̂⊙Σ_m D·x̂/M) = a⊙D + c1⊙(A − mean_A) − a⊙Σ_m D/M, c1 = −a·r²·Σ_m D·(A − mean_A)/M,
so dX = dY·W and dW = dYᵀX reduce to GEMMs over D plus Cs × Cs corrections (hint_loss_grads). The conv bias gets
Σ_m dY, which is exactly zero under batch statistics.

Launches of a training call with batch statistics (no torch launch between them; every reduction across programs
is finished inside the kernel that made its partials, by the last program to arrive: hint_loss_common.tickets):
  prepare   moments of X: μ and the shifted Gram Gc (hint_loss_stats, one launch) → W·Gc, which also rounds W to the
            feature dtype → every per-channel quantity a, e, center, r, mean_A, var_A and the running statistics'
            update (hint_loss_channels). A separate op (fastfit::hint_prepare) because it mutates the running stats.
  forward   regressor GEMM + loss epilogue (2·M·Cs·Ct FLOPs; reads X, W, T); the same launch finishes the per-sample
            sums, the backward's per-sample coefficients and the loss (hint_loss_finalize)
  backward  Cs ≤ 256, bf16 (hint_loss_fused_bwd): one pass recomputes A, writes D and accumulates DᵀX, then finishes
            the per-channel gradients and dW; otherwise dP (hint_loss_tiles, writes D) → dW with the per-channel
            gradients (hint_loss_grads). Then Wᵀ·diag(c1)·W (hint_loss_stats) → dX (2·M·Ct·Cs + 2·M·Cs²).
Memory: D is one (M, Ct) buffer in the grad dtype (bf16 for bf16 features, else fp32), live only during backward:
M·Ct·2 bytes in bf16 — 51 MB for layer4 (12,544 × 2048) and 103 MB for layer3 (50,176 × 1024) at batch 256, the
size of the teacher feature. Recomputing dY inside the dX GEMM instead would redo the regressor GEMM once per Cs
tile, so the buffer is the faster trade.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .hint_loss_channels import BATCH_STATS, CHANNEL_ROWS, NO_BN, RUNNING_STATS, channel_affine, channel_grads
from .hint_loss_checks import check_hint_inputs, unpack_connector
from .hint_loss_common import check_runnable
from .hint_loss_fused_bwd import fused_backward_fits, hint_backward_fused
from .hint_loss_grads import hint_grad_student, hint_grad_weight_and_channels
from .hint_loss_stats import fp32_matmul, hint_moments
from .hint_loss_tiles import hint_backward_dp, hint_forward_loss


def _fp32_math(device: torch.device):
    # Autocast stays enabled inside a custom op's implementation; its small matmuls (batch statistics, BatchNorm
    # corrections) must stay fp32.
    return torch.autocast(device.type, enabled=False)


def regressor_stats(w_lp: Tensor, feature_mean: Tensor, feature_gram: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean_A, var_A, W·Gc) of A = X Wᵀ from X's moments (μ, Gc over m rows), fp32. No fp32 torch matmul: those
    follow torch.backends.cuda.matmul.allow_tf32, and TF32 would cost ~1e-3 of the variance. W·Gc runs as 3×TF32
    MMAs (fp32-accurate) and is kept for the backward; mean_A and var_A come from the per-channel kernel."""
    wg = fp32_matmul(w_lp, feature_gram)
    chan = channel_affine(BATCH_STATS, w_lp, feature_mean, wg, m, None, None, None, None, None, 0.0)
    return chan[4], chan[5], wg


@torch.library.custom_op("fastfit::hint_prepare", mutates_args=("update_mean", "update_var", "update_count"))
def _hint_prepare_op(
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    feature_mean: Optional[Tensor],
    feature_gram: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    update_mean: Optional[Tensor],
    update_var: Optional[Tensor],
    update_count: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    bn_mode: int,
    m: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(w_lp, chan (6, Ct), W·Gc or empty): the weight in the GEMM's dtype and every per-channel quantity, from
    detached parameters (the hint op's own backward differentiates through them). update_*: the running statistics
    a training call with batch statistics updates in place, as nn.BatchNorm2d does (else None)."""
    with _fp32_math(weight.device):
        return _prepare(
            weight,
            bias,
            bn_weight,
            bn_bias,
            feature_mean,
            feature_gram,
            running_mean,
            running_var,
            update_mean,
            update_var,
            update_count,
            momentum,
            eps,
            bn_mode,
            m,
            dtype,
        )


def _prepare(
    weight,
    bias,
    bn_weight,
    bn_bias,
    feature_mean,
    feature_gram,
    running_mean,
    running_var,
    update_mean,
    update_var,
    update_count,
    momentum,
    eps,
    bn_mode,
    m,
    dtype,
):
    ct = weight.shape[0]
    weight = weight.reshape(ct, -1)
    wg = weight.new_empty((0,), dtype=torch.float32)
    if bn_mode == BATCH_STATS and weight.dtype != dtype:
        # W·Gc (kept for the backward's dW) rounds W to the feature dtype and writes it: the GEMMs' operand
        w_lp = weight.new_empty(weight.shape, dtype=dtype)
        wg = fp32_matmul(weight, feature_gram, a_as=w_lp)
    else:
        w_lp = weight.to(dtype, copy=True)  # the GEMMs' operand; batch statistics use the same values
        if bn_mode == BATCH_STATS:
            wg = fp32_matmul(w_lp, feature_gram)
    update = (update_mean, update_var, update_count) if update_mean is not None else None
    # One launch: (6, Ct) rows a, e, center, r, mean_A, var_A and the running statistics' update.
    chan = channel_affine(
        bn_mode,
        w_lp,
        feature_mean,
        wg,
        m,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        eps,
        update,
        momentum,
    )
    return w_lp, chan, wg


@_hint_prepare_op.register_fake
def _(weight, bias, bn_weight, bn_bias, feature_mean, feature_gram, *rest):
    bn_mode, dtype = rest[-3], rest[-1]
    ct = weight.shape[0]
    cs = weight.numel() // ct
    f32 = torch.float32
    return (
        weight.new_empty((ct, cs), dtype=dtype),
        weight.new_empty((CHANNEL_ROWS, ct), dtype=f32),
        weight.new_empty((ct, cs) if bn_mode == BATCH_STATS else (0,), dtype=f32),
    )


@torch.library.custom_op("fastfit::hint_loss", mutates_args=())
def _hint_loss_op(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    feature_mean: Optional[Tensor],
    w_lp: Tensor,
    chan: Tensor,
    wg: Tensor,
    bn_mode: int,
    relu: bool,
    kind: str,
) -> tuple[Tensor, Tensor]:
    """(loss, per-sample coefficients (2, N) fp32 kept for the backward). weight, bias, bn_weight and bn_bias are
    here for their gradients; the forward reads w_lp and chan (hint_prepare)."""
    with _fp32_math(student.device):
        return _forward(student, teacher, w_lp, chan, relu, kind)


def _forward(student, teacher, w_lp, chan, relu, kind):
    return hint_forward_loss(student, teacher, w_lp, chan[0], chan[1], relu, kind)


@_hint_loss_op.register_fake
def _(student, teacher, *rest):
    return (
        student.new_empty((), dtype=torch.float32),
        student.new_empty((2, student.shape[0]), dtype=torch.float32),
    )


@torch.library.custom_op("fastfit::hint_loss_backward", mutates_args=())
def _hint_loss_backward_op(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    feature_mean: Optional[Tensor],
    w_lp: Tensor,
    chan: Tensor,
    wg: Tensor,
    coef: Tensor,
    bn_mode: int,
    relu: bool,
    need_student: bool,
    need_weight: bool,
    need_bias: bool,
    need_bn: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dX, dW, d bias, dγ, dβ), each empty unless wanted; no torch launch between the kernels."""
    with _fp32_math(student.device):
        return _backward_grads(
            grad,
            student,
            teacher,
            weight,
            bias,
            bn_weight,
            bn_bias,
            feature_mean,
            w_lp,
            chan,
            wg,
            coef,
            bn_mode,
            relu,
            need_student,
            need_weight,
            need_bias,
            need_bn,
        )


def _backward_grads(
    grad,
    student,
    teacher,
    weight,
    bias,
    bn_weight,
    bn_bias,
    feature_mean,
    w_lp,
    chan,
    wg,
    coef,
    bn_mode,
    relu,
    need_student,
    need_weight,
    need_bias,
    need_bn,
):
    n, cs, h, w = student.shape
    m = n * h * w
    scale, shift, center = chan[0], chan[1], chan[2]  # from the forward's per-channel kernel
    batch = bn_mode == BATCH_STATS
    want_sums = batch or need_bias or (need_bn and bn_mode != NO_BN)
    grad_dtype = torch.bfloat16 if student.dtype == torch.bfloat16 else torch.float32
    f32 = torch.float32
    dtypes = tuple(p.dtype if p is not None else f32 for p in (bn_bias, bn_weight, bias))

    def none():  # a distinct empty per unwanted output: a custom op's outputs may not alias each other
        return student.new_empty((0,))

    d_student, d_weight = none(), none()
    if fused_backward_fits(cs, grad_dtype, student.device):
        # One launch: D, its column sums, DᵀX, the per-channel gradients, Wa, g0 and dW (hint_loss_fused_bwd).
        d, bn_coef, d_beta, d_gamma, d_bias, weight_a, g0, dw = hint_backward_fused(
            student,
            teacher,
            w_lp,
            chan,
            coef,
            grad,
            wg if batch else None,
            feature_mean,
            weight,
            bn_mode,
            relu,
            want_sums,
            need_student,
            need_weight,
            grad_dtype,
            dtypes,
        )
        if need_weight:
            d_weight = dw
    else:
        d, col_part = hint_backward_dp(
            student, teacher, w_lp, scale, shift, center, coef, grad, relu, want_sums, grad_dtype
        )
        if need_weight:
            # One launch: dW and, from the column sums, dγ, dβ, the bias gradient, c1, a·Σ dP, g0 and Wa.
            bn_coef, d_beta, d_gamma, d_bias, weight_a, g0, d_weight = hint_grad_weight_and_channels(
                d, student, col_part, chan, w_lp, wg if batch else None, feature_mean, weight, bn_mode, dtypes
            )
        else:
            bn_coef, d_beta, d_gamma, d_bias, weight_a, g0 = channel_grads(
                bn_mode, col_part, chan, w_lp, m, grad_dtype, dtypes
            )
    if need_student:
        g1 = fp32_matmul(w_lp.t(), w_lp, scale_k=bn_coef[0]) if batch else None  # Wᵀ·diag(c1)·W
        d_student = hint_grad_student(d, weight_a, student, feature_mean, g1, g0 if batch else None)
    d_bias = d_bias if need_bias else none()
    if not need_bn:
        d_gamma, d_beta = none(), none()
    return d_student, d_weight, d_bias, d_gamma, d_beta


@_hint_loss_backward_op.register_fake
def _(grad, student, teacher, weight, bias, bn_weight, bn_bias, *rest):
    need_student, need_weight, need_bias, need_bn = rest[-4:]

    def none():
        return student.new_empty((0,))

    return (
        torch.empty_like(student) if need_student else none(),
        torch.empty_like(weight) if need_weight else none(),
        torch.empty_like(bias) if need_bias else none(),
        torch.empty_like(bn_weight) if need_bn else none(),
        torch.empty_like(bn_bias) if need_bn else none(),
    )


def _setup_context(ctx, inputs, output):
    student, teacher, weight, bias, bn_weight, bn_bias, feature_mean, w_lp, chan, wg, bn_mode, relu, _kind = inputs
    _, coef = output
    ctx.save_for_backward(student, teacher, weight, bias, bn_weight, bn_bias, feature_mean, w_lp, chan, wg, coef)
    ctx.config = (bn_mode, relu)


def _backward(ctx, grad_loss, _grad_coef):
    need = ctx.needs_input_grad
    need_bn = ctx.saved_tensors[4] is not None and (need[4] or need[5])
    grads = _hint_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.config, need[0], need[2], need[3], need_bn)
    d_student, d_weight, d_bias, d_gamma, d_beta = grads
    return (
        d_student if need[0] else None,
        None,
        d_weight if need[2] else None,
        d_bias if need[3] else None,
        d_gamma if need[4] else None,
        d_beta if need[5] else None,
        *([None] * 7),
    )


_hint_loss_op.register_autograd(_backward, setup_context=_setup_context)


def supports_connector(connector: nn.Module) -> bool:
    """True for nn.Sequential(Conv2d 1×1 stride 1 padding 0 dilation 1 groups 1 [, BatchNorm2d] [, ReLU])."""
    return not isinstance(unpack_connector(connector), str)


def fused_connector_hint_loss(
    connector: nn.Module, student_feature: Tensor, teacher_feature: Tensor, kind: str
) -> Tensor:
    """The hint loss of connector(student_feature) against teacher_feature, fused (see fused_hint_loss).

    Args:
        connector: nn.Sequential(Conv2d 1×1 stride 1 padding 0 dilation 1 groups 1 [, BatchNorm2d] [, ReLU]) — the
            MMRazor connector and the paper's 1×1 regressor (supports_connector tells). BatchNorm follows the
            module's training flag exactly like nn.BatchNorm2d: batch statistics and running-stat updates in
            training, running statistics in eval.
        student_feature: (N, Cs, H, W) fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1), any strides
            (channels-last is the fast path).
        teacher_feature: (N, Ct, H, W), the student's device; gets no gradient.
        kind: "normalized_l2" (MMRazor), "half_sq" (the paper's ½‖·‖²/N) or "mse".

    Returns:
        The 0-dim fp32 loss; backward fills the student feature's and the connector's gradients.

    Raises:
        ValueError: a connector of another form (the message names the layer that cannot be fused), or a
            feature of the wrong rank, dtype, device or shape (see fused_hint_loss).
    """
    parts = unpack_connector(connector)
    if isinstance(parts, str):
        raise ValueError(parts)
    conv, bn, relu = parts
    if bn is None:
        return fused_hint_loss(student_feature, teacher_feature, conv.weight, conv.bias, kind=kind, relu=relu)
    return fused_hint_loss(
        student_feature,
        teacher_feature,
        conv.weight,
        conv.bias,
        kind=kind,
        batch_norm=True,
        bn_weight=bn.weight,
        bn_bias=bn.bias,
        running_mean=bn.running_mean,
        running_var=bn.running_var,
        num_batches_tracked=bn.num_batches_tracked,
        momentum=bn.momentum,
        eps=bn.eps,
        training=bn.training,
        relu=relu,
    )


def fused_hint_loss(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    kind: str,
    batch_norm: bool = False,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    training: bool = True,
    relu: bool = False,
) -> Tensor:
    """hint_loss(relu?(bn?(conv1x1(student, weight, bias))), teacher, kind) without materializing the regressor output.

    The 1×1 GEMM runs in the student's dtype (the weight is cast to it, as autocast would) with fp32 accumulation on
    tensor cores (3×TF32 for fp32 features); BatchNorm statistics and the loss are fp32-accurate whatever
    torch.backends.cuda.matmul.allow_tf32 says. No host sync: CUDA-graph capturable.

    Args:
        student: (N, Cs, H, W) fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1), channels-last (fast) or
            any strides, read in place.
        teacher: (N, Ct, H, W), the student's device; gets no gradient.
        weight: (Ct, Cs) or (Ct, Cs, 1, 1) regressor weight, fp32/bf16/fp16.
        bias: (Ct,) conv bias or None.
        kind: "normalized_l2" Σ‖y/‖y‖ − u/‖u‖‖²/N (MMRazor), "half_sq" ½Σ(y − u)²/N (paper) or "mse".
        batch_norm: apply BatchNorm2d to the regressor output.
        bn_weight, bn_bias: (Ct,) γ and β, or None (no affine).
        running_mean, running_var: (Ct,) running statistics (both or neither). Batch statistics are used when
            training or when there are none; a training call updates them in place (unbiased variance) and adds 1
            to num_batches_tracked, as nn.BatchNorm2d does.
        num_batches_tracked: 0-dim int64 counter, or None.
        momentum: running-stat momentum; None for a cumulative average.
        eps: BatchNorm's ε.
        training: BatchNorm's mode.
        relu: apply ReLU after BatchNorm.

    Returns:
        The 0-dim fp32 loss.

    Raises:
        ValueError: an unknown kind; a feature that is not 4-D, is empty or of another dtype; shapes that do not
            agree (teacher (N, Ct, H, W), weight (Ct, Cs[, 1, 1]), vectors (Ct,)); tensors on other devices;
            BatchNorm parameters without batch_norm; only one of running_mean/running_var; batch statistics over a
            single value per channel; a CPU tensor without the interpreter. Each message names the argument and
            what was expected.
    """
    check_hint_inputs(
        student, teacher, weight, bias, kind, batch_norm, bn_weight, bn_bias, running_mean, running_var, training
    )
    check_runnable(student, "the student feature")
    mode = NO_BN if not batch_norm else (BATCH_STATS if training or running_mean is None else RUNNING_STATS)
    feature_mean = feature_gram = None
    if mode == BATCH_STATS:
        feature_mean, feature_gram = hint_moments(student.detach())
    running = (running_mean, running_var) if mode == RUNNING_STATS else (None, None)
    # A training call with batch statistics updates the running statistics, as nn.BatchNorm2d does.
    update = (running_mean, running_var, num_batches_tracked) if mode == BATCH_STATS and training else (None,) * 3
    n, _, h, w = student.shape
    params = [p.detach() if p is not None else None for p in (weight, bias, bn_weight, bn_bias)]
    w_lp, chan, wg = _hint_prepare_op(
        *params, feature_mean, feature_gram, *running, *update, momentum, float(eps), mode, n * h * w, student.dtype
    )
    loss, _ = _hint_loss_op(
        student,
        teacher.detach(),
        weight,
        bias,
        bn_weight,
        bn_bias,
        feature_mean,
        w_lp,
        chan,
        wg,
        mode,
        bool(relu),
        kind,
    )
    return loss
