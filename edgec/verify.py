"""Numeric equivalence of ONNX models, checked with onnxruntime.

Every transformation in edgec proves that it kept the model's numbers: the transformed model and
a reference (the model before the transformation, or PyTorch) are run on the same fresh random
inputs and their outputs compared.

Error measures, per output and then the worst over all outputs:

- ``max_abs = max |y - y_ref|``
- ``max_rel = max_abs / max(max |y_ref|, tiny)``: the error relative to the output's range. An
  element-wise relative error is meaningless where ``y_ref`` crosses zero, which every logit does.
- ``sqnr_db = 10 log10(sum y_ref^2 / sum (y - y_ref)^2)``: used for quantized models.

A comparison passes when ``max_abs <= atol + rtol * max |y_ref|`` for every output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgec.errors import InputError

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed difference: ``max_abs <= atol + rtol * max|reference|`` per output."""

    rtol: float = 1e-4
    atol: float = 1e-5

    def allows(self, max_abs: float, ref_range: float) -> bool:
        return max_abs <= self.atol + self.rtol * ref_range


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype of a model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return f"{self.name}: {np.dtype(self.dtype).name}[{','.join(map(str, self.shape))}]"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": np.dtype(self.dtype).name}


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    ref_range: float
    sqnr_db: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class EquivalenceReport:
    """Result of comparing a candidate model with a reference on ``samples`` random inputs."""

    outputs: tuple[OutputComparison, ...]
    samples: int
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=math.inf)

    def summary(self) -> str:
        verdict = "ok" if self.passed else "MISMATCH"
        sq = "inf" if math.isinf(self.sqnr_db) else f"{self.sqnr_db:.1f}"
        return f"{verdict}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, SQNR {sq} dB ({self.samples} random inputs)"

    def to_json(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "sqnr_db": None if math.isinf(self.sqnr_db) else self.sqnr_db,
            "samples": self.samples,
            "tolerance": dataclasses.asdict(self.tolerance),
        }


def _as_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)


def _initializer_names(proto: onnx.ModelProto) -> set[str]:
    return {i.name for i in proto.graph.initializer}


def input_specs(
    model: ir.Model | onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    dynamic_dim: int = 1,
) -> tuple[TensorSpec, ...]:
    """Static specs of the graph's real inputs (initializers excluded).

    Symbolic dimensions take ``shapes[name]`` when given, else ``dynamic_dim`` (batch 1).
    """
    proto = _as_proto(model)
    inits = _initializer_names(proto)
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = _ONNX_TO_NUMPY.get(tt.elem_type)
        if dtype is None:
            raise InputError(f"input {vi.name!r} has an unsupported element type {tt.elem_type}")
        if shapes and vi.name in shapes:
            shape = tuple(int(d) for d in shapes[vi.name])
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") else dynamic_dim for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, shape, np.dtype(dtype)))
    return tuple(specs)


def output_specs(model: ir.Model | onnx.ModelProto) -> tuple[TensorSpec, ...]:
    proto = _as_proto(model)
    specs = []
    for vi in proto.graph.output:
        tt = vi.type.tensor_type
        dtype = _ONNX_TO_NUMPY.get(tt.elem_type, np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, shape, np.dtype(dtype)))
    return tuple(specs)


def random_inputs(specs: Sequence[TensorSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh random inputs: standard normal floats, small non-negative integers, random bools."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.integers(0, 4, spec.shape).astype(spec.dtype)
    return feeds


def session(model: ir.Model | onnx.ModelProto, *, optimize: bool = False, threads: int = 0):
    """An onnxruntime CPU session for ``model`` (graph optimizations off unless ``optimize``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    proto = _as_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` once with onnxruntime and return its outputs in graph order."""
    return list(session(model).run(None, dict(feeds)))


def compare_outputs(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    tolerance: Tolerance,
) -> EquivalenceReport:
    """Compare per-sample output lists ``reference[i][k]`` vs ``candidate[i][k]``."""
    comparisons = []
    for k, name in enumerate(names):
        ref = np.concatenate([np.asarray(r[k], dtype=np.float64).ravel() for r in reference])
        got = np.concatenate([np.asarray(c[k], dtype=np.float64).ravel() for c in candidate])
        if ref.shape != got.shape:
            comparisons.append(OutputComparison(name, math.inf, math.inf, 0.0, -math.inf, False))
            continue
        diff = np.abs(got - ref)
        max_abs = float(diff.max(initial=0.0))
        ref_range = float(np.abs(ref).max(initial=0.0))
        noise = float(np.sum((got - ref) ** 2))
        signal = float(np.sum(ref**2))
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        if not np.all(np.isfinite(got)) and not np.array_equal(np.isfinite(got), np.isfinite(ref)):
            max_abs = math.inf
        comparisons.append(
            OutputComparison(
                name,
                max_abs,
                max_abs / max(ref_range, 1e-12),
                ref_range,
                sqnr,
                tolerance.allows(max_abs, ref_range),
            )
        )
    return EquivalenceReport(tuple(comparisons), len(reference), tolerance)


def compare_models(
    reference: ir.Model | onnx.ModelProto,
    candidate: ir.Model | onnx.ModelProto,
    *,
    tolerance: Tolerance = Tolerance(),
    samples: int = 2,
    seed: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> EquivalenceReport:
    """Run both models on the same ``samples`` fresh random inputs and compare their outputs."""
    ref_proto, cand_proto = _as_proto(reference), _as_proto(candidate)
    specs = input_specs(ref_proto, shapes)
    rng = np.random.default_rng(seed)
    feeds = [random_inputs(specs, rng) for _ in range(samples)]
    ref_sess, cand_sess = session(ref_proto), session(cand_proto)
    ref_out = [ref_sess.run(None, f) for f in feeds]
    cand_out = [cand_sess.run(None, f) for f in feeds]
    names = [o.name for o in ref_sess.get_outputs()]
    return compare_outputs(ref_out, cand_out, names, tolerance)
