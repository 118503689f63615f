"""Shared building blocks, seeded init and BatchNorm calibration for the zoo models.

See :mod:`edgec.models` for the init distributions and the calibration procedure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: train-mode forward passes and batch size used to calibrate BN running statistics.
CALIBRATION_STEPS = 2
CALIBRATION_BATCH = 8


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without going more than 10% below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation, 'same' padding for odd kernels."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish) else act())
        super().__init__(*layers)


def init_weights(module: nn.Module) -> None:
    """Seeded init (uses the global torch RNG; the caller seeds it)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:  # BN-free (deploy) convs: keep the activation variance through ReLU layers
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.normal_(m.bias, 0.0, 0.05)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.6, 1.4)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.reset_running_stats()


def calibrate_batchnorm(
    module: nn.Module,
    input_shape: tuple[int, ...],
    *,
    seed: int = 0,
    steps: int = CALIBRATION_STEPS,
    batch: int = CALIBRATION_BATCH,
) -> None:
    """Set BN running stats to the average batch statistics of ``steps`` seeded random batches."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    gen = torch.Generator().manual_seed(seed + 1)
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.randn(batch, *input_shape[1:], generator=gen))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
        bn.num_batches_tracked.zero_()
    module.eval()
