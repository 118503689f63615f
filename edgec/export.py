"""PyTorch -> ONNX export, simplified with onnxsim and checked against PyTorch with onnxruntime.

Steps of :func:`export`:

1. a trial forward pass in PyTorch on an input of ``input_shape``; an exception there means the
   model cannot run that shape (:class:`~edgec.errors.InputError`);
2. the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``), with onnxscript's
   graph cleanup minus its Conv+BN fusion (BatchNormalization nodes stay unless ``fold_bn``,
   so edgec's own, verified, fusion passes see them); if it raises, or
   cannot produce the requested opset, the TorchScript exporter (``dynamo=False``) runs instead
   and :attr:`ExportResult.fallback_reason` says why, in one line;
3. onnxsim (constant folding, shape inference, dead-code removal);
4. the equivalence check: PyTorch and onnxruntime run the same fresh ``N(0, 1)`` inputs and the
   outputs are compared with :func:`edgec.verify.compare_outputs` (``max_abs <= atol + rtol *
   max|y_torch|``).  With a dynamic batch one sample uses a different batch size.

:func:`export_zoo_model` exports a zoo model and caches the ONNX file on disk, keyed by a hash of
the zoo and exporter source, the arguments and the torch/onnx/onnxsim versions, so tests and
benchmarks get zoo models in milliseconds after the first export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgec import verify as vfy
from edgec.errors import EquivalenceError, InputError, ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_CACHE_DIR",
    "ExportResult",
    "export",
    "export_zoo_model",
    "load_module",
    "parse_shape",
    "quiet",
]

#: The torch.export-based exporter implements opset 18 and newer.
DEFAULT_OPSET = 18
#: Where :func:`export_zoo_model` caches ONNX files unless given ``cache_dir``.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "edgec" / "zoo"
#: fp32 export differences are float rounding; this is loose enough for 50-layer nets.
EXPORT_TOLERANCE = vfy.Tolerance(rtol=1e-4, atol=1e-5)

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._export", "onnxscript", "onnx_ir", "torch")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """An exported model and how it was obtained."""

    model: onnx.ModelProto
    exporter: str  # "dynamo" (torch.export-based) or "torchscript"
    fallback_reason: str | None
    equivalence: vfy.EquivalenceReport | None
    seconds: float
    input_shape: tuple[int, ...]
    opset: int
    dynamic_batch: bool
    simplified: bool
    fold_bn: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "input_shape": list(self.input_shape),
            "opset": self.opset,
            "dynamic_batch": self.dynamic_batch,
            "simplified": self.simplified,
            "fold_bn": self.fold_bn,
            "nodes": len(self.model.graph.node),
            "seconds": self.seconds,
            "equivalence": None if self.equivalence is None else self.equivalence.to_json(),
        }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings, log records and prints (Python level) while active."""
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; positive integers only."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"malformed input shape {text!r}", "give positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise InputError(
        f"the model returned {type(out).__name__}, not a tensor or a tuple of tensors",
        "export a module whose forward returns tensors",
    )


def _trial_forward(module: torch.nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor]:
    import torch

    try:
        with torch.no_grad():
            out = module(torch.randn(*shape))
    except Exception as exc:
        raise InputError(
            f"input shape {','.join(map(str, shape))} is not supported by the model ({_one_line(exc)})",
            "give a shape the model accepts with --input-shape, e.g. 1,3,224,224",
        ) from None
    return _flatten_outputs(out)


def _names(n_outputs: int) -> tuple[list[str], list[str]]:
    outs = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    return ["input"], outs


def _optimize_keep_bn(model: Any) -> None:
    """onnxscript's default export optimization (constant folding, rewrite rules) without its
    Conv+BatchNormalization fusion: BN folding is edgec's job, done by a verified pass."""
    import onnx_ir.passes.common as common_passes
    import onnxscript.optimizer as opt
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    bn_rules = {id(r) for r in _fuse_batchnorm.rules}
    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if id(r) not in bn_rules]
    for _ in range(2):
        opt.fold_constants(model)
        rewriter.rewrite(model, rules)
        common_passes.RemoveUnusedNodesPass()(model)


def _export_dynamo(module, example, opset: int, dynamic_batch: bool, n_out: int, fold_bn: bool) -> onnx.ModelProto:
    import torch

    in_names, out_names = _names(n_out)
    kwargs: dict[str, Any] = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=in_names,
        output_names=out_names,
        verbose=False,
        optimize=fold_bn,
        **kwargs,
    )
    if program is None:
        raise RuntimeError("the exporter returned no program")
    if not fold_bn:
        try:
            _optimize_keep_bn(program.model)
        except (ImportError, AttributeError):  # onnxscript moved its internals: default optimizer
            program.optimize()
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise RuntimeError(f"it could not convert the model to opset {opset}; it produced opset {got}")
    return proto


def _export_torchscript(module, example, opset: int, dynamic_batch: bool, n_out: int, fold_bn: bool) -> onnx.ModelProto:
    import torch

    in_names, out_names = _names(n_out)
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=in_names,
        output_names=out_names,
        dynamic_axes=axes,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE,
    )
    return onnx.load_from_string(buf.getvalue())


def _simplify(proto: onnx.ModelProto, fold_bn: bool) -> tuple[onnx.ModelProto, bool]:
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(proto, check_n=0, skip_fuse_bn=not fold_bn)
    except Exception:
        return proto, False
    return (simplified, True) if ok else (proto, False)


def _verify(module, proto: onnx.ModelProto, shape: tuple[int, ...], dynamic_batch: bool, samples: int,
            seed: int | None, tolerance: vfy.Tolerance) -> vfy.EquivalenceReport:
    import torch

    rng = np.random.default_rng(seed)
    sess = vfy.session(proto)
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    ref, got = [], []
    for i in range(samples):
        s = shape
        if dynamic_batch and i == samples - 1:
            s = (shape[0] + 2, *shape[1:])
        x = rng.standard_normal(s).astype(np.float32)
        with torch.no_grad():
            ref.append([t.detach().numpy() for t in _flatten_outputs(module(torch.from_numpy(x)))])
        got.append(sess.run(None, {input_name: x}))
    return vfy.compare_outputs(ref, got, names, tolerance)


def export(
    module: torch.nn.Module,
    input_shape: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    fold_bn: bool = False,
    simplify: bool = True,
    check: bool = True,
    samples: int = 2,
    seed: int | None = None,
    tolerance: vfy.Tolerance = EXPORT_TOLERANCE,
) -> ExportResult:
    """Export ``module`` (one float32 input of ``input_shape``) to ONNX; see the module docstring.

    Raises :class:`~edgec.errors.InputError` for a non-module or an unsupported shape, and
    :class:`~edgec.errors.EquivalenceError` when ``check`` finds the ONNX outputs differ.
    BatchNormalization nodes are kept (edgec's fusion passes fold them, verified) unless
    ``fold_bn``, which lets the exporter and onnxsim fold them into the convolutions.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"expected a torch.nn.Module to export, got {type(module).__name__}",
            "pass an nn.Module instance",
        )
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"malformed input shape {shape}", "give positive integers, e.g. 1,3,224,224")
    if opset < 7:
        raise InputError(f"opset {opset} is too old", f"use opset {DEFAULT_OPSET} (the default) or newer")
    start = time.perf_counter()
    module = module.eval()
    outputs = _trial_forward(module, shape)
    example_shape = (max(2, shape[0]), *shape[1:]) if dynamic_batch else shape
    example = torch.randn(*example_shape)
    fallback_reason = None
    with quiet():
        try:
            proto = _export_dynamo(module, example, opset, dynamic_batch, len(outputs), fold_bn)
            exporter = "dynamo"
        except Exception as exc:
            fallback_reason = f"torch.export-based exporter failed ({_one_line(exc)})"
            try:
                proto = _export_torchscript(module, example, opset, dynamic_batch, len(outputs), fold_bn)
            except Exception as exc2:
                raise ModelLoadError(
                    f"ONNX export failed: {fallback_reason}; TorchScript exporter: {_one_line(exc2)}",
                    "check that the model is traceable (no data-dependent control flow)",
                ) from None
            exporter = "torchscript"
        simplified = False
        if simplify:
            proto, simplified = _simplify(proto, fold_bn)
    equivalence = None
    if check:
        equivalence = _verify(module, proto, shape, dynamic_batch, samples, seed, tolerance)
        if not equivalence.passed:
            raise EquivalenceError(
                f"the exported ONNX model differs from PyTorch: {equivalence.summary()}",
                "this is an exporter bug; try another --opset",
            )
    return ExportResult(
        proto, exporter, fallback_reason, equivalence, time.perf_counter() - start, shape, opset, dynamic_batch, simplified,
        fold_bn,
    )


def load_module(spec: str, *, seed: int = 0, **build_kwargs: Any) -> tuple[torch.nn.Module, tuple[int, ...] | None]:
    """A zoo name or ``file.py:factory`` / ``package.module:factory`` -> (module, default input shape).

    Zoo models also return their default input shape; a factory returns ``None`` for it.
    """
    import torch

    from edgec import models
    from edgec.passes_api import load_object

    if ":" not in spec:
        zoo = models.get(spec)
        return zoo.build(seed=seed, **build_kwargs), zoo.input_shape(**build_kwargs)
    factory = load_object(spec, "model factory")
    if not callable(factory):
        raise ModelLoadError(f"{spec} is a {type(factory).__name__}, not callable", "name a function or class that returns an nn.Module")
    try:
        module = factory(**build_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{spec} raised {_one_line(exc)}", "fix the factory, or call it in Python to see the traceback") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"{spec} returned {type(module).__name__}, not a torch.nn.Module",
            "return an nn.Module instance from the factory",
        )
    return module.eval(), None


def _source_digest() -> str:
    """sha256 over the zoo's and this module's source: a code change invalidates the cache."""
    import edgec.models as zoo

    h = hashlib.sha256()
    files = sorted(Path(zoo.__path__[0]).glob("*.py")) + [Path(__file__)]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(name: str, input_shape: tuple[int, ...], opset: int, dynamic_batch: bool, fold_bn: bool, seed: int,
              build_kwargs: dict[str, Any]) -> str:
    import onnxsim
    import torch

    payload = json.dumps(
        {
            "name": name,
            "shape": list(input_shape),
            "opset": opset,
            "dynamic_batch": dynamic_batch,
            "fold_bn": fold_bn,
            "seed": seed,
            "kwargs": {k: repr(v) for k, v in sorted(build_kwargs.items())},
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxsim": getattr(onnxsim, "__version__", "?"),
            "source": _source_digest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def export_zoo_model(
    name: str,
    *,
    input_shape: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    fold_bn: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    **build_kwargs: Any,
) -> onnx.ModelProto:
    """The zoo model ``name`` as verified ONNX, from the on-disk cache when present.

    ``cache_dir=None`` disables the cache.  Files are ``<cache_dir>/<name>-<hash>.onnx``, written
    atomically (concurrent test processes are safe).
    """
    from edgec import ir as eir
    from edgec import models

    spec = models.get(name)
    spec.check_kwargs(build_kwargs)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else spec.input_shape(**build_kwargs)
    path = None
    if cache_dir is not None:
        key = cache_key(spec.name, shape, opset, dynamic_batch, fold_bn, seed, build_kwargs)
        path = Path(cache_dir) / f"{spec.name}-{key}.onnx"
        if path.is_file():
            try:
                return eir.load_proto(path)
            except ModelLoadError:
                pass  # a corrupt cache entry is rebuilt below
    module = spec.build(seed=seed, **build_kwargs)
    result = export(module, shape, opset=opset, dynamic_batch=dynamic_batch, fold_bn=fold_bn, seed=seed)
    proto = result.model
    proto.graph.name = spec.name
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        eir.save_proto(proto, path)
    return proto
