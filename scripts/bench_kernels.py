"""Kernel microbenchmarks: eager PyTorch vs torch.compile of the reference vs the fused Triton op, forward and
forward+backward, for every case in fastfit.perf.kernel_bench (kd, hint). Prints a table and writes JSON.

    python scripts/bench_kernels.py                       # all ops, default shapes (needs CUDA)
    python scripts/bench_kernels.py --ops kd --quick      # small shapes; also runs on CPU via TRITON_INTERPRET=1
    python scripts/bench_kernels.py --plan                # no GPU: launches, modeled bytes/FLOPs/floors, registers
"""

from __future__ import annotations

import argparse
import sys

from fastfit.console import setup_logging
from fastfit.perf.kernel_bench import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=["kd", "hint"], choices=["kd", "hint"])
    parser.add_argument(
        "--providers", nargs="+", default=["eager", "compile", "fused", "objective", "objective_scaled"]
    )
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--quick", action="store_true", help="small shapes and few iterations (CPU smoke runs)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", default=None, help="where to write the results (default under docs/results/)")
    parser.add_argument("--plan", action="store_true", help="the modeled plan (compiles for sm_90a; needs no GPU)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.plan:
        from fastfit.perf.kernel_bench.plan import main as plan_main

        plan_main(args.json or "docs/results/kernel_plan.json")
        return 0
    run(
        ops=args.ops,
        providers=args.providers,
        modes=args.modes,
        quick=args.quick,
        iters=args.iters,
        warmup=args.warmup,
        json_path=args.json or "docs/results/bench_kernels.json",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
