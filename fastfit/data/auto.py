"""What `auto` means for the input pipeline, per device type, as measured by `fastfit profile --ablate`.

- backend: DALI whenever it is importable. On CUDA it decodes JPEGs on the GPU; on a CPU its C++ pipeline still
  feeds the demo student 4× faster than PIL in DataLoader workers on 2 cores (those workers compete with the
  compute for the same cores; docs/results/profile_cpu_ablation.json). Without DALI: torchvision.
- DALI threads and DataLoader workers (torchvision): the rank's share of the cores, at most 8. On 2 cores DALI with
  2 threads was the fastest of 1, 2 and 4 (within about 6 %), and 4 PIL workers were slower than 2.
"""

from __future__ import annotations

import importlib.util
import os

from fastfit.config import DataConfig
from fastfit.dist import DistEnv

MAX_LOADER_THREADS = 8


def dali_importable() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def cpus_per_rank() -> int:
    """The cores this process may use, shared evenly by the ranks on this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // local_ranks)


def resolve_backend(cfg: DataConfig, env: DistEnv) -> str:
    if cfg.backend == "auto":
        return "dali" if dali_importable() else "torchvision"
    return cfg.backend


def resolve_dali_threads(cfg: DataConfig) -> int:
    if cfg.dali_threads != "auto":
        return cfg.dali_threads
    return min(MAX_LOADER_THREADS, cpus_per_rank())


def resolve_workers(cfg: DataConfig) -> int:
    if cfg.workers != "auto":
        return cfg.workers
    return min(MAX_LOADER_THREADS, cpus_per_rank())
