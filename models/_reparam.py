"""Structural re-parameterization blocks shared by RepVGG and MobileOne.

Training form of a block (``deploy=False``)::

    y = act( sum_{i<k} BN_i(conv_kxk_i(x)) + BN_s(conv_1x1(x)) + BN_id(x) )

(the 1x1 "scale" branch only when ``kernel > 1``; the identity branch only when the stride is 1
and ``cin == cout``).  Inference form (``deploy=True``): ``y = act(conv_kxk(x) + b)``.

Folding (:func:`reparameterize`): a conv+BN branch is ``W' = W * g / sqrt(v + eps)`` per output
channel and ``b' = beta - m * g / sqrt(v + eps)``; the 1x1 kernel is zero-padded to ``kxk`` at the
centre (same stride, padding ``(k-1)/2`` vs 0, so the taps line up); the identity is the kernel
with a 1 at ``[o, o mod (cin/groups), k//2, k//2]``, then folded with its BN.  Convolution is
linear in the kernel, so the sum of the branches is one conv with ``sum W'`` and ``sum b'``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ReparamBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        branches: int = 1,
        *,
        deploy: bool = False,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride, self.groups = cin, cout, kernel, stride, groups
        self.act = act()
        pad = (kernel - 1) // 2
        if deploy:
            self.reparam = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=True)
            return
        self.reparam = None
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout))
            for _ in range(branches)
        )
        self.scale = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(cout))
            if kernel > 1
            else None
        )
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        if self.reparam is not None:
            return self.act(self.reparam(x))
        y = self.convs[0](x)
        for conv in self.convs[1:]:
            y = y + conv(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to the sum of the branches (eval-mode BN)."""
        k = self.kernel
        weight = torch.zeros(self.cout, self.cin // self.groups, k, k)
        bias = torch.zeros(self.cout)

        def fold(w: torch.Tensor, bn: nn.BatchNorm2d) -> None:
            nonlocal weight, bias
            std = torch.sqrt(bn.running_var + bn.eps)
            weight = weight + w * (bn.weight / std).reshape(-1, 1, 1, 1)
            bias = bias + bn.bias - bn.running_mean * bn.weight / std

        for conv, bn in self.convs:
            fold(conv.weight, bn)
        if self.scale is not None:
            conv, bn = self.scale
            fold(nn.functional.pad(conv.weight, [(k - 1) // 2] * 4), bn)
        if self.identity is not None:
            eye = torch.zeros(self.cout, self.cin // self.groups, k, k)
            per_group = self.cin // self.groups
            for o in range(self.cout):
                eye[o, o % per_group, k // 2, k // 2] = 1.0
            fold(eye, self.identity)
        return weight, bias

    def switch_to_deploy(self) -> None:
        if self.reparam is not None:
            return
        weight, bias = self.fused_kernel()
        conv = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, (self.kernel - 1) // 2, groups=self.groups, bias=True)
        conv.weight.data.copy_(weight)
        conv.bias.data.copy_(bias)
        self.reparam = conv
        del self.convs, self.scale, self.identity


def reparameterize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`ReparamBlock` folded to its single-conv form.

    The copy computes the same function as ``model`` in eval mode (up to float rounding): it is
    the reference for the graph-level branch-fusion passes.
    """
    out = copy.deepcopy(model).eval()
    for m in out.modules():
        if isinstance(m, ReparamBlock):
            m.switch_to_deploy()
    return out
