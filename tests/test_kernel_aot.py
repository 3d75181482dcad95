"""The ahead-of-time gate (fastfit.perf.kernel_bench.aot): every Triton kernel × every config its launcher can pick
at the real shapes compiles for sm_90a and sm_80 without spills, within shared memory, on tensor cores, with vector
loads where promised — checked with Triton's compiler and ptxas, no GPU. It runs once per session in a subprocess
(the test process has TRITON_INTERPRET=1 set, and interpreted kernels cannot be compiled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastfit.perf.kernel_bench.aot import FROZEN_OP, HINT_DTYPES, HINT_SHAPES, KD_SHAPES, SMEM_LIMIT


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "fastfit.perf.kernel_bench.aot", "--json", str(path), "--workers", "2", "--probe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert path.exists(), run.stdout + run.stderr
    return run, json.loads(path.read_text())


def _gated(rows):
    return [r for r in rows if not r["launch"]["op"].startswith("probe")]


def test_every_kernel_and_config_passes_on_sm90_and_sm80(report):
    run, data = report
    failures = [p for row in _gated(data["results"]) for p in row["problems"]]
    assert failures == [], "\n".join(failures)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_gate_covers_every_op_shape_dtype_and_arch(report):
    _, data = report
    seen = {(r["launch"]["op"], r["launch"]["arch"]) for r in _gated(data["results"])}
    ops = {f"hint {layer} {d}" for layer in HINT_SHAPES for d in HINT_DTYPES}
    ops |= {f"{kd} {n}x{c} {d}" for n, c, d in KD_SHAPES for kd in ("kd", "kd_objective")}
    ops.add(FROZEN_OP)
    assert seen == {(op, arch) for op in ops for arch in (90, 80)}

    def kernels(op, arch):
        return {
            r["launch"]["kernel"]
            for r in _gated(data["results"])
            if (r["launch"]["op"], r["launch"]["arch"]) == (op, arch)
        }

    forward = {"_hint_moments_kernel", "_small_gemm_kernel", "_hint_channel_affine_kernel", "_hint_fwd_kernel"}
    split = forward | {"_hint_bwd_dp_kernel", "_hint_dx_kernel", "_hint_dw_kernel"}
    for arch in (90, 80):
        assert kernels("hint layer4 bfloat16", arch) == split  # Cs 512: the split backward
        assert kernels(FROZEN_OP, arch) == split - {"_hint_dw_kernel"} | {"_hint_channel_grads_kernel"}
    # Cs 256, bf16: the fused first pass on sm_90; sm_80's register-held operands would spill it
    assert kernels("hint layer3 bfloat16", 90) == forward | {"_hint_bwd_fused_kernel", "_hint_dx_kernel"}
    assert kernels("hint layer3 bfloat16", 80) == split


def test_gemms_run_on_tensor_cores_with_the_right_operands(report):
    _, data = report
    for row in _gated(data["results"]):
        launch = row["launch"]
        if not row["has_dot"]:
            continue
        prefix = "wgmma.mma_async" if launch["arch"] == 90 else "mma.sync"
        assert row["mma"] and all(m.startswith(prefix) and f".{launch['mma_operand']}" in m for m in row["mma"])
        if launch["op"].endswith("float32"):
            assert launch["mma_operand"] == "tf32"  # 3×TF32 for fp32 features, never FMA on CUDA cores


def test_shared_memory_stays_within_each_architecture(report):
    _, data = report
    for row in _gated(data["results"]):
        assert 0 <= row["shared_bytes"] <= SMEM_LIMIT[row["launch"]["arch"]]
        assert row["spill_bytes"] == 0


def test_kd_kernels_load_logits_in_vectors(report):
    _, data = report
    kd = [r for r in _gated(data["results"]) if r["launch"]["kernel"].startswith("_kd_")]
    assert {r["launch"]["kernel"] for r in kd} == {
        "_kd_loss_fwd_kernel",
        "_kd_loss_bwd_kernel",
        "_kd_objective_bwd_kernel",
    }
    for row in kd:
        c = int(row["launch"]["op"].split()[1].split("x")[1])
        assert row["launch"]["vector_loads"] == (c % 4 == 0)
        if c % 4 == 0:
            assert any(int(width) >= 8 for width in row["load_widths"]), row["load_widths"]


def test_the_gate_fails_a_deliberately_spilling_config(report):
    _, data = report
    probes = [r for r in data["results"] if r["launch"]["op"].startswith("probe")]
    assert len(probes) == 1 and probes[0]["spill_bytes"] > 0
    assert any("spills" in p for p in probes[0]["problems"])


def test_the_prune_hook_drops_that_config_before_any_launch():
    import torch
    import triton

    from fastfit.kernels.hint_loss_common import prune_gemm_configs

    spilling = triton.Config({"BLOCK_K": 64, "GROUP_M": 8}, num_warps=2, num_stages=3)
    fits = triton.Config({"BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)
    too_deep = triton.Config({"BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=8)  # 262,144 B of operands
    args = {"s_ptr": torch.empty(1, device="meta")}
    kept = prune_gemm_configs([spilling, fits, too_deep], args, BLOCK_M=128, BLOCK_N=128, MODE="bf16")
    assert kept == [fits]
