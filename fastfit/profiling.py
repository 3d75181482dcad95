"""Meters for the training loop: loss terms kept as device tensors (read only every log interval, so the hot
loop never syncs) and images/second over wall-clock windows."""

from __future__ import annotations

import time

import torch
from torch import Tensor


class LossMeter:
    """Running sums of detached loss terms on the device; `read()` is the one place that syncs."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def update(self, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._count += 1

    def read(self, reset: bool = True, env=None) -> dict[str, float]:
        """Means since the last read; with a distributed `env`, averaged over ranks (every rank must call it)."""
        if not self._count:
            return {}
        names = list(self._sums)
        values = torch.stack([self._sums[n] for n in names]) / self._count
        if env is not None and env.distributed:
            from fastfit.dist import all_reduce_sum

            values = all_reduce_sum(values, env) / env.world_size
        # Deliberate sync: one transfer of all terms at a log interval, not one per step.
        values = values.tolist()
        if reset:
            self._sums, self._count = {}, 0
        return dict(zip(names, values))


class Throughput:
    """Images per second since the last `rate()` call (wall clock; callers sync at window edges when exactness matters)."""

    def __init__(self) -> None:
        self._images = 0
        self._start = time.perf_counter()
        self.total_images = 0
        self.total_seconds = 0.0

    def add(self, images: int) -> None:
        self._images += images
        self.total_images += images

    def rate(self) -> float:
        now = time.perf_counter()
        elapsed = now - self._start
        value = self._images / elapsed if elapsed > 0 else 0.0
        self.total_seconds += elapsed
        self._images, self._start = 0, now
        return value
