"""The hint loss inside the forward GEMM's launch: per-sample sums, the backward's per-sample coefficients, the loss.

The forward GEMM (hint_loss_tiles) leaves, per channel block j and row m, S partial sums (S = 3 for normalized L2:
Σ Z², Σ Z·U, Σ U²; S = 1 otherwise: Σ (Z − U)²). The program that stores a sample's last partial (a ticket, see
hint_loss_common.last_arrival) adds its H·W rows over every channel block in float64 and writes the sample's sums
and coefficients; the program that finishes the last sample turns the N sample sums into the loss:
    half_sq  ½ Σ_n s_n / N          mse  Σ_n s_n / (M·Ct)
    normalized_l2  Σ_n ‖y/‖y‖ − u/‖u‖‖² / N = Σ_n (yy/ny² − 2·yu/(ny·nu) + uu/nu²) / N,  ny = max(‖y‖, ε)
Every sum runs in a fixed order, so the loss is deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .hint_loss_common import last_arrival


@triton.jit
def _finish_sample(
    part_ptr,
    sums_ptr,
    coef_ptr,
    n,
    M,
    HW,
    NUM_N,
    NSAMPLES,
    CT,
    KIND: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Sample n's sums over its H·W rows and every channel block, in float64, and its backward coefficients.
    n = n + tl.full([], 0, tl.int64)  # int64 (a Python int under the interpreter)
    m = M + n * 0  # int64 (M may arrive as a constexpr when it is 1)
    acc0 = tl.zeros((BLOCK,), dtype=tl.float64)
    acc1 = tl.zeros((BLOCK,), dtype=tl.float64)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float64)
    for r0 in range(0, HW, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        ok = offs < HW
        rows = n * HW + offs
        for j in range(0, NUM_N):
            acc0 += tl.load(part_ptr + j * m + rows, mask=ok, other=0.0, volatile=True).to(tl.float64)
            if KIND == 2:
                acc1 += tl.load(part_ptr + (NUM_N + j) * m + rows, mask=ok, other=0.0, volatile=True).to(tl.float64)
                acc2 += tl.load(part_ptr + (2 * NUM_N + j) * m + rows, mask=ok, other=0.0, volatile=True).to(tl.float64)
    yy = tl.sum(acc0, axis=0)
    tl.store(sums_ptr + n, yy)
    # The backward's coefficients (it multiplies them by the upstream gradient):
    #   half_sq  α = −β = 1/N      mse  α = −β = 2/(M·Ct)
    #   normalized_l2  α = 2(y·u)/(N‖y‖³‖u‖) (2/(N·ε²) when ‖y‖ < ε: the clamp blocks the norm's gradient),
    #                  β = −2/(N‖y‖‖u‖), norms clamped at ε
    if KIND == 2:
        yu = tl.sum(acc1, axis=0)
        uu = tl.sum(acc2, axis=0)
        tl.store(sums_ptr + NSAMPLES + n, yu)
        tl.store(sums_ptr + 2 * NSAMPLES + n, uu)
        ny = tl.sqrt(yy)
        nyc = tl.maximum(ny, EPS)
        nu = tl.maximum(tl.sqrt(uu), EPS)
        alpha = tl.where(ny >= EPS, 2.0 * yu / (NSAMPLES * nyc * nyc * nyc * nu), 2.0 / (NSAMPLES * nyc * nyc))
        beta = -2.0 / (NSAMPLES * nyc * nu)
    else:
        if KIND == 0:
            alpha = 1.0 / (NSAMPLES + m * 0).to(tl.float64)
        else:
            alpha = 2.0 / (m.to(tl.float64) * CT)
        beta = -alpha
    tl.store(coef_ptr + n, alpha.to(tl.float32))
    tl.store(coef_ptr + NSAMPLES + n, beta.to(tl.float32))


@triton.jit
def _finish_loss(sums_ptr, loss_ptr, M, NSAMPLES, CT, KIND: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for n0 in range(0, NSAMPLES, BLOCK):
        ns = n0 + tl.arange(0, BLOCK)
        ok = ns < NSAMPLES
        s0 = tl.load(sums_ptr + ns, mask=ok, other=0.0, volatile=True)
        if KIND == 2:
            s1 = tl.load(sums_ptr + NSAMPLES + ns, mask=ok, other=0.0, volatile=True)
            s2 = tl.load(sums_ptr + 2 * NSAMPLES + ns, mask=ok, other=0.0, volatile=True)
            norm_y = tl.maximum(tl.sqrt(s0), EPS)
            norm_u = tl.maximum(tl.sqrt(s2), EPS)
            total += tl.where(ok, s0 / (norm_y * norm_y) - 2.0 * s1 / (norm_y * norm_u) + s2 / (norm_u * norm_u), 0.0)
        else:
            total += s0
    loss = tl.sum(total, axis=0)
    if KIND == 0:
        loss = 0.5 * loss / NSAMPLES
    elif KIND == 1:
        loss = loss / ((M + NSAMPLES * 0).to(tl.float64) * CT)
    else:
        loss = loss / NSAMPLES
    tl.store(loss_ptr, loss.to(tl.float32))


@triton.jit(noinline=True)
def finish_rows(
    part_ptr,  # (S, NUM_N, M) fp32 per-row partial sums, one slot per channel block
    sums_ptr,  # (S, N) fp64 out: per-sample sums
    coef_ptr,  # (2, N) fp32 out: per-sample α, β of dL/dZ = α·Z + β·U at an upstream gradient of 1
    loss_ptr,  # () fp32 out: the loss
    ticket_ptr,  # 1 + N int32 ticket slots, zero at rest: slot 0 for the loss, slot 1 + n for sample n
    first_row,  # the calling program's rows: first_row … last_row
    last_row,
    M,  # rows: N·H·W
    HW,  # rows per sample
    NUM_N,  # channel blocks of the forward GEMM
    NSAMPLES,  # N
    CT,  # regressor output channels (the mse denominator)
    BLOCK_M: tl.constexpr,  # rows per program of the forward GEMM
    KIND: tl.constexpr,  # 0 half_sq, 1 mse, 2 normalized_l2
    EPS: tl.constexpr,  # norm clamp of normalized L2
    BLOCK: tl.constexpr,  # rows (samples) per step
):
    """Called by every forward GEMM program once its row partials are stored: for each sample its rows touch, the
    program that stores that sample's last partial (a ticket counting row blocks × channel blocks) finishes the
    sample; the program that finishes the last sample computes the loss."""
    for n in range(first_row // HW, last_row // HW + 1):
        r0 = n * HW
        expected = ((r0 + HW - 1) // BLOCK_M - r0 // BLOCK_M + 1) * NUM_N
        if last_arrival(ticket_ptr + 1 + n, expected):
            _finish_sample(part_ptr, sums_ptr, coef_ptr, n, M, HW, NUM_N, NSAMPLES, CT, KIND, EPS, BLOCK)
            if last_arrival(ticket_ptr, NSAMPLES):
                _finish_loss(sums_ptr, loss_ptr, M, NSAMPLES, CT, KIND, EPS, BLOCK)
