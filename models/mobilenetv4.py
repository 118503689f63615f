"""MobileNetV4-conv-small (Qin et al., 2024) built from Universal Inverted Bottleneck blocks.

UIB block with optional depthwise convs before the expansion (``start``, kernel ``a``) and after
it (``middle``, kernel ``k``)::

    x -> [dw a x a, BN]            (start; stride here if there is no middle dw)
      -> 1x1 expand (x e), BN, ReLU
      -> [dw k x k (stride), BN, ReLU]   (middle)
      -> 1x1 project, BN       (+ x when stride 1 and channels equal)

``a=0, k>0`` is the MobileNetV2 inverted residual (IR), ``a>0, k>0`` ExtraDW, ``a>0, k=0``
ConvNext-like, ``a=k=0`` an FFN.  The network: 3x3 stem, two stages of plain conv+BN+ReLU
("cn"), UIB stages, a 1x1 conv to 960, global pooling, 1x1 conv to 1280 + ReLU, classifier.
"""

from __future__ import annotations

from torch import nn

from edgec.models import ModelSpec, register
from edgec.models._common import ConvBNAct, make_divisible

# ("cn", kernel, stride, out) or ("uib", start kernel a, middle kernel k, stride, expansion, out)
SMALL = (
    ("cn", 3, 2, 32),
    ("cn", 1, 1, 32),
    ("cn", 3, 2, 96),
    ("cn", 1, 1, 64),
    ("uib", 5, 5, 2, 3.0, 96),
    ("uib", 0, 3, 1, 2.0, 96),
    ("uib", 0, 3, 1, 2.0, 96),
    ("uib", 0, 3, 1, 2.0, 96),
    ("uib", 0, 3, 1, 2.0, 96),
    ("uib", 3, 0, 1, 4.0, 96),
    ("uib", 3, 3, 2, 6.0, 128),
    ("uib", 5, 5, 1, 4.0, 128),
    ("uib", 0, 5, 1, 4.0, 128),
    ("uib", 0, 5, 1, 3.0, 128),
    ("uib", 0, 3, 1, 4.0, 128),
    ("uib", 0, 3, 1, 4.0, 128),
    ("cn", 1, 1, 960),
)


class UniversalInvertedBottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, start_k: int, mid_k: int, stride: int, expand: float) -> None:
        super().__init__()
        mid = make_divisible(cin * expand)
        layers: list[nn.Module] = []
        if start_k:
            layers.append(ConvBNAct(cin, cin, start_k, stride if not mid_k else 1, groups=cin, act=None))
        layers.append(ConvBNAct(cin, mid, 1))
        if mid_k:
            layers.append(ConvBNAct(mid, mid, mid_k, stride, groups=mid))
        layers.append(ConvBNAct(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV4(nn.Module):
    def __init__(self, arch=SMALL, num_classes: int = 1000, head: int = 1280) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 32, 3, 2)]
        cin = 32
        for spec in arch:
            if spec[0] == "cn":
                _, k, s, c = spec
                layers.append(ConvBNAct(cin, c, k, s))
            else:
                _, a, k, s, e, c = spec
                layers.append(UniversalInvertedBottleneck(cin, c, a, k, s, e))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # no BN after pooling (as in the paper's head): batch statistics of 1x1 maps are meaningless
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.classifier(self.head(self.pool(self.features(x))).flatten(1))


def build(*, resolution: int = 224, num_classes: int = 1000) -> nn.Module:
    """MobileNetV4-conv-small; ``resolution`` only sets the input shape."""
    del resolution
    return MobileNetV4(SMALL, num_classes)


SPEC = register(
    ModelSpec(
        name="mobilenetv4_conv_small",
        description="MobileNetV4-conv-small (Universal Inverted Bottlenecks)",
        default_input_shape=(1, 3, 224, 224),
        builder=build,
    )
)
