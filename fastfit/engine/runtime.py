"""The run's speed switches resolved for its device ("auto" → what the device supports), as one Runtime.

One AMP path: autocast with the configured dtype (bf16 default on CUDA) and GradScaler enabled only for fp16.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from fastfit.config import Config
from fastfit.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    compile_mode: str | None
    fused_kernels: bool
    fused_optimizer: bool

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """DALI hands over float16 batches; without autocast the fp32 models need them as float32."""
        if self.amp_dtype is None and images.dtype != torch.float32:
            return images.float()
        return images

    @property
    def fp16(self) -> bool:
        return self.amp_dtype == torch.float16


def _auto(value, default: bool) -> bool:
    return default if value == "auto" else bool(value)


def triton_usable(device: torch.device) -> bool:
    """Fused kernels run on CUDA, or on CPU through Triton's interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_runtime(cfg: Config, device: torch.device) -> Runtime:
    cuda = device.type == "cuda"
    amp = cfg.run.amp
    if amp == "auto":
        amp = "bf16" if cuda else "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    fused_kernels = _auto(cfg.run.fused_kernels, cuda and triton_usable(device))
    if fused_kernels and not triton_usable(device):
        raise ConfigError(
            "run.fused_kernels = true needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
            "set run.fused_kernels=auto"
        )
    compile = _auto(cfg.run.compile, cuda)
    if cfg.run.cuda_graphs and not compile:
        raise ConfigError("run.cuda_graphs = true needs run.compile = true (the graphs are captured by torch.compile)")
    return Runtime(
        device=device,
        amp_dtype=amp_dtype,
        channels_last=_auto(cfg.run.channels_last, cuda),
        compile=compile,
        compile_mode=compile_mode(cfg.run.compile_mode, cfg.run.cuda_graphs) if compile else None,
        fused_kernels=fused_kernels,
        fused_optimizer=_auto(cfg.optim.fused, cuda),
    )


def compile_mode(mode: str, cuda_graphs: bool) -> str:
    """torch.compile's mode for the configured mode and CUDA-graph switch ("max-autotune" itself uses graphs)."""
    if not cuda_graphs:
        return "max-autotune-no-cudagraphs" if mode == "max-autotune" else mode
    return "max-autotune" if mode.startswith("max-autotune") else "reduce-overhead"
