"""Fused 1×1 regressor + BatchNorm + ReLU + hint loss (kernels/hint_loss*.py) against float64 references written
here: the conv as an einsum, BatchNorm and the three hint losses by hand, gradients by float64 autograd of those
formulas, running-stat updates by hand. On CPU the Triton kernels run through the interpreter (tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastfit.distill.connectors import MMRazorConnector, PaperRegressor
from fastfit.distill.losses import HINT_KINDS, HintLoss
from fastfit.kernels import fused_connector_hint_loss, fused_hint_loss, supports_connector

# (N, Cs, Ct, H, W)
SHAPES = {
    "resnet_like": (4, 64, 128, 7, 7),  # layer4's 7×7 maps, channels scaled down for the interpreter
    "odd": (3, 3, 37, 3, 5),  # Cs 3 → Ct 37, H·W = 15: nothing is a multiple of a tile
    "wide_odd": (2, 37, 20, 5, 5),  # Cs spans several K steps and Gram tiles, all ragged
    "single": (1, 6, 19, 2, 3),  # N = 1
    "one_pixel": (1, 4, 5, 1, 1),  # M = 1: no batch statistics, but eval BatchNorm and no BatchNorm work
}
# (loss and running stats, gradients): max |fused − reference| ≤ tol · max |reference|. 16-bit gradients carry the
# rounding of D = dL/dP and of dS to the feature dtype (bf16: 8 significant bits).
DTYPE_TOLS = {torch.float32: (1e-6, 2e-5), torch.bfloat16: (1e-4, 3e-2), torch.float16: (1e-4, 3e-3)}
NORM_EPS = 1e-12
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_device():
    # The kernels run on CUDA, or on the CPU through Triton's interpreter when there is no GPU (tests/conftest.py).
    # The unfused fp32 parity references must not use TF32 convolutions on a GPU (cuDNN allows them by default).
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)
    torch.backends.cudnn.allow_tf32 = tf32


def _reference_loss(y: torch.Tensor, u: torch.Tensor, kind: str) -> torch.Tensor:
    n = y.shape[0]
    y, u = y.reshape(n, -1), u.reshape(n, -1)
    if kind == "normalized_l2":
        # norm() has gradient 0 at 0, where sqrt(Σy²) would give 0·∞ = NaN; the clamp blocks it either way.
        y = y / y.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        return ((y - u) ** 2).sum() / n
    if kind == "half_sq":
        return 0.5 * ((y - u) ** 2).sum() / n
    return ((y - u) ** 2).sum() / y.numel()


def _inputs(shape, dtype, layout, bias, bn, affine, track):
    n, cs, ct, h, w = shape
    student = (torch.randn(n, cs, h, w) + 0.5).to(dtype)
    teacher = torch.randn(n, ct, h, w).relu().to(dtype)
    if layout in ("channels_last", "student_cl"):
        student = student.to(memory_format=torch.channels_last)
    if layout == "channels_last":
        teacher = teacher.to(memory_format=torch.channels_last)
    p = {
        "weight": torch.randn(ct, cs, 1, 1) / cs**0.5,
        "bias": torch.randn(ct) * 0.3 if bias else None,
        "bn_weight": None,
        "bn_bias": None,
        "running_mean": None,
        "running_var": None,
        "num_batches_tracked": None,
    }
    if bn and affine:
        p["bn_weight"], p["bn_bias"] = torch.rand(ct) + 0.5, torch.randn(ct) * 0.3
    if bn and track:
        p["running_mean"], p["running_var"] = torch.randn(ct) * 0.2, torch.rand(ct) + 0.5
        p["num_batches_tracked"] = torch.tensor(3)
    return student, teacher, p


def _reference(student, teacher, p, kind, bn, relu, momentum, eps, grad_scale):
    """Loss, grads {name: tensor} and updated running stats, in float64."""
    x = student.double().requires_grad_()
    ct = p["weight"].shape[0]
    # The fused op runs the regressor in the feature's dtype (like autocast): round the weight the same way.
    w = p["weight"].reshape(ct, -1).to(student.dtype).double().requires_grad_()
    leaves = {"student": x, "weight": w}
    y = torch.einsum("nchw,oc->nohw", x, w)
    if p["bias"] is not None:
        leaves["bias"] = p["bias"].double().requires_grad_()
        y = y + leaves["bias"][None, :, None, None]
    stats = {}
    if bn is not None:
        m = y.numel() // ct
        if bn == "train" or p["running_mean"] is None:
            mean = y.mean(dim=(0, 2, 3))
            var = ((y - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / m
            if bn == "train" and p["running_mean"] is not None:
                nbt = p["num_batches_tracked"].item() + 1
                f = 1.0 / nbt if momentum is None else momentum
                stats["running_mean"] = (1 - f) * p["running_mean"].double() + f * mean.detach()
                stats["running_var"] = (1 - f) * p["running_var"].double() + f * var.detach() * m / (m - 1)
                stats["num_batches_tracked"] = torch.tensor(nbt)
        else:
            mean, var = p["running_mean"].double(), p["running_var"].double()
        y = (y - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
        if p["bn_weight"] is not None:
            leaves["bn_weight"] = p["bn_weight"].double().requires_grad_()
            leaves["bn_bias"] = p["bn_bias"].double().requires_grad_()
            y = y * leaves["bn_weight"][None, :, None, None] + leaves["bn_bias"][None, :, None, None]
    if relu:
        y = y.clamp_min(0.0)
    loss = _reference_loss(y, teacher.double(), kind)
    (loss * grad_scale).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads["weight"] = grads["weight"].reshape(p["weight"].shape)
    return loss.detach(), grads, stats


def _assert_close(name, got, ref, tol):
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert bool(torch.isfinite(ref).all()), f"{name}: the reference itself has NaN/Inf"
    bad_values = int((~torch.isfinite(got)).sum())
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = (got - ref).abs()
    limit = tol * max(scale, 1e-30)
    over = err > limit
    if bad_values or bool(over.any()):
        idx = over.nonzero()[:3].tolist()
        raise AssertionError(
            f"{name}: {int(over.sum())}/{err.numel()} elements off by more than {limit:.3g} "
            f"(max err {float(err.max()):.3g}, max |ref| {scale:.3g}, NaN/Inf {bad_values}), "
            f"first at {idx}"
        )


def _check_once(
    shape="odd",
    kind="normalized_l2",
    bn="train",
    relu=True,
    bias=True,
    affine=True,
    track=True,
    layout="channels_last",
    dtype=torch.float32,
    grad_scale=1.0,
    momentum=0.1,
    eps=1e-5,
):
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    student, teacher, p = _inputs(dims, dtype, layout, bias, bn is not None, affine, track)
    ref_loss, ref_grads, ref_stats = _reference(student, teacher, p, kind, bn, relu, momentum, eps, grad_scale)
    params = {
        k: (v.clone().requires_grad_() if k in ("weight", "bias", "bn_weight", "bn_bias") else v.clone())
        for k, v in p.items()
        if v is not None
    }
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()  # must get no gradient
    loss = fused_hint_loss(
        s,
        t,
        params["weight"],
        params.get("bias"),
        kind=kind,
        batch_norm=bn is not None,
        bn_weight=params.get("bn_weight"),
        bn_bias=params.get("bn_bias"),
        running_mean=params.get("running_mean"),
        running_var=params.get("running_var"),
        num_batches_tracked=params.get("num_batches_tracked"),
        momentum=momentum,
        eps=eps,
        training=bn == "train",
        relu=relu,
    )
    assert loss.shape == () and loss.dtype == torch.float32
    (loss * grad_scale).backward()
    loss_tol, grad_tol = DTYPE_TOLS[dtype]
    _assert_close("loss", loss, ref_loss, loss_tol)
    assert t.grad is None, "the teacher feature must not get a gradient"
    assert s.grad.dtype == dtype and s.grad.stride() == s.stride(), "dS must keep the student's dtype and layout"
    _assert_close("grad student", s.grad, ref_grads["student"], grad_tol)
    _assert_close("grad weight", params["weight"].grad, ref_grads["weight"], grad_tol)
    if "bn_weight" in ref_grads:
        _assert_close("grad bn_weight", params["bn_weight"].grad, ref_grads["bn_weight"], grad_tol)
        _assert_close("grad bn_bias", params["bn_bias"].grad, ref_grads["bn_bias"], grad_tol)
    if bias:
        if bn == "train" or (bn is not None and not track):
            # Under batch statistics the bias cancels: its gradient is zero (the float64 reference's is rounding noise).
            assert torch.count_nonzero(params["bias"].grad) == 0
            assert float(ref_grads["bias"].abs().max()) < 1e-9 * float(ref_grads["weight"].abs().max())
        else:
            _assert_close("grad bias", params["bias"].grad, ref_grads["bias"], grad_tol)
    if ref_stats:
        _assert_close("running_mean", params["running_mean"], ref_stats["running_mean"], loss_tol * 10)
        _assert_close("running_var", params["running_var"], ref_stats["running_var"], loss_tol * 10)
        assert params["num_batches_tracked"].item() == ref_stats["num_batches_tracked"].item()
    elif bn is not None and track:
        torch.testing.assert_close(params["running_mean"], p["running_mean"], rtol=0, atol=0)
        torch.testing.assert_close(params["running_var"], p["running_var"], rtol=0, atol=0)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bn", ["train", "eval", None])
@pytest.mark.parametrize("kind", HINT_KINDS)
def test_matches_reference_per_kind_and_batchnorm_mode(kind, bn, relu):
    _check_once(kind=kind, bn=bn, relu=relu, grad_scale=2.5)


@pytest.mark.parametrize(
    "case",
    [
        {"affine": False},
        {"bias": False},
        {"affine": False, "bias": False, "bn": "eval"},
        {"track": False},  # batch statistics, nothing to update
        {"track": False, "bn": "eval"},  # eval without running stats still uses batch statistics
        {"momentum": None},  # cumulative moving average
        {"layout": "contiguous"},
        {"layout": "student_cl"},  # mixed layouts
        {"layout": "contiguous", "bn": "eval", "kind": "half_sq"},
        {"shape": "single", "kind": "mse"},
        {"shape": "single", "bn": "eval", "layout": "contiguous"},
        {"shape": "one_pixel", "bn": "eval"},
        {"shape": "one_pixel", "bn": None, "kind": "half_sq"},
        {"shape": "wide_odd", "kind": "half_sq"},
        {"shape": "wide_odd", "layout": "contiguous", "relu": False},
        {"grad_scale": -3.0, "kind": "mse"},
        {"eps": 1e-3, "bn": "eval"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_matches_reference_variants(case):
    _check_once(**case)


def test_matches_reference_resnet_like_shape():
    _check_once(shape="resnet_like", kind="normalized_l2", bn="train", grad_scale=10.0)


@pytest.mark.parametrize(
    "case",
    [
        {"kind": "normalized_l2", "bn": "train"},
        {"kind": "half_sq", "bn": "eval", "relu": False},
        {"kind": "mse", "bn": None},
        {"shape": "resnet_like", "bn": "train", "grad_scale": 10.0},
        {"shape": "wide_odd", "dtype": torch.bfloat16, "kind": "normalized_l2"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("path", ["fused", "split"])
def test_both_backward_paths_match_the_reference(case, path, monkeypatch):
    """The fused first pass (hint_loss_fused_bwd) runs for bf16 D with at most FUSED_MAX_CS student channels; every
    other call takes the split dP, channel and dW kernels. Force each path for every case, fp32 included, so both
    are held to the fp32 tolerances."""
    from fastfit.kernels import hint_loss_fused_bwd

    if path == "fused":
        monkeypatch.setattr(hint_loss_fused_bwd, "FUSED_GRAD_DTYPES", (torch.bfloat16, torch.float32))
    else:
        monkeypatch.setattr(hint_loss_fused_bwd, "FUSED_MAX_CS", 0)
    calls = []
    real = hint_loss_fused_bwd.hint_backward_fused
    monkeypatch.setattr(hint_loss_fused_bwd, "hint_backward_fused", lambda *a: calls.append(1) or real(*a))
    from fastfit.kernels import hint_loss

    monkeypatch.setattr(hint_loss, "hint_backward_fused", hint_loss_fused_bwd.hint_backward_fused)
    _check_once(**case)
    assert bool(calls) == (path == "fused")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", HINT_KINDS)
def test_matches_reference_16bit(kind, dtype):
    _check_once(kind=kind, dtype=dtype, shape="wide_odd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_16bit_eval_contiguous(dtype):
    _check_once(dtype=dtype, bn="eval", layout="contiguous", kind="half_sq")


def test_all_zero_maps_follow_the_clamped_norm():
    # Regressor outputs with ‖y‖ below the clamp (1e-12) are divided by the clamp, whose gradient is I/ε: a tiny
    # sample (0) and an all-zero one (2); an all-zero teacher sample (1) normalizes to zero as well.
    student, teacher, p = _inputs(SHAPES["odd"], torch.float32, "channels_last", False, False, False, False)
    student[0] *= 1e-14
    student[2].zero_()
    teacher[1].zero_()
    ref_loss, ref_grads, _ = _reference(student, teacher, p, "normalized_l2", None, False, 0.1, 1e-5, 1.0)
    s, w = student.clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss = fused_hint_loss(s, teacher, w, kind="normalized_l2")
    loss.backward()
    _assert_close("loss", loss, ref_loss, 1e-6)
    _assert_close("grad student", s.grad, ref_grads["student"], 2e-5)
    _assert_close("grad weight", w.grad, ref_grads["weight"], 2e-5)


def test_two_training_steps_update_running_stats_like_batchnorm():
    torch.manual_seed(1)
    connector = MMRazorConnector(5, 21)
    connector[1].momentum = None  # cumulative average: uses num_batches_tracked
    reference = copy.deepcopy(connector)
    for _ in range(2):
        s = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last)
        t = torch.randn(2, 21, 3, 4)
        fused_connector_hint_loss(connector, s, t, "half_sq").backward()
        reference(s)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(connector[1], name), getattr(reference[1], name), rtol=1e-5, atol=1e-6)
    assert connector[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["normalized_l2", "mse"])
def test_parity_with_unfused_hint_loss_on_mmrazor_connector(kind, train):
    connector = MMRazorConnector(6, 24)
    with torch.no_grad():
        connector[1].running_mean.uniform_(-0.2, 0.2)
        connector[1].running_var.uniform_(0.5, 2.0)
    _parity(connector, kind, train, (2, 6, 24, 4, 3))


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_parity_with_unfused_hint_loss_on_paper_regressor(activation):
    _parity(PaperRegressor(7, 13, (1, 1), activation), "half_sq", True, (3, 7, 13, 3, 3))


def _parity(connector, kind, train, shape):
    n, cs, ct, h, w = shape
    fused = HintLoss(copy.deepcopy(connector).train(train), kind, fused=True)
    plain = HintLoss(copy.deepcopy(connector).train(train), kind, fused=False)
    s = torch.randn(n, cs, h, w).to(memory_format=torch.channels_last)
    t = torch.randn(n, ct, h, w).relu()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    l1, l2 = fused(s1, t), plain(s2, t)
    (l1 * 0.7).backward()
    (l2 * 0.7).backward()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)
    for (name, p1), (_, p2) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        atol = 1e-6 * float(p2.grad.abs().max()) + 1e-9
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    for (name, b1), (_, b2) in zip(fused.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_compiles_with_fullgraph():
    connector = MMRazorConnector(6, 20)
    fused = torch.compile(
        HintLoss(copy.deepcopy(connector), "normalized_l2", fused=True), backend="aot_eager", fullgraph=True
    )
    plain = HintLoss(copy.deepcopy(connector), "normalized_l2", fused=False)
    for _ in range(2):  # the second step reads the running stats the first one wrote
        s = torch.randn(2, 6, 3, 3).to(memory_format=torch.channels_last)
        t = torch.randn(2, 20, 3, 3)
        s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        l1, l2 = fused(s1, t), plain(s2, t)
        (2 * l1).backward()
        (2 * l2).backward()
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
    plain_conn = plain.connector
    fused_conn = fused._orig_mod.connector
    torch.testing.assert_close(fused_conn[0].weight.grad, plain_conn[0].weight.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused_conn[1].running_var, plain_conn[1].running_var, rtol=1e-5, atol=1e-6)
    assert fused_conn[1].num_batches_tracked.item() == 2


def test_supports_connector():
    assert supports_connector(MMRazorConnector(4, 8))
    assert supports_connector(PaperRegressor(4, 8, (1, 1)))
    assert supports_connector(
        nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, affine=False, track_running_stats=False))
    )
    assert not supports_connector(PaperRegressor(4, 8, (3, 3)))
    assert not supports_connector(nn.Conv2d(4, 8, 1))


@pytest.mark.parametrize(
    "connector, message",
    [
        (
            PaperRegressor(4, 8, (3, 3)),
            "Conv2d to be 1×1 with stride 1, padding 0, dilation 1, groups 1, got kernel_size=(3, 3)",
        ),
        (nn.Sequential(nn.Conv2d(4, 8, 1, stride=2)), "got kernel_size=(1, 1), stride=(2, 2)"),
        (nn.Sequential(nn.Conv2d(4, 8, 1), nn.Dropout()), "got [Conv2d, Dropout] (Dropout cannot be fused"),
        (nn.Sequential(nn.Conv2d(4, 8, 1), nn.SyncBatchNorm(8)), "(SyncBatchNorm cannot be fused"),
        (nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.BatchNorm2d(8)), "got [Conv2d, ReLU, BatchNorm2d]"),
        (nn.Sequential(nn.BatchNorm2d(4)), "expected Sequential to start with an nn.Conv2d"),
        (
            nn.Conv2d(4, 8, 1),
            "expected a connector of the form nn.Sequential(Conv2d 1×1 [, BatchNorm2d] [, ReLU]), got Conv2d",
        ),
    ],
    ids=["3x3", "stride", "dropout", "syncbn", "order", "no-conv", "bare-conv"],
)
def test_unsupported_connector_names_the_problem(connector, message):
    with pytest.raises(ValueError) as info:
        fused_connector_hint_loss(connector, torch.randn(1, 4, 3, 3), torch.randn(1, 8, 3, 3), "mse")
    assert message in str(info.value)


def _call(student=None, teacher=None, weight=None, **kwargs):
    student = torch.randn(2, 4, 3, 3) if student is None else student
    teacher = torch.randn(2, 8, 3, 3) if teacher is None else teacher
    weight = torch.randn(8, 4, 1, 1) if weight is None else weight
    return fused_hint_loss(student, teacher, weight, kind=kwargs.pop("kind", "mse"), **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: {"kind": "cosine"}, "expected hint loss kind in ('normalized_l2', 'half_sq', 'mse'), got 'cosine'"),
        (
            lambda: {"student": torch.randn(2, 4, 9)},
            "expected the student feature to be a 4-D (N, C, H, W) tensor, got (2, 4, 9)",
        ),
        (
            lambda: {"student": torch.randn(2, 4, 3, 3).double()},
            "expected the student feature in float32, bfloat16 or float16, got torch.float64",
        ),
        (lambda: {"teacher": torch.randn(2, 8, 3, 4)}, "expected a teacher feature of shape (2, 8, 3, 3)"),
        (lambda: {"weight": torch.randn(8, 5, 1, 1)}, "expected a regressor weight of shape (Ct, 4) or (Ct, 4, 1, 1)"),
        (lambda: {"weight": torch.randn(8, 4, 3, 3)}, "got (8, 4, 3, 3)"),
        (lambda: {"bias": torch.randn(7)}, "expected regressor bias of shape (8,)"),
        (
            lambda: {"teacher": torch.randn(2, 8, 3, 3, device="meta")},
            "expected the teacher feature on the student feature's device",
        ),
        (
            lambda: {"bn_weight": torch.ones(8)},
            "expected no BatchNorm parameters or running stats with batch_norm=False",
        ),
        (
            lambda: {"batch_norm": True, "running_mean": torch.zeros(8)},
            "expected running_mean and running_var together",
        ),
        (
            lambda: {"batch_norm": True, "student": torch.randn(1, 4, 1, 1), "teacher": torch.randn(1, 8, 1, 1)},
            "expected more than one value per channel for BatchNorm batch statistics, got N·H·W = 1",
        ),
        (
            lambda: {"student": torch.randn(0, 4, 3, 3), "teacher": torch.randn(0, 8, 3, 3)},
            "expected a non-empty student feature",
        ),
    ],
    ids=[
        "kind",
        "rank",
        "dtype",
        "teacher-shape",
        "weight-cs",
        "weight-kernel",
        "bias",
        "device",
        "bn-without-flag",
        "half-running",
        "bn-one-value",
        "empty",
    ],
)
def test_bad_inputs_name_the_problem(make, message):
    with pytest.raises(ValueError) as info:
        _call(**make())
    assert message in str(info.value)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    import fastfit.kernels.hint_loss_common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="expected the student feature on a CUDA device \\(or TRITON_INTERPRET=1"):
        _call(
            torch.randn(2, 4, 3, 3, device=cpu),
            torch.randn(2, 8, 3, 3, device=cpu),
            torch.randn(8, 4, 1, 1, device=cpu),
        )


def test_kinds_match_the_reference_losses():
    from fastfit.kernels.hint_loss_checks import KINDS

    assert KINDS == HINT_KINDS


@pytest.mark.gpu
@pytest.mark.parametrize("kind", HINT_KINDS)
def test_layer4_like_shape_on_gpu(kind):
    # The tuned GPU path (bf16 tensor cores, autotuned configs, 128-wide tiles) on a layer4 slice: 8 × 7 × 7 rows.
    # fp32/fp16 without ReLU: among 800k outputs a few sit within rounding of 0, and a flipped ReLU mask would move
    # one gradient row by far more than those dtypes' tolerances (bf16's covers it).
    layer4_slice = (8, 512, 2048, 7, 7)
    _check_once(shape=layer4_slice, kind=kind, dtype=torch.bfloat16)
    _check_once(shape=layer4_slice, kind=kind, dtype=torch.float16, relu=False)
    _check_once(shape=layer4_slice, kind=kind, dtype=torch.float32, layout="contiguous", bn="eval", relu=False)


def test_autocast_does_not_reach_the_op_internals():
    # Under bf16 autocast the op must still do its small fp32 matmuls (batch statistics, BN corrections) in fp32.
    connector = MMRazorConnector(24, 40)
    s = torch.randn(2, 24, 3, 3).to(torch.bfloat16).to(memory_format=torch.channels_last)
    t = torch.randn(2, 40, 3, 3).relu().to(torch.bfloat16)
    results = []
    for autocast in (False, True):
        c = copy.deepcopy(connector)
        x = s.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fused_connector_hint_loss(c, x, t, "normalized_l2")
            loss.backward()
        results.append((loss, x.grad, c[0].weight.grad, c[1].running_var))
    for plain, autocast in zip(*results, strict=True):
        torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_only_the_inputs_that_need_gradients_get_them(train):
    # Frozen student feature and BatchNorm affine: only the conv weight and bias learn (the backward skips dX, dγ, dβ).
    connector = MMRazorConnector(5, 11)
    connector[0].bias = nn.Parameter(torch.randn(11) * 0.1)
    connector[1].weight.requires_grad_(False)
    connector[1].bias.requires_grad_(False)
    fused_conn, plain_conn = copy.deepcopy(connector).train(train), copy.deepcopy(connector).train(train)
    s = torch.randn(2, 5, 3, 3).to(memory_format=torch.channels_last)
    t = torch.randn(2, 11, 3, 3)
    fused_connector_hint_loss(fused_conn, s, t, "normalized_l2").backward()
    HintLoss(plain_conn, "normalized_l2")(s, t).backward()
    assert fused_conn[1].weight.grad is None and fused_conn[1].bias.grad is None
    torch.testing.assert_close(fused_conn[0].weight.grad, plain_conn[0].weight.grad, rtol=1e-4, atol=1e-7)
    scale = float(plain_conn[0].weight.grad.abs().max())
    torch.testing.assert_close(fused_conn[0].bias.grad, plain_conn[0].bias.grad, rtol=1e-4, atol=1e-6 * scale)


def test_int64_offsets_path(monkeypatch):
    # Offsets switch to int64 only when a tensor spans 2³¹ elements; force that path on a small case.
    import fastfit.kernels.hint_loss_grads as grads
    import fastfit.kernels.hint_loss_stats as stats
    import fastfit.kernels.hint_loss_tiles as tiles

    for module in (grads, stats, tiles):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)
    _check_once(shape="wide_odd", kind="normalized_l2", bn="train", layout="contiguous")


def test_needs_int64_measures_the_farthest_offset():
    from fastfit.kernels.hint_loss_common import needs_int64

    small = torch.empty_strided((4, 8, 7, 7), (392, 1, 56, 8), device="meta")
    assert not needs_int64(small)
    # 2 × 2¹⁶ × 2¹⁴ × 1 elements: the last offset is 2³¹ − 1, past what int32 offsets can address safely
    assert needs_int64(torch.empty((2, 2**16, 2**14, 1), device="meta"))
    assert not needs_int64(torch.empty((2, 2**16, 2**14 - 1, 1), device="meta"))
