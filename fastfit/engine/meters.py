"""Meters for the training loop: loss terms kept as device tensors (read only every log interval, so the hot
loop never syncs) and images/second over wall-clock windows."""

from __future__ import annotations

import contextlib
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
            self._sums = {}
            self._count = 0
        return dict(zip(names, values, strict=True))

    def state_dict(self) -> dict:
        """The partial sums (on the CPU), for a mid-epoch checkpoint."""
        return {"sums": {name: value.cpu() for name, value in self._sums.items()}, "count": self._count}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self._sums = {name: value.to(device) for name, value in state["sums"].items()}
        self._count = state["count"]


class Throughput:
    """Images per second since the last `rate()` call (wall clock; callers sync at window edges when exactness
    matters)."""

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
        self._images = 0
        self._start = now
        return value


class PhaseTimer:
    """Per-phase time of a training step: CUDA events on the GPU (read once, in `summary`), wall clock on the CPU,
    and an NVTX range per phase so Nsight Systems shows the same names. Disabled, every call is a no-op."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self._cuda = device.type == "cuda"
        self._events: dict[str, list] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self._cuda:
            torch.cuda.nvtx.range_push(name)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                torch.cuda.nvtx.range_pop()
            self._events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._events.setdefault(name, []).append(time.perf_counter() - t0)

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per occurrence of each phase."""
        if self._cuda:
            torch.cuda.synchronize(self.device)  # deliberate: events are read once, after the window
            return {name: sum(s.elapsed_time(e) for s, e in pairs) / len(pairs) for name, pairs in self._events.items()}
        return {name: 1e3 * sum(times) / len(times) for name, times in self._events.items()}


NO_TIMER = PhaseTimer(torch.device("cpu"), enabled=False)
