"""The hint loss from the forward GEMM's per-row partial sums, in one launch: per-sample sums and the backward's
per-sample coefficients, then the loss.

The forward GEMM (hint_loss_tiles) leaves, per channel block j and row m, S partial sums (S = 3 for normalized L2:
Σ Z², Σ Z·U, Σ U²; S = 1 otherwise: Σ (Z − U)²). One program per sample n adds its H·W rows over every channel block
in float64 and writes the sample's sums (kept for the backward's coefficients); the program that finishes last
(a ticket, see hint_loss_common.last_arrival) turns the N sample sums into the loss:
    half_sq  ½ Σ_n s_n / N          mse  Σ_n s_n / (M·Ct)
    normalized_l2  Σ_n ‖y/‖y‖ − u/‖u‖‖² / N = Σ_n (yy/ny² − 2·yu/(ny·nu) + uu/nu²) / N,  ny = max(‖y‖, ε)
Every sum runs in a fixed order, so the loss is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hint_loss_common import INTERPRET, KIND_CODES, NORM_EPS, last_arrival, tickets

FINALIZE_BLOCK = 32 if INTERPRET else 256  # rows (then samples) per step


@triton.jit
def _hint_loss_finalize_kernel(
    part_ptr,  # (S, NUM_N, M) fp32 per-row partial sums of the forward GEMM, one slot per channel block
    sums_ptr,  # (S, N) fp64 out: per-sample sums
    coef_ptr,  # (2, N) fp32 out: per-sample α, β of dL/dZ = α·Z + β·U at an upstream gradient of 1
    loss_ptr,  # (1,) fp32 out: the loss
    ticket_ptr,  # one int32 ticket slot, zero at rest
    M,  # rows: N·H·W
    HW,  # rows per sample
    NUM_N,  # channel blocks of the forward GEMM
    NSAMPLES,  # N
    CT,  # regressor output channels (the mse denominator)
    S: tl.constexpr,  # sums per row: 3 (normalized L2) or 1
    KIND: tl.constexpr,  # 0 half_sq, 1 mse, 2 normalized_l2
    EPS: tl.constexpr,  # norm clamp of normalized L2
    BLOCK: tl.constexpr,  # rows (samples) per step
):
    n = tl.program_id(0).to(tl.int64)
    m = M + n * 0  # int64 (M may arrive as a constexpr when it is 1)
    acc0 = tl.zeros((BLOCK,), dtype=tl.float64)
    acc1 = tl.zeros((BLOCK,), dtype=tl.float64)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float64)
    for r0 in range(0, HW, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        ok = offs < HW
        rows = n * HW + offs
        for j in range(0, NUM_N):
            acc0 += tl.load(part_ptr + j * m + rows, mask=ok, other=0.0).to(tl.float64)
            if S == 3:
                acc1 += tl.load(part_ptr + (NUM_N + j) * m + rows, mask=ok, other=0.0).to(tl.float64)
                acc2 += tl.load(part_ptr + (2 * NUM_N + j) * m + rows, mask=ok, other=0.0).to(tl.float64)
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
    if last_arrival(ticket_ptr, NSAMPLES):
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
                total += tl.where(
                    ok, s0 / (norm_y * norm_y) - 2.0 * s1 / (norm_y * norm_u) + s2 / (norm_u * norm_u), 0.0
                )
            else:
                total += s0
        loss = tl.sum(total, axis=0)
        if KIND == 0:
            loss = 0.5 * loss / NSAMPLES
        elif KIND == 1:
            loss = loss / (m.to(tl.float64) * CT)
        else:
            loss = loss / NSAMPLES
        tl.store(loss_ptr, loss.to(tl.float32))


def hint_loss_from_partials(part: Tensor, kind: str, n: int, hw: int, ct: int) -> tuple[Tensor, Tensor]:
    """(0-dim fp32 loss, (2, N) fp32 per-sample backward coefficients α, β at an upstream gradient of 1) from the
    forward's (S, NUM_N, M) partials."""
    s, num_n, m = part.shape
    sums = torch.empty((s, n), device=part.device, dtype=torch.float64)
    coef = torch.empty((2, n), device=part.device, dtype=torch.float32)
    loss = torch.empty((), device=part.device, dtype=torch.float32)
    _hint_loss_finalize_kernel[(n,)](
        part,
        sums,
        coef,
        loss,
        tickets(part.device, 1),
        m,
        hw,
        num_n,
        n,
        ct,
        S=s,
        KIND=KIND_CODES[kind],
        EPS=NORM_EPS,
        BLOCK=FINALIZE_BLOCK,
        num_warps=4,
    )
    return loss, coef
