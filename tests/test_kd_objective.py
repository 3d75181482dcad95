"""fastfit.kernels.fused_kd_objective (kd_weight·KD + ce_weight·CE as one output, its gradient written by the forward)
against the float64 formulas of tests/test_kd_kernel.py, on both backward paths: the forward's gradient kept (upstream
gradient exactly 1, no ignored label) and the recomputation (any other upstream gradient, ignored labels)."""

import pytest
import torch
import torch.nn.functional as F
from test_kd_kernel import DTYPE_TOLS, _assert_close, _inputs, _reference

import fastfit.kernels.kd_loss as kd_module
import fastfit.kernels.kd_objective as objective_module
from fastfit.distill.losses import KDLoss
from fastfit.kernels import fused_kd_objective

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
F32 = DTYPE_TOLS[torch.float32]


@pytest.fixture(autouse=True)
def _on_device():
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    yield
    torch.set_default_device(None)


@pytest.fixture(params=["one_block", "two_pass"])
def block_mode(request, monkeypatch):
    """As shipped (a row in registers), and with tiny blocks: the forward streams over C and re-reads the row."""
    if request.param == "two_pass":
        monkeypatch.setattr(kd_module, "MAX_ONE_BLOCK_C", 4)
        monkeypatch.setattr(kd_module, "TWO_PASS_BLOCK_C", 256)
    return request.param


@pytest.fixture
def grad_buffers(monkeypatch):
    """The G buffers the forward allocates (empty when it emits none), in call order."""
    seen = []
    forward = objective_module._forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(out[-1])
        return out

    monkeypatch.setattr(objective_module, "_forward", recording)
    return seen


def _check(
    s, t, y, kd_weight=2.0, ce_weight=0.5, upstream=1.0, tau=3.0, reduction="batchmean", tau_squared=True,
    form="kl", eps=0.1, dtype=torch.float32,
):  # fmt: skip
    """objective, kd, ce and the gradient of upstream·objective against the float64 reference."""
    tols = DTYPE_TOLS[dtype]
    s = s.detach().to(dtype).clone().requires_grad_()  # a fresh leaf per call
    t = t.to(dtype)
    objective, kd, ce = fused_kd_objective(
        s, t, y, torch.tensor(kd_weight), ce_weight, tau, reduction, tau_squared, form, eps
    )
    assert objective.shape == () and objective.dtype == torch.float32 and objective.requires_grad
    assert not kd.requires_grad and (ce is None or not ce.requires_grad)
    (objective if upstream == 1.0 else upstream * objective).backward()
    with_ce = y is not None and ce_weight != 0
    weights = (upstream * kd_weight, upstream * ce_weight)
    ref_kd, ref_ce, ref_grad = _reference(s, t, y if with_ce else None, tau, reduction, tau_squared, form, eps, weights)
    _assert_close("kd", kd, ref_kd, **tols["loss"])
    want = kd_weight * ref_kd + (ce_weight * ref_ce if with_ce else 0.0)
    _assert_close("objective", objective, want, **tols["loss"])
    if with_ce:
        _assert_close("ce", ce, ref_ce, **tols["loss"])
    else:
        assert ce is None
    assert s.grad.dtype == dtype
    _assert_close("grad", s.grad, ref_grad, **tols["grad"])
    return s


@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("tau_squared", [False, True])
@pytest.mark.parametrize("form", ["kl", "ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_forms_reductions_and_both_paths(reduction, form, tau_squared, upstream):
    s, t, y = _inputs(37, 1003, ignore_row=False)
    _check(s, t, y, 2.0, 0.75, upstream, 3.0, reduction, tau_squared, form, eps=0.1)


@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("dtype", list(DTYPE_TOLS))
@pytest.mark.parametrize("shape", [(16, 1000), (37, 1003), (1, 7), (4, 5000)])
def test_shapes_dtypes_and_blocks(shape, dtype, upstream, block_mode):
    s, t, y = _inputs(*shape, ignore_row=False)
    _check(s, t, y, 1.5, 1.0, upstream, dtype=dtype)


@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_ignored_labels_take_the_exact_path(upstream, block_mode):
    s, t, y = _inputs(12, 301)  # row 1 is −100: ce is a mean over 11 rows, not the forward's bet of 12
    y[7] = -100
    _check(s, t, y, 3.0, 1.25, upstream, eps=0.2)


@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_without_cross_entropy(upstream):
    s, t, y = _inputs(9, 130, ignore_row=False)
    _check(s, t, None, 3.0, 0.5, upstream)  # no labels
    _check(s, t, y, 3.0, 0.0, upstream)  # labels, but a zero ce_weight: no ce term (and ce None)


def test_the_fast_path_keeps_the_forward_gradient(grad_buffers):
    # Mark the forward's G: an upstream gradient of 1 returns it untouched; any other value (or an ignored label)
    # rewrites every row from s and t. Without this, a backward that always recomputes would pass the tests above.
    s, t, y = _inputs(8, 64, ignore_row=False)
    for upstream, labels, kept in ((1.0, y, True), (2.5, y, False), (1.0, torch.where(y == y[0], -100, y), False)):
        grad_buffers.clear()
        x = s.clone().requires_grad_()
        objective, _, _ = fused_kd_objective(x, t, labels, torch.tensor(2.0), 1.0, 3.0)
        (g_forward,) = grad_buffers
        g_forward[0, 0] = 1234.0
        (upstream * objective if upstream != 1.0 else objective).backward()
        assert (x.grad[0, 0].item() == 1234.0) == kept, (upstream, labels)


def test_no_gradient_buffer_without_a_gradient(grad_buffers):
    s, t, y = _inputs(8, 64)
    with torch.no_grad():
        no_grad = fused_kd_objective(s.clone().requires_grad_(), t, y, torch.tensor(2.0), 1.0, 3.0)
    frozen = fused_kd_objective(s, t, y, torch.tensor(2.0), 1.0, 3.0)  # the student needs no gradient
    assert [tuple(g.shape) for g in grad_buffers] == [(0,), (0,)]
    assert not no_grad[0].requires_grad and not frozen[0].requires_grad
    for got in (no_grad, frozen):  # same values as with a gradient
        with_grad = fused_kd_objective(s.clone().requires_grad_(), t, y, torch.tensor(2.0), 1.0, 3.0)
        for a, b in zip(got, with_grad, strict=True):
            assert torch.equal(a, b.detach())


def test_retain_graph_second_backward_is_exact_and_leaves_the_first_alone(block_mode):
    s, t, y = _inputs(10, 211, ignore_row=False)
    s.requires_grad_()
    objective, _, _ = fused_kd_objective(s, t, y, torch.tensor(2.0), 0.5, 3.0)
    (first,) = torch.autograd.grad(objective, s, retain_graph=True)  # fast path: the forward's G
    kept = first.clone()
    (second,) = torch.autograd.grad(2.5 * objective, s, retain_graph=True)
    (third,) = torch.autograd.grad(objective, s)  # upstream 1 again, after G could have been rewritten
    _, _, ref = _reference(s, t, y, 3.0, "batchmean", True, "kl", 0.0, (2.0, 0.5))
    assert torch.equal(first, kept)
    _assert_close("first", first, ref, **F32["grad"])
    _assert_close("second", second, 2.5 * ref, **F32["grad"])
    _assert_close("third", third, ref, **F32["grad"])


def test_bf16_gradient_rounds_to_nearest_even_like_the_gpu():
    # The forward stores G in bf16 from fp32: round-to-nearest-even (cvt.rn.bf16.f32), emulated under the
    # interpreter (kernels/rounding.py). Truncation would miss the rounded reference on about half the elements.
    s, t, y = _inputs(16, 1000, ignore_row=False)
    s = s.to(torch.bfloat16)
    t = t.to(torch.bfloat16)
    x = s.clone().requires_grad_()
    objective, _, _ = fused_kd_objective(x, t, y, torch.tensor(2.0), 1.0, 3.0, "batchmean", True, "kl", 0.1)
    objective.backward()
    _, _, ref = _reference(s, t, y, 3.0, "batchmean", True, "kl", 0.1, (2.0, 1.0))
    same = (x.grad == ref.to(torch.bfloat16)).double().mean().item()
    assert same > 0.99, same


def test_fp16_mean_reduction_under_loss_scaling():
    # GradScaler's upstream gradient (2^16) is not 1: the backward recomputes with it folded in before the fp16
    # store, so MMRazor's tiny "mean" gradients keep their precision.
    s, t, y = _inputs(64, 1000, ignore_row=False)
    _check(s, t, y, 10.0, 1.0, 2.0**16, tau=6.0, reduction="mean", dtype=torch.float16)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: what the trainer compiles with
@pytest.mark.parametrize("upstream", [1.0, 2.0])
def test_compile_fullgraph(backend, upstream):
    torch._dynamo.reset()

    def step(s, t, y, w):
        objective, kd, ce = fused_kd_objective(s, t, y, w, 1.0, 6.0, "mean", True, "kl", 0.1)
        return objective * upstream if upstream != 1.0 else objective, kd, ce

    s, t, y = _inputs(11, 257, ignore_row=False)
    s.requires_grad_()
    objective, kd, ce = torch.compile(step, fullgraph=True, backend=backend)(s, t, y, torch.tensor(10.0))
    objective.backward()
    ref_kd, ref_ce, ref_grad = _reference(s, t, y, 6.0, "mean", True, "kl", 0.1, (10.0 * upstream, upstream))
    _assert_close("objective", objective, upstream * (10.0 * ref_kd + ref_ce), **F32["loss"])
    _assert_close("kd", kd, ref_kd, **F32["loss"])
    _assert_close("grad", s.grad, ref_grad, **F32["grad"])


def test_parity_with_the_reference_module():
    s, t, y = _inputs(13, 1000, ignore_row=False)
    x_ref, x = s.clone().requires_grad_(), s.clone().requires_grad_()
    kd_ref, ce_ref = KDLoss(6.0, "mean", True, "kl", label_smoothing=0.1)(x_ref, t, y)
    (4.0 * kd_ref + 0.5 * ce_ref).backward()
    objective, kd, ce = fused_kd_objective(x, t, y, torch.tensor(4.0), 0.5, 6.0, "mean", True, "kl", 0.1)
    objective.backward()
    _assert_close("kd", kd, kd_ref, **F32["loss"])
    _assert_close("ce", ce, ce_ref, **F32["loss"])
    _assert_close("grad", x.grad, x_ref.grad, **F32["grad"])
    assert torch.allclose(ce, F.cross_entropy(s, y, label_smoothing=0.1))


@pytest.mark.parametrize(
    "kd_weight, ce_weight, message",
    [
        (2.0, 1.0, "expected kd_weight as a 0-dim float32 tensor, got 2.0"),
        (torch.ones(1), 1.0, "expected kd_weight as a 0-dim float32 tensor, got (1,) torch.float32"),
        (torch.tensor(2.0, dtype=torch.float64), 1.0, "expected kd_weight as a 0-dim float32 tensor, got () torch."),
        (torch.tensor(2.0), torch.tensor(1.0), "expected ce_weight as a Python number, got tensor(1.)"),
        (torch.tensor(2.0), float("nan"), "expected ce_weight as a Python number, got nan"),
    ],
)
def test_bad_weights_are_named(kd_weight, ce_weight, message):
    s, t, y = _inputs(4, 10)
    with pytest.raises(ValueError) as info:
        fused_kd_objective(s, t, y, kd_weight, ce_weight, 3.0)
    assert message in str(info.value)


def test_bad_logits_are_named_as_in_fused_kd_loss():
    with pytest.raises(ValueError, match="expected temperature as a finite Python number > 0, got 0.0"):
        fused_kd_objective(torch.randn(2, 5), torch.randn(2, 5), None, torch.tensor(1.0), 0.0, 0.0)
