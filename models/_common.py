"""Shared building blocks, seeded init and BatchNorm calibration for the zoo models.

See :mod:`edgec.models` for the init distributions and the calibration procedure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: train-mode forward passes, batch size and largest resolution used to calibrate BN statistics.
CALIBRATION_STEPS = 1
CALIBRATION_BATCH = 2
#: small inputs get a larger calibration batch: at least this many pixels per BN in all.
CALIBRATION_PIXELS = 2 * 224 * 224
CALIBRATION_MAX_BATCH = 16
#: standard deviation of the logits after :func:`scale_classifier`.
LOGIT_STD = 3.0


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


def calibration_batch(input_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded ``N(0, 1)`` images of the model's input shape.

    The batch holds at least :data:`CALIBRATION_PIXELS` pixels (up to 16 images), so that the
    last stages of a small-resolution model (2x2 maps at 64 px) still see enough samples per
    channel for stable statistics.
    """
    pixels = math.prod(input_shape[2:]) or 1
    batch = min(CALIBRATION_MAX_BATCH, max(CALIBRATION_BATCH, math.ceil(CALIBRATION_PIXELS / pixels)))
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, *input_shape[1:], generator=gen)


def calibrate(module: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0) -> None:
    """BN running statistics from seeded data, then logits scaled to std :data:`LOGIT_STD`."""
    x = calibration_batch(input_shape, seed)
    calibrate_batchnorm(module, x)
    scale_classifier(module, x)


def calibrate_batchnorm(module: nn.Module, x: torch.Tensor, steps: int = CALIBRATION_STEPS) -> None:
    """Set BN running stats to the average batch statistics of ``steps`` forward passes on ``x``.

    With ``momentum=None`` PyTorch keeps the cumulative average of the batch statistics, so after
    the passes ``running_mean``/``running_var`` are those of the data each BN actually saw.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(x)
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    module.eval()


def scale_classifier(module: nn.Module, x: torch.Tensor, target_std: float = LOGIT_STD) -> None:
    """Scale the last ``nn.Linear`` so the outputs on ``x`` have standard deviation ``target_std``.

    Random features give logits of std ~0.3; trained classifiers give O(1)-O(10).  Scaling the
    weight and bias by ``c`` scales the logits by ``c`` (the layer is linear).
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return
    module.eval()
    with torch.no_grad():
        std = float(module(x).std())
        if std > 0 and math.isfinite(std):
            c = target_std / std
            linears[-1].weight.mul_(c)
            if linears[-1].bias is not None:
                linears[-1].bias.mul_(c)
