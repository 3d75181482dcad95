"""Reference losses against float64 formulas written here independently, and hand-computed values."""

import math

import pytest
import torch

from fastfit.distill.losses import HintLoss, KDLoss, hint_loss_reference, kd_loss_reference

SHAPES = [(8, 10), (37, 1003), (1, 7)]


def _kd_float64(s, t, tau, reduction, tau_squared, form):
    s, t = s.double() / tau, t.double() / tau
    p_t = torch.exp(t - torch.logsumexp(t, 1, keepdim=True))
    log_p_s = s - torch.logsumexp(s, 1, keepdim=True)
    log_p_t = t - torch.logsumexp(t, 1, keepdim=True)
    rows = (p_t * (log_p_t - log_p_s)).sum(1) if form == "kl" else -(p_t * log_p_s).sum(1)
    total = {"batchmean": rows.sum() / s.shape[0], "mean": rows.sum() / s.numel(), "sum": rows.sum()}[reduction]
    return total * tau**2 if tau_squared else total


def test_kd_hand_computed_two_classes():
    # P_T = softmax([ln 3, 0]) = (3/4, 1/4); P_S = (1/2, 1/2); KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss_reference(s, t, 1.0, "batchmean", False, "kl").item() == pytest.approx(kl, rel=1e-6)
    assert kd_loss_reference(s, t, 1.0, "batchmean", False, "ce").item() == pytest.approx(math.log(2.0), rel=1e-6)
    # MMRazor 'mean' divides by N·C = 2; τ² = 4 with τ = 2 changes the distributions, so check mean vs batchmean only
    assert kd_loss_reference(s, t, 1.0, "mean", True, "kl").item() == pytest.approx(kl / 2, rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("form", ["kl", "ce"])
@pytest.mark.parametrize("tau_squared", [True, False])
def test_kd_matches_float64_formula_value_and_gradient(shape, reduction, form, tau_squared):
    s = (torch.randn(shape) * 3).requires_grad_()
    t = (torch.randn(shape) * 3).requires_grad_()
    tau = 3.0
    got = kd_loss_reference(s, t, tau, reduction, tau_squared, form)
    s64 = s.detach().double().requires_grad_()
    want = _kd_float64(s64, t.detach(), tau, reduction, tau_squared, form)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    (got * 2.5).backward()
    (want * 2.5).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert t.grad is None, "the teacher must never receive a gradient"


def test_kd_is_zero_for_identical_logits_and_ce_form_equals_teacher_entropy():
    z = torch.randn(4, 9)
    assert kd_loss_reference(z, z.clone(), 4.0, "sum", True, "kl").item() == pytest.approx(0.0, abs=1e-5)
    p = torch.softmax(z.double() / 4.0, 1)
    entropy = -(p * p.log()).sum()
    assert kd_loss_reference(z, z.clone(), 4.0, "sum", False, "ce").item() == pytest.approx(entropy.item(), rel=1e-5)


def test_kd_module_returns_cross_entropy_on_hard_labels():
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    kd, ce = KDLoss(2.0, "batchmean")(s, t, y)
    log_p = torch.log_softmax(s.double(), 1)
    assert ce.item() == pytest.approx(-log_p[torch.arange(6), y].mean().item(), rel=1e-6)
    assert KDLoss(2.0)(s, t)[1] is None


def test_hint_hand_computed_one_sample():
    y = torch.tensor([[3.0, 4.0]]).view(1, 2, 1, 1)
    u = torch.tensor([[4.0, 3.0]]).view(1, 2, 1, 1)
    # normalized: (0.6, 0.8) vs (0.8, 0.6) → 0.04 + 0.04; half_sq: ½(1 + 1); mse: (1 + 1)/2
    assert hint_loss_reference(y, u, "normalized_l2").item() == pytest.approx(0.08, rel=1e-6)
    assert hint_loss_reference(y, u, "half_sq").item() == pytest.approx(1.0, rel=1e-6)
    assert hint_loss_reference(y, u, "mse").item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("kind", ["normalized_l2", "half_sq", "mse"])
def test_hint_matches_float64_formula_value_and_gradient(kind):
    y = torch.randn(5, 6, 3, 4, requires_grad=True)
    u = torch.randn(5, 6, 3, 4, requires_grad=True)
    got = hint_loss_reference(y, u, kind)
    y64 = y.detach().double().requires_grad_()
    a, b = y64.reshape(5, -1), u.detach().double().reshape(5, -1)
    if kind == "normalized_l2":
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        want = (2 - 2 * cos).mean()  # MMRazor's L2Loss(normalize=True) written as cosines
    elif kind == "half_sq":
        want = 0.5 * ((a - b) ** 2).sum(1).mean()
    else:
        want = ((a - b) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (3 * got).backward()
    (3 * want).backward()
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=1e-4, atol=1e-7)
    assert u.grad is None


def test_hint_all_zero_feature_is_finite():
    y = torch.zeros(2, 3, 2, 2, requires_grad=True)
    loss = hint_loss_reference(y, torch.rand(2, 3, 2, 2), "normalized_l2")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y.grad).all()
    assert loss.item() == pytest.approx(1.0, rel=1e-6)  # ‖0 − û‖² = 1 per sample


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match=r"expected hint loss kind in .*got 'l1'"):
        hint_loss_reference(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), "l1")
    with pytest.raises(
        ValueError, match=r"expected the regressor output and teacher feature to match, got \(1, 2\) and \(1, 3\)"
    ):
        hint_loss_reference(torch.zeros(1, 2), torch.zeros(1, 3), "mse")
    with pytest.raises(ValueError, match=r"expected KD reduction in .*got 'avg'"):
        kd_loss_reference(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, "avg")
    with pytest.raises(
        ValueError, match=r"expected student and teacher logits of one \(N, C\) shape, got \(2, 3\) and \(2, 4\)"
    ):
        kd_loss_reference(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_hint_module_applies_connector_then_loss():
    conv = torch.nn.Conv2d(3, 5, 1, bias=False)
    s, u = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    want = hint_loss_reference(conv(s), u, "half_sq")
    assert HintLoss(conv, "half_sq")(s, u).item() == pytest.approx(want.item(), rel=1e-6)


def test_fused_hint_loss_refuses_a_connector_it_cannot_fuse():
    regressor = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"expected a connector the fused hint op supports .*use fused=False"):
        HintLoss(regressor, "half_sq", fused=True)
