"""ResNet-18 (He et al., 2016): basic residual blocks.

Block: ``y = ReLU(BN(conv3x3(ReLU(BN(conv3x3_s(x))))) + shortcut(x))`` where the shortcut is the
identity, or ``BN(conv1x1_s(x))`` when the stride or the channel count changes.
"""

from __future__ import annotations

from torch import nn

from edgec.models import ModelSpec, register
from edgec.models._common import ConvBNAct


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride)
        self.conv2 = ConvBNAct(cout, cout, 3, 1, act=None)
        self.downsample = ConvBNAct(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        cin = 64
        for i, n in enumerate(layers):
            cout = 64 * 2**i
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def build(*, resolution: int = 224, num_classes: int = 1000) -> nn.Module:
    """ResNet-18; ``resolution`` only sets the input shape."""
    del resolution
    return ResNet((2, 2, 2, 2), num_classes)


SPEC = register(
    ModelSpec(
        name="resnet18",
        description="ResNet-18 (basic residual blocks, 7x7 stem, max pool)",
        default_input_shape=(1, 3, 224, 224),
        builder=build,
    )
)
