"""Static analysis of an ONNX model: op histogram, parameters, MACs, activation sizes, peak memory.

Shapes come from ONNX shape inference on static shapes (symbolic batch dimensions are set to 1,
other symbolic dimensions must be given in ``input_shapes``).

MAC conventions (one multiply-accumulate = one "MAC"; bias additions are not counted):

- ``Conv``: ``numel(Y) * (C_in / groups) * prod(kernel)``; stride, padding and dilation enter through
  ``numel(Y)``, groups through the weight's second dimension ``C_in / groups``.
- ``ConvTranspose``: ``numel(X) * (C_out / groups) * prod(kernel)`` (every input pixel scatters a
  kernel-sized window into each output channel of its group).
- ``Gemm``: ``M * N * K``; ``MatMul``: ``numel(Y) * K`` (batched and broadcast).
- Window pooling (``MaxPool``, ``AveragePool``, ``LpPool``): ``numel(Y) * prod(kernel)``: each element
  of each window is one compare or add, counted as one MAC-equivalent.  Global pooling and
  ``Reduce*``: ``numel(X)``.
- Elementwise ops (activations, ``Add``/``Mul``/..., ``BatchNormalization``, ``Clip``, quantize and
  dequantize, normalizations, ``Softmax``): ``numel(Y)``, one MAC-equivalent per output element.
- Data movement (``Reshape``, ``Concat``, ``Slice``, ``Transpose``, ``Pad``, ``Shape``, ...): 0.

Parameters are the elements of the initializers (and ``Constant`` nodes); a node's ``params`` are
those of the weights it reads.  Activations are every tensor that depends on a graph input; their
memory is planned by :mod:`edgec.memory` in graph (topological) order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgec import memory
from edgec.errors import InputError

ELEMENTWISE = frozenset(
    """Relu Clip Sigmoid Tanh HardSigmoid HardSwish LeakyRelu PRelu Elu Selu Celu Gelu Mish Softplus Softsign
    Neg Abs Exp Log Sqrt Reciprocal Floor Ceil Round Sign Erf Sin Cos Not Add Sub Mul Div Pow Max Min Sum Mean
    Where Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor BatchNormalization InstanceNormalization
    LayerNormalization GroupNormalization Softmax LogSoftmax QuantizeLinear DequantizeLinear Cast ThresholdedRelu
    Shrink Mod BitShift""".split()
)
WINDOW_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
GLOBAL_REDUCE = frozenset(
    {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
     "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}
)

Shape = tuple[int, ...]


def numel(shape: Sequence[int] | None) -> int:
    return 0 if shape is None else math.prod(int(d) for d in shape)


def node_macs(op_type: str, attrs: Mapping[str, object], in_shapes: Sequence[Shape | None],
              out_shapes: Sequence[Shape | None]) -> int:
    """MACs of one node from its static input and output shapes (see the module docstring)."""
    y = out_shapes[0] if out_shapes else None
    x = in_shapes[0] if in_shapes else None
    if op_type == "Conv":
        w = in_shapes[1]
        return numel(y) * numel(w[1:]) if w is not None and y is not None else 0
    if op_type == "ConvTranspose":
        w = in_shapes[1]
        return numel(x) * numel(w[1:]) if w is not None and x is not None else 0
    if op_type == "Gemm":
        if x is None or y is None:
            return 0
        k = x[0] if attrs.get("transA", 0) else x[1]
        return numel(y) * int(k)
    if op_type == "MatMul":
        if x is None or y is None:
            return 0
        return numel(y) * int(x[-1])
    if op_type in WINDOW_POOLS:
        kernel = attrs.get("kernel_shape") or ()
        return numel(y) * math.prod(int(k) for k in kernel)  # type: ignore[union-attr]
    if op_type in GLOBAL_REDUCE:
        return numel(x)
    if op_type in ELEMENTWISE:
        return numel(y)
    return 0


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """A tensor of the graph with its static shape and element size."""

    name: str
    shape: Shape | None
    dtype: str
    itemsize: int
    kind: str  # "input", "activation", "output", "weight"

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """One node: its shapes, MACs, weights and output size."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_shapes: tuple[Shape | None, ...]
    output_shapes: tuple[Shape | None, ...]
    macs: int
    params: int
    output_bytes: int
    constant: bool  # computes only from weights (folded by constant-fold; not an activation)


@dataclasses.dataclass(frozen=True)
class ModelAnalysis:
    """The result of :func:`analyze`."""

    nodes: tuple[NodeRecord, ...]
    tensors: tuple[TensorRecord, ...]
    op_histogram: tuple[tuple[str, int], ...]
    params: int
    param_bytes: int
    macs: int
    schedule: memory.Schedule
    memory_fp32: memory.MemoryPlan
    memory_int8: memory.MemoryPlan

    @property
    def activation_tensors(self) -> tuple[TensorRecord, ...]:
        return tuple(t for t in self.tensors if t.kind != "weight")

    def tensor(self, name: str) -> TensorRecord:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        return {
            "op_histogram": dict(self.op_histogram),
            "params": self.params,
            "param_bytes": self.param_bytes,
            "macs": self.macs,
            "peak_activation_bytes": {"float32": self.memory_fp32.peak_bytes, "int8": self.memory_int8.peak_bytes},
            "arena_bytes": {"float32": self.memory_fp32.arena_bytes, "int8": self.memory_int8.arena_bytes},
            "nodes": [
                {"name": n.name, "op": n.op_type, "output_shapes": [list(s) if s else None for s in n.output_shapes],
                 "macs": n.macs, "params": n.params, "output_bytes": n.output_bytes}
                for n in self.nodes
            ],
            "activations": [
                {"name": t.name, "shape": list(t.shape) if t.shape else None, "dtype": t.dtype, "bytes": t.nbytes}
                for t in self.activation_tensors
            ],
        }


def _to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        p = onnx.ModelProto()
        p.CopyFrom(model)
        return p
    return ir.serde.serialize_model(model)


def _fix_input_shapes(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    inits = {i.name for i in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if input_shapes and vi.name in input_shapes:
            given = list(input_shapes[vi.name])
            if len(given) != len(dims):
                raise InputError(f"input {vi.name!r} has rank {len(dims)}, the given shape {given} rank {len(given)}")
            for d, v in zip(dims, given):
                d.ClearField("dim_param")
                d.dim_value = int(v)
            continue
        for k, d in enumerate(dims):
            if not d.HasField("dim_value"):
                if k == 0:
                    d.ClearField("dim_param")
                    d.dim_value = 1
                else:
                    raise InputError(
                        f"input {vi.name!r} has a dynamic dimension {k} ({d.dim_param or '?'})",
                        "give static shapes, e.g. --shape x=1,3,224,224",
                    )


def infer_shapes(model: ir.Model | onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """A copy of the model with static input shapes and inferred value_info."""
    proto = _to_proto(model)
    _fix_input_shapes(proto, input_shapes)
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise InputError(f"ONNX shape inference failed: {exc}", "check the model with onnx.checker") from None


def value_types(proto: onnx.ModelProto) -> dict[str, tuple[Shape | None, int]]:
    found: dict[str, tuple[Shape | None, int]] = {}
    for vi in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        tt = vi.type.tensor_type
        shape: Shape | None = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(int(d.dim_value) for d in tt.shape.dim)
        if vi.name not in found or found[vi.name][0] is None:
            found[vi.name] = (shape, tt.elem_type)
    for init in proto.graph.initializer:
        found[init.name] = (tuple(int(d) for d in init.dims), init.data_type)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    found[node.output[0]] = (tuple(int(d) for d in a.t.dims), a.t.data_type)
    return found


@functools.lru_cache(maxsize=64)
def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:
        return 4


@functools.lru_cache(maxsize=64)
def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return "unknown"


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _depthwise_channels(node: onnx.NodeProto, in_shapes: Sequence[Shape | None], out_shapes: Sequence[Shape | None]) -> int:
    if node.op_type != "Conv" or len(in_shapes) < 2 or in_shapes[0] is None or out_shapes[0] is None:
        return 0
    group = int(attributes(node).get("group", 1))  # type: ignore[call-overload]
    c_in, c_out = in_shapes[0][1], out_shapes[0][1]
    return int(c_in) if group == c_in == c_out and group > 1 else 0


def analyze_proto(proto: onnx.ModelProto, planner: memory.PlannerOptions = memory.PlannerOptions()) -> ModelAnalysis:
    """:func:`analyze` on a model whose shapes are already inferred (no copy, no inference)."""
    graph = proto.graph
    types = value_types(proto)
    inits = {i.name for i in graph.initializer}
    graph_inputs = tuple(vi.name for vi in graph.input if vi.name not in inits)
    graph_outputs = tuple(vi.name for vi in graph.output)
    constant: set[str] = set(inits)
    for node in graph.node:
        if node.op_type == "Constant" or (all(i == "" or i in constant for i in node.input) and node.input):
            constant.update(o for o in node.output if o)
    weight_elems = {n: numel(types[n][0]) for n in constant if n in types and types[n][0] is not None}

    nodes: list[NodeRecord] = []
    steps: list[memory.Step] = []
    tensors: dict[str, TensorRecord] = {}

    def record(name: str, kind: str) -> None:
        if name in tensors or not name:
            return
        shape, et = types.get(name, (None, onnx.TensorProto.FLOAT))
        tensors[name] = TensorRecord(name, shape, _dtype_name(et), _itemsize(et), kind)

    for name in graph_inputs:
        record(name, "input")
    for idx, node in enumerate(graph.node):
        in_shapes = tuple(types.get(i, (None, 0))[0] if i else None for i in node.input)
        out_shapes = tuple(types.get(o, (None, 0))[0] if o else None for o in node.output)
        is_const = bool(node.output) and all(o in constant for o in node.output if o)
        macs = 0 if is_const else node_macs(node.op_type, attributes(node), in_shapes, out_shapes)
        params = sum(weight_elems.get(i, 0) for i in dict.fromkeys(node.input) if i in inits or i in constant)
        out_bytes = 0
        for o in node.output:
            if not o:
                continue
            record(o, "weight" if o in constant else ("output" if o in graph_outputs else "activation"))
            out_bytes += tensors[o].nbytes
        nodes.append(NodeRecord(idx, node.name or f"{node.op_type}_{idx}", node.op_type, tuple(node.input),
                                tuple(node.output), in_shapes, out_shapes, macs, params, out_bytes, is_const))
        if not is_const:
            steps.append(memory.Step(node.name or f"{node.op_type}_{idx}", node.op_type,
                                     tuple(i for i in node.input if i and i not in constant),
                                     tuple(o for o in node.output if o), _depthwise_channels(node, in_shapes, out_shapes)))
    for name in constant:
        record(name, "weight")
    missing = [t.name for t in tensors.values() if t.kind != "weight" and t.shape is None]
    if missing:
        raise InputError(
            f"no static shape for tensor {missing[0]!r} (and {len(missing) - 1} more)",
            "give static input shapes; models with data-dependent shapes cannot be planned",
        )
    sched_tensors = tuple(
        memory.TensorSize(t.name, t.numel, t.itemsize, t.dtype.startswith("float") or t.dtype == "bfloat16")
        for t in tensors.values() if t.kind != "weight"
    )
    schedule = memory.Schedule(tuple(steps), sched_tensors, graph_inputs, graph_outputs)
    params = sum(numel(types[n][0]) for n in inits if n in types)
    params += sum(weight_elems.get(o, 0) for node in graph.node if node.op_type == "Constant" for o in node.output)
    param_bytes = sum(numel(types[n][0]) * _itemsize(types[n][1]) for n in inits)
    param_bytes += sum(numel(types[o][0]) * _itemsize(types[o][1])
                       for node in graph.node if node.op_type == "Constant" for o in node.output if o in types)
    hist = Counter(n.op_type for n in graph.node)
    return ModelAnalysis(
        nodes=tuple(nodes),
        tensors=tuple(tensors.values()),
        op_histogram=tuple(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        params=params,
        param_bytes=param_bytes,
        macs=sum(n.macs for n in nodes),
        schedule=schedule,
        memory_fp32=memory.plan_memory(schedule, 4, planner),
        memory_int8=memory.plan_memory(schedule, 1, planner),
    )


def analyze(model: ir.Model | onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
            planner: memory.PlannerOptions = memory.PlannerOptions()) -> ModelAnalysis:
    """Analyze ``model`` (see the module docstring for the conventions)."""
    return analyze_proto(infer_shapes(model, input_shapes), planner)
