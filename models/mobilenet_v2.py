"""MobileNetV2 (Sandler et al., 2018): inverted residual blocks with linear bottlenecks.

Block: ``x -> [1x1 expand, BN, ReLU6] -> 3x3 depthwise (stride s), BN, ReLU6 -> 1x1 project, BN``,
plus ``x`` when the stride is 1 and the channel count is unchanged.  Channels are
``make_divisible(c * width_mult, 8)``; the last 1x1 conv has ``1280 * max(1, width_mult)`` channels.
"""

from __future__ import annotations

from torch import nn

from edgec.models import ModelSpec, register
from edgec.models._common import ConvBNAct, make_divisible

#: (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3,
                 act: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=act))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=act),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in SETTINGS:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNAct(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


def build(*, width_mult: float = 1.0, resolution: int = 224, num_classes: int = 1000) -> nn.Module:
    """MobileNetV2 with width multiplier ``width_mult``; ``resolution`` only sets the input shape."""
    del resolution  # fully convolutional + global pooling: any resolution >= 32 runs
    return MobileNetV2(width_mult=width_mult, num_classes=num_classes)


SPEC = register(
    ModelSpec(
        name="mobilenet_v2",
        description="MobileNetV2 (inverted residuals, ReLU6)",
        default_input_shape=(1, 3, 224, 224),
        builder=build,
    )
)
