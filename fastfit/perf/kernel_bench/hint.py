"""Hint-loss microbenchmark: MMRazor's connector (1×1 conv, BatchNorm in training mode, ReLU) + the normalized L2
hint loss on ResNet-50 → ResNet-18 features at batch 256, bf16, channels-last.

providers  eager    connector module + fastfit.distill.losses.hint_loss_reference under bf16 autocast
           compile  torch.compile of the same (inductor on CUDA; aot_eager for CPU smoke runs)
           fused    fastfit.kernels.fused_connector_hint_loss (the regressor output never reaches memory)
modes      fwd (no autograd graph), fwd_bwd (loss.backward() into the student feature and the connector)
floors     bytes: read S and T once, write dS once (fwd_bwd); FLOPs: 2·M·Cs·Ct forward, three times that fwd_bwd.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fastfit.distill.connectors import MMRazorConnector
from fastfit.distill.losses import HintLoss
from fastfit.perf.kernel_bench import Case

KIND = "normalized_l2"  # the MMRazor recipe's hint loss
CASES: list[dict[str, Any]] = [
    {"layer": "layer4", "n": 256, "cs": 512, "ct": 2048, "h": 7, "w": 7},  # M = 12,544
    {"layer": "layer3", "n": 256, "cs": 256, "ct": 1024, "h": 14, "w": 14},  # M = 50,176
]
QUICK_CASES: list[dict[str, Any]] = [
    {"layer": "tiny", "n": 2, "cs": 16, "ct": 32, "h": 4, "w": 4},
    {"layer": "odd", "n": 1, "cs": 3, "ct": 37, "h": 3, "w": 5},
]
TARGET_FWD_BWD_US = 150.0
ROTATE = 3  # distinct input sets, so caches do not flatter repeated calls


def _provider(
    loss_module: HintLoss, inputs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, autocast: bool
) -> dict[str, Any]:
    params = list(loss_module.parameters())

    def call(i: int) -> torch.Tensor:
        student, teacher = inputs[i % len(inputs)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return loss_module(student, teacher)

    def fwd(i: int) -> torch.Tensor:
        with torch.no_grad():
            return call(i)

    def fwd_bwd(i: int) -> torch.Tensor:
        student = inputs[i % len(inputs)][0]
        student.grad = None
        for p in params:
            p.grad = None
        loss = call(i)
        loss.backward()
        return loss

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def setup(case: dict[str, Any], device: torch.device) -> Case:
    n, cs, ct, h, w = case["n"], case["cs"], case["ct"], case["h"], case["w"]
    m = n * h * w
    dtype, elt = torch.bfloat16, 2
    inputs = []
    for _ in range(ROTATE):
        student = torch.randn(n, cs, h, w, device=device).relu().to(dtype).to(memory_format=torch.channels_last)
        teacher = torch.randn(n, ct, h, w, device=device).relu().to(dtype).to(memory_format=torch.channels_last)
        inputs.append((student.requires_grad_(), teacher))
    connector = MMRazorConnector(cs, ct).to(device).train()
    eager = HintLoss(copy.deepcopy(connector), KIND, fused=False)
    compiled = torch.compile(
        HintLoss(copy.deepcopy(connector), KIND, fused=False),
        backend="inductor" if device.type == "cuda" else "aot_eager",
    )
    fused = HintLoss(copy.deepcopy(connector), KIND, fused=True)
    providers = {
        "eager": _provider(eager, inputs, device, autocast=True),
        "compile": _provider(compiled, inputs, device, autocast=True),
        "fused": _provider(fused, inputs, device, autocast=False),  # takes bf16 features and fp32 parameters as is
    }
    read = (m * cs + m * ct) * elt
    flops = 2 * m * cs * ct
    return Case(
        op="hint",
        shape={"layer": case["layer"], "m": m, "cs": cs, "ct": ct, "dtype": "bf16", "kind": KIND},
        providers=providers,
        bytes={"fwd": read, "fwd_bwd": read + m * cs * elt},
        flops={"fwd": flops, "fwd_bwd": 3 * flops},
        target_us={"fwd_bwd": TARGET_FWD_BWD_US},
    )
