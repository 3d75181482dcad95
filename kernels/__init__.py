"""fastfit.kernels: fused Triton losses for FitNets distillation (installed as `fastfit.kernels`).

- kd_loss.py    temperature-softmax KD (+ the student's cross-entropy) in one streaming pass per logits row.
- kd_objective.py  the weighted KD + CE objective as one output: the forward pass also writes its student gradient,
                the backward only checks that its upstream gradient was 1 (else recomputes).
- hint_loss.py  1×1 regressor GEMM + BatchNorm + ReLU + hint loss, the regressor output never written to memory.

Both are torch.library custom ops (fake + autograd registered), so torch.compile(fullgraph=True) traces them.
This package imports nothing from fastfit's training side; fastfit.distill.losses is the dispatch point that picks the
reference math or these ops. On a machine without CUDA they run through Triton's interpreter
(TRITON_INTERPRET=1, set before import), which is how CI tests them.
"""

from .hint_loss import fused_connector_hint_loss, fused_hint_loss, supports_connector
from .kd_loss import fused_kd_loss
from .kd_objective import fused_kd_objective

__all__ = ["fused_kd_loss", "fused_kd_objective", "fused_hint_loss", "fused_connector_hint_loss", "supports_connector"]
