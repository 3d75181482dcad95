"""The kernels' modeled plan at the real shapes, without a GPU: per op and shape the launches (Triton and torch), the
modeled HBM bytes and FLOPs, the roofline floor on an H100 and an H200, the issue's target, and per compiled kernel
its registers, spills and shared memory (from the AOT gate's compilation for sm_90a). Nothing here is measured on a
GPU: every time is a model, built on the assumptions named in ASSUMPTIONS (also written into the JSON).

    python scripts/bench_kernels.py --plan [--json docs/results/kernel_plan.json]   # without TRITON_INTERPRET
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastfit.perf.kernel_bench import aot
from fastfit.perf.measure import CEILINGS, format_table, write_results

logger = logging.getLogger(__name__)

ASSUMPTIONS = {
    "ceilings": "vendor data-sheet peaks (fastfit.perf.measure.CEILINGS): HBM bytes/s and dense bf16 FLOP/s",
    "tf32_peak": "dense TF32 tensor-core FLOP/s = half the dense bf16 peak (data sheet: 494.7 vs 989.4 TFLOP/s)",
    "tf32x3": "a 3×TF32 dot costs three TF32 MMAs",
    "stats_bf16": "a bf16 hi/lo statistics GEMM costs one bf16 MMA per term: 3 (Gram), 2 (bf16 weight × fp32)",
    "bytes": "each tensor a kernel touches crosses HBM once (re-reads by other programs hit L2)",
    "kernel_floor": "max(bytes / bandwidth, FLOPs / peak) per kernel; kernels run one after another",
    "launch_gap_us": "1.0 µs of idle GPU per kernel boundary (launch latency, ramp-down and ramp-up), modeled",
    "not_modeled": "L2 bandwidth (operand re-reads across programs are assumed free) and the serial tail of a "
    "reduction finished by the last program to arrive (its reads are counted as bytes, not as a separate step)",
    "kd_objective_fast": "kd_objective … fast: the objective's upstream gradient is exactly 1 and no label is −100 "
    "(loss.backward() of the trainer's sum, no GradScaler): the backward kernel reads 8 B and returns, and the "
    "forward's gradient is the result (eager; under torch.compile the in-place fix may add a copy of it)",
    "kd_objective_slow": "kd_objective … slow: any other upstream gradient (GradScaler, a scaled loss) or an ignored "
    "label: the backward kernel recomputes the gradient from s and t into the forward's buffer",
}
# The backward kernel's bytes on the fast path: the upstream gradient and the valid count, 4 B each.
FAST_PATH_BYTES = {"_kd_objective_bwd_kernel": 8}
LAUNCH_GAP_US = 1.0
TF32_FRACTION_OF_BF16 = 0.5
TARGETS_US = {
    "hint layer3 bfloat16": 200.0,
    "hint layer4 bfloat16": 200.0,
    "kd 8192x1000 float32": 46.0,
    "kd 256x1000 bfloat16": 12.0,
    "kd_objective 8192x1000 float32 fast": 46.0,
    "kd_objective 8192x1000 float32 slow": 46.0,
    "kd_objective 256x1000 bfloat16 fast": 12.0,
    "kd_objective 256x1000 bfloat16 slow": 12.0,
}
MAX_HINT_LAUNCHES = 10
FLOOR_FRACTION_OF_TARGET = 0.7  # the acceptance: modeled floor ≤ 70 % of the target
# aten ops that launch nothing (views, metadata, allocation without a fill)
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "as_strided",
    "t",
    "transpose",
    "permute",
    "expand",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "empty",
    "empty_like",
    "new_empty",
    "empty_strided",
    "new_empty_strided",
    "_to_copy_noop",
    "lift_fresh",
    "_reshape_alias",
    "reshape",
    "unbind",
    "split",
}


def _nbytes(x: Any) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class _TorchLaunches(TorchDispatchMode):
    """Counts the aten ops that launch a kernel, and the bytes they touch (inputs read, outputs written)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not (name in ("to", "_to_copy", "contiguous", "clone") and _same(args, out)):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.ops.append((name, sum(map(_nbytes, tensors)) + sum(map(_nbytes, outs))))
        return out


def _same(args, out) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) and args[0] is out


def _flops(kernel: str, op: str, shape: tuple, constexprs: dict | None = None) -> tuple[float, float]:
    """(bf16/fp16 tensor-core FLOPs, TF32 tensor-core FLOPs) of one launch of `kernel` in `op` (its constexprs say
    how the statistics GEMMs run: MODE "bf16" or "tf32x3")."""
    if not op.startswith("hint"):
        return 0.0, 0.0
    n, cs, ct, h, w = shape
    m = n * h * w
    tf32 = op.endswith("float32")
    gemm = 2.0 * m * cs * ct
    per_kernel = {
        "_hint_fwd_kernel": (gemm, 0.0),
        "_hint_bwd_dp_kernel": (gemm, 0.0),
        "_hint_dx_kernel": (gemm + 2.0 * m * cs * cs, 0.0),
        "_hint_dw_kernel": (gemm, 0.0),
        "_hint_bwd_fused_kernel": (2 * gemm, 0.0),  # A = X·Wᵀ again and DᵀX (bf16 D only)
    }
    if kernel in per_kernel:
        lowp, _ = per_kernel[kernel]
        fp16_backward = op.split()[-1] == "float16" and kernel in ("_hint_dx_kernel", "_hint_dw_kernel")
        return (0.0, 3 * lowp) if tf32 or fp16_backward else (lowp, 0.0)
    bf16 = (constexprs or {}).get("MODE") == "bf16"
    if kernel == "_hint_moments_kernel":  # upper-triangle tiles only: hiᵀhi + hiᵀlo + loᵀhi, or 3×TF32
        block = (constexprs or {}).get("BLOCK_C", 64)
        tiles = -(-cs // block)
        term = 2.0 * m * block * block * tiles * (tiles + 1) / 2
        return (3 * term, 0.0) if bf16 else (0.0, 3 * term)
    if kernel == "_small_gemm_kernel":  # W·Gc or Wᵀ·diag(c1)·W: bf16 weight × hi and lo, or 3×TF32
        term = 2.0 * ct * cs * cs
        return (2 * term, 0.0) if bf16 else (0.0, 3 * term)
    return 0.0, 0.0


def _op_calls(op: str):
    for layer, shape in aot.HINT_SHAPES.items():
        for d in aot.HINT_DTYPES:
            if op == f"hint {layer} {d}":
                return aot._hint_calls, (*shape, getattr(torch, d)), shape
    for n, c, d in aot.KD_SHAPES:
        if op == f"kd {n}x{c} {d}":
            return aot._kd_calls, (n, c, getattr(torch, d)), (n, c)
        if _gate_op(op) == f"kd_objective {n}x{c} {d}" and op.split()[-1] in ("fast", "slow"):
            return aot._kd_objective_calls, (n, c, getattr(torch, d)), (n, c)
    raise ValueError(f"expected an op of the AOT gate, got {op!r}")


def _gate_op(op: str) -> str:
    """The AOT gate's op behind a plan row: "kd_objective 8192x1000 float32 fast" → without the path."""
    return op.rsplit(" ", 1)[0] if op.startswith("kd_objective") else op


def plan(ops: list[str] | None = None, workers: int = 2) -> dict[str, Any]:
    """Model every op of the gate (sm_90a compilation) and return rows for the table and the JSON."""
    launches = aot.capture(90)
    ops = ops or list(TARGETS_US)
    by_key = {}
    wanted = [x for x in launches if x.op in {_gate_op(op) for op in ops}]
    unique = {x.key(): x for x in wanted}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(aot.compile_launch, unique.values()):
            by_key[result.launch.key()] = result
    rows, kernels = [], []
    for op in ops:
        fn, args, shape = _op_calls(op)
        records: list = []
        with aot._recording([]):
            fn(*args)  # warm-up: one-time allocations (the moments kernel's tile counters) are not the steady state
        counter = _TorchLaunches()
        with aot._recording(records), counter:
            fn(*args)
        sites = _sites([x for x in wanted if x.op == _gate_op(op)])
        fast = op.endswith(" fast")
        seconds = {name: 0.0 for name in CEILINGS}
        total_bytes = total_lowp = total_tf32 = 0.0
        for site in sites:
            record_bytes = FAST_PATH_BYTES.get(site["kernel"], site["bytes"]) if fast else site["bytes"]
            lowp, tf32 = _flops(site["kernel"], op, shape, site["launch"].constexprs)
            total_bytes += record_bytes
            total_lowp += lowp
            total_tf32 += tf32
            for name, (bw, peak, _) in CEILINGS.items():
                compute = lowp / peak + tf32 / (peak * TF32_FRACTION_OF_BF16)
                seconds[name] += max(record_bytes / bw, compute)
            compiled = by_key[site["launch"].key()]
            kernels.append(
                {
                    "op": op,
                    "kernel": site["kernel"],
                    "config": aot._meta(site["launch"]) + f" warps={site['launch'].options['num_warps']}",
                    "registers": compiled.registers,
                    "spill_bytes": compiled.spill_bytes,
                    "shared_bytes": compiled.shared_bytes,
                    "configs_in_autotune": site["configs"],
                }
            )
        for _, nbytes in counter.ops:
            total_bytes += nbytes
            for name, (bw, _, _) in CEILINGS.items():
                seconds[name] += nbytes / bw
        n_launches = len(sites) + len(counter.ops)
        row = {
            "op": op,
            "launches": n_launches,
            "triton_launches": len(sites),
            "torch_launches": len(counter.ops),
            "torch_ops": sorted({name for name, _ in counter.ops}),
            "modeled_mb": total_bytes / 1e6,
            "modeled_gflop_bf16": total_lowp / 1e9,
            "modeled_gflop_tf32": total_tf32 / 1e9,
        }
        for name in CEILINGS:
            row[f"floor_us_{name}"] = seconds[name] * 1e6 + n_launches * LAUNCH_GAP_US
        target = TARGETS_US.get(op)
        if target is not None:
            row["target_us_H200"] = target
            row["floor_over_target"] = row["floor_us_H200"] / target
            row["floor_within_70pct"] = row["floor_over_target"] <= FLOOR_FRACTION_OF_TARGET
            if op.startswith("hint"):
                row["launches_within_target"] = n_launches <= MAX_HINT_LAUNCHES
        rows.append(row)
    return {"assumptions": ASSUMPTIONS, "launch_gap_us": LAUNCH_GAP_US, "ops": rows, "kernels": kernels}


def _sites(launches: list) -> list[dict[str, Any]]:
    """Group the autotune configs of one launch back into one launch site (the autotuner runs one of them)."""
    sites: list[dict[str, Any]] = []
    for x in launches:
        same = sites[-1] if sites and sites[-1]["kernel"] == x.kernel and sites[-1]["grid"] == x.grid else None
        if same is not None and same["signature"] == x.signature and same["tuned"]:
            same["configs"] += 1
            continue
        sites.append(
            {
                "kernel": x.kernel,
                "grid": x.grid,
                "signature": x.signature,
                "tuned": "BLOCK_K" in x.constexprs and x.kernel not in ("_small_gemm_kernel",),
                "configs": 1,
                "bytes": x.tensor_bytes,
                "launch": x,
            }
        )
    return sites


def main(json_path: str | None) -> list[dict[str, Any]]:
    report = plan()
    columns = ["op", "launches", "triton_launches", "torch_launches", "modeled_mb", "modeled_gflop_bf16"]
    columns += ["modeled_gflop_tf32", "floor_us_H100", "floor_us_H200", "target_us_H200", "floor_over_target"]
    logger.info("modeled, not measured on a GPU\n%s", format_table(report["ops"], columns))
    kcols = ["op", "kernel", "config", "registers", "spill_bytes", "shared_bytes", "configs_in_autotune"]
    logger.info("\n%s", format_table(report["kernels"], kcols))
    if json_path:
        write_results(json_path, {"benchmark": "kernel_plan", "measured": False, **report})
        logger.info("wrote %s", json_path)
    return report["ops"]
