"""Fused temperature-softmax KD loss + the student's cross-entropy, one streaming pass per logits row.

    kd, ce = fused_kd_loss(student_logits, teacher_logits, labels, temperature, reduction, tau_squared, form,
                           label_smoothing=0.0)

The math, the traffic and the design choices are in the comment opening `_kd_loss_fwd_kernel`.
"""

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tuning constants (untuned on hardware: chosen from the Triton softmax tutorial's heuristics).
MAX_ONE_BLOCK_C = 8192  # up to this many classes a row stays in registers between the stats and the gradient
TWO_PASS_BLOCK_C = 4096  # block over C beyond that (the gradient pass re-reads the row, mostly from L2)
REDUCE_BLOCK_N = 1024
IGNORE_INDEX = tl.constexpr(-100)  # F.cross_entropy's default: such rows add nothing to ce nor to its mean's count
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for masked lanes: exp() gives 0, never NaN
NAN = tl.constexpr(float("nan"))
REDUCTIONS = ("batchmean", "mean", "sum")
FORMS = ("kl", "ce")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton decides at decoration time whether kernels run in its interpreter, so read the switch once, at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_block(s_row, t_row, offs, mask):
    s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, s, NEG), tl.where(mask, t, NEG)


@triton.jit
def _update_stats(s, t, mask, inv_tau, m_s, d_a, m_t, d_b, acc, d_1, sum_s, KL: tl.constexpr, HAS_LABELS: tl.constexpr):
    # Maxima are kept on the raw logits (max(s/τ) = max(s)/τ) and τ scales differences, (s − m)·(1/τ): the terms
    # near the maximum, the ones that matter, then carry the rounding of a small number, not of |s|/τ (±1e4 logits).
    m_s_new = tl.maximum(m_s, tl.max(s, 0))
    m_t_new = tl.maximum(m_t, tl.max(t, 0))
    alpha_a = tl.exp((m_s - m_s_new) * inv_tau)
    alpha_b = tl.exp((m_t - m_t_new) * inv_tau)
    e_a = tl.where(mask, tl.exp((s - m_s_new) * inv_tau), 0.0)
    e_b = tl.where(mask, tl.exp((t - m_t_new) * inv_tau), 0.0)
    # acc = Σ e_b·q, q centred on the running maxima (re-centred by `shift` when they move): no large terms cancel.
    q = (m_s_new - s) * inv_tau
    shift = (m_s_new - m_s) * inv_tau
    if KL:
        q += (t - m_t_new) * inv_tau
        shift += (m_t - m_t_new) * inv_tau
    acc = alpha_b * (acc + tl.where(d_b > 0, d_b * shift, 0.0)) + tl.sum(tl.where(mask, e_b * q, 0.0), 0)
    d_a = d_a * alpha_a + tl.sum(e_a, 0)
    d_b = d_b * alpha_b + tl.sum(e_b, 0)
    if HAS_LABELS:
        d_1 = d_1 * tl.exp(m_s - m_s_new) + tl.sum(tl.where(mask, tl.exp(s - m_s_new), 0.0), 0)
        sum_s += tl.sum(tl.where(mask, s, 0.0), 0)
    return m_s_new, d_a, m_t_new, d_b, acc, d_1, sum_s


@triton.jit
def _store_grad(g_row, offs, mask, s, t, inv_tau, m_s, log_d_a, m_t, log_d_b):
    # P_S − P_T unscaled: ~kd_scale/τ (1e-7 for "mean") would be fp16 subnormals; backward applies the scale in fp32.
    g = tl.exp((s - m_s) * inv_tau - log_d_a) - tl.exp((t - m_t) * inv_tau - log_d_b)
    tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    y_ptr,
    y_stride,
    g_ptr,
    g_stride,
    rows_ptr,
    lse_ptr,
    N,
    C,
    inv_tau,
    eps,
    BLOCK_C: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    KL: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):
    # One program per row. a = s/τ, b = t/τ, P_S = softmax(a), P_T = softmax(b); m = running max, d = Σ exp(x − m):
    #   kl      = Σ P_T (log P_T − log P_S) = Σ P_T ((b − m_b) − (a − m_a)) + log d_a − log d_b
    #   ce form = −Σ P_T log P_S            = Σ P_T (m_a − a) + log d_a      (the FitNets paper's H(P_T^τ, P_S^τ))
    #   d(kd_row)/ds = (P_S − P_T) / τ for both forms (Σ P_T = 1); kd = kd_scale · Σ rows, kd_scale = [τ²]/{N|N·C|1}
    #   ce_row = log d_1 + (1−ε)(m_s − s_y) + ε(m_s − mean_c s)   (τ = 1: F.cross_entropy with label_smoothing ε)
    # Online (streaming) max/sum in fp32 for the student at τ and at 1 and the teacher at τ, in one sweep over C.
    # Traffic per row of C elements of e bytes (N·C·e is one "Ce" for the batch):
    #   forward   reads s, t: 2Ce once when C ≤ MAX_ONE_BLOCK_C (the row stays in registers for the gradient),
    #             4Ce beyond (the gradient sweep re-reads the row, mostly from L2); writes P_S − P_T (dKD/ds up to
    #             a constant): Ce, only when the student needs a gradient; per row 4 B kd, 4 B ce, 8 B (m_s, log d_1)
    #             and reads the 8 B label.
    #   backward  reads P_S − P_T (Ce), with labels also s (Ce) to rebuild dCE/ds = softmax(s) − target from the
    #             saved (m_s, log d_1), writes grad_s (Ce). fwd+bwd: 5Ce without labels, 6Ce with.
    # kd and ce have independent grad_outputs, so one pre-combined gradient cannot serve both. Storing dCE/ds as well
    # costs 7Ce (2Ce written, 2Ce re-read); 8 B/row plus a re-read of s is the cheaper way to keep backward a single
    # elementwise sweep. (Recomputing everything in backward instead is 5Ce with or without labels, 2Ce for a
    # forward alone, but makes backward a second full softmax over s and t and keeps t alive until then.)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    cols = tl.arange(0, BLOCK_C)
    m_s = tl.full((), NEG, tl.float32)
    m_t = tl.full((), NEG, tl.float32)
    d_a = tl.zeros((), tl.float32)
    d_b = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    d_1 = tl.zeros((), tl.float32)
    sum_s = tl.zeros((), tl.float32)
    if ONE_BLOCK:
        mask = cols < C
        s, t = _load_block(s_row, t_row, cols, mask)
        m_s, d_a, m_t, d_b, acc, d_1, sum_s = _update_stats(
            s, t, mask, inv_tau, m_s, d_a, m_t, d_b, acc, d_1, sum_s, KL, HAS_LABELS
        )
    else:
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = offs < C
            s, t = _load_block(s_row, t_row, offs, mask)
            m_s, d_a, m_t, d_b, acc, d_1, sum_s = _update_stats(
                s, t, mask, inv_tau, m_s, d_a, m_t, d_b, acc, d_1, sum_s, KL, HAS_LABELS
            )
    log_d_a = tl.log(d_a)
    log_d_b = tl.log(d_b)
    kd_row = acc / d_b + log_d_a
    if KL:
        kd_row -= log_d_b
    tl.store(rows_ptr + row, kd_row)
    if STORE_GRAD:
        if ONE_BLOCK:
            _store_grad(g_row, cols, mask, s, t, inv_tau, m_s, log_d_a, m_t, log_d_b)
        else:
            for start in range(0, C, BLOCK_C):
                offs = start + cols
                mask = offs < C
                s, t = _load_block(s_row, t_row, offs, mask)
                _store_grad(g_row, offs, mask, s, t, inv_tau, m_s, log_d_a, m_t, log_d_b)
    if HAS_LABELS:
        y = tl.load(y_ptr + row * y_stride)
        valid = y != IGNORE_INDEX
        in_range = (y >= 0) & (y < C)
        s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(tl.float32)
        log_d_1 = tl.log(d_1)
        ce_row = log_d_1 + (1.0 - eps) * (m_s - s_y) + eps * (m_s - sum_s / C)
        # An out-of-range label cannot raise without a host sync: it turns ce (and its gradient row) into NaN.
        ce_row = tl.where(valid, tl.where(in_range, ce_row, NAN), 0.0)
        tl.store(rows_ptr + N + row, ce_row)
        # Backward rebuilds softmax(s) as exp((s − m) − log d), as precise as the forward: keep both (8 B/row).
        tl.store(lse_ptr + 2 * row, m_s)
        tl.store(lse_ptr + 2 * row + 1, tl.where(in_range | ~valid, log_d_1, NAN))


@triton.jit
def _kd_loss_reduce_kernel(
    rows_ptr, y_ptr, y_stride, kd_ptr, ce_ptr, n_valid_ptr, N, kd_scale, BLOCK_N: tl.constexpr, HAS_LABELS: tl.constexpr
):
    # One program sums the per-row results in a fixed order: deterministic, unlike atomics. Reads 12-16 B per row.
    cols = tl.arange(0, BLOCK_N)
    kd = tl.zeros((BLOCK_N,), tl.float32)
    ce = tl.zeros((BLOCK_N,), tl.float32)
    n_valid = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        kd += tl.load(rows_ptr + offs, mask=mask, other=0.0)
        if HAS_LABELS:
            ce += tl.load(rows_ptr + N + offs, mask=mask, other=0.0)
            y = tl.load(y_ptr + offs.to(tl.int64) * y_stride, mask=mask, other=IGNORE_INDEX)
            n_valid += tl.where(y != IGNORE_INDEX, 1.0, 0.0)
    tl.store(kd_ptr, tl.sum(kd, 0) * kd_scale)
    if HAS_LABELS:
        count = tl.sum(n_valid, 0)
        tl.store(ce_ptr, tl.sum(ce, 0) / count)  # all rows ignored: 0/0 = NaN, as F.cross_entropy
        tl.store(n_valid_ptr, count)
    else:  # defined values in the unused outputs
        tl.store(ce_ptr, 0.0)
        tl.store(n_valid_ptr, 0.0)


@triton.jit
def _kd_loss_bwd_kernel(
    gkd_ptr,
    gkd_stride,
    s_ptr,
    s_stride,
    y_ptr,
    y_stride,
    lse_ptr,
    out_ptr,
    out_stride,
    grad_kd_ptr,
    grad_ce_ptr,
    n_valid_ptr,
    C,
    kd_grad_scale,
    eps,
    BLOCK_C: tl.constexpr,
    HAS_LABELS: tl.constexpr,
):
    # grad_s = grad_kd · kd_scale/τ · (P_S − P_T) (saved by the forward)
    #        + grad_ce · (softmax(s) − (1−ε)·onehot(y) − ε/C) / n_valid.
    # Per row: read Ce (P_S − P_T), + Ce (s) with labels, write Ce. grad_outputs are read on the device: no host sync.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    g_kd = tl.load(grad_kd_ptr) * kd_grad_scale
    if HAS_LABELS:
        y = tl.load(y_ptr + row * y_stride)
        m_s = tl.load(lse_ptr + 2 * row)
        log_d_1 = tl.load(lse_ptr + 2 * row + 1)
        row_scale = tl.where(y != IGNORE_INDEX, tl.load(grad_ce_ptr) / tl.load(n_valid_ptr), 0.0)
    for start in range(0, C, BLOCK_C):
        offs = start + cols
        mask = offs < C
        g = g_kd * tl.load(gkd_ptr + row * gkd_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_LABELS:
            s = tl.load(s_ptr + row * s_stride + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.where(mask, s, m_s)  # keeps exp() finite in masked lanes
            target = tl.where(offs == y, 1.0 - eps, 0.0) + eps / C
            g += row_scale * (tl.exp((s - m_s) - log_d_1) - target)
        tl.store(out_ptr + row * out_stride + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_c: int) -> int:
    return 4 if block_c <= 2048 else 8 if block_c <= 4096 else 16


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensors' one (cuda:1 under DDP, say).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kd_scale(n: int, c: int, temperature: float, reduction: str, tau_squared: bool) -> float:
    return (temperature**2 if tau_squared else 1.0) / {"batchmean": n, "mean": n * c, "sum": 1}[reduction]


def _kd_loss_forward(
    s: Tensor,
    t: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    reduction: str,
    tau_squared: bool,
    form: str,
    label_smoothing: float,
    store_grad: bool,
):
    n, c = s.shape
    has_labels = labels is not None
    kd_scale = _kd_scale(n, c, temperature, reduction, tau_squared)
    f32 = {"dtype": torch.float32, "device": s.device}
    rows = torch.empty((2 if has_labels else 1) * n, **f32)  # per-row kd, then per-row ce
    grad = torch.empty((n, c) if store_grad else (0,), dtype=s.dtype, device=s.device)
    lse = torch.empty((n, 2) if has_labels else (0,), **f32)  # per row: max(s), log Σ exp(s − max)
    kd, ce, n_valid = torch.empty((), **f32), torch.empty((), **f32), torch.empty((), **f32)
    y, y_stride = (labels, labels.stride(0)) if has_labels else (rows, 0)  # rows: a placeholder pointer, never read
    one_block = c <= MAX_ONE_BLOCK_C
    block_c = triton.next_power_of_2(c) if one_block else TWO_PASS_BLOCK_C
    with _device_guard(s.device):
        _kd_loss_fwd_kernel[(n,)](
            s,
            s.stride(0),
            t,
            t.stride(0),
            y,
            y_stride,
            grad,
            c if store_grad else 0,
            rows,
            lse,
            n,
            c,
            1.0 / temperature,
            label_smoothing,
            BLOCK_C=block_c,
            ONE_BLOCK=one_block,
            KL=form == "kl",
            HAS_LABELS=has_labels,
            STORE_GRAD=store_grad,
            num_warps=_num_warps(block_c),
        )
        _kd_loss_reduce_kernel[(1,)](
            rows, y, y_stride, kd, ce, n_valid, n, kd_scale, BLOCK_N=REDUCE_BLOCK_N, HAS_LABELS=has_labels, num_warps=4
        )
    return kd, ce, grad, lse, n_valid


def _kd_loss_backward(
    grad_buf: Tensor,
    s: Optional[Tensor],
    labels: Optional[Tensor],
    lse: Tensor,
    n_valid: Tensor,
    grad_kd: Tensor,
    grad_ce: Tensor,
    temperature: float,
    reduction: str,
    tau_squared: bool,
    label_smoothing: float,
) -> Tensor:
    n, c = grad_buf.shape
    kd_grad_scale = _kd_scale(n, c, temperature, reduction, tau_squared) / temperature
    out = torch.empty_like(grad_buf)
    has_labels = labels is not None
    s_arg, s_stride = (s, s.stride(0)) if has_labels else (grad_buf, 0)  # placeholders, never read without labels
    y, y_stride = (labels, labels.stride(0)) if has_labels else (grad_buf, 0)
    block_c = min(triton.next_power_of_2(c), TWO_PASS_BLOCK_C)
    with _device_guard(grad_buf.device):
        _kd_loss_bwd_kernel[(n,)](
            grad_buf,
            c,
            s_arg,
            s_stride,
            y,
            y_stride,
            lse,
            out,
            c,
            grad_kd,
            grad_ce,
            n_valid,
            c,
            kd_grad_scale,
            label_smoothing,
            BLOCK_C=block_c,
            HAS_LABELS=has_labels,
            num_warps=_num_warps(block_c),
        )
    return out


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
    store_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kd_loss_forward(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing, store_grad)


@_kd_loss_fwd_op.register_fake
def _(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing, store_grad):
    n, c = s.shape
    scalar = lambda: s.new_empty((), dtype=torch.float32)  # noqa: E731
    return (
        scalar(),
        scalar(),
        s.new_empty((n, c) if store_grad else (0,)),
        s.new_empty((n, 2) if labels is not None else (0,), dtype=torch.float32),
        scalar(),
    )


@torch.library.custom_op("fastfit::kd_loss_bwd", mutates_args=())
def _kd_loss_bwd_op(
    grad_buf: Tensor,
    s: Optional[Tensor],
    labels: Optional[Tensor],
    lse: Tensor,
    n_valid: Tensor,
    grad_kd: Tensor,
    grad_ce: Tensor,
    temperature: float,
    reduction: str,
    tau_squared: bool,
    label_smoothing: float,
) -> Tensor:
    return _kd_loss_backward(
        grad_buf, s, labels, lse, n_valid, grad_kd, grad_ce, temperature, reduction, tau_squared, label_smoothing
    )


@_kd_loss_bwd_op.register_fake
def _(grad_buf, s, labels, lse, n_valid, grad_kd, grad_ce, temperature, reduction, tau_squared, label_smoothing):
    return torch.empty_like(grad_buf)


def _setup_context(ctx, inputs, output):
    s, _t, labels, temperature, reduction, tau_squared, _form, label_smoothing, store_grad = inputs
    _kd, _ce, grad_buf, lse, n_valid = output
    ctx.store_grad, ctx.scalars = store_grad, (temperature, reduction, tau_squared, label_smoothing)
    if store_grad:  # s is kept only when ce's gradient must be rebuilt from it
        ctx.save_for_backward(grad_buf, s if labels is not None else None, labels, lse, n_valid)


def _backward(ctx, grad_kd, grad_ce, _grad_buf, _grad_lse, _grad_n_valid):
    if not ctx.store_grad:  # only the teacher asked for a gradient, and it never gets one
        return (None,) * 9
    grad_buf, s, labels, lse, n_valid = ctx.saved_tensors
    zero = grad_buf.new_zeros((), dtype=torch.float32)
    grad_kd = zero if grad_kd is None else grad_kd.float()
    grad_ce = zero if grad_ce is None else grad_ce.float()
    grad_s = _kd_loss_bwd_op(grad_buf, s, labels, lse, n_valid, grad_kd, grad_ce, *ctx.scalars)
    return (grad_s,) + (None,) * 8


_kd_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(s, t, labels, temperature, reduction, tau_squared, form, label_smoothing) -> None:
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected {name} as a non-empty (N, C) tensor, got {got}")
        if x.dtype not in DTYPES:
            raise ValueError(f"expected {name} in float32/bfloat16/float16, got {x.dtype}")
        if x.stride(1) != 1:
            raise ValueError(
                f"expected {name} with unit stride over classes (call .contiguous()), got strides {tuple(x.stride())}"
            )
    if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
        raise ValueError(
            f"expected student and teacher logits of one shape, dtype and device, got "
            f"{tuple(s.shape)} {s.dtype} {s.device} and {tuple(t.shape)} {t.dtype} {t.device}"
        )
    if s.device.type != "cuda" and not (s.device.type == "cpu" and _INTERPRET):
        raise ValueError(f"expected CUDA tensors or TRITON_INTERPRET=1, got {s.device.type}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != s.shape[:1]:
            got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"expected labels as an int64 tensor of shape ({s.shape[0]},) or None, got {got}")
        if labels.device != s.device:
            raise ValueError(f"expected labels on the logits' device {s.device}, got {labels.device}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"expected temperature as a finite Python number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction in {REDUCTIONS}, got {reduction!r}")
    if form not in FORMS:
        raise ValueError(f"expected form in {FORMS}, got {form!r}")
    if not isinstance(tau_squared, bool):
        raise ValueError(f"expected tau_squared as a bool, got {tau_squared!r}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not (0.0 <= label_smoothing <= 1.0)
    ):
        raise ValueError(f"expected label_smoothing as a number in [0, 1], got {label_smoothing!r}")


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

    kd: 0-dim fp32, `form` "kl" Σ P_T (log P_T − log P_S) or "ce" −Σ P_T log P_S at temperature τ, reduced by
    `reduction` ("batchmean" /N, "mean" /(N·C), "sum"), × τ² when `tau_squared`. ce: 0-dim fp32, exactly
    F.cross_entropy(student_logits.float(), labels, label_smoothing=ε) (ignore_index −100 rows skipped), or None
    without labels. Only student_logits gets a gradient: the teacher is detached even if it requires grad.
    A label outside [0, C) other than −100 makes ce and that row's gradient NaN (checking it would sync the host).
    """
    _check_inputs(student_logits, teacher_logits, labels, temperature, reduction, tau_squared, form, label_smoothing)
    store_grad = torch.is_grad_enabled() and student_logits.requires_grad  # no gradient write for eval-only calls
    kd, ce, _grad, _lse, _n_valid = _kd_loss_fwd_op(
        student_logits,
        teacher_logits.detach(),
        labels,
        float(temperature),
        reduction,
        tau_squared,
        form,
        float(label_smoothing),
        store_grad,
    )
    return kd, ce if labels is not None else None
