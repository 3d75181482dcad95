"""Non-finite losses (run.nonfinite): found without a per-step host sync, reported by term, then stop or skip.

Every step adds, on the device, one count per loss term that is NaN/Inf (plus the steps that had any); the engine
reads the counts at its check steps (every run.nonfinite_check_every steps, every log interval, epoch ends and
before every checkpoint), so no checkpoint ever holds the weights of a diverged run.

- "stop": the check raises NonFiniteError naming the terms and the step range. The weights already took the bad
  steps, so nothing is saved; the message says to resume from the last checkpoint.
- "skip": each step is also protected on the device. A step whose loss terms or gradients are not finite changes
  nothing: the optimizer step is skipped through the fused SGD's `found_inf` input (the mechanism GradScaler uses,
  no host sync), and the BatchNorm statistics its forward pass updated are put back. Skipped steps are counted and
  left out of the logged loss means. With fp16, GradScaler's own check of the gradients skips the update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastfit.errors import NonFiniteError

logger = logging.getLogger(__name__)

APPLIED = "_applied"  # meter entry: the fraction of steps whose update was applied (skip mode)


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for a fused SGD before its first step. Its first step allocates them with empty_like
    and fills them only when the step runs, so a first step skipped via found_inf (fp16 overflow, skip mode) would
    leave garbage that later steps read. Zeros give exactly the first-step result (0·μ + g = g)."""
    if not (isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get("fused")):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


class _Buffers:
    """Flat copies of modules' buffers (BatchNorm statistics), put back on the device where a step was skipped."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        seen: dict[int, Tensor] = {}
        for module in modules:
            for buffer in module.buffers():
                seen.setdefault(id(buffer), buffer)
        self.groups: dict[torch.dtype, list[Tensor]] = {}
        for buffer in seen.values():
            self.groups.setdefault(buffer.dtype, []).append(buffer)
        self.saved: dict[torch.dtype, Tensor] = {}

    def snapshot(self) -> None:
        self.saved = {dtype: torch.cat([b.reshape(-1) for b in group]) for dtype, group in self.groups.items()}

    def restore_where(self, bad: Tensor) -> None:
        for dtype, group in self.groups.items():
            mixed = torch.where(bad, self.saved[dtype], torch.cat([b.reshape(-1) for b in group]))
            parts = mixed.split([b.numel() for b in group])
            torch._foreach_copy_(group, [part.view(b.shape) for part, b in zip(parts, group, strict=True)])


class NonFiniteGuard:
    """Per-step non-finite bookkeeping for one stage: observe → (backward) → step → meter_terms."""

    def __init__(self, mode: str, fp16: bool, device: torch.device, modules: Iterable[nn.Module]) -> None:
        self.mode = mode
        self.fp16 = fp16
        self.device = device
        self.names: list[str] = []
        self.counts: Tensor | None = None  # [steps with anything non-finite, one per term…, gradients (skip)]
        self._bad: Tensor | None = None
        self._buffers = _Buffers(modules) if mode == "skip" else None

    def before_forward(self) -> None:
        if self._buffers is not None:
            self._buffers.snapshot()

    def observe(self, terms: dict[str, Tensor]) -> None:
        """Count this step's non-finite terms (device only); `terms` must keep the same names every step."""
        if self.counts is None:
            self.names = list(terms) + (["gradients"] if self.mode == "skip" and not self.fp16 else [])
            self.counts = torch.zeros(1 + len(self.names), dtype=torch.int64, device=self.device)
        bad_terms = ~torch.isfinite(torch.stack([t.detach().float() for t in terms.values()]))
        self._bad = bad_terms.any()
        self.counts[1 : 1 + len(terms)] += bad_terms

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> Tensor | None:
        """The optimizer step (skipped on the device in skip mode when needed); returns whether it was applied."""
        bad = self._bad
        if self.mode != "skip":
            scaler.step(optimizer)
            scaler.update()
            self.counts[0] += bad
            return None
        if self.fp16:
            scaler.step(optimizer)  # GradScaler finds the NaN/Inf gradients a non-finite loss leaves and skips
            scaler.update()
        else:
            found = bad.float().reshape(1)
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
            one = torch.ones(1, device=self.device)
            for grads in by_dtype.values():  # sets found to 1 if any gradient is NaN/Inf (multiplies them by 1)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
            self.counts[-1] += (found[0] > 0) & ~bad
            bad = found[0] > 0
            # Fused SGD reads these attributes (set the same way by GradScaler) and skips the update on the device.
            optimizer.grad_scale, optimizer.found_inf = None, found
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        self._buffers.restore_where(bad)
        self.counts[0] += bad
        return ~bad

    def meter_terms(self, terms: dict[str, Tensor], applied: Tensor | None) -> dict[str, Tensor]:
        """Skip mode: skipped steps count as 0 plus an APPLIED entry, so `unmask` recovers means over applied steps."""
        if applied is None:
            return terms
        zero = torch.zeros((), device=self.device)
        masked = {name: torch.where(applied, value.detach().float(), zero) for name, value in terms.items()}
        masked[APPLIED] = applied.float()
        return masked

    @staticmethod
    def unmask(values: dict[str, float]) -> dict[str, float]:
        applied = values.pop(APPLIED, None)
        if applied is None:
            return values
        return {name: (value / applied if applied > 0 else float("nan")) for name, value in values.items()}

    def read(self) -> Tensor:
        """The counts since the last read, on the host; resets them. Deliberate sync: only at the engine's checks."""
        if self.counts is None:
            return torch.zeros(0, dtype=torch.int64)
        host = self.counts.to("cpu", copy=True)  # a copy even on CPU, where .cpu() would alias what zero_() clears
        self.counts.zero_()
        return host

    def settle(self, counts: Tensor, where: str, first_step: int, last_step: int, skipped: int) -> int:
        """Act on the counts agreed over ranks: raise (stop), or log the skipped steps and return the run's new
        total of them (skip; `skipped` is the total before)."""
        if counts.numel() == 0 or int(counts[0]) == 0:
            return skipped
        bad = ", ".join(
            f"{name} ({int(n)} step{'s' if int(n) != 1 else ''})"
            for name, n in zip(self.names, counts[1:].tolist(), strict=True)
            if n
        )
        span = f"global steps {first_step}–{last_step}" if first_step < last_step else f"global step {last_step}"
        if self.mode == "stop":
            raise NonFiniteError(
                f"non-finite loss in {where}, {span}: {bad} became NaN/Inf; nothing was saved after it. Resume from "
                "the last checkpoint (--resume auto) with a lower optim.lr (or run.amp=bf16 instead of fp16), or set "
                "run.nonfinite=skip to skip such steps"
            )
        skipped += int(counts[0])
        logger.warning(
            "skipped %d step(s) with a non-finite loss or gradient in %s, %s: %s (%d skipped so far)",
            int(counts[0]),
            where,
            span,
            bad,
            skipped,
        )
        return skipped
