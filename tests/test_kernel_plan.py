"""scripts/bench_kernels.py --plan (fastfit.perf.kernel_bench.plan): the modeled launches, bytes and floors of the KD
ops (fused_kd_loss; fused_kd_objective on its fast and slow backward paths) against hand-counted values. Runs in a
subprocess without TRITON_INTERPRET (it compiles for sm_90a)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CODE = """
import json, sys
from fastfit.perf.kernel_bench.plan import plan
ops = ["kd 8192x1000 float32", "kd 256x1000 bfloat16"]
shapes = ("8192x1000 float32", "256x1000 bfloat16")
ops += [f"kd_objective {shape} {path}" for shape in shapes for path in ("fast", "slow")]
print(json.dumps(plan(ops)))
"""
N, C = 8192, 1000
BANDWIDTH = 4.8e12  # H200 data sheet


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kd_plan_counts_five_passes_and_three_launches(report):
    rows = {row["op"]: row for row in report["ops"]}
    big = rows["kd 8192x1000 float32"]
    n, c = N, C
    # forward reads s and t; backward reads s and t and writes grad_s: 5 N·C·4 bytes, plus per-row statistics,
    # labels (read twice) and the partial sums — under 1 % on top
    passes = 5 * n * c * 4
    assert passes <= big["modeled_mb"] * 1e6 <= passes * 1.01
    assert (big["launches"], big["triton_launches"], big["torch_launches"]) == (3, 2, 1)  # memset, fwd, bwd
    assert abs(big["floor_us_H200"] - (big["modeled_mb"] * 1e6 / BANDWIDTH * 1e6 + 3 * 1.0)) < 0.01
    small = rows["kd 256x1000 bfloat16"]
    assert small["floor_within_70pct"] and small["floor_us_H200"] < 0.7 * 12.0
    kernels = {k["kernel"] for k in report["kernels"] if k["op"].startswith("kd ")}
    assert kernels == {"_kd_loss_fwd_kernel", "_kd_loss_bwd_kernel"}
    assert all(k["spill_bytes"] == 0 for k in report["kernels"])


HINT_CODE = """
import json
from fastfit.perf.kernel_bench.plan import plan
print(json.dumps(plan(["hint layer3 bfloat16", "hint layer4 bfloat16"])))
"""
# The launches of the trainer's call (BatchNorm in training, ReLU, normalized L2, every gradient), in order.
HINT_FORWARD = ["_hint_moments_kernel", "_small_gemm_kernel", "_hint_channel_affine_kernel", "_hint_fwd_kernel"]
HINT_BACKWARD = {
    # layer3, Cs = 256: one fused first pass (D, DᵀX, the per-channel gradients, dW), then G1 and dX
    "hint layer3 bfloat16": ["_hint_bwd_fused_kernel", "_small_gemm_kernel", "_hint_dx_kernel"],
    # layer4, Cs = 512: DᵀX does not fit in registers; dP, then dW with the per-channel gradients, then G1 and dX
    "hint layer4 bfloat16": ["_hint_bwd_dp_kernel", "_hint_dw_kernel", "_small_gemm_kernel", "_hint_dx_kernel"],
}


def test_hint_plan_meets_the_launch_and_floor_targets_with_no_torch_launch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", HINT_CODE], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for row in report["ops"]:
        kernels = [k["kernel"] for k in report["kernels"] if k["op"] == row["op"]]
        assert kernels == HINT_FORWARD + HINT_BACKWARD[row["op"]], kernels
        # every reduction and per-sample/per-channel step runs inside those kernels: nothing launches in between
        assert (row["torch_launches"], row["torch_ops"]) == (0, []), row["torch_ops"]
        assert row["launches"] == row["triton_launches"] == len(kernels) <= 10
        assert row["floor_within_70pct"] and row["floor_us_H200"] <= 0.7 * row["target_us_H200"], row
        assert all(k["spill_bytes"] == 0 for k in report["kernels"] if k["op"] == row["op"])


def test_kd_objective_plan_three_passes_fast_six_slow(report):
    rows = {row["op"]: row for row in report["ops"]}
    ce = N * C * 4
    # fast: the forward reads s and t and writes G, the backward reads 8 B; slow: the backward reads s and t again
    # and rewrites G. Plus per-row statistics, labels and partial sums (under 1 %).
    for path, passes in (("fast", 3), ("slow", 6)):
        row = rows[f"kd_objective 8192x1000 float32 {path}"]
        assert passes * ce <= row["modeled_mb"] * 1e6 <= passes * ce * 1.01, path
        assert (row["launches"], row["triton_launches"], row["torch_ops"]) == (3, 2, ["zeros"])  # memset, fwd, bwd
        assert abs(row["floor_us_H200"] - (row["modeled_mb"] * 1e6 / BANDWIDTH * 1e6 + 3 * 1.0)) < 0.01
    assert rows["kd_objective 8192x1000 float32 fast"]["floor_within_70pct"]
    assert not rows["kd_objective 8192x1000 float32 slow"]["floor_within_70pct"]  # 6Ce: the price of a GradScaler
    assert rows["kd_objective 256x1000 bfloat16 fast"]["floor_us_H200"] < 0.7 * 12.0
    kernels = {k["kernel"] for k in report["kernels"] if k["op"].startswith("kd_objective")}
    assert kernels == {"_kd_loss_fwd_kernel", "_kd_objective_bwd_kernel"}
