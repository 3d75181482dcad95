"""BatchNorm batch statistics of the hint regressor's output without computing that output.

For Y = X Wᵀ + b over the M = N·H·W rows of the student feature X (M × Cs):
    mean(Y_c) = w_c · μ + b_c,   var(Y_c) = w_cᵀ Gc w_c / M,   μ = Σ_m x_m / M,   Gc = Σ_m (x_m − μ)(x_m − μ)ᵀ
so one pass over X (column sums and the Cs × Cs Gram together) replaces a pass that would compute the M × Ct output.

Shifted data: every column is shifted by s = X[row 0] (a data value, as stored), so one pass gives Σ Xs and the Gram
Gs of Xs = X − s; then δ = Σ Xs / M, μ = s + δ, Gc = Gs − M·δδᵀ. Centering by a data value keeps the variance
accurate when |μ| ≫ σ, as centering by μ did (E[xxᵀ] − μμᵀ would cancel catastrophically), without a first pass.

One launch: split-K over rows, one program per (row split, upper Gram tile). Each writes its partial tile and the
partial column sums of both its channel blocks, then takes a ticket from the tile's counter (acq_rel atomic); the
last program of a tile sums the partials in split order (deterministic whichever arrives last), writes Gc at (i, j)
and (j, i), μ on the diagonal, and resets the counter to 0, so the counters (allocated once per device) are ready for
the next call and for CUDA graph replays. Calls on one device must not overlap on several streams (they share the
counters).

MMAs: fp32 features run 3×TF32 (about 22 bits). 16-bit features split Xs (fp32) into hi = bf16(Xs) and
lo = bf16(Xs − hi) and sum hiᵀhi + hiᵀlo + loᵀhi: three bf16 MMAs with fp32 accumulation, half the cost of 3×TF32.
hi + lo keeps about 16 bits of Xs; the omitted loᵀlo and the rounding of lo are each below 2⁻¹⁸ of |Xs_i·Xs_j|.
loᵀlo is a positive bias on the diagonal of Gs, which grows relative to Gc as Gs/Gc = 1 + M·δ²/Gc (a shift row far
from μ): about 2·10⁻⁵ of the variance at layer3's post-ReLU maps, 5·10⁻⁶ of var(Y).
bf16 rather than fp16 for fp16 features too: Xs can leave fp16's range (|x − s| up to 2·65504) and fp16's lo would
go subnormal.

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
    last_arrival,
    needs_int64,
    row_offsets,
    split_rows,
    tickets,
    widen,
)
from .rounding import cast, dot16, mma, split16

# Rows per step of the moments kernel on fp32 features: sm_80's mma.sync holds 3×TF32's head and tail fragments in
# registers, and 64 rows spill there (ptxas, 8 warps).
TF32X3_ROWS = 32


@triton.jit
def _hint_moments_kernel(
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    part_ptr,  # fp32 partial Gram tiles: (upper tiles, SPLITS, BLOCK_C, BLOCK_C)
    psum_ptr,  # fp32 partial column sums: (upper tiles, SPLITS, 2, BLOCK_C), the tile's i block then its j block
    count_ptr,  # int32 per-tile arrival counters, 0 between launches
    mean_ptr,  # (Cs,) fp32 out: μ
    gram_ptr,  # (Cs, Cs) fp32 out, row-major: Gc
    M,  # rows of X: N·H·W
    CS,  # student channels
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    stride_n,  # feature strides (elements) over N
    stride_c,  # … over C
    stride_h,  # … over H
    stride_w,  # … over W
    ROWS_PER_PROG,  # rows of M each split-K program reduces (a multiple of the row block)
    SPLITS,  # programs per tile: cdiv(M, ROWS_PER_PROG)
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_C: tl.constexpr,  # channel tile
    MODE: tl.constexpr,  # "tf32x3" (fp32 features) or "bf16" (hi/lo split of Xs, 16-bit features)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # Reads X twice per tile pair (mostly from L2), M·Cs²/2 multiply-adds per MMA term, writes the partials once and
    # the last program of each tile reads them back.
    pid_s = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    if pid_i <= pid_j:
        col_blocks = tl.cdiv(CS, BLOCK_C)
        tile = pid_i * col_blocks - pid_i * (pid_i - 1) // 2 + (pid_j - pid_i)  # upper tiles, row by row
        ci = widen(pid_i, INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
        cj = widen(pid_j, INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
        ci_ok, cj_ok = ci < CS, cj < CS
        # The shift s: row 0 of X (n = h = w = 0), as stored.
        shift_i = tl.load(s_ptr + ci * stride_c, mask=ci_ok, other=0.0).to(tl.float32)
        shift_j = tl.load(s_ptr + cj * stride_c, mask=cj_ok, other=0.0).to(tl.float32)
        start = widen(pid_s, INDEX_64) * ROWS_PER_PROG
        end = tl.minimum(start + ROWS_PER_PROG, M)
        acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        sum_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
        sum_j = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rows_ok = rows < end
            offs = row_offsets(rows, HW, W, stride_n, stride_h, stride_w)
            mi = rows_ok[:, None] & ci_ok[None, :]
            mj = rows_ok[:, None] & cj_ok[None, :]
            xi = tl.load(s_ptr + offs[:, None] + ci[None, :] * stride_c, mask=mi, other=0.0)
            xj = tl.load(s_ptr + offs[:, None] + cj[None, :] * stride_c, mask=mj, other=0.0)
            # Shift in fp32 and zero the masked entries again (they would hold −s).
            xi = tl.where(mi, xi.to(tl.float32) - shift_i[None, :], 0.0)
            xj = tl.where(mj, xj.to(tl.float32) - shift_j[None, :], 0.0)
            sum_i += tl.sum(xi, axis=0)
            sum_j += tl.sum(xj, axis=0)
            if MODE == "tf32x3":
                acc = mma(tl.trans(xi), xj, acc, "tf32x3", EMULATE)
            else:
                hi_i, lo_i = split16(xi, tl.bfloat16, EMULATE)
                hi_j, lo_j = split16(xj, tl.bfloat16, EMULATE)
                hi_it = tl.trans(hi_i)
                acc = dot16(tl.trans(lo_i), hi_j, acc, EMULATE)  # small terms first
                acc = dot16(hi_it, lo_j, acc, EMULATE)
                acc = dot16(hi_it, hi_j, acc, EMULATE)
        r = tl.arange(0, BLOCK_C)
        first = widen(tile, INDEX_64) * SPLITS
        slot = first + pid_s
        tl.store(part_ptr + slot * (BLOCK_C * BLOCK_C) + r[:, None] * BLOCK_C + r[None, :], acc)
        tl.store(psum_ptr + slot * (2 * BLOCK_C) + r, sum_i)
        tl.store(psum_ptr + slot * (2 * BLOCK_C) + BLOCK_C + r, sum_j)
        if last_arrival(count_ptr + tile, SPLITS):  # the last split of this tile sums everyone's partials
            gram = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
            total_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
            total_j = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for k in range(0, SPLITS):  # fixed split order: the same sum whichever program arrived last
                slot = first + k
                gram += tl.load(
                    part_ptr + slot * (BLOCK_C * BLOCK_C) + r[:, None] * BLOCK_C + r[None, :], cache_modifier=".cg"
                )
                total_i += tl.load(psum_ptr + slot * (2 * BLOCK_C) + r, cache_modifier=".cg")
                total_j += tl.load(psum_ptr + slot * (2 * BLOCK_C) + BLOCK_C + r, cache_modifier=".cg")
            delta_i = total_i / M
            delta_j = total_j / M
            gram -= total_i[:, None] * delta_j[None, :]  # Gc = Gs − M·δ_i δ_jᵀ
            ok = ci_ok[:, None] & cj_ok[None, :]
            tl.store(gram_ptr + ci[:, None] * CS + cj[None, :], gram, mask=ok)
            if pid_i < pid_j:
                tl.store(gram_ptr + cj[None, :] * CS + ci[:, None], gram, mask=ok)
            else:
                tl.store(mean_ptr + ci, shift_i + delta_i, mask=ci_ok)


@triton.jit
def _small_gemm_kernel(
    a_ptr,  # (R, K) via strides: the left operand (W, or Wᵀ as a strided view), fp32 or exactly bf16
    b_ptr,  # (K, C) via strides: the right operand (Gc, or W), fp32 or exactly bf16
    v_ptr,  # (K,) fp32: a per-K scale applied between the operands (diag(v)), read only when SCALE_K
    a_out_ptr,  # (R, K) row-major, ROUND_A: A rounded to this pointer's dtype, the operand, written here too
    c_ptr,  # (R, C) fp32, row-major: the product
    R,  # rows of the product
    C,  # columns of the product
    K,  # the contracted dimension
    a_sr,  # A's row stride (elements)
    a_sk,  # A's K stride
    b_sk,  # B's K stride
    b_sc,  # B's column stride
    SCALE_K: tl.constexpr,  # multiply B's K rows by v first
    ROUND_A: tl.constexpr,  # round A to a_out_ptr's dtype first and write it there (the first column of programs)
    MODE: tl.constexpr,  # "tf32x3"; "bf16": one operand is bf16, the other fp32 split into bf16 hi + lo
    EXACT_A: tl.constexpr,  # MODE "bf16": A is the bf16 operand (else B)
    BLOCK: tl.constexpr,  # square output tile
    BLOCK_K: tl.constexpr,  # K step
    EMULATE: tl.constexpr,  # interpreter: emulate the GPU's operand rounding explicitly
):
    # C = A·diag(v)·B for the Cs × Cs and Ct × Cs products of BatchNorm (W·Gc, Wᵀ·diag(c1)·W), 2·R·C·K FLOPs per
    # MMA term, fp32-class whatever torch.backends.cuda.matmul.allow_tf32 says: three TF32 MMAs, or, with a bf16
    # operand, two bf16 MMAs (that operand exact, the other's hi + lo keeping about 16 bits).
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows_ok, cols_ok = rows < R, cols < C
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_ok = rows_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + rows[:, None] * a_sr + ks[None, :] * a_sk, mask=a_ok, other=0.0)
        if ROUND_A:
            a = cast(a, a_out_ptr.dtype.element_ty, EMULATE)
            if tl.program_id(1) == 0:
                tl.store(a_out_ptr + rows[:, None] * K + ks[None, :], a, mask=a_ok)
        b = tl.load(b_ptr + ks[:, None] * b_sk + cols[None, :] * b_sc, mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        if SCALE_K:
            b = b.to(tl.float32) * tl.load(v_ptr + ks, mask=k_ok, other=0.0)[:, None]
        if MODE == "tf32x3":
            acc = mma(a, b, acc, "tf32x3", EMULATE)
        elif EXACT_A:
            hi, lo = split16(b.to(tl.float32), tl.bfloat16, EMULATE)
            acc = dot16(a, lo, acc, EMULATE)
            acc = dot16(a, hi, acc, EMULATE)
        else:
            hi, lo = split16(a.to(tl.float32), tl.bfloat16, EMULATE)
            acc = dot16(lo, b, acc, EMULATE)
            acc = dot16(hi, b, acc, EMULATE)
    tl.store(c_ptr + rows[:, None] * C + cols[None, :], acc, mask=rows_ok[:, None] & cols_ok[None, :])


def fp32_matmul(a: Tensor, b: Tensor, scale_k: Tensor | None = None, a_as: Tensor | None = None) -> Tensor:
    """a·diag(scale_k)·b for (R, K) and (K, C) matrices (any strides), fp32 result, fp32-class accuracy on tensor
    cores. Operands are fp32, or bf16 (the regressor weight in the feature dtype): when `a` is bf16, or `b` is and
    there is no scale_k, it runs as two bf16 MMAs, that operand exact times the hi/lo split of the other (about 16
    bits); otherwise as 3×TF32 (about 22 bits). fp16 operands are read as fp32 values: an fp16 split of Gc would
    overflow (its entries reach M·σ², past 65,504). a_as: an empty (R, K) tensor: `a` rounded to its dtype is the
    operand, and is written into it (the weight's cast to the feature dtype, without a launch of its own)."""
    r, k = a.shape
    c = b.shape[1]
    exact_a = (a_as if a_as is not None else a).dtype == torch.bfloat16
    exact_b = b.dtype == torch.bfloat16 and scale_k is None
    out = torch.empty((r, c), device=a.device, dtype=torch.float32)
    block, block_k = SMALL_GEMM_TILE, SMALL_GEMM_K
    _small_gemm_kernel[(triton.cdiv(r, block), triton.cdiv(c, block))](
        a,
        b,
        scale_k if scale_k is not None else a,
        a_as if a_as is not None else out,
        out,
        r,
        c,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        SCALE_K=scale_k is not None,
        ROUND_A=a_as is not None,
        MODE="bf16" if exact_a or exact_b else "tf32x3",
        EXACT_A=exact_a,
        BLOCK=block,
        BLOCK_K=block_k,
        EMULATE=INTERPRET,
        num_warps=4,
    )
    return out


def feature_moments(student: Tensor) -> tuple[Tensor, Tensor]:
    """(μ, Gc) of the (N·H·W, Cs) rows of a 4-D feature map, fp32, any layout: one kernel launch."""
    check_runnable(student, "the student feature")
    n, cs, h, w = student.shape
    m = n * h * w
    block_rows, block_c = (INTERPRET_TILE, INTERPRET_K) if INTERPRET else (STATS_ROWS, STATS_COLS)
    mode = "tf32x3" if student.dtype == torch.float32 else "bf16"
    if mode == "tf32x3" and not INTERPRET:
        block_rows = TF32X3_ROWS
    col_blocks = triton.cdiv(cs, block_c)
    upper_tiles = col_blocks * (col_blocks + 1) // 2
    rows = split_rows(m, upper_tiles, block_rows, upper_tiles * block_c * (block_c + 2), student.device)
    splits = triton.cdiv(m, rows)
    f32 = torch.float32
    part = torch.empty((upper_tiles, splits, block_c, block_c), device=student.device, dtype=f32)
    psum = torch.empty((upper_tiles, splits, 2, block_c), device=student.device, dtype=f32)
    mean = torch.empty((cs,), device=student.device, dtype=f32)
    gram = torch.empty((cs, cs), device=student.device, dtype=f32)
    _hint_moments_kernel[(splits, col_blocks, col_blocks)](
        student,
        part,
        psum,
        tickets(student.device, upper_tiles),
        mean,
        gram,
        m,
        cs,
        h * w,
        w,
        student.stride(0),
        student.stride(1),
        student.stride(2),
        student.stride(3),
        rows,
        splits,
        BLOCK_M=block_rows,
        BLOCK_C=block_c,
        MODE=mode,
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(student, part, gram),
        num_warps=8,  # 4 warps hold too much per thread (shifted tiles, hi/lo operands, the epilogue): sm_80 spills
    )
    return mean, gram


@torch.library.custom_op("fastfit::hint_moments", mutates_args=())
def hint_moments(student: Tensor) -> tuple[Tensor, Tensor]:
    return feature_moments(student)


@hint_moments.register_fake
def _(student: Tensor) -> tuple[Tensor, Tensor]:
    cs = student.shape[1]
    return student.new_empty((cs,), dtype=torch.float32), student.new_empty((cs, cs), dtype=torch.float32)
