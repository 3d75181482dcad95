"""Fault injection for tests: FASTFIT_INJECT="<fault>@<step>[:rank<r>]" makes a run fail on purpose, so that
preemption, torchrun restarts and multi-process failures are tested end to end through the real entry points.

<fault>: sigterm / sigusr1 (this process sends itself the signal), sigkill, sigstop (the process freezes, as an
unresponsive peer does), raise (a RuntimeError), nan (the
step's input batch becomes NaN). <step> is the 1-based global step of the run: nan poisons that step's batch, the
others act right after its optimizer step. Without :rank<r> every rank injects. A torchrun restart
(TORCHELASTIC_RESTART_COUNT > 0) never injects, so the restarted group runs clean. Unset — the normal case — the
training loop pays one integer comparison per step.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

import torch

from fastfit.dist import restart_count
from fastfit.errors import FastfitError

ENV = "FASTFIT_INJECT"
_SPEC = re.compile(r"^(sigterm|sigusr1|sigkill|sigstop|raise|nan)@(\d+)(?::rank(\d+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int  # 1-based global step

    def poison(self, images: torch.Tensor) -> torch.Tensor:
        return images * float("nan") if self.kind == "nan" else images

    def after_step(self, rank: int) -> None:
        if self.kind == "raise":
            raise RuntimeError(
                f"fault injected by {ENV}={os.environ.get(ENV)} at global step {self.step} on rank {rank}"
            )
        if self.kind in ("sigterm", "sigusr1", "sigkill", "sigstop"):
            os.kill(os.getpid(), getattr(signal, self.kind.upper()))


def fault_from_env(rank: int) -> Fault | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    match = _SPEC.match(spec.strip().lower())
    if match is None:
        raise FastfitError(
            f"{ENV}={spec!r} is not <fault>@<step>[:rank<r>] with fault sigterm, sigusr1, sigkill, "
            f"sigstop, raise or nan (e.g. sigterm@5:rank1); unset {ENV} for a normal run"
        )
    kind, step, only_rank = match.group(1), int(match.group(2)), match.group(3)
    if restart_count() > 0 or (only_rank is not None and int(only_rank) != rank):
        return None
    return Fault(kind, step)
