"""One precision path: the CPU tests see the roundings the GPU does. The kernels' `mma` helper lowers to tensor-core
MMAs on the GPU and, under the interpreter, rounds the operands the same way before exact fp32 products; these tests
check the roundings themselves and the BatchNorm statistics that depend on them, against float64."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

import fastfit.kernels.hint_loss_stats as stats
from fastfit.distill.connectors import MMRazorConnector
from fastfit.kernels import fused_connector_hint_loss
from fastfit.kernels.hint_loss import regressor_stats
from fastfit.kernels.rounding import cast, mma, round_tf32

pytestmark = pytest.mark.interpreter

LAYER3 = (256, 256, 1024, 14, 14)  # N, Cs, Ct, H, W: M = 50,176 rows


def _post_relu_features(n: int, cs: int, h: int, w: int) -> torch.Tensor:
    """bf16 post-ReLU maps whose channel means range from −σ (half zeros) to 30σ (no zeros), σ from 0.05 to 2."""
    g = torch.Generator().manual_seed(1)
    sigma = torch.logspace(-1.3, 0.3, cs)[torch.randperm(cs, generator=g)]
    ratio = torch.linspace(-1.0, 30.0, cs)[torch.randperm(cs, generator=g)]
    x = torch.randn(n, h, w, cs, generator=g) * sigma + ratio * sigma
    return x.relu().to(torch.bfloat16).permute(0, 3, 1, 2)  # channels-last (N, C, H, W) view


def _float64_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    mu = rows.mean(0)
    centred = rows - mu
    cov = centred.T @ centred / rows.shape[0]
    w64 = w.double()
    return w64 @ mu, ((w64 @ cov) * w64).sum(1)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / want.abs()).max())


@pytest.fixture
def layer3_case(monkeypatch):
    # Bigger interpreter tiles: the same kernels and roundings, fewer numpy steps at 50,176 rows.
    monkeypatch.setattr(stats, "INTERPRET_TILE", 4096)
    monkeypatch.setattr(stats, "INTERPRET_K", 256)
    n, cs, ct, h, w = LAYER3
    x = _post_relu_features(n, cs, h, w)
    weight = (torch.randn(ct, cs, generator=torch.Generator().manual_seed(2)) / cs**0.5).to(torch.bfloat16)
    return x, weight


def test_batchnorm_statistics_at_layer3_within_1e5_of_float64(layer3_case):
    x, weight = layer3_case
    mean_ref, var_ref = _float64_stats(x, weight)
    mu, gram = stats.hint_moments(x)
    mean_a, var_a, _ = regressor_stats(weight, mu, gram, x.shape[0] * x.shape[2] * x.shape[3])
    # mean_A can cancel to ~0 for some channels: measure it against the spread it is compared with.
    assert float(((mean_a.double() - mean_ref).abs() / var_ref.sqrt()).max()) < 1e-5
    assert _relative_error(var_a, var_ref) < 1e-5


def test_the_bf16_rounded_gram_misses_that_bound(layer3_case):
    # The control: the Gram the GPU computed before (centred values rounded to bf16 for the MMA) fails the 1e-5
    # bound on the same data, so the test above can tell the two paths apart.
    x, weight = layer3_case
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()
    centred = (rows - rows.mean(0)).to(torch.bfloat16).double()
    var_bf16 = ((weight.double() @ (centred.T @ centred)) * weight.double()).sum(1) / rows.shape[0]
    _, var_ref = _float64_stats(x, weight)
    assert _relative_error(var_bf16, var_ref) > 1e-4


def test_tf32_rounding_matches_the_hardware_conversion():
    # cvt.rna.tf32.f32: keep 10 explicit mantissa bits, round to nearest with ties away from zero.
    @triton.jit
    def kernel(x_ptr, y_ptr):
        offs = tl.arange(0, 8)
        tl.store(y_ptr + offs, round_tf32(tl.load(x_ptr + offs)))

    one_ulp = 2.0**-10  # in [1, 2); in [2, 4) it is twice that
    x = torch.tensor(
        [1.0, 1.0 + one_ulp / 2, 1.0 + one_ulp / 2 - 2**-20, -(1.0 + one_ulp / 2), 3.0 + 3 * one_ulp / 2, 0.0, 2**-130]
        + [1e30]
    )
    y = torch.empty_like(x)
    kernel[(1,)](x, y)
    want = [1.0, 1.0 + one_ulp, 1.0, -(1.0 + one_ulp), 3.0 + 2 * one_ulp, 0.0, 2**-130, None]
    for got, expected, value in zip(y.tolist(), want, x.tolist(), strict=True):
        if expected is not None:
            assert got == expected, (value, got, expected)
    assert abs(y[-1].item() / 1e30 - 1) < 2**-11


@pytest.mark.parametrize("mode", ["bf16", "fp16", "tf32x3"])
def test_mma_rounds_operands_like_the_gpu(mode):
    @triton.jit
    def kernel(a_ptr, b_ptr, c_ptr, MODE: tl.constexpr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        acc = mma(a, b, tl.zeros((16, 16), tl.float32), MODE, True)
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], acc)

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    c = torch.empty(16, 16)
    kernel[(1,)](a, b, c, MODE=mode)
    exact = a.double() @ b.double()
    if mode == "tf32x3":
        # about 22 bits per operand: fp32-class products, far from TF32's 11 bits
        assert float((c.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max())
        assert float((c.double() - exact).abs().max()) > 0.0
    else:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        rounded = a.to(dtype).double() @ b.to(dtype).double()
        torch.testing.assert_close(c.double(), rounded, rtol=1e-6, atol=1e-6)
        assert float((rounded - exact).abs().max()) > 1e-3  # the rounding is really there


class _MatmulDtypes(TorchDispatchMode):
    MATMULS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "matmul", "dot", "vdot"}

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.MATMULS:
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_no_fp32_torch_matmul_inside_the_hint_op():
    # cuBLAS fp32 matmuls follow torch.backends.cuda.matmul.allow_tf32; the op's small products run in Triton
    # (3×TF32) or as elementwise sums, so that switch cannot change its numerics.
    connector = MMRazorConnector(12, 20).train()
    s = torch.randn(2, 12, 3, 3).to(torch.bfloat16).requires_grad_()
    t = torch.randn(2, 20, 3, 3).relu().to(torch.bfloat16)
    with _MatmulDtypes() as mode:
        fused_connector_hint_loss(connector, s, t, "normalized_l2").backward()
    assert [seen for seen in mode.seen if seen[1] == torch.float32] == []


def test_bf16_cast_rounds_to_nearest_even_like_the_gpu():
    # The interpreter's own fp32 → bf16 cast truncates; the GPU (cvt.rn.bf16.f32) rounds to nearest even.
    @triton.jit
    def kernel(x_ptr, y_ptr):
        offs = tl.arange(0, 8)
        tl.store(y_ptr + offs, cast(tl.load(x_ptr + offs), tl.bfloat16, True))

    x = torch.tensor([1 + 2**-8 + 2**-12, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-12), 3.3, 0.1, 7.77, 0.0])
    y = torch.empty(8, dtype=torch.bfloat16)
    kernel[(1,)](x, y)
    assert torch.equal(y, x.to(torch.bfloat16))  # torch rounds to nearest even
    assert not torch.equal(y[:1], torch.tensor([1.0], dtype=torch.bfloat16))  # truncation would give 1.0
