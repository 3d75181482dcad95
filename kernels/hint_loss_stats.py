"""BatchNorm batch statistics of the hint regressor's output without computing that output.

For Y = X Wᵀ + b over the M = N·H·W rows of the student feature X (M × Cs):
    mean(Y_c) = w_c · μ + b_c,   var(Y_c) = w_cᵀ Gc w_c / M,   μ = Σ_m x_m / M,   Gc = Σ_m (x_m − μ)(x_m − μ)ᵀ
so two passes over X (a column sum, then the centered Cs × Cs Gram) replace a pass that would compute the M × Ct
output. Centering before the product, rather than E[xxᵀ] − μμᵀ, keeps the variance accurate when |μ| ≫ σ.
The op `fastfit::hint_moments` returns (μ, Gc) in fp32; it has no autograd: the gradient through the batch
statistics is part of the hint loss's own backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hint_loss_common import (
    INTERPRET,
    INTERPRET_K,
    INTERPRET_TILE,
    SMALL_GEMM_K,
    SMALL_GEMM_TILE,
    STATS_COLS,
    STATS_ROWS,
    check_runnable,
    needs_int64,
    row_offsets,
    split_rows,
    widen,
)
from .rounding import mma


@triton.jit
def _hint_colsum_kernel(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    part_ptr,  # fp32 partial sums, one slot per program (layout in the comment below)
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    stride_n,  # feature strides (elements) over N
    stride_c,  # … over C
    stride_h,  # … over H
    stride_w,  # … over W
    ROWS_PER_PROG,  # rows of M each split-K program reduces (a multiple of the row block)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_C: tl.constexpr,  # channel tile
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # part[s, c] = Σ_{m in split s} X[m, c]. Reads X once (M·Cs elements), writes splits·Cs fp32.
    pid_s = widen(tl.program_id(0), INDEX_64)
    cols = widen(tl.program_id(1), INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_ok = cols < CS
    start = pid_s * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, M)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < end
        offs = row_offsets(rows, HW, W, stride_n, stride_h, stride_w)
        x = tl.load(
            s_ptr + offs[:, None] + cols[None, :] * stride_c, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0
        )
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(part_ptr + pid_s * CS + cols, acc, mask=cols_ok)


@triton.jit
def _hint_gram_kernel(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    mean_ptr,  # (Cs,) fp32 column mean μ of X
    part_ptr,  # fp32 partial sums, one slot per program (layout in the comment below)
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    stride_n,  # feature strides (elements) over N
    stride_c,  # … over C
    stride_h,  # … over H
    stride_w,  # … over W
    ROWS_PER_PROG,  # rows of M each split-K program reduces (a multiple of the row block)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_C: tl.constexpr,  # channel tile
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # part[s, i, j] = Σ_{m in split s} (X[m, i] − μ_i)(X[m, j] − μ_j), only tiles i ≤ j computed (Gc is symmetric),
    # each stored at (i, j) and (j, i). Reads X twice per tile pair from L2; M·Cs²/2 multiply-adds; writes
    # splits·Cs² fp32.
    pid_s = widen(tl.program_id(0), INDEX_64)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    if pid_i <= pid_j:
        ci = widen(pid_i, INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
        cj = widen(pid_j, INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
        ci_ok, cj_ok = ci < CS, cj < CS
        mean_i = tl.load(mean_ptr + ci, mask=ci_ok, other=0.0)
        mean_j = tl.load(mean_ptr + cj, mask=cj_ok, other=0.0)
        start = pid_s * ROWS_PER_PROG
        end = tl.minimum(start + ROWS_PER_PROG, M)
        acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rows_ok = rows < end
            offs = row_offsets(rows, HW, W, stride_n, stride_h, stride_w)
            mi = rows_ok[:, None] & ci_ok[None, :]
            mj = rows_ok[:, None] & cj_ok[None, :]
            xi = tl.load(s_ptr + offs[:, None] + ci[None, :] * stride_c, mask=mi, other=0.0)
            xj = tl.load(s_ptr + offs[:, None] + cj[None, :] * stride_c, mask=mj, other=0.0)
            # Center in fp32 and zero the masked entries again (they would hold −μ). The centred values are fp32 for
            # every feature dtype: rounding them to bf16 would round −μ the same way in every zero of a post-ReLU
            # map, a bias of up to 2⁻⁹ in the variance. 3×TF32 keeps about 22 bits on tensor cores.
            xi = tl.where(mi, xi.to(tl.float32) - mean_i[None, :], 0.0)
            xj = tl.where(mj, xj.to(tl.float32) - mean_j[None, :], 0.0)
            acc = mma(tl.trans(xi), xj, acc, "tf32x3", EMULATE)
        base = part_ptr + pid_s * CS * CS
        ok = ci_ok[:, None] & cj_ok[None, :]
        tl.store(base + ci[:, None] * CS + cj[None, :], acc, mask=ok)
        if pid_i < pid_j:
            tl.store(base + cj[None, :] * CS + ci[:, None], acc, mask=ok)


@triton.jit
def _small_gemm_kernel(
    a_ptr,  # (R, K) fp32 via strides: the left operand (W, or Wᵀ as a strided view)
    b_ptr,  # (K, C) fp32 via strides: the right operand (Gc, or W)
    v_ptr,  # (K,) fp32: a per-K scale applied between the operands (diag(v)), read only when SCALE_K
    c_ptr,  # (R, C) fp32, row-major: the product
    R,  # rows of the product
    C,  # columns of the product
    K,  # the contracted dimension
    a_sr,  # A's row stride (elements)
    a_sk,  # A's K stride
    b_sk,  # B's K stride
    b_sc,  # B's column stride
    SCALE_K: tl.constexpr,  # multiply B's K rows by v first
    BLOCK: tl.constexpr,  # square output tile
    BLOCK_K: tl.constexpr,  # K step
    EMULATE: tl.constexpr,  # interpreter: emulate the GPU's 3×TF32 operand rounding explicitly
):
    # C = A·diag(v)·B for the Cs × Cs and Ct × Cs products of BatchNorm (W·Gc, Wᵀ·diag(c1)·W): 2·R·C·K FLOPs as
    # three TF32 MMAs, so the result is fp32-accurate whatever torch.backends.cuda.matmul.allow_tf32 says.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows_ok, cols_ok = rows < R, cols < C
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * a_sr + ks[None, :] * a_sk, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * b_sk + cols[None, :] * b_sc, mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        if SCALE_K:
            b = b * tl.load(v_ptr + ks, mask=k_ok, other=0.0)[:, None]
        acc = mma(a, b, acc, "tf32x3", EMULATE)
    tl.store(c_ptr + rows[:, None] * C + cols[None, :], acc, mask=rows_ok[:, None] & cols_ok[None, :])


def fp32_matmul(a: Tensor, b: Tensor, scale_k: Tensor | None = None) -> Tensor:
    """a·diag(scale_k)·b for fp32 (R, K) and (K, C) matrices (any strides), fp32-accurate on tensor cores."""
    r, k = a.shape
    c = b.shape[1]
    out = torch.empty((r, c), device=a.device, dtype=torch.float32)
    block, block_k = SMALL_GEMM_TILE, SMALL_GEMM_K
    _small_gemm_kernel[(triton.cdiv(r, block), triton.cdiv(c, block))](
        a,
        b,
        scale_k if scale_k is not None else a,
        out,
        r,
        c,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        SCALE_K=scale_k is not None,
        BLOCK=block,
        BLOCK_K=block_k,
        EMULATE=INTERPRET,
        num_warps=4,
    )
    return out


def feature_moments(student: Tensor) -> tuple[Tensor, Tensor]:
    """(μ, Gc) of the (N·H·W, Cs) rows of a 4-D feature map, fp32, any layout."""
    check_runnable(student, "the student feature")
    n, cs, h, w = student.shape
    m = n * h * w
    block_rows, block_c = (INTERPRET_TILE, INTERPRET_K) if INTERPRET else (STATS_ROWS, STATS_COLS)
    col_blocks = triton.cdiv(cs, block_c)
    strides = (student.stride(0), student.stride(1), student.stride(2), student.stride(3))

    rows = split_rows(m, col_blocks, block_rows, cs, student.device)
    splits = triton.cdiv(m, rows)
    part = torch.empty((splits, cs), device=student.device, dtype=torch.float32)
    _hint_colsum_kernel[(splits, col_blocks)](
        student,
        part,
        m,
        cs,
        h * w,
        w,
        *strides,
        rows,
        BLOCK_M=block_rows,
        BLOCK_C=block_c,
        INDEX_64=needs_int64(student),
    )
    mean = part.sum(0) / m

    upper_tiles = col_blocks * (col_blocks + 1) // 2
    rows = split_rows(m, upper_tiles, block_rows, cs * cs, student.device)
    splits = triton.cdiv(m, rows)
    part = torch.empty((splits, cs, cs), device=student.device, dtype=torch.float32)
    _hint_gram_kernel[(splits, col_blocks, col_blocks)](
        student,
        mean,
        part,
        m,
        cs,
        h * w,
        w,
        *strides,
        rows,
        BLOCK_M=block_rows,
        BLOCK_C=block_c,
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(student, part),
    )
    return mean, part.sum(0)


@torch.library.custom_op("fastfit::hint_moments", mutates_args=())
def hint_moments(student: Tensor) -> tuple[Tensor, Tensor]:
    return feature_moments(student)


@hint_moments.register_fake
def _(student: Tensor) -> tuple[Tensor, Tensor]:
    cs = student.shape[1]
    return student.new_empty((cs,), dtype=torch.float32), student.new_empty((cs, cs), dtype=torch.float32)
