"""MCUNet-style network (Lin et al., 2020) for ~256 KB-class SRAM budgets.

An inverted-residual net (MobileNetV2 blocks, ReLU6) whose blocks mix 3x3, 5x5 and 7x7 depthwise
kernels and expansion ratios 3-6, as found by TinyNAS for microcontrollers; no 1280-channel head:
the last block feeds global pooling and the classifier directly.  At 144 px the largest activation
pair (block input + expanded tensor, int8) is about 210 KB.
"""

from __future__ import annotations

from torch import nn

from edgec.models import ModelSpec, register
from edgec.models._common import ConvBNAct, make_divisible
from edgec.models.mobilenet_v2 import InvertedResidual

#: (expansion, output channels, depthwise kernel, stride) per block.
BLOCKS = (
    (1, 8, 3, 1),
    (4, 16, 7, 2),
    (3, 16, 3, 1),
    (6, 24, 7, 2),
    (3, 24, 5, 1),
    (4, 24, 5, 1),
    (5, 40, 3, 2),
    (4, 40, 7, 1),
    (4, 40, 5, 1),
    (5, 48, 5, 1),
    (4, 48, 5, 1),
    (6, 96, 3, 2),
    (3, 96, 7, 1),
    (4, 96, 3, 1),
    (5, 160, 7, 1),
)


class MCUNet(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        cin = make_divisible(16 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=nn.ReLU6)]
        for e, c, k, s in BLOCKS:
            cout = make_divisible(c * width_mult)
            layers.append(InvertedResidual(cin, cout, s, e, kernel=k))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build(*, width_mult: float = 1.0, resolution: int = 144, num_classes: int = 1000) -> nn.Module:
    """MCUNet-style net; ``resolution`` (96-160 typical) only sets the input shape."""
    del resolution
    return MCUNet(width_mult, num_classes)


SPEC = register(
    ModelSpec(
        name="mcunet",
        description="MCUNet-style tiny net for ~256 KB SRAM (dw 3/5/7, exp 3-6)",
        default_input_shape=(1, 3, 144, 144),
        builder=build,
    )
)
