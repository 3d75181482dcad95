"""The hint loss's per-channel math in one launch: BatchNorm statistics of the regressor output and the folded affine.

For each regressor channel c (see hint_loss.py for the math) one program row computes
    mean_A = w_c·μ,  var_A = max((W·Gc)_c·w_c / M, 0)                       (batch statistics only)
    (a, e, center, r): P = A·a + e and x̂ = (A − center)·r
and writes them as rows of one (6, Ct) fp32 tensor: a, e, center, r, mean_A, var_A. The forward reads a and e, the
backward a, center and r, the running-stat update mean_A and var_A; nothing recomputes them with small torch ops.
After the backward's dP pass a second kernel reduces its column partial sums into the BatchNorm and bias gradients
and the batch-statistics coefficients (c1, a·Σ dP), and writes Wa = diag(a)·W for the dX GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hint_loss_common import INTERPRET, last_arrival, tickets
from .rounding import cast

NO_BN, BATCH_STATS, RUNNING_STATS = 0, 1, 2  # = hint_loss's modes: how BatchNorm normalizes
CHANNEL_ROWS = 6  # a, e, center, r, mean_A, var_A
CHANNEL_BLOCK = 32 if INTERPRET else 128  # channels per program
CHANNEL_BLOCK_CS = 32 if INTERPRET else 64  # student channels per step of the batch-statistics dot products


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's formula (exact at both ends), so the running statistics match nn.BatchNorm2d's update
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _update_running(
    mean_ptr,
    var_ptr,
    count_ptr,
    ticket_ptr,
    cols,
    ok,
    batch_mean,
    batch_var,
    M,
    momentum,
    HAS_COUNT: tl.constexpr,
    CUMULATIVE: tl.constexpr,
):
    factor = momentum
    if HAS_COUNT:
        count = tl.load(count_ptr)
        if CUMULATIVE:
            factor = 1.0 / (count + 1).to(tl.float32)
    elif CUMULATIVE:
        factor = 0.0
    unbiased = batch_var * (M.to(tl.float64) / (M - 1)).to(tl.float32)
    running_mean = tl.load(mean_ptr + cols, mask=ok, other=0.0)
    running_var = tl.load(var_ptr + cols, mask=ok, other=0.0)
    new_mean = _lerp(running_mean.to(tl.float32), batch_mean, factor)
    new_var = _lerp(running_var.to(tl.float32), unbiased, factor)
    tl.store(mean_ptr + cols, new_mean.to(running_mean.dtype), mask=ok)
    tl.store(var_ptr + cols, new_var.to(running_var.dtype), mask=ok)
    if HAS_COUNT:
        if last_arrival(ticket_ptr, tl.num_programs(0)):
            tl.store(count_ptr, count + 1)


@triton.jit
def _hint_channel_affine_kernel(
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype, row-major (the GEMM operand)
    mean_ptr,  # (Cs,) fp32 column mean μ of X (batch statistics)
    wg_ptr,  # (Ct, Cs) fp32 W·Gc, row-major (batch statistics)
    bias_ptr,  # (Ct,) conv bias, any float dtype (HAS_BIAS)
    gamma_ptr,  # (Ct,) BatchNorm γ (HAS_AFFINE)
    beta_ptr,  # (Ct,) BatchNorm β (HAS_AFFINE)
    rmean_ptr,  # (Ct,) running mean (running statistics)
    rvar_ptr,  # (Ct,) running variance (running statistics)
    out_ptr,  # (6, Ct) fp32 out: a, e, center, r, mean_A, var_A
    upd_mean_ptr,  # (Ct,) running mean updated in place (UPDATE)
    upd_var_ptr,  # (Ct,) running variance updated in place (UPDATE)
    count_ptr,  # () int64 num_batches_tracked, incremented in place (UPDATE and HAS_COUNT)
    ticket_ptr,  # one int32 ticket slot, zero at rest
    CT,  # regressor output channels
    CS,  # student channels
    M,  # rows N·H·W (the unbiased variance's count)
    inv_m,  # 1 / M
    eps,  # BatchNorm's ε
    momentum,  # running-stat momentum (unused when CUMULATIVE)
    MODE: tl.constexpr,  # NO_BN 0, BATCH_STATS 1, RUNNING_STATS 2
    HAS_BIAS: tl.constexpr,  # a conv bias is given
    HAS_AFFINE: tl.constexpr,  # BatchNorm has γ and β
    UPDATE: tl.constexpr,  # batch statistics in training: update the running statistics like nn.BatchNorm2d
    HAS_COUNT: tl.constexpr,  # num_batches_tracked exists
    CUMULATIVE: tl.constexpr,  # momentum None: a cumulative average, factor 1/num_batches_tracked
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_CS: tl.constexpr,  # student channels per step (batch statistics)
):
    # Reads W and W·Gc once (batch statistics: 2·Ct·Cs multiply-adds), a few (Ct,) vectors; writes 6·Ct fp32.
    # UPDATE follows nn.BatchNorm2d: num_batches_tracked += 1; factor = momentum, or 1/num_batches_tracked when
    # momentum is None (0 without a counter); running ← lerp(running, batch, factor) with the batch mean of the conv
    # output (bias included) and its unbiased variance. Every program reads the counter before the last one (by
    # ticket) increments it.
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < CT
    zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
    b = zero
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    mean_a = zero
    var_a = zero
    if MODE == 0:
        scale = zero + 1.0
        shift = b
        center = zero
        rstd = zero + 1.0
    else:
        if MODE == 1:
            for k0 in range(0, CS, BLOCK_CS):
                ks = k0 + tl.arange(0, BLOCK_CS)
                m2 = ok[:, None] & (ks < CS)[None, :]
                w = tl.load(w_ptr + cols[:, None] * CS + ks[None, :], mask=m2, other=0.0).to(tl.float32)
                mu = tl.load(mean_ptr + ks, mask=ks < CS, other=0.0)
                wg = tl.load(wg_ptr + cols[:, None] * CS + ks[None, :], mask=m2, other=0.0)
                mean_a += tl.sum(w * mu[None, :], axis=1)
                var_a += tl.sum(wg * w, axis=1)
            var_a = tl.maximum(var_a * inv_m, 0.0)
            rstd = 1.0 / tl.sqrt_rn(var_a + eps)
            center = mean_a
            if UPDATE:
                _update_running(
                    upd_mean_ptr,
                    upd_var_ptr,
                    count_ptr,
                    ticket_ptr,
                    cols,
                    ok,
                    mean_a + b,
                    var_a,
                    M,
                    momentum,
                    HAS_COUNT,
                    CUMULATIVE,
                )
        else:
            rvar = tl.load(rvar_ptr + cols, mask=ok, other=1.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(rvar + eps)
            center = tl.load(rmean_ptr + cols, mask=ok, other=0.0).to(tl.float32) - b
        scale = rstd
        beta = zero
        if HAS_AFFINE:
            scale = rstd * tl.load(gamma_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        shift = beta - center * scale
    tl.store(out_ptr + cols, scale, mask=ok)
    tl.store(out_ptr + CT + cols, shift, mask=ok)
    tl.store(out_ptr + 2 * CT + cols, center, mask=ok)
    tl.store(out_ptr + 3 * CT + cols, rstd, mask=ok)
    tl.store(out_ptr + 4 * CT + cols, mean_a, mask=ok)
    tl.store(out_ptr + 5 * CT + cols, var_a, mask=ok)


def channel_affine(
    mode: int,
    weight_lp: Tensor,
    feature_mean: Tensor | None,
    wg: Tensor | None,
    m: int,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    update: tuple[Tensor, Tensor, Tensor | None] | None = None,
    momentum: float | None = 0.1,
) -> Tensor:
    """(6, Ct) fp32 rows a, e, center, r, mean_A, var_A (the last two zero unless batch statistics). With batch
    statistics, `update` = (running_mean, running_var, num_batches_tracked or None) are updated in place as
    nn.BatchNorm2d does in training, with `momentum` (None: cumulative average)."""
    ct, cs = weight_lp.shape
    out = torch.empty((CHANNEL_ROWS, ct), device=weight_lp.device, dtype=torch.float32)
    update = update if mode == BATCH_STATS else None
    if mode == BATCH_STATS and not weight_lp.is_contiguous():
        weight_lp = weight_lp.contiguous()
    unused = out  # pointers a mode never reads (their loads compile away)
    _hint_channel_affine_kernel[(triton.cdiv(ct, CHANNEL_BLOCK),)](
        weight_lp,
        feature_mean if feature_mean is not None else unused,
        wg if wg is not None else unused,
        bias if bias is not None else unused,
        bn_weight if bn_weight is not None else unused,
        bn_bias if bn_bias is not None else unused,
        running_mean if running_mean is not None else unused,
        running_var if running_var is not None else unused,
        out,
        update[0] if update else unused,
        update[1] if update else unused,
        update[2] if update and update[2] is not None else unused,
        tickets(weight_lp.device, 1),
        ct,
        cs,
        m,
        1.0 / m,
        eps,
        0.0 if momentum is None else momentum,
        MODE=mode,
        HAS_BIAS=bias is not None,
        HAS_AFFINE=bn_weight is not None,
        UPDATE=update is not None,
        HAS_COUNT=update is not None and update[2] is not None,
        CUMULATIVE=momentum is None,
        BLOCK_C=CHANNEL_BLOCK,
        BLOCK_CS=CHANNEL_BLOCK_CS,
        num_warps=4,
    )
    return out


@triton.jit
def _hint_channel_grads_kernel(
    part_ptr,  # (2, R, Ct) fp32 column partial sums of the dP pass: Σ dP and Σ dP·(A − center) per row block
    chan_ptr,  # (6, Ct) fp32 per-channel rows of the forward: a, e, center, r, mean_A, var_A
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype, row-major
    coef_ptr,  # (2, Ct) fp32 out: c1, a·Σ dP (the batch-statistics corrections of dX and dW)
    dbeta_ptr,  # (Ct,) out: dβ = Σ dP, in its own dtype
    dgamma_ptr,  # (Ct,) out: dγ = r·Σ dP·(A − center)
    dbias_ptr,  # (Ct,) out: the conv bias gradient
    wa_ptr,  # (Ct, Cs) out: Wa = diag(a)·W in the grad dtype, row-major
    g0_part_ptr,  # (programs, Cs) fp32 scratch: each program's share of g0 (batch statistics)
    g0_ptr,  # (Cs,) fp32 out: g0 = −Wᵀ(a·Σ dP)/M, dX's constant batch-statistics term
    ticket_ptr,  # one int32 ticket slot, zero at rest
    R,  # row blocks of the partial sums
    CT,  # regressor output channels
    CS,  # student channels
    inv_m,  # 1 / M
    MODE: tl.constexpr,  # NO_BN 0, BATCH_STATS 1, RUNNING_STATS 2
    SUMS: tl.constexpr,  # the partial sums exist (BatchNorm or bias gradients wanted)
    EMULATE: tl.constexpr,  # interpreter: round to the grad dtype as the GPU does
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_CS: tl.constexpr,  # student channels per step
):
    # Reads 2·R·Ct partials, W; writes 5·Ct values and Wa (finish_channels).
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < CT
    sum_d = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if SUMS:
        sum_d, sum_dx = column_sums(part_ptr, R, CT, cols, ok, False)
    finish_channels(
        pid,
        tl.num_programs(0),
        cols,
        ok,
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
        MODE,
        SUMS,
        EMULATE,
        BLOCK_CS,
    )


@triton.jit
def column_sums(part_ptr, R, CT, cols, ok, VOLATILE: tl.constexpr):
    """(Σ dP, Σ dP·(A − center)) of `cols` from partials laid out (2, R, Ct), added in row-block order. VOLATILE:
    the partials were written by other programs of the same launch (read past L1)."""
    sum_d = tl.zeros(cols.shape, dtype=tl.float32)
    sum_dx = tl.zeros(cols.shape, dtype=tl.float32)
    for r in range(0, R):
        sum_d += tl.load(part_ptr + r * CT + cols, mask=ok, other=0.0, volatile=VOLATILE)
        sum_dx += tl.load(part_ptr + (R + r) * CT + cols, mask=ok, other=0.0, volatile=VOLATILE)
    return sum_d, sum_dx


@triton.jit
def channel_coefficients(cols, ok, sum_d, sum_dx, chan_ptr, CT, inv_m):
    """(a, c1, a·Σ dP) of `cols` from their column sums Σ dP and Σ dP·(A − center): c1 = −a·r²·Σ dP·(A − center)/M."""
    scale = tl.load(chan_ptr + cols, mask=ok, other=0.0)
    rstd = tl.load(chan_ptr + 3 * CT + cols, mask=ok, other=0.0)
    return scale, -scale * rstd * rstd * sum_dx * inv_m, scale * sum_d


@triton.jit
def finish_channels(
    pid,  # this program's index among the `programs` that share the g0 reduction
    programs,
    cols,  # (BLOCK_C,) the regressor channels this program finishes
    ok,  # cols < Ct
    sum_d,  # (BLOCK_C,) fp32 Σ_m dP over every row (SUMS)
    sum_dx,  # (BLOCK_C,) fp32 Σ_m dP·(A − center) over every row (SUMS)
    chan_ptr,  # (6, Ct) fp32 per-channel rows of the forward: a, e, center, r, mean_A, var_A
    w_ptr,  # (Ct, Cs) regressor weight in the feature dtype, row-major
    coef_ptr,  # (2, Ct) fp32 out: c1, a·Σ dP
    dbeta_ptr,  # (Ct,) out: dβ = Σ dP, in its own dtype
    dgamma_ptr,  # (Ct,) out: dγ = r·Σ dP·(A − center)
    dbias_ptr,  # (Ct,) out: the conv bias gradient
    wa_ptr,  # (Ct, Cs) out: Wa = diag(a)·W in the grad dtype, row-major
    g0_part_ptr,  # (programs, Cs) fp32 scratch: each program's share of g0 (batch statistics)
    g0_ptr,  # (Cs,) fp32 out: g0 = −Wᵀ(a·Σ dP)/M, dX's constant batch-statistics term
    ticket_ptr,  # one int32 ticket slot, zero at rest (g0's reduction)
    CT,  # regressor output channels
    CS,  # student channels
    inv_m,  # 1 / M
    MODE: tl.constexpr,  # NO_BN 0, BATCH_STATS 1, RUNNING_STATS 2
    SUMS: tl.constexpr,  # the column sums exist (BatchNorm or bias gradients wanted)
    EMULATE: tl.constexpr,  # interpreter: round to the grad dtype as the GPU does
    BLOCK_CS: tl.constexpr,  # student channels per step
):
    """The backward's per-channel math for `cols` once their column sums are complete; returns (c1, a·Σ dP). With
    batch statistics
        c1 = −a·r²·Σ dP·(A − mean_A)/M   (dY's term along A − mean_A, see hint_loss.py)
        g0 = −Σ_c (a·Σ dP)_c·W[c, :]/M  (a reduction over every program's channels: the last one finishes it)
    and the bias gradient is 0; otherwise it is Σ dP (no BatchNorm) or a·Σ dP (running statistics)."""
    G0: tl.constexpr = MODE == 1 and SUMS
    scale, c1, a_sum_d = channel_coefficients(cols, ok, sum_d, sum_dx, chan_ptr, CT, inv_m)
    if SUMS:
        rstd = tl.load(chan_ptr + 3 * CT + cols, mask=ok, other=0.0)
        if MODE == 1:
            d_bias = tl.zeros(cols.shape, dtype=tl.float32)
        elif MODE == 0:
            d_bias = sum_d
        else:
            d_bias = a_sum_d
        tl.store(coef_ptr + cols, c1, mask=ok)
        tl.store(coef_ptr + CT + cols, a_sum_d, mask=ok)
        tl.store(dbeta_ptr + cols, cast(sum_d, dbeta_ptr.dtype.element_ty, EMULATE), mask=ok)
        tl.store(dgamma_ptr + cols, cast(rstd * sum_dx, dgamma_ptr.dtype.element_ty, EMULATE), mask=ok)
        tl.store(dbias_ptr + cols, cast(d_bias, dbias_ptr.dtype.element_ty, EMULATE), mask=ok)
    for k0 in range(0, CS, BLOCK_CS):
        ks = k0 + tl.arange(0, BLOCK_CS)
        m2 = ok[:, None] & (ks < CS)[None, :]
        w = tl.load(w_ptr + cols[:, None] * CS + ks[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(
            wa_ptr + cols[:, None] * CS + ks[None, :],
            cast(scale[:, None] * w, wa_ptr.dtype.element_ty, EMULATE),
            mask=m2,
        )
        if G0:
            tl.store(g0_part_ptr + pid * CS + ks, tl.sum(a_sum_d[:, None] * w, axis=0), mask=ks < CS)
    if G0:
        if last_arrival(ticket_ptr, programs):
            for k0 in range(0, CS, BLOCK_CS):
                ks = k0 + tl.arange(0, BLOCK_CS)
                g0 = tl.zeros((BLOCK_CS,), dtype=tl.float32)
                for p in range(0, programs):
                    g0 += tl.load(g0_part_ptr + p * CS + ks, mask=ks < CS, other=0.0, volatile=True)
                tl.store(g0_ptr + ks, -g0 * inv_m, mask=ks < CS)
    return c1, a_sum_d


def channel_grad_outputs(
    ct: int,
    cs: int,
    programs: int,
    device: torch.device,
    grad_dtype: torch.dtype,
    param_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Empty buffers for what finish_channels writes: bn_coef (2, Ct) fp32 (c1, a·Σ dP), dβ, dγ and the bias gradient
    (param_dtypes, each its own tensor: a custom op's outputs may not alias), Wa (Ct, Cs) in grad_dtype, and g0's
    per-program scratch (programs, Cs) and result (Cs,) in fp32."""
    f32 = torch.float32
    bn_coef = torch.empty((2, ct), device=device, dtype=f32)
    d_beta, d_gamma, d_bias = (torch.empty((ct,), device=device, dtype=d) for d in param_dtypes)
    wa = torch.empty((ct, cs), device=device, dtype=grad_dtype)
    g0_part = torch.empty((programs, cs), device=device, dtype=f32)
    g0 = torch.empty((cs,), device=device, dtype=f32)
    return bn_coef, d_beta, d_gamma, d_bias, wa, g0_part, g0


def channel_grads(
    mode: int,
    part: Tensor | None,
    chan: Tensor,
    weight_lp: Tensor,
    m: int,
    grad_dtype: torch.dtype,
    param_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(coef (2, Ct) fp32 rows c1 and a·Σ dP, dβ, dγ, bias gradient, Wa = diag(a)·W in grad_dtype, g0 (Cs,) fp32)
    from the dP pass's column partial sums `part` (2, R, Ct); without `part` only Wa is defined, and g0 only with
    batch statistics. param_dtypes: dβ's, dγ's and the bias gradient's dtypes (each a separate tensor: the op's
    outputs may not alias)."""
    ct, cs = weight_lp.shape
    weight_lp = weight_lp.contiguous()
    device = chan.device
    programs = triton.cdiv(ct, CHANNEL_BLOCK)
    coef, d_beta, d_gamma, d_bias, wa, g0_part, g0 = channel_grad_outputs(
        ct, cs, programs, device, grad_dtype, param_dtypes
    )
    _hint_channel_grads_kernel[(programs,)](
        part if part is not None else coef,
        chan,
        weight_lp,
        coef,
        d_beta,
        d_gamma,
        d_bias,
        wa,
        g0_part,
        g0,
        tickets(device, 1),
        part.shape[1] if part is not None else 0,
        ct,
        cs,
        1.0 / m,
        MODE=mode,
        SUMS=part is not None,
        EMULATE=INTERPRET,
        BLOCK_C=CHANNEL_BLOCK,
        BLOCK_CS=CHANNEL_BLOCK_CS,
        num_warps=4,
    )
    return coef, d_beta, d_gamma, d_bias, wa, g0
