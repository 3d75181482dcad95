"""Stopping a run cleanly. Preemption: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) end a run — the step finishes, a
checkpoint is written, the process exits with code 75.

The handler only records the request: Python runs it between bytecodes of the main thread, where doing I/O or a
collective could deadlock. The training loop asks `StopAgreement` at every step end whether *any* rank was asked
to stop, so all ranks stop after the same step and rank 0 writes one consistent checkpoint.

How the ranks agree, and why it costs nothing per step: the flag travels through a gloo group on CPU tensors
(fastfit.dist's control group), never through NCCL, so agreeing never waits for the GPU stream. Each step end
starts an asynchronous all-reduce of the local flag and collects the one started a step earlier, which completed
long ago: the host never blocks on another rank and the signal is acted on one step later (two steps at most
between the signal and the checkpoint; a scheduler's grace period is tens of seconds). Steps that must be exact
(epoch ends, checkpoints, log intervals) use the blocking `agree`, which also carries the non-finite loss counts.

A repeated signal is ignored rather than treated as "force": under SLURM and torchrun a worker often receives the
same SIGTERM twice (from the scheduler and forwarded by the agent), a Ctrl-C in a terminal reaches torchrun and every
worker, and the second signal must not lose the checkpoint. The first repeat says once how to abandon the stop
(SIGKILL). DataLoader workers ignore these signals (fastfit.data), so they serve batches until the checkpoint is
written.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch

from fastfit.dist import DistEnv, control_all_reduce, control_barrier
from fastfit.errors import ConfigError, Preempted


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """run.preemption_signals → signals; names that are unknown or cannot be caught raise a ConfigError."""
    parsed = []
    for name in names:
        sig = getattr(signal, str(name).upper(), None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(
                f"run.preemption_signals: {name!r} is not a signal a process can catch; use names such "
                "as SIGTERM, SIGUSR1, SIGUSR2 or SIGHUP (or [] to turn preemption handling off)"
            )
        parsed.append(sig)
    return parsed


class StopSignals:
    """Installs handlers that record the first stop request; a context manager that restores the old handlers."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.signals = parse_signals(names)
        self.requested: str | None = None
        self._told_repeat = False
        self._previous: dict[signal.Signals, object] = {}

    def request(self, name: str) -> None:
        if self.requested is None:
            self.requested = name
        elif not self._told_repeat:
            self._told_repeat = True
            # os.write, not logging: a handler can run in the middle of a logging call holding its lock.
            os.write(
                2,
                f"fastfit: {name} received while stopping for {self.requested}: the step finishes and the checkpoint "
                "is written first; SIGKILL (kill -9) abandons it\n".encode(),
            )

    def _handle(self, signum, _frame) -> None:
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> Self:
        # Handlers can only be set from the main thread; a run started from another thread keeps default handling.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class StopAgreement:
    """The same stop decision on every rank at the same step (see the module docstring for the protocol)."""

    def __init__(self, env: DistEnv, signals: StopSignals | None) -> None:
        self.env = env
        self.signals = signals
        self._pending: tuple[Any, torch.Tensor] | None = None

    def local(self) -> int:
        return int(self.signals is not None and self.signals.requested is not None)

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, box = self._pending
        work.wait()
        self._pending = None
        return bool(box[0])

    def poll(self) -> bool:
        """Non-blocking, every step: the agreed flag as of the previous step (this rank's own flag when alone)."""
        if not self.env.distributed:
            return bool(self.local())
        decided = self._collect()
        box = torch.tensor([self.local()], dtype=torch.int64)
        self._pending = (control_all_reduce(box, self.env, async_op=True), box)
        return decided

    def agree(self, counts: torch.Tensor | None = None) -> tuple[bool, torch.Tensor]:
        """Blocking: (any rank asked to stop, per-entry max of `counts` over ranks). `counts`: CPU int64, 1-D."""
        decided = self._collect()
        counts = torch.zeros(0, dtype=torch.int64) if counts is None else counts
        box = torch.cat([torch.tensor([self.local()], dtype=torch.int64), counts.to(torch.int64)])
        control_all_reduce(box, self.env)
        return decided or bool(box[0]), box[1:]


def raise_preempted(env: DistEnv, signals: StopSignals | None, checkpoint: Path, position: Any) -> None:
    """After rank 0 saved `checkpoint` (of `position`): wait for it on every rank, then raise Preempted."""
    control_barrier(env)  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
    name = signals.requested if signals is not None and signals.requested else "a signal to another rank"
    raise Preempted(name, checkpoint, position)
