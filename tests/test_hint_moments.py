"""The moments of the student feature behind the fused hint op's batch statistics (kernels/hint_loss_stats.py):
hint_moments → (μ, Gc) in one launch, and fp32_matmul's bf16 path, against float64 formulas written here.

Error bounds (elementwise, against float64 of the same feature values), with Xs = X − X[row 0] and S = Σ_m Xs:
  bf16 hi/lo Gram (16-bit features): hi + lo keeps about 16 bits of Xs; the omitted loᵀlo and the rounding of lo are
      each below 2⁻¹⁸·|Xs_i·Xs_j| per product, so |ΔGc_ij| ≤ 2⁻¹⁶·(Σ_m |Xs_mi·Xs_mj| + |S_i·S_j|/M);
  3×TF32 (fp32 features): about 22 bits, |ΔGc_ij| ≤ 2⁻¹⁹·(the same magnitudes);
  μ = s + S/M in fp32: |Δμ| ≤ 2⁻²⁰·(|μ| + Σ_m |Xs_m|/M).
A Gram of the bf16-rounded Xs alone (no lo term) violates the 16-bit bound on the same data (the control).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastfit.kernels.hint_loss_common as common
import fastfit.kernels.hint_loss_stats as stats

pytestmark = pytest.mark.interpreter

SHAPE = (3, 37, 5, 7)  # M = 105 rows (not a multiple of the 32-row interpreter tile), Cs = 37: 3 ragged channel blocks
GRAM_BITS = {torch.float32: 19, torch.bfloat16: 16, torch.float16: 16}


def _features(kind: str, dtype: torch.dtype, layout: str, seed: int = 0) -> torch.Tensor:
    n, c, h, w = SHAPE
    g = torch.Generator().manual_seed(seed)
    if kind == "post_relu":  # channel means from −σ (about half zeros) to 3σ, σ from 0.05 to 2
        sigma = torch.logspace(-1.3, 0.3, c)[torch.randperm(c, generator=g)]
        ratio = torch.linspace(-1.0, 3.0, c)[torch.randperm(c, generator=g)]
        x = (torch.randn(n, h, w, c, generator=g) * sigma + ratio * sigma).relu()
    else:  # |μ| ≫ σ
        x = torch.randn(n, h, w, c, generator=g) * 0.5 + 100.0
    x = x.permute(0, 3, 1, 2).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _rows64(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows64(x)
    mu = rows.mean(0)
    centred = rows - mu
    return mu, centred.T @ centred


def _magnitudes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_m |Xs_i·Xs_j| + |S_i·S_j|/M, |μ| + Σ_m |Xs|/M) in float64: what the error bounds scale with."""
    rows = _rows64(x)
    shifted = rows - rows[0]
    total = shifted.sum(0)
    gram = shifted.abs().T @ shifted.abs() + total.abs()[:, None] * total.abs()[None, :] / rows.shape[0]
    return gram, rows.mean(0).abs() + shifted.abs().mean(0)


def _check(x: torch.Tensor) -> tuple[float, float]:
    mu, gram = stats.hint_moments(x)
    mu_ref, gram_ref = _reference(x)
    gram_mag, mu_mag = _magnitudes(x)
    gram_excess = float(((gram.double() - gram_ref).abs() / (2.0 ** -GRAM_BITS[x.dtype] * gram_mag)).max())
    mu_excess = float(((mu.double() - mu_ref).abs() / (2.0**-20 * mu_mag)).max())
    assert gram_excess <= 1.0, f"Gram error {gram_excess:.2f}× its bound"
    assert mu_excess <= 1.0, f"mean error {mu_excess:.2f}× its bound"
    # each off-diagonal tile is computed once and written at (i, j) and (j, i)
    block = torch.arange(x.shape[1]) // stats.INTERPRET_K
    off_diagonal = block[:, None] != block[None, :]
    assert torch.equal(gram[off_diagonal], gram.T[off_diagonal])
    return gram_excess, mu_excess


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("kind", ["post_relu", "offset"])
def test_moments_match_float64_within_the_bound(kind, layout, dtype):
    _check(_features(kind, dtype, layout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_splits_reduce_in_the_kernel_and_leave_the_counters_at_zero(monkeypatch, dtype):
    # One 32-row block per program: 4 splits per tile, summed by the last program to arrive.
    monkeypatch.setattr(stats, "split_rows", lambda m, tiles, block_rows, *rest: block_rows)
    x = _features("post_relu", dtype, "channels_last")
    _check(x)
    counters = common._TICKETS[(x.device.type, x.device.index)]
    assert int(counters.abs().sum()) == 0
    # A second call on other data reuses the same counters: only a reset after the first makes it correct.
    _check(_features("offset", dtype, "contiguous", seed=1))
    assert common._TICKETS[(x.device.type, x.device.index)] is counters and int(counters.abs().sum()) == 0


def test_stale_counters_would_be_noticed(monkeypatch):
    # The control for the reset: a counter left at 1 makes a tile finish one split early (its Gc is wrong).
    monkeypatch.setattr(stats, "split_rows", lambda m, tiles, block_rows, *rest: block_rows)
    x = _features("post_relu", torch.float32, "channels_last")
    stats.hint_moments(x)
    counters = common._TICKETS[(x.device.type, x.device.index)]
    counters[0] = 1
    with pytest.raises(AssertionError, match="Gram error"):
        _check(x)
    counters.zero_()


def test_the_gram_without_the_lo_term_misses_the_16bit_bound():
    # Xs rounded once to bf16 (what hi alone would give): far outside the bound the hi/lo kernel meets.
    x = _features("post_relu", torch.bfloat16, "channels_last")
    rows = _rows64(x)
    shifted = rows - rows[0]
    hi = shifted.float().to(torch.bfloat16).double()
    total = hi.sum(0)
    gram_hi = hi.T @ hi - total[:, None] * total[None, :] / rows.shape[0]
    gram_mag, _ = _magnitudes(x)
    _, gram_ref = _reference(x)
    assert float(((gram_hi - gram_ref).abs() / (2.0**-16 * gram_mag)).max()) > 4.0


class _TorchOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_one_kernel_launch_and_no_torch_kernels(monkeypatch):
    launches = []

    class _Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    x = _features("post_relu", torch.bfloat16, "channels_last")
    stats.hint_moments(x)  # the counters exist from here on
    monkeypatch.setattr(stats, "_hint_moments_kernel", _Recorder())
    with _TorchOps() as ops:
        stats.feature_moments(x)
    assert len(launches) == 1 and launches[0][1]["MODE"] == "bf16"
    assert set(ops.names) <= {"empty", "empty_strided"}, ops.names  # allocations only, no fill, no reduction


def test_fp32_matmul_bf16_operand_matches_float64():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(70, 45, generator=g).to(torch.bfloat16)  # Ct × Cs: two output tiles of rows, ragged K
    gram = torch.randn(45, 45, generator=g)
    gram = gram @ gram.T * 1e3
    c1 = torch.randn(70, generator=g)
    cases = [
        (w, gram, None, w.double() @ gram.double()),  # W·Gc: left operand exact
        (gram, w.t(), None, gram.double() @ w.t().double()),  # right operand exact
        (w.t(), w.float(), c1, w.t().double() @ (c1.double()[:, None] * w.double())),  # Wᵀ·diag(c1)·W
    ]
    for a, b, scale, want in cases:
        a64 = a.double()
        b64 = b.double() if scale is None else c1.double()[:, None] * b.double()  # diag(c1)·B
        got = stats.fp32_matmul(a, b, scale).double()
        # exact bf16 operand × (hi + lo) of the other, which keeps 16 bits: |Δ| ≤ 2⁻¹⁶ Σ_k |a_ik|·|b_kj|
        bound = 2.0**-16 * (a64.abs() @ b64.abs())
        assert float(((got - want).abs() / bound).max()) <= 1.0
        # the control: the fp32 operand rounded once to bf16 (no lo term) misses that bound
        if a.dtype == torch.bfloat16:
            coarse = a64 @ b64.float().to(torch.bfloat16).double()
        else:
            coarse = a64.float().to(torch.bfloat16).double() @ b64
        assert float(((coarse - want).abs() / bound).max()) > 4.0
