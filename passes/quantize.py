"""Post-training int8 quantization to QDQ (QuantizeLinear / DequantizeLinear) ONNX.

Numbers.  A real tensor ``x`` with scale ``s`` and zero point ``z`` is stored as
``q = clamp(round(x / s) + z, qmin, qmax)`` and read back as ``x' = (q - z) * s``.

- Weights: int8 symmetric, ``z = 0``, ``s_c = max|W_c| / 127`` per output channel ``c`` (axis 0 of
  a Conv weight, the ``N`` axis of a Gemm/MatMul weight), or one ``s`` per tensor.
- Activations: per tensor, from a calibrated range ``[lo, hi]`` widened to contain 0:
  uint8 asymmetric ``s = (hi - lo) / 255``, ``z = round(-lo / s)`` (default, fastest on x86
  VNNI), or int8 symmetric ``s = max(|lo|, |hi|) / 127``, ``z = 0``.
- Biases: int32, ``s_b,c = s_x * s_w,c``, ``z = 0``, ``q_b = round(b / s_b)``, so the integer
  accumulator ``sum q_x q_w + q_b`` needs no rescale before the bias.

Placement (what runtimes fuse):

- Conv, Gemm and MatMul with constant weights are quantized: ``DQ(x) -> op(DQ(W), DQ(b)) -> Q``.
  A Relu/Clip that is the only consumer of the op's output is fused: the output range is taken
  after the activation.  With uint8 activations and ``z = 0`` (and a Clip whose bounds contain
  the quantized range) ``Q(act(y)) == Q(y)`` exactly, so the activation node is dropped.
- Add, Concat, GlobalAveragePool and AveragePool are quantized when all their inputs come from
  quantized ops, so residual branches stay in int8.  ``ReduceMean`` over H and W with
  ``keepdims=1`` is rewritten to the equal ``GlobalAveragePool`` first.
- Channel padding (``pad_channels``, exact): see :mod:`edgec.passes._quant_layout`.  Concat inputs share the output's scale.
- Data-movement ops (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze) get no QDQ of
  their own: their output shares the scale of their input, so ``DQ -> op -> Q`` runs in int8.
- Other ops (Softmax, Sigmoid, shape arithmetic ...) stay float: QDQ around them gains nothing.

Bias correction: quantized weights (and input) change each layer's mean output.  With ``x`` the
layer's float input on the calibration data, ``y = op(x, W) + b`` and
``y_q = op(DQ(Q(x)), DQ(Q(W))) + b``, per output channel ``c``:
``b_c <- b_c - mean_{n,h,w}(y_q - y)_c`` (applied before the bias is quantized).  Each layer is
corrected for its own error only (same float input), so nothing is corrected twice.

Sensitivity: for each quantized layer alone, ``SQNR = 10 log10(sum y^2 / sum (y_q - y)^2)`` of
the model outputs on the calibration data.  Mixed precision (``max_drop``) keeps the least
SQNR layers in float, one at a time, until the top-1 drop is within the budget.

SQNR target (``target_sqnr_db``): the layers' output errors are roughly independent, so their
powers add: with ``n_i = 10^(-SQNR_i / 10)`` (layer ``i`` alone) and ``N`` the measured noise
power ratio of the whole int8 model, keeping the set ``F`` in float leaves about
``N * sum_{i not in F} n_i / sum_i n_i``.  The least-SQNR layers go to float, as many as that
estimate says reach the target; the model is rebuilt and measured, and the step repeats (at
least one more layer each time) until the measured SQNR meets the target or one layer is left.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgec import ir as eir
from edgec import verify as vfy
from edgec.calibration import BuiltinDataset, CalibrationSet, CalibrationSource, Sample, source_for
from edgec.errors import EquivalenceError, InputError
from edgec.passes._quant_ranges import (
    METHODS,
    Histograms,
    MinMax,
    TensorRange,
    entropy_range,
    mse_range,
    percentile_range,
)
from edgec.passes_api import Pass, PassOption, PassResult, PassStats, register_pass

ANCHORS = ("Conv", "Gemm", "MatMul")
MERGED = ("Add", "Concat", "GlobalAveragePool", "AveragePool")
SHARED = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
FUSED_ACTS = ("Relu", "Clip")
ALREADY_QUANTIZED = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                     "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd")


# --- configuration and reports --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    ``activations``: ``"uint8"`` (asymmetric, default) or ``"int8"`` (symmetric).
    ``float_layers``: node names kept in float.  ``max_drop``: allowed top-1 drop in points
    (accuracy vs labels when the data has labels, else agreement with the float model); ``None``
    quantizes every layer.  ``min_sqnr_db``: the pass fails below this output SQNR.
    ``target_sqnr_db``: keep the most sensitive layers in float until the output SQNR on the
    evaluation data reaches this (``None``: no SQNR target).  ``pad_channels``: pad the stem's
    input channels to a multiple of 4 and depthwise blocks' channels to a multiple of 16 (exact,
    see :mod:`edgec.passes._quant_layout`) so onnxruntime runs them on its fast int8 kernels.
    """

    method: str = "minmax"
    per_channel: bool = True
    activations: str = "uint8"
    percentile: float = 99.99
    bins: int = 2048
    bias_correction: bool = True
    float_layers: tuple[str, ...] = ()
    max_drop: float | None = None
    max_samples: int = 128
    min_sqnr_db: float = 10.0
    target_sqnr_db: float | None = None
    pad_channels: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown calibration method {self.method!r}", f"one of {', '.join(METHODS)}")
        if self.activations not in ("uint8", "int8"):
            raise InputError(f"activation type {self.activations!r} is not uint8 or int8")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile {self.percentile} is not in (50, 100]")
        if self.max_drop is not None and self.max_drop < 0:
            raise InputError(f"--max-drop {self.max_drop} is negative")
        if self.max_samples < 1:
            raise InputError("max_samples must be at least 1")
        if self.target_sqnr_db is not None and not math.isfinite(self.target_sqnr_db):
            raise InputError(f"--target-sqnr {self.target_sqnr_db} is not a finite number of dB")


@dataclasses.dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: str  # "uint8" | "int8"

    @property
    def onnx_type(self) -> int:
        return TensorProto.UINT8 if self.dtype == "uint8" else TensorProto.INT8

    @property
    def qrange(self) -> tuple[float, float]:
        qmin, qmax = (0, 255) if self.dtype == "uint8" else (-128, 127)
        return (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale


def activation_qparams(r: TensorRange, dtype: str) -> QParams:
    lo, hi = min(r.lo, 0.0), max(r.hi, 0.0)
    if dtype == "uint8":
        scale = float(np.float32((hi - lo) / 255.0)) if hi > lo else 1.0
        zp = int(np.clip(round(-lo / scale), 0, 255))
        return QParams(scale, zp, "uint8")
    a = max(abs(lo), abs(hi))
    return QParams(float(np.float32(a / 127.0)) if a > 0 else 1.0, 0, "int8")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A quantizable Conv/Gemm/MatMul and where its tensors are."""

    node: str
    op: str
    input: str
    weight: str
    bias: str | None
    output: str  # the op's own output (before a fused activation)
    quant_output: str  # where the output range is taken: after a fused Relu/Clip
    act: str | None  # fused activation node name
    weight_axis: int  # output-channel axis of the weight
    out_axis: int  # channel axis of the output


@dataclasses.dataclass(frozen=True)
class Plan:
    layers: tuple[Layer, ...]
    merged: tuple[str, ...]  # quantized Add/Concat/Pool node names
    tensors: tuple[str, ...]  # activation tensors that get Q -> DQ, in graph order
    groups: tuple[tuple[str, ...], ...]  # tensors sharing one scale
    rejected: tuple[tuple[str, str], ...]  # (node, reason)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrated ranges per activation tensor, by method."""

    method: str
    ranges: Mapping[str, TensorRange]
    samples: int


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op: str
    sqnr_db: float


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Quantized vs float model on evaluation samples."""

    samples: int
    sqnr_db: float
    max_abs: float
    max_abs_in_scales: float | None  # max abs error in units of the output's quantization scale
    top1_agreement: float | None  # percent of samples where argmax matches the float model
    float_top1: float | None  # accuracy vs labels (percent) if labels are known
    quant_top1: float | None

    @property
    def drop(self) -> float | None:
        if self.float_top1 is not None and self.quant_top1 is not None:
            return self.float_top1 - self.quant_top1
        if self.top1_agreement is not None:
            return 100.0 - self.top1_agreement
        return None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drop"] = self.drop
        if math.isinf(self.sqnr_db):
            d["sqnr_db"] = None
        return d


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    model: onnx.ModelProto
    config: QuantConfig
    calibration_description: str
    calibration_samples: int
    layers_quantized: tuple[str, ...]
    layers_float: tuple[str, ...]
    tensors_quantized: int
    activations_removed: int
    bias_corrected: int
    evaluation: Evaluation
    sensitivity: tuple[LayerSensitivity, ...]
    rejected: tuple[tuple[str, str], ...]
    batchnorms_folded: int = 0
    channels_padded: tuple[str, ...] = ()  # convs whose channels were padded (exact; for int8 kernels)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "batchnorms_folded": self.batchnorms_folded,
            "channels_padded": list(self.channels_padded),
            "calibration": {"source": self.calibration_description, "samples": self.calibration_samples},
            "layers_quantized": list(self.layers_quantized),
            "layers_float": list(self.layers_float),
            "tensors_quantized": self.tensors_quantized,
            "activations_removed": self.activations_removed,
            "bias_corrected": self.bias_corrected,
            "evaluation": self.evaluation.to_json(),
            "sensitivity": [dataclasses.asdict(s) | {"sqnr_db": None if math.isinf(s.sqnr_db) else s.sqnr_db} for s in self.sensitivity],
            "rejected": [{"node": n, "reason": r} for n, r in self.rejected],
        }


# --- graph helpers ----------------------------------------------------------------------------


class _Graph:
    """Read-only indexes over a GraphProto (nodes must have unique names)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.proto = proto
        self.inits = {i.name: i for i in g.initializer}
        self.consts: dict[str, np.ndarray] = {n: numpy_helper.to_array(t) for n, t in self.inits.items()}
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.graph_outputs = [o.name for o in g.output]
        self.by_name = {n.name: n for n in g.node}

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def attr(self, node: onnx.NodeProto, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _named(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return out


def check_quantizable(proto: onnx.ModelProto) -> None:
    """Raise InputError for an already-quantized model or an opset without per-channel QDQ."""
    found = sorted({n.op_type for n in proto.graph.node if n.op_type in ALREADY_QUANTIZED})
    if found:
        raise InputError(
            f"the model is already quantized (it contains {', '.join(found)})",
            "quantize the float model it was made from",
        )
    if _opset(proto) < 13:
        raise InputError(
            f"the model uses opset {_opset(proto)}; per-channel QuantizeLinear needs opset 13 or later",
            "re-export with opset_version=17",
        )


# --- placement --------------------------------------------------------------------------------


def _find_layer(g: _Graph, node: onnx.NodeProto) -> tuple[Layer | None, str | None]:
    """The Layer for a Conv/Gemm/MatMul, or None and why it stays float."""
    op = node.op_type
    if len(node.input) < 2 or not node.input[0] or g.is_const(node.input[0]):
        return None, "its input is a constant"
    w_name = node.input[1]
    if w_name not in g.inits:
        return None, "its weight is not a constant initializer"
    w = g.consts[w_name]
    if w.dtype != np.float32:
        return None, f"its weight is {w.dtype}, not float32"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if op == "Conv":
        if w.ndim < 3:
            return None, "weight is not a conv kernel"
        w_axis, out_axis = 0, 1
        if bias is not None and (bias not in g.inits or g.consts[bias].shape != (w.shape[0],)):
            return None, "its bias is not a constant vector"
    elif op == "Gemm":
        if w.ndim != 2 or g.attr(node, "transA", 0) or g.attr(node, "alpha", 1.0) != 1.0 or g.attr(node, "beta", 1.0) != 1.0:
            return None, "Gemm with transA, alpha != 1 or beta != 1"
        w_axis = 0 if g.attr(node, "transB", 0) else 1
        out_axis = 1
        if bias is not None and (bias not in g.inits or g.consts[bias].shape != (w.shape[w_axis],)):
            return None, "its bias is not a constant vector of the output size"
    else:  # MatMul
        if w.ndim != 2:
            return None, "its weight is not a 2-d matrix"
        w_axis, out_axis, bias = 1, -1, None
    out = node.output[0]
    quant_out, act = out, None
    users = g.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type in FUSED_ACTS and out not in g.graph_outputs:
        act = users[0].name
        quant_out = users[0].output[0]
    return Layer(node.name, op, node.input[0], w_name, bias, out, quant_out, act, w_axis, out_axis), None


def make_plan(proto: onnx.ModelProto, float_layers: Sequence[str] = (), only: Sequence[str] | None = None) -> Plan:
    """Decide which nodes and tensors are quantized (see the module docstring)."""
    g = _Graph(proto)
    rejected: list[tuple[str, str]] = []
    layers: list[Layer] = []
    produced_by_quant: set[str] = set()  # tensors written by a quantized op (after fusion) or shared from one
    merged: list[str] = []
    tensors: set[str] = set()
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb

    skip = set(float_layers)
    fused_out: dict[str, str] = {}
    for node in g.proto.graph.node:
        op = node.op_type
        if op in ANCHORS:
            if node.name in skip or (only is not None and node.name not in only):
                continue
            layer, why = _find_layer(g, node)
            if layer is None:
                rejected.append((node.name, why or "?"))
                continue
            layers.append(layer)
            tensors.add(layer.input)
            produced_by_quant.add(layer.quant_output)
            if layer.act is not None:
                fused_out[layer.quant_output] = layer.node
        elif op in MERGED and only is None:
            acts = [i for i in node.input if i and not g.is_const(i)]
            if op in ("Add", "Concat") and len(acts) != len([i for i in node.input if i]):
                rejected.append((node.name, "an input is a constant"))
                continue
            if acts and all(i in produced_by_quant for i in acts):
                merged.append(node.name)
                tensors.update(acts)
                produced_by_quant.add(node.output[0])
                if op == "Concat":
                    for i in acts:
                        union(i, node.output[0])
        elif op in SHARED and node.input and node.input[0] in produced_by_quant:
            produced_by_quant.add(node.output[0])
            union(node.input[0], node.output[0])

    # outputs of quantized ops: Conv always (runtimes need Q after it to fuse), others when an
    # int8 consumer (or a shared-scale op leading to one) reads them.
    layer_by_out = {lay.quant_output: lay for lay in layers}
    quant_nodes = {lay.node for lay in layers} | set(merged)
    for lay in layers:
        users = g.consumers.get(lay.quant_output, [])
        if lay.op == "Conv" or any(u.name in quant_nodes or u.op_type in SHARED for u in users):
            tensors.add(lay.quant_output)
    for name in merged:
        out = g.by_name[name].output[0]
        if any(u.name in quant_nodes or u.op_type in SHARED for u in g.consumers.get(out, [])):
            tensors.add(out)
    # shared-scale chains: a quantized tensor read through MaxPool/Reshape/... shares its input's QDQ
    changed = True
    while changed:
        changed = False
        for node in g.proto.graph.node:
            if node.op_type in SHARED and node.input and node.output[0] in tensors and node.input[0] in produced_by_quant:
                if node.input[0] not in tensors:
                    tensors.add(node.input[0])
                    changed = True
                union(node.input[0], node.output[0])
    del layer_by_out
    order = [i for i in g.graph_inputs if i in tensors]
    for node in g.proto.graph.node:
        order.extend(o for o in node.output if o in tensors)
    groups: dict[str, list[str]] = {}
    for t in order:
        groups.setdefault(find(t), []).append(t)
    return Plan(tuple(layers), tuple(merged), tuple(order), tuple(tuple(v) for v in groups.values()), tuple(rejected))


# --- running models ---------------------------------------------------------------------------


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    existing = {o.name for o in out.graph.output}
    for n in names:
        if n not in existing:
            out.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return out


def _run_all(proto: onnx.ModelProto, samples: Sequence[Sample], names: Sequence[str] | None = None,
             on_sample: Callable[[int, list[np.ndarray]], None] | None = None) -> list[list[np.ndarray]]:
    """Run ``proto`` on every sample; ``names`` selects outputs (default: the graph outputs)."""
    sess = vfy.session(proto, optimize=False)
    results: list[list[np.ndarray]] = []
    for i, s in enumerate(samples):
        outs = sess.run(list(names) if names is not None else None, s.feeds())
        if on_sample is not None:
            on_sample(i, outs)
        else:
            results.append(outs)
    return results


def calibrate(proto: onnx.ModelProto, tensors: Sequence[str], data: CalibrationSet, config: QuantConfig,
              progress: Callable[[str, int, int], None] | None = None) -> Calibration:
    """Ranges of ``tensors`` on ``data`` with ``config.method``."""
    g = _Graph(proto)
    inputs = [t for t in tensors if t in g.graph_inputs]
    inner = [t for t in tensors if t not in g.graph_inputs]
    aug = _with_outputs(proto, inner)
    samples = data.samples
    mm = MinMax()
    total = len(samples) * (1 if config.method == "minmax" else 2)

    def first(i: int, outs: list[np.ndarray]) -> None:
        for name, arr in zip(inner, outs[: len(inner)], strict=True):  # [] names: onnxruntime returns the graph outputs
            mm.add(name, arr)
        for name in inputs:
            mm.add(name, samples[i].feeds()[name])
        if progress:
            progress("calibrating", i + 1, total)

    _run_all(aug, samples, inner, first)
    minmax = mm.ranges()
    if config.method == "minmax":
        return Calibration("minmax", minmax, len(samples))
    hists = Histograms(minmax, config.bins)

    def second(i: int, outs: list[np.ndarray]) -> None:
        for name, arr in zip(inner, outs[: len(inner)], strict=True):  # [] names: onnxruntime returns the graph outputs
            hists.add(name, arr)
        for name in inputs:
            hists.add(name, samples[i].feeds()[name])
        if progress:
            progress("calibrating", len(samples) + i + 1, total)

    _run_all(aug, samples, inner, second)
    levels = 256
    ranges: dict[str, TensorRange] = {}
    for name, r in minmax.items():
        lo, hi = hists.edges[name]
        counts = hists.counts[name]
        if config.method == "percentile":
            ranges[name] = percentile_range(counts, lo, hi, r, config.percentile)
        elif config.method == "entropy":
            ranges[name] = entropy_range(counts, lo, hi, r, levels)
        else:
            ranges[name] = mse_range(counts, lo, hi, r, levels)
    return Calibration(config.method, ranges, len(samples))


# --- rewriting --------------------------------------------------------------------------------


def _quantize_weight(w: np.ndarray, axis: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric ``(q, scale)``; ``scale`` is per channel along ``axis`` or a scalar."""
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=red) if w.size else np.zeros(w.shape[axis], np.float32)
    else:
        amax = np.array(np.max(np.abs(w)) if w.size else 0.0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


@dataclasses.dataclass(frozen=True)
class Built:
    model: onnx.ModelProto
    activations_removed: int
    qparams: Mapping[str, QParams]


def group_qparams(plan: Plan, cal: Calibration, dtype: str) -> dict[str, QParams]:
    out: dict[str, QParams] = {}
    for group in plan.groups:
        r: TensorRange | None = None
        for t in group:
            tr = cal.ranges.get(t)
            if tr is not None:
                r = tr if r is None else r.union(tr)
        qp = activation_qparams(r if r is not None else TensorRange(0.0, 0.0), dtype)
        for t in group:
            out[t] = qp
    return out


def build(proto: onnx.ModelProto, plan: Plan, cal: Calibration, config: QuantConfig,
          bias_delta: Mapping[str, np.ndarray] | None = None) -> Built:
    """The QDQ model for ``plan`` (``proto`` must have unique node names, see :func:`_named`)."""
    g = _Graph(proto)
    qp = group_qparams(plan, cal, config.activations)
    layers = {lay.node: lay for lay in plan.layers}
    tensors = set(plan.tensors)
    graph_outputs = set(g.graph_outputs)

    # which fused activations are exact no-ops after Q (uint8, zero point 0, Clip containing the range)
    removable: dict[str, str] = {}  # act node name -> layer output to read instead
    for lay in plan.layers:
        if lay.act is None or lay.quant_output not in tensors or lay.quant_output in graph_outputs:
            continue
        q = qp[lay.quant_output]
        act = g.by_name[lay.act]
        if q.dtype != "uint8" or q.zero_point != 0:
            continue
        if act.op_type == "Clip":
            lo, hi = _clip_bounds(g, act)
            qlo, qhi = q.qrange
            if lo is None or hi is None or not (lo <= qlo + 1e-12 and qhi <= hi + 1e-6):
                continue
        removable[lay.act] = lay.output
    # the tensor a Q reads: the layer's raw output when its activation is removed
    q_source = {g.by_name[a].output[0]: src for a, src in removable.items()}

    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}  # graph-output tensors whose float producer output is renamed
    dq_of: dict[str, str] = {}
    for t in plan.tensors:
        if t in graph_outputs:
            renamed[t] = f"{t}_float"
            dq_of[t] = t
        else:
            dq_of[t] = f"{t}_dq"

    def scalar(name: str, value: float | int, dtype: Any) -> str:
        new_inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def emit_qdq(t: str) -> None:
        q = qp[t]
        src = q_source.get(t, t)
        src = renamed.get(src, src)
        s = scalar(f"{t}_scale", q.scale, np.float32)
        z = scalar(f"{t}_zp", q.zero_point, np.uint8 if q.dtype == "uint8" else np.int8)
        new_nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [f"{t}_q"], name=f"{t}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{t}_q", s, z], [dq_of[t]], name=f"{t}_DequantizeLinear"))

    def const_dq(base: str, q: np.ndarray, scale: np.ndarray, axis: int | None) -> str:
        new_inits.append(numpy_helper.from_array(q, f"{base}_quantized"))
        new_inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"))
        new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, q.dtype), f"{base}_zp"))
        kw = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zp"],
                                          [f"{base}_dq"], name=f"{base}_DequantizeLinear", **kw))
        return f"{base}_dq"

    for t in g.graph_inputs:
        if t in tensors:
            emit_qdq(t)
    emitted = {t for t in g.graph_inputs if t in tensors}
    for node in proto.graph.node:
        if node.name in removable:
            continue
        n = onnx.NodeProto()
        n.CopyFrom(node)
        lay = layers.get(node.name)
        if lay is not None:
            w = g.consts[lay.weight]
            wq, ws = _quantize_weight(w, lay.weight_axis, config.per_channel)
            n.input[1] = const_dq(f"{node.name}_W", wq, ws, lay.weight_axis)
            b = g.consts[lay.bias].astype(np.float32) if lay.bias is not None else None
            delta = bias_delta.get(node.name) if bias_delta else None
            if delta is not None:
                b = (np.zeros(delta.shape, np.float32) if b is None else b) - delta.astype(np.float32)
            if b is not None:
                sx = qp[lay.input].scale
                bs = (np.float32(sx) * ws).astype(np.float32)
                if bs.ndim == 0:
                    bs = np.full(b.shape, bs, np.float32)
                bq = np.clip(np.round(b / bs), -(2**31) + 1, 2**31 - 1).astype(np.int32)
                name = const_dq(f"{node.name}_B", bq, bs, 0)
                if len(n.input) > 2:
                    n.input[2] = name
                else:
                    n.input.append(name)
        for k, i in enumerate(n.input):
            if i in tensors:
                n.input[k] = dq_of[i]
        for k, o in enumerate(n.output):
            if o in renamed:
                n.output[k] = renamed[o]
        new_nodes.append(n)
        for o in node.output:
            if o in tensors and o not in emitted:
                emit_qdq(o)
                emitted.add(o)
            # a removed activation's output is emitted right after the layer that feeds its Q
            for t, src in q_source.items():
                if src == o and t in tensors and t not in emitted:
                    emit_qdq(t)
                    emitted.add(t)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    # value_info of removed/renamed tensors would be stale; onnxruntime re-infers shapes
    del out.graph.value_info[:]
    unused = {i.name for i in out.graph.initializer} - {i for nd in out.graph.node for i in nd.input}
    if unused:
        keep = [i for i in out.graph.initializer if i.name not in unused]
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
    from edgec.passes._quant_layout import pad_after_quantize

    out, _moved = pad_after_quantize(out)
    return Built(out, len(removable), qp)


def _clip_bounds(g: _Graph, node: onnx.NodeProto) -> tuple[float | None, float | None]:
    lo: float | None = -math.inf
    hi: float | None = math.inf
    if len(node.input) > 1 and node.input[1]:
        lo = float(g.consts[node.input[1]]) if node.input[1] in g.consts else None
    if len(node.input) > 2 and node.input[2]:
        hi = float(g.consts[node.input[2]]) if node.input[2] in g.consts else None
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        if a.name == "max":
            hi = a.f
    return lo, hi


def bias_deltas(float_proto: onnx.ModelProto, plan: Plan, cal: Calibration, config: QuantConfig,
                data: CalibrationSet) -> dict[str, np.ndarray]:
    """Per-channel mean error ``mean(y_q - y)`` of every Conv/Gemm, each layer on its own.

    ``y_q = op(DQ(Q(x)), DQ(Q(W)), b)`` is computed next to ``y = op(x, W, b)`` inside the float
    model, from the same float input ``x``, so each correction removes the layer's own error
    and none is counted twice down the network (MatMul has no bias to correct).
    """
    g = _Graph(float_proto)
    qp = group_qparams(plan, cal, config.activations)
    layers = [lay for lay in plan.layers if lay.op in ("Conv", "Gemm") and lay.input in qp]
    if not layers:
        return {}
    aug = onnx.ModelProto()
    aug.CopyFrom(float_proto)
    names: list[str] = []
    for lay in layers:
        node = g.by_name[lay.node]
        q = qp[lay.input]
        p = f"{lay.node}__bc"
        wq, ws = _quantize_weight(g.consts[lay.weight], lay.weight_axis, config.per_channel)
        zp_t = np.uint8 if q.dtype == "uint8" else np.int8
        aug.graph.initializer.extend([
            numpy_helper.from_array(np.array(q.scale, np.float32), f"{p}_xs"),
            numpy_helper.from_array(np.array(q.zero_point, zp_t), f"{p}_xz"),
            numpy_helper.from_array(wq, f"{p}_wq"), numpy_helper.from_array(ws, f"{p}_ws"),
            numpy_helper.from_array(np.zeros(ws.shape, np.int8), f"{p}_wz"),
        ])
        kw = {"axis": lay.weight_axis} if ws.ndim == 1 else {}
        dup = onnx.NodeProto()
        dup.CopyFrom(node)
        dup.name = f"{p}_op"
        dup.input[0], dup.input[1] = f"{p}_xdq", f"{p}_wdq"
        del dup.output[:]
        dup.output.append(f"{p}_y")
        aug.graph.node.extend([
            helper.make_node("QuantizeLinear", [lay.input, f"{p}_xs", f"{p}_xz"], [f"{p}_xq"], name=f"{p}_q"),
            helper.make_node("DequantizeLinear", [f"{p}_xq", f"{p}_xs", f"{p}_xz"], [f"{p}_xdq"], name=f"{p}_dq"),
            helper.make_node("DequantizeLinear", [f"{p}_wq", f"{p}_ws", f"{p}_wz"], [f"{p}_wdq"], name=f"{p}_wdqn", **kw),
            dup,
        ])
        names += [lay.output, f"{p}_y"]
    # the duplicates read tensors produced earlier; appending keeps the graph topologically sorted
    # only if they come after their inputs, which holds at the end of the node list
    aug = _with_outputs(aug, names)
    sums: dict[str, np.ndarray] = {}

    def acc(_: int, outs: list[np.ndarray]) -> None:
        for k, lay in enumerate(layers):
            y, yq = outs[2 * k], outs[2 * k + 1]
            d = np.moveaxis(yq - y, lay.out_axis, 0).reshape(y.shape[lay.out_axis], -1).mean(axis=1)
            sums[lay.node] = sums.get(lay.node, 0) + d.astype(np.float64)

    _run_all(aug, data.samples, names, acc)
    n = max(len(data.samples), 1)
    return {k: v / n for k, v in sums.items()}


# --- evaluation -------------------------------------------------------------------------------


def evaluate(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, data: CalibrationSet,
             float_outputs: Sequence[Sequence[np.ndarray]] | None = None) -> Evaluation:
    ref = list(float_outputs) if float_outputs is not None else _run_all(float_proto, data.samples)
    got = _run_all(quant_proto, data.samples)
    names = [o.name for o in float_proto.graph.output]
    cmp = vfy.compare_outputs(ref, got, names, vfy.Tolerance())
    # output scale: the scale of the Q that writes the first output, if any
    out_scale = _output_scale(quant_proto)
    agreement = float_top1 = quant_top1 = None
    first_ref = np.concatenate([r[0].reshape(1, -1) if r[0].ndim <= 2 and r[0].shape[0] == 1 else r[0].reshape(r[0].shape[0], -1) for r in ref])
    first_got = np.concatenate([q[0].reshape(first_ref.shape[0] // len(ref), -1) for q in got])
    if first_ref.ndim == 2 and first_ref.shape[1] > 1 and first_ref.shape == first_got.shape:
        ar, aq = first_ref.argmax(1), first_got.argmax(1)
        agreement = float(np.mean(ar == aq) * 100)
        labels = data.labels
        if labels is not None and len(labels) == len(ar):
            float_top1 = float(np.mean(ar == labels) * 100)
            quant_top1 = float(np.mean(aq == labels) * 100)
    return Evaluation(len(data), cmp.sqnr_db, cmp.max_abs, None if out_scale is None else cmp.max_abs / out_scale,
                      agreement, float_top1, quant_top1)


def _output_scale(proto: onnx.ModelProto) -> float | None:
    g = _Graph(proto)
    out = proto.graph.output[0].name
    node = g.producer.get(out)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    return float(np.asarray(g.consts[node.input[1]]).ravel()[0])


def sensitivity(float_proto: onnx.ModelProto, plan: Plan, cal: Calibration, config: QuantConfig, data: CalibrationSet,
                float_outputs: Sequence[Sequence[np.ndarray]],
                progress: Callable[[str, int, int], None] | None = None) -> tuple[LayerSensitivity, ...]:
    """SQNR of the model outputs with only one layer quantized, for every layer in ``plan``."""
    names = [o.name for o in float_proto.graph.output]
    out: list[LayerSensitivity] = []
    for k, lay in enumerate(plan.layers):
        single = make_plan(float_proto, only=[lay.node])
        built = build(float_proto, single, cal, dataclasses.replace(config, bias_correction=False))
        got = _run_all(built.model, data.samples)
        cmp = vfy.compare_outputs(float_outputs, got, names, vfy.Tolerance())
        out.append(LayerSensitivity(lay.node, lay.op, cmp.sqnr_db))
        if progress:
            progress("sensitivity", k + 1, len(plan.layers))
    return tuple(out)


# --- the whole flow ---------------------------------------------------------------------------


def _fold_batchnorm(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold BatchNormalization into adjacent convs first (exact), so Conv -> Relu fusion sees them."""
    if not any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        return proto, 0
    from edgec.passes_api import registry

    result = registry.create("fold-bn")(eir.from_proto(proto))
    out = eir.to_proto(result.model)
    return out, sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization") - sum(
        1 for n in out.graph.node if n.op_type == "BatchNormalization")


def _pad_channels(proto: onnx.ModelProto, data: CalibrationSet) -> tuple[onnx.ModelProto, tuple[str, ...], dict[str, str]]:
    """:func:`edgec.passes._quant_layout.pad_channels`, kept only if onnxruntime agrees on the calibration data."""
    from edgec.passes._quant_layout import pad_channels

    out, what = pad_channels(proto)
    changed = what.inputs + what.depthwise
    if not changed:
        return proto, (), {}
    probe = data.samples[:2]
    names = [o.name for o in proto.graph.output]
    cmp = vfy.compare_outputs(_run_all(proto, probe), _run_all(out, probe), names, vfy.Tolerance())
    return (out, changed, dict(what.aliases)) if cmp.passed else (proto, (), {})


def _build_with_bias(proto: onnx.ModelProto, plan: Plan, cal: Calibration, config: QuantConfig, data: CalibrationSet) -> tuple[Built, int]:
    if not config.bias_correction:
        return build(proto, plan, cal, config), 0
    deltas = bias_deltas(proto, plan, cal, config, data)
    return build(proto, plan, cal, config, deltas), len(deltas)


def quantize_model(
    model: onnx.ModelProto | ir.Model,
    calibration: CalibrationSource | CalibrationSet,
    config: QuantConfig = QuantConfig(),
    *,
    evaluation: CalibrationSource | CalibrationSet | None = None,
    with_sensitivity: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize ``model`` to QDQ int8 and verify it against the float model.

    ``evaluation`` (default: the calibration data) is what the SQNR / top-1 report and the
    ``max_drop`` budget are measured on.  Raises :class:`InputError` for empty or misshapen
    calibration data, an already-quantized model or one with nothing to quantize.
    """
    proto = model if isinstance(model, onnx.ModelProto) else eir.to_proto(model)
    check_quantizable(proto)
    proto, folded = _fold_batchnorm(proto)
    proto = _named(proto)
    specs = vfy.input_specs(proto)
    data = calibration if isinstance(calibration, CalibrationSet) else calibration.load(specs, config.max_samples)
    data.validate(specs)
    data = data.take(config.max_samples)
    from edgec.passes._quant_layout import spatial_mean_to_gap

    proto, _pools = spatial_mean_to_gap(proto)
    padded: tuple[str, ...] = ()
    unpadded, aliases = proto, {}
    if config.pad_channels:
        proto, padded, aliases = _pad_channels(proto, data)
    if evaluation is None:
        eval_data = data
    else:
        eval_data = evaluation if isinstance(evaluation, CalibrationSet) else evaluation.load(specs)
        eval_data.validate(specs)
    plan = make_plan(proto, config.float_layers)
    if not plan.layers:
        reasons = "; ".join(f"{n}: {r}" for n, r in plan.rejected[:3])
        raise InputError(
            "the model has no quantizable layer (Conv, Gemm or MatMul with constant float weights)"
            + (f" ({reasons})" if reasons else ""),
            "nothing to quantize; the float model is already what you would get",
        )
    # ranges come from the unpadded model (the padded channels' zeros would skew the histograms)
    cal = calibrate(unpadded, [aliases.get(t, t) for t in plan.tensors], data, config, progress)
    if aliases:
        cal = dataclasses.replace(cal, ranges={**cal.ranges, **{t: cal.ranges[o] for t, o in aliases.items() if o in cal.ranges}})
    float_eval = _run_all(proto, eval_data.samples)
    built, corrected = _build_with_bias(proto, plan, cal, config, data)
    report_eval = evaluate(proto, built.model, eval_data, float_eval)
    sens: tuple[LayerSensitivity, ...] = ()
    if with_sensitivity or config.max_drop is not None or config.target_sqnr_db is not None:
        sens = sensitivity(proto, plan, cal, config, data if len(data) <= 32 else data.take(32), _run_all(proto, (data if len(data) <= 32 else data.take(32)).samples), progress)
    float_layers = list(config.float_layers)
    if config.target_sqnr_db is not None and report_eval.sqnr_db < config.target_sqnr_db:
        noise = {s.node: 10.0 ** (-s.sqnr_db / 10.0) for s in sens if math.isfinite(s.sqnr_db)}
        order = [s.node for s in sorted(sens, key=lambda s: s.sqnr_db) if s.node in noise]
        target = 10.0 ** (-config.target_sqnr_db / 10.0)
        done = 0
        while report_eval.sqnr_db < config.target_sqnr_db and done < len(order):
            measured = 10.0 ** (-report_eval.sqnr_db / 10.0)
            left = sum(noise[n] for n in order[done:]) or 1.0
            k = done + 1
            while k < len(order) and measured * sum(noise[n] for n in order[k:]) / left > target:
                k += 1
            candidate = make_plan(proto, [*float_layers, *order[:k]])
            while not candidate.layers and k > done + 1:  # keep at least one int8 layer
                k -= 1
                candidate = make_plan(proto, [*float_layers, *order[:k]])
            if not candidate.layers:
                break  # the report says the target is not met
            done, plan = k, candidate
            built, corrected = _build_with_bias(proto, plan, cal, config, data)
            report_eval = evaluate(proto, built.model, eval_data, float_eval)
            if progress:
                progress("SQNR target", done, len(order))
        float_layers += order[:done]
    if config.max_drop is not None:
        order = [s.node for s in sorted(sens, key=lambda s: s.sqnr_db) if s.node not in float_layers]
        while report_eval.drop is not None and report_eval.drop > config.max_drop and order:
            candidate = make_plan(proto, [*float_layers, order[0]])
            if not candidate.layers:
                break  # keep at least one int8 layer; the report says the budget is not met
            float_layers.append(order.pop(0))
            plan = candidate
            built, corrected = _build_with_bias(proto, plan, cal, config, data)
            report_eval = evaluate(proto, built.model, eval_data, float_eval)
            if progress:
                progress("mixed precision", len(float_layers), len(float_layers) + len(order))
    all_layers = [n.name for n in proto.graph.node if n.op_type in ANCHORS]
    quantized = tuple(lay.node for lay in plan.layers)
    return QuantizeReport(
        model=built.model,
        config=config,
        calibration_description=data.description,
        calibration_samples=len(data),
        layers_quantized=quantized,
        layers_float=tuple(n for n in all_layers if n not in quantized),
        tensors_quantized=len(plan.tensors),
        activations_removed=built.activations_removed,
        bias_corrected=corrected,
        evaluation=report_eval,
        sensitivity=sens,
        rejected=plan.rejected,
        batchnorms_folded=folded,
        channels_padded=padded,
    )


# --- the pass ---------------------------------------------------------------------------------


def _parse_bool(v: str) -> bool:
    low = str(v).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


@register_pass
class Quantize(Pass):
    """int8 QDQ quantization as a pipeline pass (see the module docstring).

    The pipeline's random-input check is loose by design (``tolerance``: quantization error on
    inputs that do not look like the calibration data); the pass checks itself on the
    calibration data and raises :class:`EquivalenceError` when the output SQNR falls below
    ``config.min_sqnr_db``.
    """

    name = "quantize"
    summary = "post-training int8 QDQ quantization (needs --calib DIR or --calib-dataset NAME)"
    rewrites_in_place = False
    tolerance = vfy.Tolerance(rtol=0.5, atol=1e-2)
    options = (
        PassOption("--calib", "calib", "folder of images or .npy files for quantization", Path, "DIR"),
        PassOption("--calib-dataset", "calib_dataset", "built-in calibration dataset (digits, photos)", str, "NAME"),
        PassOption("--quant-method", "method", "calibration: minmax, percentile, entropy, mse", str, "METHOD"),
        PassOption("--quant-activations", "activations", "uint8 (asymmetric) or int8 (symmetric)", str, "TYPE"),
        PassOption("--quant-per-channel", "per_channel", "per-channel weight scales (true/false)", _parse_bool, "BOOL"),
    )

    def __init__(self, calibration: CalibrationSource | CalibrationSet | None = None, config: QuantConfig = QuantConfig()) -> None:
        super().__init__()
        self.calibration = calibration
        self.config = config
        self.report: QuantizeReport | None = None

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> Quantize:
        calib, dataset = values.get("calib"), values.get("calib_dataset")
        source = source_for(calib, dataset) if calib is not None or dataset is not None else None
        fields = {k: values[k] for k in ("method", "activations", "per_channel") if values.get(k) is not None}
        return cls(source, QuantConfig(**fields))

    def call(self, model: ir.Model) -> PassResult:
        if self.calibration is None:
            raise InputError(
                "the quantize pass needs calibration data",
                f"add --calib DIR or --calib-dataset NAME (built-in: digits, photos); or use `edgec quantize`",
            )
        report = quantize_model(model, self.calibration, self.config)
        self.report = report
        stats = PassStats()
        stats.count("layers quantized", len(report.layers_quantized))
        stats.count("tensors quantized", report.tensors_quantized)
        if report.bias_corrected:
            stats.count("biases corrected", report.bias_corrected)
        for node, reason in report.rejected:
            stats.reject("quantize", node, reason)
        ev = report.evaluation
        stats.note(f"SQNR {ev.sqnr_db:.1f} dB vs float on {ev.samples} calibration samples ({report.calibration_description})")
        if ev.sqnr_db < self.config.min_sqnr_db:
            raise EquivalenceError(
                f"quantized model's SQNR {ev.sqnr_db:.1f} dB is below {self.config.min_sqnr_db} dB",
                "try --quant-method percentile or entropy, more calibration data, or `edgec quantize --max-drop`",
            )
        return PassResult(eir.from_proto(report.model), True, stats)

    def __repr__(self) -> str:
        return f"Quantize({self.config})"


__all__ = [
    "BuiltinDataset",
    "Calibration",
    "Evaluation",
    "LayerSensitivity",
    "Plan",
    "QuantConfig",
    "QuantizeReport",
    "Quantize",
    "quantize_model",
    "make_plan",
    "calibrate",
    "build",
    "evaluate",
    "sensitivity",
]
