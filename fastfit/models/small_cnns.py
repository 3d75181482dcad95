"""Small models for the Fashion-MNIST demo (28×28) and 32×32 inputs: a wide, shallow teacher and deep, thin
FitNet-style students (the paper's shape: more layers, far fewer parameters than the teacher).

Every model keeps torchvision's classifier contract (`forward(x) -> logits`, `num_classes` argument) and names
its stages `stem`, `stage1`…, so hints are tapped by the same module paths as on ResNets.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _conv_bn_relu(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class WideCNN(nn.Module):
    """Wide and shallow: three 3×3 conv stages and a wide fully connected head (most of the parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 64, hidden: int = 512, batch_norm: bool = True):
        super().__init__()
        self.stage1 = nn.Sequential(*_conv_bn_relu(3, width // 2, batch_norm), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*_conv_bn_relu(width // 2, width, batch_norm), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*_conv_bn_relu(width, width, batch_norm), nn.AdaptiveAvgPool2d(7))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * 49, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.stage3(self.stage2(self.stage1(x))))


class ThinDeepCNN(nn.Module):
    """Deep and thin (FitNet-style): `depth_per_stage` 3×3 convs per stage, pooling between stages.
    init="kaiming": He-normal convolutions (for stacks without BatchNorm); "default": PyTorch's."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (8, 16, 16),
        depth_per_stage: int = 3,
        batch_norm: bool = True,
        init: str = "default",
    ):
        super().__init__()
        if init not in ("default", "kaiming"):
            raise ValueError(f"init must be 'default' or 'kaiming', got {init!r}")
        cin = 3
        for index, width in enumerate(widths, start=1):
            layers: list[nn.Module] = []
            for _ in range(depth_per_stage):
                layers += _conv_bn_relu(cin, width, batch_norm)
                cin = width
            if index < len(widths):
                layers.append(nn.MaxPool2d(2))
            setattr(self, f"stage{index}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        if init == "kaiming":
            # He et al. (2015): variance 2/fan_in keeps a plain ReLU stack's activations at scale with depth;
            # PyTorch's default (uniform, a = √5) shrinks them layer by layer, so deep stacks without BatchNorm stall.
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, x):
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.head(x)


SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "wide_cnn": WideCNN,
    "fitnet_thin": ThinDeepCNN,
    "fitnet_thin_wide": lambda **kw: ThinDeepCNN(widths=(12, 24, 24), **kw),
}
