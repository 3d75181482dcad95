"""Shared measurement helpers for the benchmarks and profilers: timing with CUDA events (wall clock on CPU),
percentiles, roofline ceilings per GPU, and results JSON that records what was measured and where."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Ceilings for roofline floors: (HBM bandwidth in bytes/s, dense bf16 matrix FLOP/s), the vendors' data-sheet peaks
# (no card has been measured here yet); every results JSON names its source.
CEILINGS: dict[str, tuple[float, float, str]] = {
    "H200": (4.8e12, 989e12, "vendor peak (SXM)"),
    "H100": (3.35e12, 989e12, "vendor peak (SXM)"),
    "A100": (2.0e12, 312e12, "vendor peak (80GB SXM)"),
}


def ceilings_for(device_name: str) -> tuple[float, float, str] | None:
    for key, value in CEILINGS.items():
        if key in device_name:
            return value
    return None


def git_sha() -> str:
    """The commit being measured: the checkout's HEAD (marked -dirty when changed), else the build's record."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            from fastfit import _build_info

            return _build_info.GIT_SHA
        except ImportError:
            return "unknown"


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host_cpus": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


def percentiles(samples_us: list[float]) -> dict[str, float]:
    ordered = sorted(samples_us)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"median_us": statistics.median(ordered), "p20_us": pick(0.2), "p80_us": pick(0.8)}


def time_fn(
    fn: Callable[[int], Any], warmup: int = 10, iters: int = 50, device: torch.device | None = None
) -> dict[str, float]:
    """Time fn(i) per call. `i` lets the caller rotate inputs so caches do not flatter the numbers.

    On CUDA every call is bracketed by its own events (no host sync inside the window); on CPU, wall clock.
    """
    cuda = device is not None and device.type == "cuda"
    for i in range(warmup):
        fn(i)
    if cuda:
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(device)  # deliberate: read the events once, after the window
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]
    else:
        samples = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(warmup + i)
            samples.append((time.perf_counter() - t0) * 1e6)
    return percentiles(samples)


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a results JSON atomically, with the environment recorded beside the numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width table for stdout."""
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) if cells else len(col) for i, col in enumerate(columns)]
    lines = [
        "  ".join(col.rjust(w) for col, w in zip(columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
