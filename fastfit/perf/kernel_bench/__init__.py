"""Kernel microbenchmark runner. Each op module (kd.py, hint.py) provides

    CASES: list[dict]          real shapes (the issue's targets); QUICK_CASES: small ones for CPU smoke runs
    setup(case, device) -> Case

and this runner times every provider × mode with fastfit.perf.measure.time_fn, adds bandwidth/FLOP figures
against the roofline floor of the card, peak memory, and writes one JSON.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastfit.perf.measure import ceilings_for, format_table, time_fn, write_results

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One shape of one op. providers[name][mode] is a callable(i) running that mode on rotating inputs i."""

    op: str
    shape: dict[str, Any]
    providers: dict[str, dict[str, Callable[[int], Any]]]
    bytes: dict[str, int]  # minimal HBM traffic per mode (the bandwidth floor)
    flops: dict[str, int] = field(default_factory=dict)  # matrix FLOPs per mode (the compute floor)
    target_us: dict[str, float] = field(default_factory=dict)


def _floor_us(case: Case, mode: str, device_name: str) -> float | None:
    ceil = ceilings_for(device_name)
    if ceil is None:
        return None
    bandwidth, flops, _ = ceil
    return max(case.bytes.get(mode, 0) / bandwidth, case.flops.get(mode, 0) / flops) * 1e6


def run(
    ops: list[str], providers: list[str], modes: list[str], quick: bool, iters: int, warmup: int, json_path: str | None
) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if quick:
        iters, warmup = min(iters, 5), min(warmup, 2)
    rows: list[dict[str, Any]] = []
    for op in ops:
        module = importlib.import_module(f"fastfit.perf.kernel_bench.{op}")
        for shape in module.QUICK_CASES if quick else module.CASES:
            case = module.setup(shape, device)
            for provider in providers:
                for mode in modes:
                    fn = case.providers.get(provider, {}).get(mode)
                    if fn is None:
                        continue
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    stats = time_fn(fn, warmup=warmup, iters=iters, device=device)
                    row: dict[str, Any] = {"op": case.op, "provider": provider, "mode": mode, **case.shape, **stats}
                    seconds = stats["median_us"] * 1e-6
                    if case.bytes.get(mode):
                        row["gb_s"] = case.bytes[mode] / seconds / 1e9
                    if case.flops.get(mode):
                        row["tflop_s"] = case.flops[mode] / seconds / 1e12
                    row["floor_us"] = _floor_us(case, mode, device_name)
                    if row["floor_us"]:
                        row["x_floor"] = stats["median_us"] / row["floor_us"]
                    if mode in case.target_us:
                        row["target_us"] = case.target_us[mode]
                    if device.type == "cuda":
                        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                    rows.append(row)
            del case
    columns = [
        "op",
        "provider",
        "mode",
        "shape",
        "median_us",
        "p20_us",
        "p80_us",
        "gb_s",
        "tflop_s",
        "floor_us",
        "x_floor",
        "peak_mb",
    ]
    printable = [{**r, "shape": "×".join(str(v) for k, v in r.items() if k in _shape_keys(r))} for r in rows]
    logger.info("%s", format_table(printable, columns))
    if json_path:
        ceil = ceilings_for(device_name)
        write_results(
            json_path,
            {
                "benchmark": "kernels",
                "device": device_name,
                "quick": quick,
                "iters": iters,
                "ceilings": None
                if ceil is None
                else {"bytes_per_s": ceil[0], "flop_per_s": ceil[1], "source": ceil[2]},
                "results": rows,
            },
        )
        logger.info("wrote %s", json_path)
    return rows


def _shape_keys(row: dict[str, Any]) -> list[str]:
    fixed = {
        "op",
        "provider",
        "mode",
        "median_us",
        "p20_us",
        "p80_us",
        "gb_s",
        "tflop_s",
        "floor_us",
        "x_floor",
        "peak_mb",
        "target_us",
    }
    return [k for k in row if k not in fixed]
