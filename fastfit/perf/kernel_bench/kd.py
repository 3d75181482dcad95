"""KD loss (+ the student's cross-entropy) cases for the kernel benchmark runner (fastfit.perf.kernel_bench).

Providers, all computing MMRazor's KD (τ = 6, reduction "mean", × τ²) plus the student's CE on hard labels:
  eager    fastfit.distill.losses.kd_loss_reference + F.cross_entropy, plain PyTorch
  compile  torch.compile of the same function
  fused    fastfit.kernels.fused_kd_loss (one Triton pass per row forward, one backward)
  objective         fastfit.kernels.fused_kd_objective (10·kd + ce as one output, the gradient written forward):
                    upstream gradient 1, the trainer's plain loss.backward() — the backward's fast path
  objective_scaled  the same with an upstream gradient of 2^16, as a GradScaler gives — the slow path
Modes: "fwd" is a training forward (the student requires grad), "fwd_bwd" adds the gradient of 10·kd + ce with
respect to the student logits. The bandwidth floor of both is reading s and t and writing one student-sized
gradient: 3·N·C·element_size (+ 8 B per label).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fastfit.distill.losses import kd_loss_reference
from fastfit.perf.kernel_bench import Case
from fastfit.perf.measure import ceilings_for

CASES = [
    {"N": n, "C": c, "dtype": dtype} for n in (256, 8192) for c in (1000, 21843) for dtype in ("float32", "bfloat16")
]
QUICK_CASES = [{"N": 4, "C": 37, "dtype": "float32"}, {"N": 3, "C": 300, "dtype": "bfloat16"}]

TEMPERATURE, REDUCTION, KD_WEIGHT = 6.0, "mean", 10.0  # MMRazor's fitnets R50 → R18 recipe
ROTATION_BYTES = 256 * 2**20  # rotate through enough input sets to overflow any L2 (H100/H200: 50-60 MB)
MAX_SETS = 64


def _reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    kd = kd_loss_reference(s, t, TEMPERATURE, REDUCTION, tau_squared=True, form="kl")
    return kd, F.cross_entropy(s.float(), y)


def _fused(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    from fastfit.kernels import fused_kd_loss  # imported here: it pulls in Triton

    return fused_kd_loss(s, t, y, TEMPERATURE, REDUCTION, True, "kl")


def _objective_modes(inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], upstream: float):
    from fastfit.kernels import fused_kd_objective  # imported here: it pulls in Triton

    device = inputs[0][0].device
    kd_weight = torch.tensor(KD_WEIGHT, device=device)
    grad_output = torch.tensor(upstream, device=device)

    def forward(i: int):
        s, t, y = inputs[i % len(inputs)]
        return fused_kd_objective(s, t, y, kd_weight, 1.0, TEMPERATURE, REDUCTION, True, "kl")

    def fwd_bwd(i: int):
        objective, _, _ = forward(i)
        return torch.autograd.grad(objective, inputs[i % len(inputs)][0], grad_output)[0]

    return {"fwd": forward, "fwd_bwd": fwd_bwd}


def _modes(loss_fn, inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    def fwd(i: int):
        return loss_fn(*inputs[i % len(inputs)])

    def fwd_bwd(i: int):
        s, t, y = inputs[i % len(inputs)]
        kd, ce = loss_fn(s, t, y)
        return torch.autograd.grad(KD_WEIGHT * kd + ce, s)[0]  # returns the gradient: no accumulation into s.grad

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def setup(case: dict[str, Any], device: torch.device) -> Case:
    n, c = case["N"], case["C"]
    dtype = getattr(torch, case["dtype"])
    elt = torch.empty((), dtype=dtype).element_size()
    set_bytes = 2 * n * c * elt + 8 * n
    sets = min(MAX_SETS, max(2, math.ceil(ROTATION_BYTES / set_bytes)))
    inputs = [
        (
            (torch.randn(n, c, device=device) * 3).to(dtype).requires_grad_(),
            (torch.randn(n, c, device=device) * 3).to(dtype),
            torch.randint(0, c, (n,), device=device),
        )
        for _ in range(sets)
    ]
    floor_bytes = 3 * n * c * elt + 8 * n
    target_us: dict[str, float] = {}
    ceil = ceilings_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if ceil is not None:
        target_us["fwd_bwd"] = 2 * floor_bytes / ceil[0] * 1e6
    return Case(
        op="kd",
        shape={"N": n, "C": c, "dtype": case["dtype"]},
        providers={
            "eager": _modes(_reference, inputs),
            "compile": _modes(torch.compile(_reference), inputs),
            "fused": _modes(_fused, inputs),
            "objective": _objective_modes(inputs, 1.0),
            "objective_scaled": _objective_modes(inputs, 2.0**16),
        },
        bytes={"fwd": floor_bytes, "fwd_bwd": floor_bytes},
        target_us=target_us,
    )
