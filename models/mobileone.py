"""MobileOne-S0 (Vasu et al., 2023): over-parameterized depthwise/pointwise blocks.

Training form: every "MobileOne block" is a depthwise block followed by a pointwise block, each
``ReLU(sum_{i<k} BN_i(conv_i(x)) + BN(conv1x1(x)) + BN(x))`` with ``k = 4`` parallel conv+BN
branches for S0 (depthwise: 3x3 convs with ``groups = channels`` and a 1x1 depthwise scale
branch; pointwise: 1x1 convs, no scale branch; the identity BN only at stride 1 with equal
channels).  ``deploy=True`` builds the single-branch inference form (one conv + bias + ReLU per
block) directly; :func:`edgec.models.mobileone.reparameterize` folds a training-form model into
it with the same outputs.  Folding math: :mod:`edgec.models._reparam`.

S0: stem block 3->48 (3x3, stride 2, one branch), stages of 2, 8, 10, 1 blocks with 48, 128, 256,
1024 channels (stride 2 at the start of each), global pooling, linear classifier.
"""

from __future__ import annotations

from torch import nn

from edgec.models import ModelSpec, register
from edgec.models._reparam import ReparamBlock, reparameterize

__all__ = ["MobileOne", "build", "reparameterize"]

#: (blocks, channels) per stage for S0.
S0_STAGES = ((2, 48), (8, 128), (10, 256), (1, 1024))


class MobileOne(nn.Module):
    def __init__(self, stages=S0_STAGES, branches: int = 4, num_classes: int = 1000, deploy: bool = False) -> None:
        super().__init__()
        stem = 48
        blocks: list[nn.Module] = [ReparamBlock(3, stem, 3, 2, branches=1, deploy=deploy)]
        cin = stem
        for n, c in stages:
            for i in range(n):
                stride = 2 if i == 0 else 1
                blocks.append(ReparamBlock(cin, cin, 3, stride, groups=cin, branches=branches, deploy=deploy))
                blocks.append(ReparamBlock(cin, c, 1, 1, branches=branches, deploy=deploy))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build(*, deploy: bool = False, branches: int = 4, resolution: int = 224, num_classes: int = 1000) -> nn.Module:
    """MobileOne-S0 (``branches`` = k parallel conv branches); ``deploy=True``: single-branch form."""
    del resolution
    return MobileOne(S0_STAGES, branches, num_classes, deploy)


SPEC = register(
    ModelSpec(
        name="mobileone_s0",
        description="MobileOne-S0, k=4 branches (deploy=true: fused form)",
        default_input_shape=(1, 3, 224, 224),
        builder=build,
    )
)
