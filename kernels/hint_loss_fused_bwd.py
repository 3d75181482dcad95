"""The hint loss backward's first pass with dW and the per-channel gradients in the same launch (Cs ≤ 256).

One program owns BLOCK_N regressor channels and a chunk of rows. Per row block it recomputes A = X Wᵀ, forms
D = dL/dP (as hint_loss_tiles' dP kernel does), stores D for the dX GEMM, adds D's column sums and accumulates
DᵀX for all Cs student channels in registers (BLOCK_N × Cs fp32, which is why this path needs Cs ≤ 256). The program
that finishes a channel block last (a ticket over the row chunks) adds the chunks' partials in chunk order, runs the
per-channel math (hint_loss_channels.finish_channels: c1, a·Σ dP, dβ, dγ, the bias gradient, Wa, g0) and writes
    dW = diag(a)·DᵀX (+ diag(c1)·W·Gc − (a·Σ dP)·μᵀ with batch statistics)
in the weight's dtype. Against the separate dP, channel and dW kernels this reads D's M × Ct elements zero times
instead of once and saves two launches; the A GEMM and the DᵀX GEMM share each X tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hint_loss_channels import channel_grad_outputs, column_sums, finish_channels
from .hint_loss_common import (
    INTERPRET,
    device_limits,
    last_arrival,
    mma_mode,
    needs_int64,
    row_offsets,
    tickets,
    widen,
)
from .hint_loss_grads import store_weight_grad
from .rounding import cast, mma

FUSED_MAX_CS = 256  # DᵀX accumulates BLOCK_N × Cs fp32 in registers: 64 per thread at 256 threads and BLOCK_N 64
# Where the fused pass runs: bf16 D on sm_90 (wgmma reads the operands from shared memory). fp32 D (fp32 and fp16
# features, 3×TF32 for DᵀX) and sm_80's register-held mma.sync operands spill at every tile that keeps the GPU busy
# (ptxas), so those take the split path.
FUSED_GRAD_DTYPES = (torch.bfloat16,)
FUSED_MIN_MAJOR = 9
FUSED_TILE = (64, 64)  # BLOCK_M, BLOCK_N
INTERPRET_TILE = (16, 16)
FUSED_STAGES = 2  # a third pipeline stage spills the bf16 tile's registers (ptxas, sm_90a)
FUSED_WARPS = 4 if INTERPRET else 8
CHUNKS_PER_SM = 1  # row chunks × channel blocks ≈ one program per SM per channel block group


@triton.jit
def _hint_bwd_fused_kernel(
    s_ptr,  # (N, Cs, H, W) student feature X, any strides
    t_ptr,  # (N, Ct, H, W) teacher feature U, any strides
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype, row-major
    chan_ptr,  # (6, Ct) fp32 per-channel rows of the forward: a, e, center, r, mean_A, var_A
    coef_ptr,  # (2, N) fp32 per-sample α, β of the forward, for an upstream gradient of 1
    grad_ptr,  # () fp32 upstream gradient of the loss
    d_ptr,  # (M, Ct) out: D = dL/dP in the grad dtype, row-major
    col_part_ptr,  # (2, CHUNKS, Ct) fp32 scratch: each chunk's Σ dP and Σ dP·(A − center)
    dw_part_ptr,  # (CHUNKS, Ct, Cs) fp32 scratch: each chunk's DᵀX
    wg_ptr,  # (Ct, Cs) fp32 W·Gc of the forward (batch statistics)
    mean_ptr,  # (Cs,) fp32 column mean μ of X (batch statistics)
    bn_coef_ptr,  # (2, Ct) fp32 out: c1, a·Σ dP
    dbeta_ptr,  # (Ct,) out: dβ
    dgamma_ptr,  # (Ct,) out: dγ
    dbias_ptr,  # (Ct,) out: the conv bias gradient
    wa_ptr,  # (Ct, Cs) out: Wa = diag(a)·W in the grad dtype
    g0_part_ptr,  # (channel blocks, Cs) fp32 scratch
    g0_ptr,  # (Cs,) fp32 out: g0 (batch statistics)
    dw_ptr,  # (Ct, Cs) out: dW in the weight's dtype, through its strides
    ticket_ptr,  # 1 + channel blocks int32 ticket slots, zero at rest
    M,  # rows of X: N·H·W
    CS,  # student channels
    CT,  # regressor output channels
    HW,  # H·W: rows per sample
    W,  # feature-map width
    NSAMPLES,  # N
    s_sn,  # student strides (elements) over N
    s_sc,  # … over C
    s_sh,  # … over H
    s_sw,  # … over W
    t_sn,  # teacher strides over N
    t_sc,  # … over C
    t_sh,  # … over H
    t_sw,  # … over W
    dw_so,  # dW stride over output channels
    dw_si,  # dW stride over input channels
    ROWS_PER_CHUNK,  # rows per chunk (a multiple of BLOCK_M)
    CHUNKS,  # row chunks per channel block
    inv_m,  # 1 / M
    BLOCK_M: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,  # regressor channels per program
    BLOCK_CS: tl.constexpr,  # Cs rounded up to a power of two (the DᵀX accumulator's width)
    FINISH_CS: tl.constexpr,  # student channels per slice of dW's finish
    RELU: tl.constexpr,  # Z = relu(P)
    BN_MODE: tl.constexpr,  # NO_BN 0, BATCH_STATS 1, RUNNING_STATS 2
    SUMS: tl.constexpr,  # column sums wanted (BatchNorm or bias gradients)
    WANT_D: tl.constexpr,  # store D (the dX GEMM reads it)
    WANT_DW: tl.constexpr,  # accumulate and write dW
    MODE: tl.constexpr,  # the A GEMM's MMA operands (rounding.mma)
    GRAD_MODE: tl.constexpr,  # the DᵀX GEMM's MMA operands (D's dtype)
    EMULATE: tl.constexpr,  # interpreter: apply the GPU's roundings explicitly (rounding.py)
    INDEX_64: tl.constexpr,  # int64 offsets (a tensor spans 2³¹ elements)
):
    pid_n = widen(tl.program_id(0), INDEX_64)
    chunk = widen(tl.program_id(1), INDEX_64)
    num_n = tl.num_programs(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < CT
    ks = tl.arange(0, BLOCK_CS)
    ks_ok = ks < CS
    scale = tl.load(chan_ptr + cols, mask=cols_ok, other=0.0)
    shift = tl.load(chan_ptr + CT + cols, mask=cols_ok, other=0.0)
    center = tl.load(chan_ptr + 2 * CT + cols, mask=cols_ok, other=0.0)
    g = tl.load(grad_ptr)
    # Wᵀ for this channel block, all Cs rows: loaded once, used for every row block of the chunk.
    w_t = tl.load(w_ptr + cols[None, :] * CS + ks[:, None], mask=ks_ok[:, None] & cols_ok[None, :], other=0.0)
    sum_d = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_dx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw_acc = tl.zeros((BLOCK_N, BLOCK_CS), dtype=tl.float32)
    start = chunk * ROWS_PER_CHUNK
    end = tl.minimum(start + ROWS_PER_CHUNK, M)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < end
        s_rows = row_offsets(rows, HW, W, s_sn, s_sh, s_sw)
        # One X tile serves both GEMMs: A = X·Wᵀ over all Cs at once, then DᵀX below.
        x = tl.load(s_ptr + s_rows[:, None] + ks[None, :] * s_sc, mask=rows_ok[:, None] & ks_ok[None, :], other=0.0)
        acc = mma(x, w_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), MODE, EMULATE)
        p = acc * scale[None, :] + shift[None, :]
        ok = rows_ok[:, None] & cols_ok[None, :]
        t_rows = row_offsets(rows, HW, W, t_sn, t_sh, t_sw)
        u = tl.load(t_ptr + t_rows[:, None] + cols[None, :] * t_sc, mask=ok, other=0.0).to(tl.float32)
        z = p
        if RELU:
            z = tl.maximum(p, 0.0)
        sample = rows // HW
        alpha = tl.load(coef_ptr + sample, mask=rows_ok, other=0.0) * g
        beta = tl.load(coef_ptr + NSAMPLES + sample, mask=rows_ok, other=0.0) * g
        dp = alpha[:, None] * z + beta[:, None] * u
        if RELU:
            dp = tl.where(p > 0.0, dp, 0.0)
        # Padded rows load α = β = 0 and padded columns have Z = U = 0: dP is 0 there for every sum below.
        d_lp = cast(dp, d_ptr.dtype.element_ty, EMULATE)
        if WANT_D:
            tl.store(d_ptr + rows[:, None] * CT + cols[None, :], d_lp, mask=ok)
        if SUMS:
            sum_d += tl.sum(dp, axis=0)
            sum_dx += tl.sum(dp * (acc - center[None, :]), axis=0)
        if WANT_DW:
            dw_acc = mma(tl.trans(d_lp), x, dw_acc, GRAD_MODE, EMULATE)
    tl.store(col_part_ptr + chunk * CT + cols, sum_d, mask=cols_ok)
    tl.store(col_part_ptr + (CHUNKS + chunk) * CT + cols, sum_dx, mask=cols_ok)
    tile = cols[:, None] * CS + ks[None, :]
    tile_ok = cols_ok[:, None] & ks_ok[None, :]
    if WANT_DW:
        tl.store(dw_part_ptr + chunk * CT * CS + tile, dw_acc, mask=tile_ok)
    if last_arrival(ticket_ptr + 1 + pid_n, CHUNKS):
        sum_d, sum_dx = column_sums(col_part_ptr, CHUNKS, CT, cols, cols_ok, True)
        c1, a_sum_d = finish_channels(
            pid_n,
            num_n,
            cols,
            cols_ok,
            sum_d,
            sum_dx,
            chan_ptr,
            w_ptr,
            bn_coef_ptr,
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
        if WANT_DW:
            # In column slices: the accumulator is gone, and a whole BLOCK_N × Cs slab of partials would spill.
            for k0 in range(0, CS, FINISH_CS):
                kk = k0 + tl.arange(0, FINISH_CS)
                kk_ok = kk < CS
                part = cols[:, None] * CS + kk[None, :]
                part_ok = cols_ok[:, None] & kk_ok[None, :]
                total = tl.zeros((BLOCK_N, FINISH_CS), dtype=tl.float32)
                for c in range(0, CHUNKS):
                    total += tl.load(dw_part_ptr + c * CT * CS + part, mask=part_ok, other=0.0, volatile=True)
                store_weight_grad(
                    total,
                    cols,
                    cols_ok,
                    kk,
                    kk_ok,
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


def fused_backward_fits(cs: int, grad_dtype: torch.dtype, device: torch.device) -> bool:
    """The fused first pass holds DᵀX for every student channel in registers: up to FUSED_MAX_CS student channels,
    bf16 D, on sm_90 (the interpreter follows the same rule, so the CPU tests run the path a GPU would take)."""
    return cs <= FUSED_MAX_CS and grad_dtype in FUSED_GRAD_DTYPES and device_limits(device)[2] >= FUSED_MIN_MAJOR


def hint_backward_fused(
    student: Tensor,
    teacher: Tensor,
    weight_lp: Tensor,
    chan: Tensor,
    coef: Tensor,
    grad: Tensor,
    wg: Tensor | None,
    mean: Tensor | None,
    weight: Tensor,
    bn_mode: int,
    relu: bool,
    sums: bool,
    want_d: bool,
    want_dw: bool,
    grad_dtype: torch.dtype,
    param_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(D, bn_coef (2, Ct): c1 and a·Σ dP, dβ, dγ, bias gradient, Wa, g0, dW shaped like `weight`) in one launch.
    wg and mean: W·Gc and μ with batch statistics (else None)."""
    n, cs, h, w = student.shape
    ct = teacher.shape[1]
    m = n * h * w
    device = student.device
    weight_lp = weight_lp.contiguous()
    block_m, block_n = INTERPRET_TILE if INTERPRET else FUSED_TILE
    num_n = triton.cdiv(ct, block_n)
    # Enough programs to fill the GPU; two chunks under the interpreter (still a real cross-chunk reduction, and
    # each program is a slow Python-level loop there).
    target = 2 if INTERPRET else triton.cdiv(CHUNKS_PER_SM * device_limits(device)[0], num_n)
    chunks = max(1, min(target, triton.cdiv(m, block_m)))
    rows = triton.cdiv(triton.cdiv(m, chunks), block_m) * block_m
    chunks = triton.cdiv(m, rows)
    f32 = torch.float32
    d = torch.empty((m, ct) if want_d else (0,), device=device, dtype=grad_dtype)
    col_part = torch.empty((2, chunks, ct), device=device, dtype=f32)
    dw_part = torch.empty((chunks, ct, cs) if want_dw else (0,), device=device, dtype=f32)
    bn_coef, d_beta, d_gamma, d_bias, wa, g0_part, g0 = channel_grad_outputs(
        ct, cs, num_n, device, grad_dtype, param_dtypes
    )
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    out = d_weight.view(ct, cs)
    batch = wg is not None
    _hint_bwd_fused_kernel[(num_n, chunks)](
        student,
        teacher,
        weight_lp,
        chan,
        coef,
        grad,
        d,
        col_part,
        dw_part,
        wg if batch else col_part,
        mean if batch else col_part,
        bn_coef,
        d_beta,
        d_gamma,
        d_bias,
        wa,
        g0_part,
        g0,
        out,
        tickets(device, 1 + num_n),
        m,
        cs,
        ct,
        h * w,
        w,
        n,
        *student.stride(),
        *teacher.stride(),
        *out.stride(),
        rows,
        chunks,
        1.0 / m,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_CS=max(16, triton.next_power_of_2(cs)),  # tl.dot's smallest tile side
        FINISH_CS=16 if INTERPRET else 32,  # wider slices spill the finish (ptxas, sm_90a)
        RELU=relu,
        BN_MODE=bn_mode,
        SUMS=sums,
        WANT_D=want_d,
        WANT_DW=want_dw,
        MODE=mma_mode(student.dtype),
        GRAD_MODE=mma_mode(grad_dtype),
        EMULATE=INTERPRET,
        INDEX_64=needs_int64(student, teacher, d, dw_part),
        num_warps=FUSED_WARPS,
        num_stages=FUSED_STAGES,
    )
    return d, bn_coef, d_beta, d_gamma, d_bias, wa, g0, d_weight
