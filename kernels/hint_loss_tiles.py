"""The regressor GEMM with the hint loss in its epilogue: forward (loss sums) and the backward's first pass (dP).

Per output tile (BLOCK_M rows of X, BLOCK_N regressor channels) both kernels compute A = X Wᵀ in fp32 and
    P = A·scale_c + shift_c        (conv bias + BatchNorm folded into one per-channel affine, see hint_loss.py)
    Z = relu(P) or P,  U = teacher tile
and never write A, P or Z. Only small per-row / per-channel partial sums leave the tile, so the M × Ct regressor
output costs no HBM traffic in the forward pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hint_loss_common import (
    INTERPRET,
    KIND_CODES,
    NORM_EPS,
    check_runnable,
    fixed_meta,
    mma_mode,
    needs_int64,
    output_tile,
    row_offsets,
    tickets,
    tile_for,
    tuned,
    widen,
)
from .hint_loss_finalize import finish_rows
from .rounding import cast, mma

FINISH_BLOCK = 32 if INTERPRET else 64  # rows (then samples) per step of the forward's per-sample sums and loss


@triton.jit
def _regress_tile(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    s_rows,  # (BLOCK_M,) element offsets of this tile's X rows
    rows_ok,  # (BLOCK_M,) rows < M
    stride_sc,  # student stride over C
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype (the GEMM operand)
    stride_wo,  # weight stride over output channels
    stride_wi,  # weight stride over input channels
    cols,  # (BLOCK_N,) this tile's output channels
    cols_ok,  # (BLOCK_N,) channels < Ct
    CS,  # student channels (GEMM K forward, N of dX)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # K step of the GEMM loop (autotuned)
    MODE: tl.constexpr,  # MMA operands: "bf16", "fp16" or "tf32x3" (see rounding.mma)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CS, BLOCK_K):
        ks = widen(k0 + tl.arange(0, BLOCK_K), INDEX_64)
        k_ok = ks < CS
        x = tl.load(s_ptr + s_rows[:, None] + ks[None, :] * stride_sc, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + cols[None, :] * stride_wo + ks[:, None] * stride_wi,
            mask=k_ok[:, None] & cols_ok[None, :],
            other=0.0,
        )
        acc = mma(x, w, acc, MODE, EMULATE)
    return acc


@triton.jit
def _tile(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    t_ptr,  # (N, Ct, H, W) teacher feature U, the student's dtype, any strides
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype (the GEMM operand)
    scale_ptr,  # (Ct,) fp32 per-channel scale a of P = A·a + e (bias and BatchNorm folded)
    shift_ptr,  # (Ct,) fp32 per-channel shift e
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    CT,  # regressor output channels
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    s_sn,  # student strides (elements) over N
    s_sc,  # … over C
    s_sh,  # … over H
    s_sw,  # … over W
    t_sn,  # teacher strides over N
    t_sc,  # … over C
    t_sh,  # … over H
    t_sw,  # … over W
    w_so,  # weight stride over output channels
    w_si,  # weight stride over input channels
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # K step of the GEMM loop (autotuned)
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped program order (autotuned)
    MODE: tl.constexpr,  # MMA operands: "bf16", "fp16" or "tf32x3" (see rounding.mma)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    """This program's output tile, shared by both kernels: A = X Wᵀ, P = A·scale + shift and the teacher tile U."""
    num_m, pid_m, pid_n, rows, cols, rows_ok, cols_ok = output_tile(M, CT, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    num_n = tl.cdiv(CT, BLOCK_N)
    acc = _regress_tile(
        s_ptr,
        row_offsets(rows, HW, W, s_sn, s_sh, s_sw),
        rows_ok,
        s_sc,
        w_ptr,
        w_so,
        w_si,
        cols,
        cols_ok,
        CS,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        MODE,
        EMULATE,
        INDEX_64,
    )
    scale = tl.load(scale_ptr + cols, mask=cols_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=cols_ok, other=0.0)
    p = acc * scale[None, :] + shift[None, :]
    ok = rows_ok[:, None] & cols_ok[None, :]
    t_rows = row_offsets(rows, HW, W, t_sn, t_sh, t_sw)
    u = tl.load(t_ptr + t_rows[:, None] + cols[None, :] * t_sc, mask=ok, other=0.0).to(tl.float32)
    return num_m, num_n, pid_m, pid_n, rows, cols, rows_ok, cols_ok, ok, acc, p, u


@triton.jit
def _hint_fwd_kernel(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    t_ptr,  # (N, Ct, H, W) teacher feature U, the student's dtype, any strides
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype (the GEMM operand)
    scale_ptr,  # (Ct,) fp32 per-channel scale a of P = A·a + e (bias and BatchNorm folded)
    shift_ptr,  # (Ct,) fp32 per-channel shift e
    part_ptr,  # fp32 partial sums, one slot per program (layout in the comment below)
    sums_ptr,  # (S, N) fp64 out: per-sample sums (hint_loss_finalize)
    coef_ptr,  # (2, N) fp32 out: per-sample backward coefficients at an upstream gradient of 1
    loss_ptr,  # () fp32 out: the loss
    ticket_ptr,  # 1 + N int32 ticket slots, zero at rest
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    CT,  # regressor output channels
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    NSAMPLES,  # N
    s_sn,  # student strides (elements) over N
    s_sc,  # … over C
    s_sh,  # … over H
    s_sw,  # … over W
    t_sn,  # teacher strides over N
    t_sc,  # … over C
    t_sh,  # … over H
    t_sw,  # … over W
    w_so,  # weight stride over output channels
    w_si,  # weight stride over input channels
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # K step of the GEMM loop (autotuned)
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped program order (autotuned)
    RELU: tl.constexpr,  # Z = relu(P) (else Z = P)
    KIND: tl.constexpr,  # 0 half_sq, 1 mse, 2 normalized_l2 (three sums per row rather than one)
    EPS: tl.constexpr,  # norm clamp of normalized L2
    FINISH_BLOCK: tl.constexpr,  # rows (samples) per step of the per-sample sums and the loss
    MODE: tl.constexpr,  # MMA operands: "bf16", "fp16" or "tf32x3" (see rounding.mma)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # Loss sums per row m of this tile's channel block j (part has shape (R, num_n, M), fp32):
    #   NORMALIZED: Σ_c Z², Σ_c Z·U, Σ_c U²   → per sample ‖y‖², y·u, ‖u‖² → Σ_n ‖y/‖y‖ − u/‖u‖‖² / N
    #   otherwise:  Σ_c (Z − U)²              → ½Σ/N (half_sq) or Σ/(M·Ct) (mse)
    # Per tile: reads BLOCK_M×Cs of X, Cs×BLOCK_N of W, BLOCK_M×BLOCK_N of T; writes R·BLOCK_M fp32.
    # Whole op: X is read Ct/BLOCK_N times (from L2 with grouped order), T once; 2·M·Cs·Ct FLOPs.
    num_m, num_n, pid_m, pid_n, rows, cols, rows_ok, cols_ok, ok, acc, p, u = _tile(
        s_ptr,
        t_ptr,
        w_ptr,
        scale_ptr,
        shift_ptr,
        M,
        CS,
        CT,
        HW,
        W,
        s_sn,
        s_sc,
        s_sh,
        s_sw,
        t_sn,
        t_sc,
        t_sh,
        t_sw,
        w_so,
        w_si,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        GROUP_M,
        MODE,
        EMULATE,
        INDEX_64,
    )
    z = p
    if RELU:
        z = tl.maximum(z, 0.0)
    # No masking of Z needed: padded columns are exactly 0 (W, scale, shift and T load as 0) and padded rows only
    # reach their own, unstored, row sums.
    out = part_ptr + pid_n * M + rows
    if KIND == 2:
        tl.store(out, tl.sum(z * z, axis=1), mask=rows_ok)
        tl.store(out + num_n * M, tl.sum(z * u, axis=1), mask=rows_ok)
        tl.store(out + 2 * num_n * M, tl.sum(u * u, axis=1), mask=rows_ok)
    else:
        d = z - u
        tl.store(out, tl.sum(d * d, axis=1), mask=rows_ok)
    first_row = pid_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, M) - 1
    finish_rows(
        part_ptr,
        sums_ptr,
        coef_ptr,
        loss_ptr,
        ticket_ptr,
        first_row,
        last_row,
        M,
        HW,
        num_n,
        NSAMPLES,
        CT,
        BLOCK_M,
        KIND,
        EPS,
        FINISH_BLOCK,
    )


@triton.jit
def _hint_bwd_dp_kernel(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    t_ptr,  # (N, Ct, H, W) teacher feature U, the student's dtype, any strides
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype (the GEMM operand)
    scale_ptr,  # (Ct,) fp32 per-channel scale a of P = A·a + e (bias and BatchNorm folded)
    shift_ptr,  # (Ct,) fp32 per-channel shift e
    center_ptr,  # (Ct,) fp32 BatchNorm centre of A (mean_A, or running mean − bias)
    coef_ptr,  # (2, N) fp32 per-sample α, β of the forward (hint_loss_finalize), for an upstream gradient of 1
    grad_ptr,  # () fp32 upstream gradient of the loss
    d_ptr,  # (M, Ct) D = dL/dP, row-major, bf16 for bf16 features else fp32
    part_ptr,  # fp32 partial sums, one slot per program (layout in the comment below)
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    CT,  # regressor output channels
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    NSAMPLES,  # N: samples (rows of coef)
    s_sn,  # student strides (elements) over N
    s_sc,  # … over C
    s_sh,  # … over H
    s_sw,  # … over W
    t_sn,  # teacher strides over N
    t_sc,  # … over C
    t_sh,  # … over H
    t_sw,  # … over W
    w_so,  # weight stride over output channels
    w_si,  # weight stride over input channels
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # K step of the GEMM loop (autotuned)
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped program order (autotuned)
    RELU: tl.constexpr,  # Z = relu(P) (else Z = P)
    SUMS: tl.constexpr,  # also the column sums Σ dP, Σ dP·(A − centre) for BatchNorm and bias gradients
    MODE: tl.constexpr,  # MMA operands: "bf16", "fp16" or "tf32x3" (see rounding.mma)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # Gradient of the loss at P (before ReLU), per sample n = m // (H·W) with coefficients from the forward sums:
    #   dL/dZ = α_n Z + β_n U    (normalized: α = 2(y·u)/(N‖y‖³‖u‖), β = −2/(N‖y‖‖u‖); half_sq: α = −β = g/N;
    #                             mse: α = −β = 2g/(M·Ct); grad_output g folded into α, β)
    #   dP = dL/dZ · [P > 0]     (ReLU), stored as D (M × Ct, row-major) for the dX and dW GEMMs.
    # SUMS: per tile-row block, column sums Σ_m dP and Σ_m dP·(A − center) for BatchNorm's and the bias' gradients.
    # Per tile: reads as the forward, writes BLOCK_M×BLOCK_N of D and 2·BLOCK_N fp32. Whole op: 2·M·Cs·Ct FLOPs.
    num_m, num_n, pid_m, pid_n, rows, cols, rows_ok, cols_ok, ok, acc, p, u = _tile(
        s_ptr,
        t_ptr,
        w_ptr,
        scale_ptr,
        shift_ptr,
        M,
        CS,
        CT,
        HW,
        W,
        s_sn,
        s_sc,
        s_sh,
        s_sw,
        t_sn,
        t_sc,
        t_sh,
        t_sw,
        w_so,
        w_si,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        GROUP_M,
        MODE,
        EMULATE,
        INDEX_64,
    )
    z = p
    if RELU:
        z = tl.maximum(p, 0.0)
    sample = rows // HW
    g = tl.load(grad_ptr)
    alpha = tl.load(coef_ptr + sample, mask=rows_ok, other=0.0) * g
    beta = tl.load(coef_ptr + NSAMPLES + sample, mask=rows_ok, other=0.0) * g
    dp = alpha[:, None] * z + beta[:, None] * u
    if RELU:
        dp = tl.where(p > 0.0, dp, 0.0)
    # Padded rows load α = β = 0 and padded columns have Z = U = 0, so dP is already 0 there for the column sums.
    tl.store(d_ptr + rows[:, None] * CT + cols[None, :], cast(dp, d_ptr.dtype.element_ty, EMULATE), mask=ok)
    if SUMS:
        center = tl.load(center_ptr + cols, mask=cols_ok, other=0.0)
        tl.store(part_ptr + pid_m * CT + cols, tl.sum(dp, axis=0), mask=cols_ok)
        tl.store(part_ptr + (num_m + pid_m) * CT + cols, tl.sum(dp * (acc - center[None, :]), axis=0), mask=cols_ok)


_hint_fwd = tuned(_hint_fwd_kernel)
_hint_bwd_dp = tuned(_hint_bwd_dp_kernel)


def _layout_args(student: Tensor, teacher: Tensor, weight_lp: Tensor) -> tuple:
    n, cs, h, w = student.shape
    return (
        n * h * w,
        cs,
        teacher.shape[1],
        h * w,
        w,
        student.stride(0),
        student.stride(1),
        student.stride(2),
        student.stride(3),
        teacher.stride(0),
        teacher.stride(1),
        teacher.stride(2),
        teacher.stride(3),
        weight_lp.stride(0),
        weight_lp.stride(1),
    )


def hint_forward_loss(
    student: Tensor, teacher: Tensor, weight_lp: Tensor, scale: Tensor, shift: Tensor, relu: bool, kind: str
) -> tuple[Tensor, Tensor]:
    """(0-dim fp32 loss, (2, N) fp32 per-sample backward coefficients at an upstream gradient of 1), one launch."""
    check_runnable(student, "the student feature")
    n = student.shape[0]
    args = _layout_args(student, teacher, weight_lp)
    m, ct = args[0], args[2]
    block_m, block_n = tile_for(student.dtype, student.device)
    num_n = triton.cdiv(ct, block_n)
    normalized = kind == "normalized_l2"
    part = torch.empty((3 if normalized else 1, num_n, m), device=student.device, dtype=torch.float32)
    sums = torch.empty((3 if normalized else 1, n), device=student.device, dtype=torch.float64)
    coef = torch.empty((2, n), device=student.device, dtype=torch.float32)
    loss = torch.empty((), device=student.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m) * num_n,)
    _hint_fwd[grid](
        student,
        teacher,
        weight_lp,
        scale,
        shift,
        part,
        sums,
        coef,
        loss,
        tickets(student.device, n + 1),
        *args[:5],
        n,
        *args[5:],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        RELU=relu,
        KIND=KIND_CODES[kind],
        EPS=NORM_EPS,
        FINISH_BLOCK=FINISH_BLOCK,
        MODE=mma_mode(student.dtype),
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(student, teacher, part),
        **fixed_meta(),
    )
    return loss, coef


def hint_backward_dp(
    student: Tensor,
    teacher: Tensor,
    weight_lp: Tensor,
    scale: Tensor,
    shift: Tensor,
    center: Tensor,
    coef: Tensor,
    grad: Tensor,
    relu: bool,
    sums: bool,
    grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    """D = dL/dP as an (M, Ct) matrix of grad_dtype (the forward's per-sample coefficients `coef` (2, N) times the
    0-dim upstream gradient `grad`), and when
    sums the (2, row blocks, Ct) fp32 column partial sums
    of dP and dP·(A − center) (hint_loss_channels.channel_grads reduces them)."""
    n = student.shape[0]
    args = _layout_args(student, teacher, weight_lp)
    m, ct = args[0], args[2]
    block_m, block_n = tile_for(student.dtype, student.device)
    num_m = triton.cdiv(m, block_m)
    d = torch.empty((m, ct), device=student.device, dtype=grad_dtype)
    part = torch.empty((2, num_m, ct) if sums else (0,), device=student.device, dtype=torch.float32)
    grid = (num_m * triton.cdiv(ct, block_n),)
    _hint_bwd_dp[grid](
        student,
        teacher,
        weight_lp,
        scale,
        shift,
        center,
        coef,
        grad,
        d,
        part,
        *args[:5],
        n,
        *args[5:],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        RELU=relu,
        SUMS=sums,
        MODE=mma_mode(student.dtype),
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(student, teacher, d, part),
        **fixed_meta(),
    )
    return d, (part if sums else None)
