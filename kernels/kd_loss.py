"""Fused temperature-softmax KD loss + the student's cross-entropy: one streaming pass over the logits forward, one
backward, the batch reduction folded into the forward kernel.

    kd, ce = fused_kd_loss(student_logits, teacher_logits, labels, temperature, reduction, tau_squared, form,
                           label_smoothing=0.0)

The math, the traffic and the design choices are in the comment opening `_kd_loss_fwd_kernel`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kd_loss_checks import INTERPRET, check_kd_inputs
from .rounding import cast

# Tuning constants (untuned on hardware: chosen from the Triton softmax tutorial's heuristics).
MAX_ONE_BLOCK_C = 8192  # up to this many classes a row is one block (registers); beyond, it streams in blocks
TWO_PASS_BLOCK_C = 4096  # the block over C beyond that
TILE_ELEMENTS = 4096  # rows per program = TILE_ELEMENTS // block (several short rows share a program)
MAX_ROWS = 16
PARTIALS_BLOCK = tl.constexpr(1024)  # the final, fixed-order sum of the per-program partials
IGNORE_INDEX = tl.constexpr(-100)  # F.cross_entropy's default: such rows add nothing to ce nor to its mean's count
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for masked lanes: exp() gives 0, never NaN
NAN = tl.constexpr(float("nan"))
STATS = 5  # per row: max(s), log Σ exp((s − max)/τ), max(t), log Σ exp((t − max)/τ), log Σ exp(s − max)


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr,  # (N, C) student logits, fp32/bf16/fp16, unit stride over classes
    t_ptr,  # (N, C) teacher logits, the student's dtype
    y_ptr,  # (N,) int64 labels (−100: ignored); a placeholder, never read, without labels
    stats_ptr,  # (N, STATS) fp32 out: the row statistics the backward rebuilds the softmaxes from
    part_ptr,  # (programs, 3) fp32 scratch: each program's Σ kd_row, Σ ce_row, valid-label count
    ticket_ptr,  # (1,) int32, zero on entry: counts finished programs; the last one resets it to 0
    kd_ptr,  # () fp32 out: kd
    ce_ptr,  # () fp32 out: ce (0 without labels)
    n_valid_ptr,  # () fp32 out: the number of rows whose label is not ignored
    kd_weight_ptr,  # () fp32: the objective's weight of kd (OBJECTIVE; else a placeholder)
    obj_ptr,  # () fp32 out: kd_weight·kd + ce_weight·ce (OBJECTIVE; else a placeholder)
    grad_ptr,  # (N, C) out, row-major, the logits' dtype: d(objective)/ds (EMIT_GRAD; else a placeholder)
    N,  # rows
    C_VEC,  # classes / VEC (so the compiler knows C is a multiple of VEC)
    s_stride_vec,  # student row stride / VEC
    t_stride_vec,  # teacher row stride / VEC
    y_stride,  # label stride
    inv_tau,  # 1 / temperature
    eps,  # label smoothing ε
    kd_scale,  # [τ²] / {N | N·C | 1}: turns Σ kd_row into kd
    ce_weight,  # the objective's weight of ce (a Python float)
    VEC: tl.constexpr,  # the largest of 8, 4, 2, 1 dividing C and both row strides: aligned vector loads
    ROWS: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per step of the sweep
    ONE_BLOCK: tl.constexpr,  # BLOCK_C ≥ C: a row is one tile, loaded once and kept in registers
    KL: tl.constexpr,  # "kl" form (else the paper's cross-entropy form)
    HAS_LABELS: tl.constexpr,  # also the student's cross-entropy on labels
    OBJECTIVE: tl.constexpr,  # also write the weighted objective (fused_kd_objective)
    EMIT_GRAD: tl.constexpr,  # also write d(objective)/ds for an upstream gradient of 1 and no ignored label
    EMULATE: tl.constexpr,  # interpreter: round the bf16 gradient store to nearest even, as the GPU does
):
    # ROWS rows per program. a = s/τ, b = t/τ, P_S = softmax(a), P_T = softmax(b); m = running max, d = Σ exp(x − m):
    #   kl      = Σ P_T (log P_T − log P_S) = Σ P_T ((b − m_b) − (a − m_a)) + log d_a − log d_b
    #   ce form = −Σ P_T log P_S            = Σ P_T (m_a − a) + log d_a      (the FitNets paper's H(P_T^τ, P_S^τ))
    #   d(kd_row)/ds = (P_S − P_T) / τ for both forms (Σ P_T = 1); kd = kd_scale · Σ rows, kd_scale = [τ²]/{N|N·C|1}
    #   ce_row = log d_1 + (1−ε)(m_s − s_y) + ε(m_s − mean_c s)   (τ = 1: F.cross_entropy with label_smoothing ε)
    # Online (streaming) max/sum in fp32 for the student at τ and at 1 and the teacher at τ, in one sweep over C.
    # Traffic, with Ce = N·C·element_size:
    # fused_kd_loss (two outputs, independent grad_outputs): forward reads s and t (2Ce) and writes 20 B of
    #   statistics per row; backward (_kd_loss_bwd_kernel) reads s and t again and writes grad_s: 5Ce in all. With
    #   the gradient scales known only in backward, 5Ce is the least: the backward needs two N × C quantities
    #   (storing P_S − P_T and re-reading s costs 6Ce; storing both parts 7Ce).
    # fused_kd_objective (one output, objective = kd_weight·kd + ce_weight·ce, kd_weight read on the device):
    #   EMIT_GRAD writes G = d(objective)/ds in this same pass, betting on an upstream gradient of exactly 1 and no
    #   ignored label (ce's mean over N) — what loss.backward() of a plain sum gives without GradScaler. For
    #   C ≤ MAX_ONE_BLOCK_C the tile stays in registers: 2Ce read + Ce written. The backward (kd_objective.py) reads
    #   the upstream gradient and the valid count and returns at once when the bet holds (3Ce in all); otherwise it
    #   recomputes G from s and t in place (6Ce). G lives from forward to backward, as do s and t.
    # Reduction: each program writes its partial sums, takes a ticket, and the last program sums the partials in
    # program order: deterministic, in this one launch (the ticket counter is zeroed by a memset before it).
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    C = C_VEC * VEC
    s_rows = s_ptr + rows64[:, None] * (s_stride_vec * VEC)
    t_rows = t_ptr + rows64[:, None] * (t_stride_vec * VEC)
    cols = tl.arange(0, BLOCK_C)
    m_s = tl.full((ROWS,), NEG, tl.float32)
    m_t = tl.full((ROWS,), NEG, tl.float32)
    d_a = tl.zeros((ROWS,), tl.float32)
    d_b = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS,), tl.float32)
    d_1 = tl.zeros((ROWS,), tl.float32)
    sum_s = tl.zeros((ROWS,), tl.float32)
    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols < C)[None, :]
        s = tl.where(mask, tl.load(s_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32), NEG)
        t = tl.where(mask, tl.load(t_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32), NEG)
        m_s, m_t, d_a, d_b, acc, d_1, sum_s, e_a, e_b, e_1 = _sweep_tile(
            s, t, mask, m_s, m_t, d_a, d_b, acc, d_1, sum_s, inv_tau, KL, HAS_LABELS
        )
    else:
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = row_ok[:, None] & (offs < C)[None, :]
            s = tl.where(mask, tl.load(s_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32), NEG)
            t = tl.where(mask, tl.load(t_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32), NEG)
            m_s, m_t, d_a, d_b, acc, d_1, sum_s, _e_a, _e_b, _e_1 = _sweep_tile(
                s, t, mask, m_s, m_t, d_a, d_b, acc, d_1, sum_s, inv_tau, KL, HAS_LABELS
            )
    # Rows past N saw only masked lanes: give them d = 1 so that nothing below takes log(0) or divides by 0.
    d_a, d_b, d_1 = tl.where(row_ok, d_a, 1.0), tl.where(row_ok, d_b, 1.0), tl.where(row_ok, d_1, 1.0)
    log_d_a, log_d_b = tl.log(d_a), tl.log(d_b)
    kd_row = acc / d_b + log_d_a
    if KL:
        kd_row -= log_d_b
    stats = stats_ptr + rows64 * 5
    tl.store(stats, m_s, mask=row_ok)
    tl.store(stats + 1, log_d_a, mask=row_ok)
    tl.store(stats + 2, m_t, mask=row_ok)
    tl.store(stats + 3, log_d_b, mask=row_ok)
    ce_sum = 0.0
    valid_sum = 0.0
    y = tl.zeros((ROWS,), tl.int64)
    valid = row_ok
    log_d_1 = tl.zeros((ROWS,), tl.float32)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows64 * y_stride, mask=row_ok, other=IGNORE_INDEX)
        valid = y != IGNORE_INDEX
        in_range = (y >= 0) & (y < C)
        s_y = tl.load(s_ptr + rows64 * (s_stride_vec * VEC) + tl.where(in_range, y, 0), mask=row_ok, other=0.0)
        log_d_1 = tl.log(d_1)
        ce_row = log_d_1 + (1.0 - eps) * (m_s - s_y.to(tl.float32)) + eps * (m_s - sum_s / C)
        # An out-of-range label cannot raise without a host sync: it turns ce (and its gradient row) into NaN.
        ce_sum = tl.sum(tl.where(valid, tl.where(in_range, ce_row, NAN), 0.0), 0)
        valid_sum = tl.sum(tl.where(valid, 1.0, 0.0), 0)
        log_d_1 = tl.where(in_range | ~valid, log_d_1, NAN)
        tl.store(stats + 4, log_d_1, mask=row_ok)
    if EMIT_GRAD:
        # Upstream gradient 1 and no ignored label: the scales are kd_weight·kd_scale/τ and ce_weight/N.
        g_kd = tl.load(kd_weight_ptr) * kd_scale * inv_tau
        row_scale = tl.where(valid, ce_weight / N, 0.0)
        if ONE_BLOCK:
            # From the tile in registers: e/d is the softmax (the maxima are final after one tile).
            g = g_kd * (e_a * (1.0 / d_a)[:, None] - e_b * (1.0 / d_b)[:, None])
            if HAS_LABELS:
                target = tl.where(cols[None, :] == y[:, None], 1.0 - eps, 0.0) + eps / C
                inv_d_1 = tl.where(log_d_1 == log_d_1, 1.0 / d_1, NAN)  # NaN for an out-of-range label
                g += row_scale[:, None] * (e_1 * inv_d_1[:, None] - target)
            out = grad_ptr + rows64[:, None] * C + cols[None, :]
            tl.store(out, cast(g, grad_ptr.dtype.element_ty, EMULATE), mask=mask)
        else:
            _grad_rows(
                s_ptr, t_ptr, grad_ptr, rows64, row_ok, y, m_s, log_d_a, m_t, log_d_b, log_d_1, g_kd, row_scale,
                C, s_stride_vec * VEC, t_stride_vec * VEC, inv_tau, eps, BLOCK_C, HAS_LABELS, EMULATE,
            )  # fmt: skip
    tl.store(part_ptr + pid * 3, tl.sum(tl.where(row_ok, kd_row, 0.0), 0))
    tl.store(part_ptr + pid * 3 + 1, ce_sum)
    tl.store(part_ptr + pid * 3 + 2, valid_sum)
    # acq_rel: this program's partials are visible before its ticket; the last program sees every partial.
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        _sum_partials(
            part_ptr, kd_ptr, ce_ptr, n_valid_ptr, kd_weight_ptr, obj_ptr, tl.num_programs(0), kd_scale, ce_weight,
            HAS_LABELS, OBJECTIVE,
        )  # fmt: skip
        tl.store(ticket_ptr, 0)


@triton.jit
def _sweep_tile(s, t, mask, m_s, m_t, d_a, d_b, acc, d_1, sum_s, inv_tau, KL: tl.constexpr, HAS_LABELS: tl.constexpr):
    # One tile of the online sweep; also returns the tile's exponentials (the softmax numerators after one tile).
    # Maxima stay on the raw logits (max(s/τ) = max(s)/τ) and τ scales differences, (s − m)·(1/τ): the terms
    # near the maximum, the ones that matter, then carry the rounding of a small number, not of |s|/τ.
    m_s_new = tl.maximum(m_s, tl.max(s, 1))
    m_t_new = tl.maximum(m_t, tl.max(t, 1))
    alpha_a = tl.exp((m_s - m_s_new) * inv_tau)
    alpha_b = tl.exp((m_t - m_t_new) * inv_tau)
    e_a = tl.where(mask, tl.exp((s - m_s_new[:, None]) * inv_tau), 0.0)
    e_b = tl.where(mask, tl.exp((t - m_t_new[:, None]) * inv_tau), 0.0)
    # acc = Σ e_b·q, q centred on the running maxima (re-centred by `shift` when they move): no large terms cancel.
    q = (m_s_new[:, None] - s) * inv_tau
    shift = (m_s_new - m_s) * inv_tau
    if KL:
        q += (t - m_t_new[:, None]) * inv_tau
        shift += (m_t - m_t_new) * inv_tau
    acc = alpha_b * (acc + tl.where(d_b > 0, d_b * shift, 0.0)) + tl.sum(tl.where(mask, e_b * q, 0.0), 1)
    d_a = d_a * alpha_a + tl.sum(e_a, 1)
    d_b = d_b * alpha_b + tl.sum(e_b, 1)
    e_1 = e_a
    if HAS_LABELS:
        e_1 = tl.where(mask, tl.exp(s - m_s_new[:, None]), 0.0)
        d_1 = d_1 * tl.exp(m_s - m_s_new) + tl.sum(e_1, 1)
        sum_s += tl.sum(tl.where(mask, s, 0.0), 1)
    return m_s_new, m_t_new, d_a, d_b, acc, d_1, sum_s, e_a, e_b, e_1


@triton.jit
def _sum_partials(
    part_ptr, kd_ptr, ce_ptr, n_valid_ptr, kd_weight_ptr, obj_ptr, programs, kd_scale, ce_weight,
    HAS_LABELS: tl.constexpr, OBJECTIVE: tl.constexpr,
):  # fmt: skip
    # The second level of the reduction, in program order (deterministic): reads 12 B per program.
    idx = tl.arange(0, PARTIALS_BLOCK)
    kd = tl.zeros((PARTIALS_BLOCK,), tl.float32)
    ce = tl.zeros((PARTIALS_BLOCK,), tl.float32)
    n_valid = tl.zeros((PARTIALS_BLOCK,), tl.float32)
    for start in range(0, programs, PARTIALS_BLOCK):
        p = start + idx
        ok = p < programs
        kd += tl.load(part_ptr + p * 3, mask=ok, other=0.0, volatile=True)
        ce += tl.load(part_ptr + p * 3 + 1, mask=ok, other=0.0, volatile=True)
        n_valid += tl.load(part_ptr + p * 3 + 2, mask=ok, other=0.0, volatile=True)
    kd_value = tl.sum(kd, 0) * kd_scale
    tl.store(kd_ptr, kd_value)
    count = tl.sum(n_valid, 0)
    tl.store(n_valid_ptr, count)
    if HAS_LABELS:
        ce_value = tl.sum(ce, 0) / count  # all rows ignored: 0/0 = NaN, as F.cross_entropy
        tl.store(ce_ptr, ce_value)
        if OBJECTIVE:
            tl.store(obj_ptr, tl.load(kd_weight_ptr) * kd_value + ce_weight * ce_value)
    else:
        tl.store(ce_ptr, 0.0)  # a defined value in the unused output
        if OBJECTIVE:
            tl.store(obj_ptr, tl.load(kd_weight_ptr) * kd_value)


@triton.jit
def _load_row_stats(stats_ptr, rows64, row_ok, HAS_LABELS: tl.constexpr):
    """The forward's (max, log Σ exp) per row: student at τ, teacher at τ, student at 1 (0 without labels)."""
    stats = stats_ptr + rows64 * 5
    m_s = tl.load(stats, mask=row_ok, other=0.0)
    log_d_a = tl.load(stats + 1, mask=row_ok, other=0.0)
    m_t = tl.load(stats + 2, mask=row_ok, other=0.0)
    log_d_b = tl.load(stats + 3, mask=row_ok, other=0.0)
    log_d_1 = tl.zeros_like(m_s)
    if HAS_LABELS:
        log_d_1 = tl.load(stats + 4, mask=row_ok, other=0.0)
    return m_s, log_d_a, m_t, log_d_b, log_d_1


@triton.jit
def _grad_rows(
    s_ptr, t_ptr, out_ptr, rows64, row_ok, y, m_s, log_d_a, m_t, log_d_b, log_d_1, g_kd, row_scale,
    C, s_stride, t_stride, inv_tau, eps, BLOCK_C: tl.constexpr, HAS_LABELS: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    # grad_s = g_kd · (P_S − P_T) + row_scale · (softmax(s) − (1−ε)·onehot(y) − ε/C), every softmax rebuilt from
    # the row statistics. Reads s, t (2Ce), writes grad_s (Ce), row-major.
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        offs = start + cols
        mask = row_ok[:, None] & (offs < C)[None, :]
        s = tl.load(s_ptr + rows64[:, None] * s_stride + offs[None, :], mask=mask, other=0.0)
        t = tl.load(t_ptr + rows64[:, None] * t_stride + offs[None, :], mask=mask, other=0.0)
        s = tl.where(mask, s.to(tl.float32), m_s[:, None])  # masked lanes at the maximum: exp() stays finite
        t = tl.where(mask, t.to(tl.float32), m_t[:, None])
        p_s = tl.exp((s - m_s[:, None]) * inv_tau - log_d_a[:, None])
        p_t = tl.exp((t - m_t[:, None]) * inv_tau - log_d_b[:, None])
        g = g_kd * (p_s - p_t)
        if HAS_LABELS:
            target = tl.where(offs[None, :] == y[:, None], 1.0 - eps, 0.0) + eps / C
            g += row_scale[:, None] * (tl.exp((s - m_s[:, None]) - log_d_1[:, None]) - target)
        out = out_ptr + rows64[:, None] * C + offs[None, :]
        tl.store(out, cast(g, out_ptr.dtype.element_ty, EMULATE), mask=mask)


@triton.jit
def _kd_loss_bwd_kernel(
    s_ptr,  # (N, C) student logits, unit stride over classes
    t_ptr,  # (N, C) teacher logits
    y_ptr,  # (N,) int64 labels; a placeholder without labels
    stats_ptr,  # (N, STATS) fp32: the forward's row statistics
    out_ptr,  # (N, C) out: grad_s in the logits' dtype, row-major
    grad_kd_ptr,  # () fp32: kd's grad_output, read on the device (no host sync)
    grad_ce_ptr,  # () fp32: ce's grad_output
    n_valid_ptr,  # () fp32: the forward's count of rows with a label
    N,  # rows
    C_VEC,  # classes / VEC
    s_stride_vec,  # student row stride / VEC
    t_stride_vec,  # teacher row stride / VEC
    y_stride,  # label stride
    inv_tau,  # 1 / temperature
    eps,  # label smoothing ε
    kd_grad_scale,  # kd_scale / τ
    VEC: tl.constexpr,  # as in the forward
    ROWS: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per step
    HAS_LABELS: tl.constexpr,  # add ce's gradient
    EMULATE: tl.constexpr,  # interpreter: round the bf16 store to nearest even, as the GPU does
):
    # grad_s = grad_kd · kd_scale/τ · (P_S − P_T) + grad_ce · (softmax(s) − (1−ε)·onehot(y) − ε/C) / n_valid.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    m_s, log_d_a, m_t, log_d_b, log_d_1 = _load_row_stats(stats_ptr, rows64, row_ok, HAS_LABELS)
    g_kd = tl.load(grad_kd_ptr) * kd_grad_scale
    y = tl.zeros((ROWS,), tl.int64)
    row_scale = tl.zeros((ROWS,), tl.float32)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows64 * y_stride, mask=row_ok, other=IGNORE_INDEX)
        row_scale = tl.where(y != IGNORE_INDEX, tl.load(grad_ce_ptr) / tl.load(n_valid_ptr), 0.0)
    _grad_rows(
        s_ptr, t_ptr, out_ptr, rows64, row_ok, y, m_s, log_d_a, m_t, log_d_b, log_d_1, g_kd, row_scale,
        C_VEC * VEC, s_stride_vec * VEC, t_stride_vec * VEC, inv_tau, eps, BLOCK_C, HAS_LABELS, EMULATE,
    )  # fmt: skip


def _launch_shape(c: int, *strides: int) -> tuple[int, int, int, int]:
    """(VEC, BLOCK_C, ROWS, num_warps) for rows of c classes."""
    vec = next(v for v in (8, 4, 2, 1) if all(x % v == 0 for x in (c, *strides)))
    block_c = triton.next_power_of_2(c) if c <= MAX_ONE_BLOCK_C else TWO_PASS_BLOCK_C
    rows = max(1, min(MAX_ROWS, TILE_ELEMENTS // block_c))
    elements = rows * block_c
    return vec, block_c, rows, 4 if elements <= 2048 else 8 if elements <= 4096 else 16


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensors' one (cuda:1 under DDP, say).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kd_scale(n: int, c: int, temperature: float, reduction: str, tau_squared: bool) -> float:
    return (temperature**2 if tau_squared else 1.0) / {"batchmean": n, "mean": n * c, "sum": 1}[reduction]


def _kd_loss_forward(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing):
    kd, ce, n_valid, stats, _objective, _grad = _forward(
        s, t, labels, temperature, reduction, tau_squared, form, label_smoothing
    )
    return kd, ce, n_valid, stats


def _forward(
    s, t, labels, temperature, reduction, tau_squared, form, label_smoothing, kd_weight=None, ce_weight=0.0,
    emit_grad=False,
):  # fmt: skip
    """One forward launch (after a 4-byte memset): kd, ce, n_valid, stats, and with kd_weight (a 0-dim fp32 tensor)
    the objective kd_weight·kd + ce_weight·ce, and with emit_grad its gradient for an upstream gradient of 1."""
    n, c = s.shape
    has_labels = labels is not None
    f32 = {"dtype": torch.float32, "device": s.device}
    vec, block_c, rows, warps = _launch_shape(c, s.stride(0), t.stride(0))
    programs = triton.cdiv(n, rows)
    stats = torch.empty((n, STATS), **f32)
    partials = torch.empty((programs, 3), **f32)
    kd, ce, n_valid, objective = (torch.empty((), **f32) for _ in range(4))
    grad = torch.empty((n, c) if emit_grad else (0,), dtype=s.dtype, device=s.device)
    ticket = torch.zeros((1,), dtype=torch.int32, device=s.device)
    y, y_stride = (labels, labels.stride(0)) if has_labels else (stats, 0)  # stats: a placeholder, never read
    with _device_guard(s.device):
        _kd_loss_fwd_kernel[(programs,)](
            s,
            t,
            y,
            stats,
            partials,
            ticket,
            kd,
            ce,
            n_valid,
            kd if kd_weight is None else kd_weight,  # kd: a placeholder, never read
            objective,
            grad if emit_grad else stats,  # stats: a placeholder, never written
            n,
            c // vec,
            s.stride(0) // vec,
            t.stride(0) // vec,
            y_stride,
            1.0 / temperature,
            label_smoothing,
            _kd_scale(n, c, temperature, reduction, tau_squared),
            float(ce_weight),
            VEC=vec,
            ROWS=rows,
            BLOCK_C=block_c,
            ONE_BLOCK=block_c >= c,
            KL=form == "kl",
            HAS_LABELS=has_labels,
            OBJECTIVE=kd_weight is not None,
            EMIT_GRAD=emit_grad,
            EMULATE=INTERPRET,
            num_warps=warps,
        )
    return kd, ce, n_valid, stats, objective, grad


def _kd_loss_backward(s, t, labels, stats, grads, temperature, reduction, tau_squared, label_smoothing):
    n, c = s.shape
    has_labels = labels is not None
    grad = torch.empty((n, c), dtype=s.dtype, device=s.device)
    vec, block_c, rows, warps = _launch_shape(c, s.stride(0), t.stride(0))
    y, y_stride = (labels, labels.stride(0)) if has_labels else (stats, 0)
    with _device_guard(s.device):
        _kd_loss_bwd_kernel[(triton.cdiv(n, rows),)](
            s,
            t,
            y,
            stats,
            grad,
            *grads,
            n,
            c // vec,
            s.stride(0) // vec,
            t.stride(0) // vec,
            y_stride,
            1.0 / temperature,
            label_smoothing,
            _kd_scale(n, c, temperature, reduction, tau_squared) / temperature,
            VEC=vec,
            ROWS=rows,
            BLOCK_C=block_c,
            HAS_LABELS=has_labels,
            EMULATE=INTERPRET,
            num_warps=warps,
        )
    return grad


@torch.library.custom_op("fastfit::kd_loss_fwd", mutates_args=())
def _kd_loss_fwd_op(
    s: Tensor,
    t: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    reduction: str,
    tau_squared: bool,
    form: str,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kd_loss_forward(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing)


@_kd_loss_fwd_op.register_fake
def _(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing):
    scalar = lambda: s.new_empty((), dtype=torch.float32)  # noqa: E731
    return scalar(), scalar(), scalar(), s.new_empty((s.shape[0], STATS), dtype=torch.float32)


@torch.library.custom_op("fastfit::kd_loss_bwd", mutates_args=())
def _kd_loss_bwd_op(
    s: Tensor,
    t: Tensor,
    labels: Optional[Tensor],
    stats: Tensor,
    grad_kd: Tensor,
    grad_ce: Tensor,
    n_valid: Tensor,
    temperature: float,
    reduction: str,
    tau_squared: bool,
    label_smoothing: float,
) -> Tensor:
    grads = (grad_kd, grad_ce, n_valid)
    return _kd_loss_backward(s, t, labels, stats, grads, temperature, reduction, tau_squared, label_smoothing)


@_kd_loss_bwd_op.register_fake
def _(s, t, labels, stats, grad_kd, grad_ce, n_valid, temperature, reduction, tau_squared, label_smoothing):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    s, t, labels, temperature, reduction, tau_squared, _form, label_smoothing = inputs
    _kd, _ce, n_valid, stats = output
    ctx.scalars = (temperature, reduction, tau_squared, label_smoothing)
    ctx.save_for_backward(s, t, labels, stats, n_valid)


def _backward(ctx, grad_kd, grad_ce, _grad_n_valid, _grad_stats):
    s, t, labels, stats, n_valid = ctx.saved_tensors
    zero = stats.new_zeros(())  # only for an output that was not used
    grad_kd = zero if grad_kd is None else grad_kd.float()
    grad_ce = zero if grad_ce is None else grad_ce.float()
    grad_s = _kd_loss_bwd_op(s, t, labels, stats, grad_kd, grad_ce, n_valid, *ctx.scalars)
    return (grad_s,) + (None,) * 7


_kd_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    reduction: str = "batchmean",
    tau_squared: bool = True,
    form: str = "kl",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Optional[Tensor]]:
    """Temperature KD of the student on the teacher (+ the student's cross-entropy on labels), fused.

    Args:
        student_logits: (N, C) fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1), unit stride over classes.
            The only input that gets a gradient.
        teacher_logits: (N, C), the student's dtype and device; detached even if it requires grad.
        labels: (N,) int64 class indices for the student's cross-entropy, −100 to ignore a row; or None.
        temperature: τ > 0, a Python number.
        reduction: "batchmean" (Σ/N), "mean" (Σ/(N·C), MMRazor) or "sum".
        tau_squared: multiply kd by τ² (Hinton et al.), keeping its gradient's scale independent of τ.
        form: "kl" Σ P_T (log P_T − log P_S), or "ce" −Σ P_T log P_S (the FitNets paper's H(P_T^τ, P_S^τ)).
        label_smoothing: ε in [0, 1] for the cross-entropy, as F.cross_entropy's.

    Returns:
        (kd, ce): 0-dim fp32 tensors; ce is exactly F.cross_entropy(student_logits.float(), labels,
        label_smoothing=ε) with ignored rows skipped, or None without labels. Forward and backward are one Triton
        launch each (plus a 4-byte memset), with no host sync: CUDA-graph capturable.

    Raises:
        ValueError: a tensor of the wrong rank, dtype, device, shape or class stride, or a scalar argument out of
            its range; the message names the argument and what was expected. A label outside [0, C) other than
            −100 is not detected (that would sync the host): it makes ce and that row's gradient NaN.
    """
    check_kd_inputs(student_logits, teacher_logits, labels, temperature, reduction, tau_squared, form, label_smoothing)
    kd, ce, _n_valid, _stats = _kd_loss_fwd_op(
        student_logits,
        teacher_logits.detach(),
        labels,
        float(temperature),
        reduction,
        tau_squared,
        form,
        float(label_smoothing),
    )
    return kd, ce if labels is not None else None
