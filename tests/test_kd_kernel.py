"""fastfit.kernels.fused_kd_loss (KD + student cross-entropy in one Triton pass) against float64 formulas written
here, independently of fastfit.distill.losses; on CPU through the Triton interpreter (tests/conftest.py sets it up)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastfit.kernels.kd_loss as kd_module
import fastfit.kernels.kd_loss_checks as kd_checks
from fastfit.distill.losses import KDLoss
from fastfit.kernels import fused_kd_loss

# (N, C): ImageNet's 1000 classes; deliberately odd; a single row of 7; more classes than a two-pass block.
SHAPES = [(16, 1000), (37, 1003), (1, 7), (4, 5000)]
# Losses are fp32 sums over the same (rounded) inputs as the float64 reference; gradients are stored in the input
# dtype, so they carry its rounding. atol is relative to the largest reference magnitude.
DTYPE_TOLS = {
    torch.float32: {"loss": {"rtol": 2e-5, "atol": 1e-6}, "grad": {"rtol": 1e-4, "atol": 2e-6}},
    torch.bfloat16: {"loss": {"rtol": 2e-5, "atol": 1e-6}, "grad": {"rtol": 1e-2, "atol": 1e-2}},
    torch.float16: {"loss": {"rtol": 2e-5, "atol": 1e-6}, "grad": {"rtol": 2e-3, "atol": 2e-3}},
}
# The interpreter runs kernels in numpy: an overflow or 0/0 there means an inf/NaN lane, masked or not.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
DIVISORS = {"batchmean": lambda n, c: n, "mean": lambda n, c: n * c, "sum": lambda n, c: 1}


@pytest.fixture(autouse=True)
def _on_device():
    # The kernel runs on CUDA, or on the CPU through Triton's interpreter when there is no GPU (tests/conftest.py).
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    yield
    torch.set_default_device(None)


@pytest.fixture(params=["one_block", "two_pass"])
def block_mode(request, monkeypatch):
    """Run the kernel as shipped, and with tiny blocks so every shape streams over C in several blocks."""
    if request.param == "two_pass":
        monkeypatch.setattr(kd_module, "MAX_ONE_BLOCK_C", 4)
        monkeypatch.setattr(kd_module, "TWO_PASS_BLOCK_C", 256)
    return request.param


def _reference(s, t, y, tau, reduction, tau_squared, form, eps, weights):
    """kd, ce and d(w_kd·kd + w_ce·ce)/ds in float64, from the definitions."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double()
    n, c = s64.shape
    log_ps = s64 / tau - torch.logsumexp(s64 / tau, dim=1, keepdim=True)
    log_pt = t64 / tau - torch.logsumexp(t64 / tau, dim=1, keepdim=True)
    p_t = log_pt.exp()
    rows = (p_t * (log_pt - log_ps)).sum(1) if form == "kl" else -(p_t * log_ps).sum(1)
    kd = rows.sum() / DIVISORS[reduction](n, c) * (tau**2 if tau_squared else 1.0)
    loss, ce = weights[0] * kd, None
    if y is not None:
        log_p = s64 - torch.logsumexp(s64, dim=1, keepdim=True)
        valid = y != -100
        nll = -log_p.gather(1, y.clamp_min(0)[:, None])[:, 0]
        ce_rows = (1 - eps) * nll + eps * (-log_p.mean(1))
        ce = (ce_rows * valid).sum() / valid.sum()
        loss = loss + weights[1] * ce
    loss.backward()
    return kd.detach(), None if ce is None else ce.detach(), s64.grad


def _assert_close(name, got, want, rtol, atol):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bound = atol * want.abs().max() + rtol * want.abs()
    bad = ~((got - want).abs() <= bound)  # NaN in got fails
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches, first at {where}: got "
            f"{got[bad][:5].tolist()} want {want[bad][:5].tolist()}; max |diff| {(got - want).abs().max().item():.3g}; "
            f"NaN {int(got.isnan().sum())}, Inf {int(got.isinf().sum())}"
        )


def _check_once(
    s,
    t,
    y,
    tau=3.0,
    reduction="batchmean",
    tau_squared=True,
    form="kl",
    eps=0.0,
    weights=(1.0, 1.0),
    dtype=torch.float32,
    tols=None,
):
    """Forward value of kd and ce and the student gradient of w_kd·kd + w_ce·ce against _reference."""
    tols = tols or DTYPE_TOLS[dtype]
    s = s.to(dtype).requires_grad_()
    t = t.to(dtype)
    kd, ce = fused_kd_loss(s, t, y, tau, reduction, tau_squared, form, eps)
    assert kd.shape == () and kd.dtype == torch.float32
    loss = weights[0] * kd if y is None else weights[0] * kd + weights[1] * ce
    loss.backward()
    ref_kd, ref_ce, ref_grad = _reference(s, t, y, tau, reduction, tau_squared, form, eps, weights)
    _assert_close("kd", kd, ref_kd, **tols["loss"])
    if y is None:
        assert ce is None
    else:
        assert ce.shape == () and ce.dtype == torch.float32
        _assert_close("ce", ce, ref_ce, **tols["loss"])
    assert s.grad.dtype == dtype
    _assert_close("grad", s.grad, ref_grad, **tols["grad"])
    return kd, ce, s.grad


def _inputs(n, c, scale=3.0, ignore_row=True):
    s, t = torch.randn(n, c) * scale, torch.randn(n, c) * scale
    y = torch.randint(0, c, (n,))
    if ignore_row and n > 1:
        y[1] = -100
    return s, t, y


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("tau_squared", [False, True])
@pytest.mark.parametrize("form", ["kl", "ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_reductions_forms_and_tau_squared(reduction, form, tau_squared, with_labels):
    s, t, y = _inputs(37, 1003)
    _check_once(s, t, y if with_labels else None, 3.0, reduction, tau_squared, form, eps=0.1, weights=(2.5, -0.75))


@pytest.mark.parametrize("dtype", list(DTYPE_TOLS))
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_dtypes(shape, dtype, block_mode):
    s, t, y = _inputs(*shape)
    _check_once(s, t, y, 3.0, "batchmean", True, "kl", eps=0.1, dtype=dtype)


def test_more_classes_than_one_block():
    c = kd_module.MAX_ONE_BLOCK_C + 809  # streams over C in blocks with the shipped constants
    s, t, y = _inputs(2, c)
    _check_once(s, t, y, 2.0, "mean", True, "kl", eps=0.2, weights=(3.0, 0.5))


@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("form", ["kl", "ce"])
@pytest.mark.parametrize("tau", [0.5, 3.0, 20.0])
def test_temperatures_and_extreme_logits(tau, form, scale, block_mode):
    s, t, y = _inputs(6, 301, scale=scale)
    if scale > 1e3:  # the extremes themselves, plus a row where teacher and student disagree at ±1e4
        s[0, :3], t[0, :3] = torch.tensor([1e4, -1e4, 1e4]), torch.tensor([-1e4, 1e4, 1e4])
        s[2], t[2] = -1e4, 1e4
    _check_once(s, t, y, tau, "batchmean", True, form, eps=0.1, weights=(1.0, 2.0))


def test_all_equal_rows(block_mode):
    n, c = 5, 517
    s = torch.arange(n, dtype=torch.float32)[:, None].expand(n, c) * 7.0 - 10.0  # each row one constant
    t = torch.randn(n, c) * 2
    t[0] = 4.0
    y = torch.randint(0, c, (n,))
    _check_once(s, t, y, 3.0, "batchmean", True, "kl", eps=0.1)
    # Student equal to the teacher: kl and its gradient are exactly zero (identical arithmetic on both sides).
    s_eq = t.clone().requires_grad_()
    kd, _ = fused_kd_loss(s_eq, t, None, 3.0, "batchmean", True, "kl")
    kd.backward()
    assert kd.item() == 0.0 and torch.count_nonzero(s_eq.grad) == 0


def test_fp16_mean_reduction_under_loss_scaling():
    # MMRazor's "mean" KD gives per-element gradients ~τ/(N·C): fp16 subnormals unless they are scaled up (by a
    # GradScaler's grad_output) before being rounded to fp16. The stored piece must keep its precision until then.
    s, t, _ = _inputs(64, 1000)
    _check_once(s, t, None, 6.0, "mean", True, "kl", weights=(10.0 * 2.0**16, 1.0), dtype=torch.float16)


@pytest.mark.parametrize("used", ["kd", "ce"])
def test_only_one_output_used(used):
    s, t, y = _inputs(9, 130)
    weights = (1.5, 0.0) if used == "kd" else (0.0, 1.5)
    s = s.requires_grad_()
    kd, ce = fused_kd_loss(s, t, y, 4.0, "batchmean", True, "kl", 0.05)
    (weights[0] * kd if used == "kd" else weights[1] * ce).backward()
    _, _, ref_grad = _reference(s, t, y, 4.0, "batchmean", True, "kl", 0.05, weights)
    _assert_close("grad", s.grad, ref_grad, **DTYPE_TOLS[torch.float32]["grad"])


def test_teacher_gets_no_grad():
    s, t, y = _inputs(7, 50)
    s.requires_grad_()
    t.requires_grad_()
    kd, ce = fused_kd_loss(s, t, y, 3.0, "batchmean", True, "kl", 0.0)
    (kd + ce).backward()
    assert t.grad is None and s.grad is not None
    # Only the teacher requires grad: the outputs do not (it is detached), and the student gets nothing either.
    s2 = s.detach()
    kd2, ce2 = fused_kd_loss(s2, t, y, 3.0, "batchmean", True, "kl", 0.0)
    assert not kd2.requires_grad and not ce2.requires_grad and t.grad is None


def test_ignored_and_out_of_range_labels():
    s, t, y = _inputs(6, 40)
    y[:] = -100
    with warnings.catch_warnings():  # the intended 0/0 of an all-ignored batch
        warnings.simplefilter("ignore", RuntimeWarning)
        kd, ce = fused_kd_loss(s, t, y, 3.0, "batchmean", True, "kl", 0.1)
    want = F.cross_entropy(s, y, label_smoothing=0.1)
    assert torch.isnan(want) and torch.isnan(ce) and torch.isfinite(kd)
    y = torch.randint(0, 40, (6,))
    y[3] = 40  # out of range: documented to give NaN (ce and that row's gradient) rather than sync the host to raise
    s.requires_grad_()
    kd, ce = fused_kd_loss(s, t, y, 3.0, "batchmean", True, "kl", 0.0)
    (kd + ce).backward()
    assert torch.isnan(ce) and torch.isfinite(kd)
    assert s.grad[3].isnan().all() and s.grad[torch.arange(6) != 3].isfinite().all()


def test_no_grad_and_deterministic():
    s, t, y = _inputs(37, 1003)
    with torch.no_grad():
        kd, ce = fused_kd_loss(s.requires_grad_(), t, y, 3.0, "mean", True, "kl", 0.1)
    ref_kd, ref_ce, _ = _reference(s, t, y, 3.0, "mean", True, "kl", 0.1, (1.0, 1.0))
    assert not kd.requires_grad
    _assert_close("kd", kd, ref_kd, **DTYPE_TOLS[torch.float32]["loss"])
    _assert_close("ce", ce, ref_ce, **DTYPE_TOLS[torch.float32]["loss"])
    kd2, ce2 = fused_kd_loss(s.detach(), t, y, 3.0, "mean", True, "kl", 0.1)
    assert torch.equal(kd, kd2) and torch.equal(ce, ce2)  # fixed-order reduction, no atomics


def test_noncontiguous_rows():
    n, c = 9, 101
    base_s = torch.randn(n, c + 13, requires_grad=True)
    base_t = torch.randn(n, c + 5)
    s, t = base_s[:, 3 : c + 3], base_t[:, :c]  # row strides c+13 and c+5, unit class stride
    y = torch.randint(0, c, (n,))
    kd, ce = fused_kd_loss(s, t, y, 2.0, "batchmean", False, "ce", 0.0)
    (2.0 * kd + ce).backward()
    ref_kd, ref_ce, ref_grad = _reference(s, t, y, 2.0, "batchmean", False, "ce", 0.0, (2.0, 1.0))
    tols = DTYPE_TOLS[torch.float32]
    _assert_close("kd", kd, ref_kd, **tols["loss"])
    _assert_close("ce", ce, ref_ce, **tols["loss"])
    _assert_close("grad", base_s.grad[:, 3 : c + 3], ref_grad, **tols["grad"])
    assert torch.count_nonzero(base_s.grad[:, :3]) == 0 and torch.count_nonzero(base_s.grad[:, c + 3 :]) == 0


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])  # inductor: what the trainer compiles with
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(s, t, y):
        kd, ce = fused_kd_loss(s, t, y, 6.0, "mean", True, "kl", 0.1)
        return 10.0 * kd + ce

    s, t, y = _inputs(11, 257)
    s.requires_grad_()
    loss = torch.compile(step, fullgraph=True, backend=backend)(s, t, y)
    loss.backward()
    ref_kd, ref_ce, ref_grad = _reference(s, t, y, 6.0, "mean", True, "kl", 0.1, (10.0, 1.0))
    tols = DTYPE_TOLS[torch.float32]
    _assert_close("loss", loss, 10.0 * ref_kd + ref_ce, **tols["loss"])
    _assert_close("grad", s.grad, ref_grad, **tols["grad"])


@pytest.mark.parametrize(
    "config",
    [
        {"temperature": 6.0, "reduction": "mean", "tau_squared": True, "form": "kl"},  # MMRazor's recipe
        {"temperature": 3.0, "reduction": "batchmean", "tau_squared": False, "form": "ce"},  # the FitNets paper
    ],
)
def test_parity_with_reference_module(config):
    s, t, y = _inputs(13, 1000, ignore_row=False)
    results = []
    for fused in (False, True):
        x = s.clone().requires_grad_()
        kd, ce = KDLoss(**config, label_smoothing=0.1, fused=fused)(x, t, y)
        (4.0 * kd + ce).backward()
        results.append((kd, ce, x.grad))
    (kd_ref, ce_ref, g_ref), (kd, ce, g) = results
    tols = DTYPE_TOLS[torch.float32]
    _assert_close("kd", kd, kd_ref, **tols["loss"])
    _assert_close("ce", ce, ce_ref, **tols["loss"])
    _assert_close("grad", g, g_ref, **tols["grad"])


def _bad_inputs():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    ok = dict(
        student_logits=s,
        teacher_logits=t,
        labels=y,
        temperature=3.0,
        reduction="batchmean",
        tau_squared=True,
        form="kl",
        label_smoothing=0.0,
    )
    return [
        ({"student_logits": s[0]}, "expected student_logits as a non-empty (N, C) tensor, got (10,)"),
        ({"teacher_logits": torch.randn(0, 10)}, "expected teacher_logits as a non-empty (N, C) tensor, got (0, 10)"),
        ({"student_logits": s.double()}, "expected student_logits in float32/bfloat16/float16, got torch.float64"),
        ({"teacher_logits": torch.randn(10, 4).t()}, "expected teacher_logits with unit stride over classes"),
        ({"teacher_logits": torch.randn(4, 11)}, "expected student and teacher logits of one shape, dtype and device"),
        ({"teacher_logits": t.half()}, "expected student and teacher logits of one shape, dtype and device"),
        ({"labels": y.int()}, "expected labels as an int64 tensor of shape (4,) or None, got (4,) torch.int32"),
        ({"labels": y[:3]}, "expected labels as an int64 tensor of shape (4,) or None, got (3,) torch.int64"),
        ({"temperature": 0.0}, "expected temperature as a finite Python number > 0, got 0.0"),
        ({"temperature": float("nan")}, "expected temperature as a finite Python number > 0, got nan"),
        ({"temperature": torch.tensor(3.0)}, "expected temperature as a finite Python number > 0, got tensor(3.)"),
        ({"reduction": "avg"}, "expected reduction in ('batchmean', 'mean', 'sum'), got 'avg'"),
        ({"form": "js"}, "expected form in ('kl', 'ce'), got 'js'"),
        ({"tau_squared": 1}, "expected tau_squared as a bool, got 1"),
        ({"label_smoothing": 1.5}, "expected label_smoothing as a number in [0, 1], got 1.5"),
    ], ok


@pytest.mark.parametrize("index", range(len(_bad_inputs()[0])))
def test_bad_inputs_are_named(index):
    cases, ok = _bad_inputs()
    change, message = cases[index]
    with pytest.raises(ValueError) as info:
        fused_kd_loss(**{**ok, **change})
    assert message in str(info.value)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(kd_checks, "INTERPRET", False)
    with pytest.raises(ValueError, match="expected CUDA tensors or TRITON_INTERPRET=1, got cpu"):
        fused_kd_loss(torch.randn(2, 5), torch.randn(2, 5), None, 3.0, "batchmean", True, "kl")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1000), (64, 21843)])
def test_gpu_real_shapes(shape, dtype):
    s, t, y = (x.cuda() for x in _inputs(*shape))
    _check_once(s, t, y, 6.0, "mean", True, "kl", eps=0.1, weights=(10.0, 1.0), dtype=dtype)
