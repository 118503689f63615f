"""The edgec model zoo: small vision models written here, with seeded random weights.

No downloads and no torchvision: every model is plain PyTorch in this package.  A model is a
:class:`ModelSpec` (name, one-line description, default input shape, builder) in a small
registry::

    from edgec import models
    models.names()                                  # ['mcunet', 'mobilenet_v2', ...]
    spec = models.get("mobilenet_v2")
    net = spec.build(width_mult=0.5, resolution=160)  # nn.Module in eval mode
    spec.input_shape(resolution=160)                # (1, 3, 160, 160)

Weights are deterministic for a given ``seed``.  BatchNorms get realistic statistics so that
BN folding and quantization are exercised on numbers like a trained model's:

1. seeded init: convolutions He-normal (fan-out, as torchvision), linear layers uniform
   ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, BN ``gamma ~ U(0.6, 1.4)``, ``beta ~ N(0, 0.1^2)``;
2. calibration: a forward pass in train mode on a seeded batch of ``N(0, 1)`` images (two at 224 px, up to 16
   for small inputs, so every BN sees enough samples) with ``momentum=None`` (cumulative average), so
   ``running_mean``/``running_var`` are the statistics of the data each BN sees and every BN
   output has roughly mean ``beta`` and variance ``gamma^2``;
3. ``eval()``, then the last linear layer is scaled so the logits on that batch have standard
   deviation 3 (like a trained classifier's; random features give ~0.3).

The result: finite outputs of O(1)-O(10) scale, BN statistics far from the ``(0, 1)`` defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgec.errors import InputError, UnknownNameError

if TYPE_CHECKING:  # torch is imported lazily (``edgec --help`` stays fast)
    import torch

__all__ = ["ModelSpec", "names", "get", "register", "model_info", "ModelInfo"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A zoo model: ``builder(**kwargs)`` returns the architecture with untrained modules.

    ``build`` adds the seeded init and BN calibration described in the module docstring.
    ``resolution_arg`` names the builder argument that sets the input resolution (if any).
    """

    name: str
    description: str
    default_input_shape: tuple[int, ...]
    builder: Callable[..., Any]
    resolution_arg: str | None = "resolution"

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The builder's keyword arguments (name -> inspect.Parameter with its default)."""
        return {
            n: p
            for n, p in inspect.signature(self.builder).parameters.items()
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        }

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        params = self.parameters()
        for k in kwargs:
            if k not in params:
                close = difflib.get_close_matches(k, params, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise InputError(
                    f"model {self.name!r} has no argument {k!r}",
                    f"{hint}its arguments: {', '.join(params) or 'none'}",
                )

    def input_shape(self, **kwargs: Any) -> tuple[int, ...]:
        """Default input shape, with the resolution argument applied when given."""
        if self.resolution_arg and kwargs.get(self.resolution_arg) is not None:
            r = int(kwargs[self.resolution_arg])
            return (*self.default_input_shape[:-2], r, r)
        return self.default_input_shape

    def build(self, *, seed: int = 0, calibrate: bool = True, **kwargs: Any) -> torch.nn.Module:
        """Build the model with seeded weights, calibrate its BatchNorms, return it in eval mode."""
        import torch

        from edgec.models import _common

        self.check_kwargs(kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.builder(**kwargs)
            _common.init_weights(module)
        if calibrate:
            _common.calibrate(module, self.input_shape(**kwargs), seed=seed)
        return module.eval()


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the zoo (one call per model module, at import)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name].builder.__qualname__ != spec.builder.__qualname__:
        raise ValueError(f"model {spec.name!r} already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    """Names of the zoo models, sorted."""
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name``; unknown names raise with a close-match hint."""
    _load()
    spec = _REGISTRY.get(name) or _REGISTRY.get(name.replace("-", "_"))
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name, _REGISTRY, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownNameError(
        f"unknown model {name!r}",
        f"{hint}`edgec models` lists the zoo; a model of your own: path/to/file.py:factory",
    )


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Size of a model: parameters and multiply-accumulates of one forward pass (batch 1)."""

    params: int
    macs: int


def model_info(module: torch.nn.Module, input_shape: tuple[int, ...]) -> ModelInfo:
    """Count parameters and the MACs of Conv2d and Linear layers on one input of ``input_shape``.

    Conv MACs = ``out_numel * (in_channels / groups) * kh * kw``; Linear MACs = ``out_numel * in_features``.
    A module built under ``torch.device("meta")`` is counted without computing anything.
    """
    import torch

    macs = 0

    def conv_hook(mod: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = mod.kernel_size
        macs += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: torch.nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * mod.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            module(torch.zeros(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    batch = input_shape[0] if input_shape else 1
    return ModelInfo(sum(p.numel() for p in module.parameters()), macs // max(batch, 1))
