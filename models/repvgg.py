"""RepVGG-A0 (Ding et al., 2021): a VGG-style stack of re-parameterizable 3x3 blocks.

Training form: each block is ``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))`` (the identity BN
only at stride 1 with equal channels); ``deploy=True`` builds the same architecture directly in
its inference form, ``ReLU(conv3x3(x) + b)``, with its own random weights.  To get the inference
form *of a given training-form model* (same outputs) use :func:`edgec.models.repvgg.reparameterize`.
See :mod:`edgec.models._reparam` for the folding math.

A0: stages of 1, 2, 4, 14, 1 blocks with 48, 48, 96, 192, 1280 channels, each stage starting with
stride 2; then global pooling and a linear classifier.
"""

from __future__ import annotations

from torch import nn

from edgec.models import ModelSpec, register
from edgec.models._reparam import ReparamBlock, reparameterize

__all__ = ["RepVGG", "build", "reparameterize"]

#: (blocks, channels) per stage for RepVGG-A0.
A0_STAGES = ((1, 48), (2, 48), (4, 96), (14, 192), (1, 1280))


class RepVGG(nn.Module):
    def __init__(self, stages=A0_STAGES, num_classes: int = 1000, deploy: bool = False) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = 3
        for n, c in stages:
            for i in range(n):
                blocks.append(ReparamBlock(cin, c, 3, 2 if i == 0 else 1, branches=1, deploy=deploy))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build(*, deploy: bool = False, resolution: int = 224, num_classes: int = 1000) -> nn.Module:
    """RepVGG-A0; ``deploy=True`` gives the single-branch inference form (3x3 conv + bias + ReLU)."""
    del resolution
    return RepVGG(A0_STAGES, num_classes, deploy)


SPEC = register(
    ModelSpec(
        name="repvgg_a0",
        description="RepVGG-A0, 3 branches (deploy=true: fused form)",
        default_input_shape=(1, 3, 224, 224),
        builder=build,
    )
)
