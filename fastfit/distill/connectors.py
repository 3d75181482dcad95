"""Connectors (regressors) that map a student's guided-layer output onto the teacher's hint-layer shape.

- MMRazorConnector: 1×1 conv (no bias) + BatchNorm + ReLU; needs equal spatial sizes.
- PaperRegressor (Romero et al. 2015): a convolution whose kernel makes the spatial sizes meet,
  N_g − k + 1 = N_h per dimension, followed by the hint layer's nonlinearity.
"""

from __future__ import annotations

from torch import nn

from fastfit.errors import TapError


class MMRazorConnector(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=False)
        )


class PaperRegressor(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], activation: str = "relu"):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel)]
        if activation == "relu":
            layers.append(nn.ReLU(inplace=False))
        super().__init__(*layers)


def build_connector(
    kind: str,
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    activation: str = "relu",
    where: str = "hint",
) -> nn.Module:
    """A connector (regressor) from a student feature map to a teacher feature map.

    Args:
        kind: "mmrazor" (1×1 conv without bias + BatchNorm + ReLU; equal spatial sizes) or "paper" (a k×k conv with
            N_g − k + 1 = N_h per dimension, then `activation`).
        student_shape: the student's per-sample (C, H, W) at the guided layer.
        teacher_shape: the teacher's per-sample (C, H, W) at the hint layer.
        activation: "relu" or "none", the hint layer's nonlinearity (paper regressor only).
        where: names the hint in error messages (e.g. "recipe.hints[0] (layer3 → layer3)").

    Returns:
        An nn.Module mapping (N, Cs, Hs, Ws) to (N, Ct, Ht, Wt).

    Raises:
        TapError: the shapes are not feature maps, cannot be connected by `kind`, or `kind` is unknown.
    """
    if len(student_shape) != 3 or len(teacher_shape) != 3:
        raise TapError(
            f"{where}: hints need (C, H, W) feature maps, got student {student_shape} and teacher "
            f"{teacher_shape}; tap a convolutional stage instead"
        )
    (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
    if kind == "mmrazor":
        if (hs, ws) != (ht, wt):
            raise TapError(
                f"{where}: the 1×1 mmrazor connector needs equal spatial sizes, got student {hs}×{ws} and "
                f"teacher {ht}×{wt}; tap layers of the same resolution or use connector = 'paper'"
            )
        return MMRazorConnector(cs, ct)
    if kind == "paper":
        kh, kw = hs - ht + 1, ws - wt + 1
        if kh < 1 or kw < 1:
            raise TapError(
                f"{where}: no convolutional regressor maps student {hs}×{ws} onto the larger teacher "
                f"{ht}×{wt} (N_g − k + 1 = N_h needs N_g ≥ N_h); tap an earlier student layer or a later "
                "teacher layer"
            )
        return PaperRegressor(cs, ct, (kh, kw), activation)
    raise TapError(f"{where}: unknown connector {kind!r}; use 'mmrazor' or 'paper'")
