"""The hint loss backward's two GEMMs over D = dL/dP (M × Ct, written by hint_loss_tiles):

    dX = D·Wa + (X − μ)·G1 + g0      Wa = diag(a)·W; G1, g0 only for batch-statistics BatchNorm
    dW = diag(a)·DᵀX (+ diag(c1)·W·Gc − (a·Σ dP)·μᵀ)   in the same launch, the split-K partials finished in-kernel

With batch statistics dY = a⊙dP + c1⊙(A − mean_A) − a⊙Σ_m dP / M, and A − mean_A = (X − μ)Wᵀ turns the middle term
of dY·W into (X − μ)·Wᵀdiag(c1)W = (X − μ)·G1: a Cs × Cs matrix instead of a second M × Ct buffer.
Operands are the grad dtype (bf16 for bf16 features, fp32 otherwise) with fp32 accumulation; fp16 features get fp32
D (fp16 would underflow the small gradients) and TF32 dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hint_loss_channels import channel_coefficients, channel_grad_outputs, column_sums, finish_channels
from .hint_loss_common import (
    INTERPRET,
    fixed_meta,
    grouped_tile,
    last_arrival,
    mma_mode,
    needs_int64,
    output_tile,
    row_offsets,
    split_rows,
    tickets,
    tile_for,
    tuned,
    widen,
)
from .rounding import cast, mma


@triton.jit
def _hint_dx_kernel(
    d_ptr,  # (M, Ct) D = dL/dP, row-major, bf16 for bf16 features else fp32
    wa_ptr,  # (Ct, Cs) Wa = diag(a)·W in D's dtype, row-major
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    mean_ptr,  # (Cs,) fp32 column mean μ of X
    g1_ptr,  # (Cs, Cs) fp32 G1 = Wᵀ·diag(c1)·W (batch-statistics correction)
    g0_ptr,  # (Cs,) fp32 g0 = −Wᵀ(a⊙ΣD)/M (batch-statistics correction)
    ds_ptr,  # (N, Cs, H, W) out: dX in the student's dtype and layout
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    CT,  # regressor output channels
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    s_sn,  # student strides (elements) over N
    s_sc,  # … over C
    s_sh,  # … over H
    s_sw,  # … over W
    o_sn,  # dX strides over N
    o_sc,  # … over C
    o_sh,  # … over H
    o_sw,  # … over W
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # K step of the GEMM loop (autotuned)
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped program order (autotuned)
    BATCH_STATS: tl.constexpr,  # add the batch-statistics terms (X − μ)·G1 + g0
    MODE: tl.constexpr,  # MMA operands: "bf16", "fp16" or "tf32x3" (see rounding.mma)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # dX tile (BLOCK_M rows, BLOCK_N student channels). Reads BLOCK_M×Ct of D, Ct×BLOCK_N of Wa (+ BLOCK_M×Cs of X,
    # Cs×BLOCK_N of G1 with batch statistics); writes BLOCK_M×BLOCK_N of dS in the student's layout.
    # Whole op: 2·M·Ct·Cs FLOPs (+ 2·M·Cs² with batch statistics); D read Cs/BLOCK_N times (L2), dS written once.
    _, pid_m, pid_n, rows, cols, rows_ok, cols_ok = output_tile(M, CS, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, CT, BLOCK_K):
        cs = widen(c0 + tl.arange(0, BLOCK_K), INDEX_64)
        c_ok = cs < CT
        d = tl.load(d_ptr + rows[:, None] * CT + cs[None, :], mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
        wa = tl.load(wa_ptr + cs[:, None] * CS + cols[None, :], mask=c_ok[:, None] & cols_ok[None, :], other=0.0)
        acc = mma(d, wa, acc, MODE, EMULATE)
    if BATCH_STATS:
        s_rows = row_offsets(rows, HW, W, s_sn, s_sh, s_sw)
        for j0 in range(0, CS, BLOCK_K):
            js = widen(j0 + tl.arange(0, BLOCK_K), INDEX_64)
            j_ok = js < CS
            xm = rows_ok[:, None] & j_ok[None, :]
            x = tl.load(s_ptr + s_rows[:, None] + js[None, :] * s_sc, mask=xm, other=0.0)
            mu = tl.load(mean_ptr + js, mask=j_ok, other=0.0)
            x = tl.where(xm, x.to(tl.float32) - mu[None, :], 0.0)
            g1 = tl.load(g1_ptr + js[:, None] * CS + cols[None, :], mask=j_ok[:, None] & cols_ok[None, :], other=0.0)
            acc = mma(x, g1, acc, MODE, EMULATE)
        acc += tl.load(g0_ptr + cols, mask=cols_ok, other=0.0)[None, :]
    o_rows = row_offsets(rows, HW, W, o_sn, o_sh, o_sw)
    tl.store(
        ds_ptr + o_rows[:, None] + cols[None, :] * o_sc,
        cast(acc, ds_ptr.dtype.element_ty, EMULATE),
        mask=rows_ok[:, None] & cols_ok[None, :],
    )


@triton.jit
def _hint_dw_kernel(
    d_ptr,  # (M, Ct) D = dL/dP, row-major, bf16 for bf16 features else fp32
    s_ptr,  # (N, Cs, H, W) student feature X, fp32/bf16/fp16, any strides
    part_ptr,  # fp32 partial sums, one slot per program (layout in the comment below)
    col_part_ptr,  # (2, R, Ct) fp32 column sums Σ dP, Σ dP·(A − center) per row block of the dP kernel
    chan_ptr,  # (6, Ct) fp32 per-channel rows of the forward: a, e, center, r, mean_A, var_A
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype, row-major (for Wa and g0)
    coef_ptr,  # (2, Ct) fp32 out: c1, a·Σ dP (the G1 kernel reads c1)
    dbeta_ptr,  # (Ct,) out: dβ
    dgamma_ptr,  # (Ct,) out: dγ
    dbias_ptr,  # (Ct,) out: the conv bias gradient
    wa_ptr,  # (Ct, Cs) out: Wa = diag(a)·W in the grad dtype
    g0_part_ptr,  # (Ct blocks, Cs) fp32 scratch
    g0_ptr,  # (Cs,) fp32 out: g0 (batch statistics)
    wg_ptr,  # (Ct, Cs) fp32 W·Gc of the forward (batch statistics)
    mean_ptr,  # (Cs,) fp32 column mean μ of X (batch statistics)
    dw_ptr,  # (Ct, Cs) out: dW in the weight's dtype, through its strides
    ticket_ptr,  # 1 + output tiles int32 ticket slots, zero at rest (slot 0: g0)
    R,  # row blocks of the column sums
    inv_m,  # 1 / M
    M,  # rows of X: N·H·W
    CS,  # student channels (GEMM K forward, N of dX)
    CT,  # regressor output channels
    HW,  # H·W: rows per sample
    W,  # feature-map width (row m = (n·H + h)·W + w)
    s_sn,  # student strides (elements) over N
    s_sc,  # … over C
    s_sh,  # … over H
    s_sw,  # … over W
    dw_so,  # dW stride over output channels
    dw_si,  # dW stride over input channels
    ROWS_PER_PROG,  # rows of M each split-K program reduces (a multiple of the row block)
    SPLITS,  # split-K programs per output tile
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # K step of the GEMM loop (autotuned)
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped program order (autotuned)
    BN_MODE: tl.constexpr,  # NO_BN 0, BATCH_STATS 1 (adds c1·(W·Gc) − (a·Σ dP)·μᵀ), RUNNING_STATS 2
    SUMS: tl.constexpr,  # the column sums exist (BatchNorm or bias gradients wanted)
    FINISH_CS: tl.constexpr,  # student channels per step of the per-channel finish
    MODE: tl.constexpr,  # MMA operands: "bf16", "fp16" or "tf32x3" (see rounding.mma)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    # part[s] tile (BLOCK_M regressor channels, BLOCK_N student channels) = Σ_{m in split s} D[m, c]·X[m, k].
    # The reduction runs over M, so it is split across program_id(1) for parallelism; the split that finishes a
    # tile last adds the partials in split order (deterministic) and writes
    #   dW = diag(a)·DᵀX (+ diag(c1)·W·Gc − (a·Σ dP)·μᵀ with batch statistics)
    # in the weight's dtype. Whole op: 2·M·Ct·Cs FLOPs; D and X read once per tile column/row (L2), splits·Ct·Cs
    # fp32 partials written and read back once.
    num_m = tl.cdiv(CT, BLOCK_M)
    num_n = tl.cdiv(CS, BLOCK_N)
    pid_c, pid_k = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    pid_c, pid_k, pid_s = widen(pid_c, INDEX_64), widen(pid_k, INDEX_64), widen(tl.program_id(1), INDEX_64)
    cs = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    cs_ok, ks_ok = cs < CT, ks < CS
    start = pid_s * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_K):
        rows = m0 + tl.arange(0, BLOCK_K)
        r_ok = rows < end
        d = tl.load(d_ptr + rows[:, None] * CT + cs[None, :], mask=r_ok[:, None] & cs_ok[None, :], other=0.0)
        s_rows = row_offsets(rows, HW, W, s_sn, s_sh, s_sw)
        x = tl.load(s_ptr + s_rows[:, None] + ks[None, :] * s_sc, mask=r_ok[:, None] & ks_ok[None, :], other=0.0)
        acc = mma(tl.trans(d), x, acc, MODE, EMULATE)
    ok = cs_ok[:, None] & ks_ok[None, :]
    tile = cs[:, None] * CS + ks[None, :]
    tl.store(part_ptr + pid_s * CT * CS + tile, acc, mask=ok)
    if last_arrival(ticket_ptr + 1 + pid_c * num_n + pid_k, SPLITS):
        # The dP kernel's column sums are complete (it ran before): every tile gets its channels' coefficients,
        # the tiles of the first student-channel block also finish those channels (hint_loss_channels).
        sum_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_dx = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if SUMS:
            sum_d, sum_dx = column_sums(col_part_ptr, R, CT, cs, cs_ok, False)
        scale, c1, a_sum_d = channel_coefficients(cs, cs_ok, sum_d, sum_dx, chan_ptr, CT, inv_m)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLITS):
            total += tl.load(part_ptr + s * CT * CS + tile, mask=ok, other=0.0, volatile=True)
        store_weight_grad(
            total,
            cs,
            cs_ok,
            ks,
            ks_ok,
            scale,
            c1,
            a_sum_d,
            wg_ptr,
            mean_ptr,
            dw_ptr,
            dw_so,
            dw_si,
            CS,
            BN_MODE,
            EMULATE,
        )
        if pid_k == 0:  # after dW's tile is stored: its registers are free for the channel math
            finish_channels(
                pid_c,
                num_m,
                cs,
                cs_ok,
                sum_d,
                sum_dx,
                chan_ptr,
                w_ptr,
                coef_ptr,
                dbeta_ptr,
                dgamma_ptr,
                dbias_ptr,
                wa_ptr,
                g0_part_ptr,
                g0_ptr,
                ticket_ptr,
                CT,
                CS,
                inv_m,
                BN_MODE,
                SUMS,
                EMULATE,
                FINISH_CS,
            )


@triton.jit
def store_weight_grad(
    total,
    rows,
    rows_ok,
    ks,
    ks_ok,
    scale,
    c1,
    a_sum_d,
    wg_ptr,
    mean_ptr,
    dw_ptr,
    dw_so,
    dw_si,
    CS,
    BN_MODE: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """One tile of dW = diag(a)·DᵀX (+ diag(c1)·W·Gc − (a·Σ dP)·μᵀ with batch statistics) from its DᵀX `total`,
    written in the weight's dtype; rows are regressor channels, ks student channels."""
    ok = rows_ok[:, None] & ks_ok[None, :]
    dw = scale[:, None] * total
    if BN_MODE == 1:
        mean = tl.load(mean_ptr + ks, mask=ks_ok, other=0.0)
        wg = tl.load(wg_ptr + rows[:, None] * CS + ks[None, :], mask=ok, other=0.0)
        dw = dw + c1[:, None] * wg - a_sum_d[:, None] * mean[None, :]
    tl.store(dw_ptr + rows[:, None] * dw_so + ks[None, :] * dw_si, cast(dw, dw_ptr.dtype.element_ty, EMULATE), mask=ok)


_hint_dx = tuned(_hint_dx_kernel)
_hint_dw = tuned(_hint_dw_kernel)


def hint_grad_student(
    d: Tensor, weight_a: Tensor, student: Tensor, mean: Tensor | None, g1: Tensor | None, g0: Tensor | None
) -> Tensor:
    """dX = D·Wa (+ (X − μ)·G1 + g0 when g1 is given), written in the student feature's layout and dtype."""
    n, cs, h, w = student.shape
    m, ct = d.shape
    grad = torch.empty_like(student)  # keeps channels-last / NCHW; the kernel writes through its strides
    block_m, block_n = tile_for(d.dtype, d.device)  # the operands are D's dtype (fp32 for fp16 features)
    batch_stats = g1 is not None
    if not batch_stats:
        mean = g1 = g0 = weight_a  # never read: BATCH_STATS=False compiles those loads away
    grid = (triton.cdiv(m, block_m) * triton.cdiv(cs, block_n),)
    _hint_dx[grid](
        d,
        weight_a,
        student,
        mean,
        g1,
        g0,
        grad,
        m,
        cs,
        ct,
        h * w,
        w,
        *student.stride(),
        *grad.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BATCH_STATS=batch_stats,
        MODE=mma_mode(d.dtype),
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(d, student, grad),
        **fixed_meta(),
    )
    return grad


def hint_grad_weight_and_channels(
    d: Tensor,
    student: Tensor,
    col_part: Tensor | None,
    chan: Tensor,
    weight_lp: Tensor,
    wg: Tensor | None,
    mean: Tensor | None,
    weight: Tensor,
    bn_mode: int,
    param_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(bn_coef (2, Ct): c1 and a·Σ dP, dβ, dγ, bias gradient, Wa, g0, dW shaped and typed like `weight`) in one
    launch: dW = diag(a)·DᵀX (+ diag(c1)·W·Gc − (a·Σ dP)·μᵀ when wg is given: batch statistics), and the per-channel
    gradients from the dP kernel's column sums `col_part` (2, R, Ct) (hint_loss_channels.finish_channels)."""
    n, cs, h, w = student.shape
    m, ct = d.shape
    device = d.device
    weight_lp = weight_lp.contiguous()
    block_m, block_n = tile_for(d.dtype, d.device)
    ct_blocks = triton.cdiv(ct, block_m)
    tiles = ct_blocks * triton.cdiv(cs, block_n)
    rows = split_rows(m, tiles, block_m, ct * cs, student.device)
    splits = triton.cdiv(m, rows)
    part = torch.empty((splits, ct, cs), device=device, dtype=torch.float32)
    bn_coef, d_beta, d_gamma, d_bias, wa, g0_part, g0 = channel_grad_outputs(
        ct, cs, ct_blocks, device, d.dtype, param_dtypes
    )
    grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
    out = grad.view(ct, cs)
    batch_stats = wg is not None
    _hint_dw[(tiles, splits)](
        d,
        student,
        part,
        col_part if col_part is not None else bn_coef,
        chan,
        weight_lp,
        bn_coef,
        d_beta,
        d_gamma,
        d_bias,
        wa,
        g0_part,
        g0,
        wg if batch_stats else part,
        mean if batch_stats else part,
        out,
        tickets(device, 1 + tiles),
        col_part.shape[1] if col_part is not None else 0,
        1.0 / m,
        m,
        cs,
        ct,
        h * w,
        w,
        *student.stride(),
        *out.stride(),
        rows,
        splits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BN_MODE=bn_mode,
        SUMS=col_part is not None,
        FINISH_CS=16 if INTERPRET else 32,
        MODE=mma_mode(d.dtype),
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(d, student, part),
        **fixed_meta(),
    )
    return bn_coef, d_beta, d_gamma, d_bias, wa, g0, grad
