"""The KD microbenchmark plug-in: its providers compute the same loss and gradient, its inputs rotate, and its
bandwidth floor is the one the protocol promises (3·N·C·element_size + labels)."""

import torch

from fastfit.perf.kernel_bench import kd as bench_kd


def test_cases_cover_the_targets():
    shapes = {(c["N"], c["C"], c["dtype"]) for c in bench_kd.CASES}
    assert shapes == {(n, c, d) for n in (256, 8192) for c in (1000, 21843) for d in ("float32", "bfloat16")}


def test_providers_agree_and_inputs_rotate():
    case = bench_kd.setup({"N": 5, "C": 37, "dtype": "float32"}, torch.device("cpu"))
    assert set(case.providers) == {"eager", "compile", "fused", "objective", "objective_scaled"}
    assert case.bytes == {"fwd": 3 * 5 * 37 * 4 + 8 * 5, "fwd_bwd": 3 * 5 * 37 * 4 + 8 * 5}
    assert case.target_us == {}  # no roofline for a CPU
    eager, fused = case.providers["eager"], case.providers["fused"]
    for i in (0, 1):
        for got, want in zip(fused["fwd"](i), eager["fwd"](i), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused["fwd_bwd"](i), eager["fwd_bwd"](i), rtol=1e-4, atol=1e-7)
    assert not torch.equal(eager["fwd"](0)[0], eager["fwd"](1)[0])  # call i and i+1 read different inputs
    objective, scaled = case.providers["objective"], case.providers["objective_scaled"]
    for i in (0, 1):
        kd, ce = eager["fwd"](i)
        total, kd_fused, ce_fused = objective["fwd"](i)
        torch.testing.assert_close(total, bench_kd.KD_WEIGHT * kd + ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((kd_fused, ce_fused), (kd, ce), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(objective["fwd_bwd"](i), eager["fwd_bwd"](i), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scaled["fwd_bwd"](i), 2.0**16 * eager["fwd_bwd"](i), rtol=1e-4, atol=1e-7 * 2**16)
