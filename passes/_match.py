"""Matching and rewriting helpers shared by the fusion and reparameterization passes.

Nothing here depends on how a model was produced: operators are recognised by ``op_type`` and
domain, weights by being constant (an initializer that is not a graph input, or a ``Constant``
node), and a value can be absorbed into a fold only when its single consumer is the next node of
the pattern and it is not a graph output.

Weights are combined in float64 and cast back to the original dtype once, so a fold's only error
is the final rounding.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ONNX_DOMAINS and node.op_type in op_types


def const_array(value: ir.Value | None, _depth: int = 0) -> np.ndarray | None:
    """The value as a numpy array if it is a constant, else None.

    Constants are initializers, ``Constant`` nodes, and short chains of shape-only ops on them
    (Identity, Cast, CastLike, Expand, Reshape, Unsqueeze, Squeeze) as unoptimized exporters emit
    for zero biases.  An initializer that is also a graph input can be overridden at run time, so
    it is not constant.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if is_op(producer, "Constant"):
            return _constant_attr(producer)
        if producer is not None and _depth < 6:
            return _eval_shape_op(producer, _depth + 1)
    if tensor is None:
        return None
    try:
        return np.asarray(tensor.numpy())
    except Exception:  # external data that cannot be read, odd dtypes
        return None


def single_use_by(value: ir.Value, node: ir.Node) -> str | None:
    """None if ``node`` is the only reader of ``value``, else the reason it cannot be absorbed."""
    if value.is_graph_output():
        return f"{value.name} is a graph output"
    uses = value.uses()
    if len(uses) != 1 or uses[0].node is not node:
        return f"{value.name} is used by {len(uses)} nodes"
    return None


def add_initializer(graph: ir.Graph, hint: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a unique name built from ``hint``."""
    existing = set(graph.initializers)
    name, k = hint, 0
    while name in existing:
        k += 1
        name = f"{hint}_{k}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def drop_unused_initializers(graph: ir.Graph, values: Iterable[ir.Value | None]) -> None:
    """Remove initializers among ``values`` that nothing reads any more."""
    for v in values:
        if v is None or not v.is_initializer() or v.is_graph_input() or v.is_graph_output() or v.uses():
            continue
        if v.name in graph.initializers and graph.initializers[v.name] is v:
            graph.initializers.pop(v.name)


def replace_with_node(graph: ir.Graph, anchor: ir.Node, old_nodes: Sequence[ir.Node], new_nodes: Sequence[ir.Node],
                      old_value: ir.Value, new_value: ir.Value) -> None:
    """Insert ``new_nodes`` after ``anchor``, route ``old_value``'s readers (and graph output) to
    ``new_value`` (which takes its name), delete ``old_nodes`` and initializers left unread."""
    inputs = [i for n in old_nodes for i in n.inputs]
    old_name = old_value.name
    new_value.type = old_value.type if old_value.type is not None else new_value.type
    new_value.shape = old_value.shape if old_value.shape is not None else new_value.shape
    old_value.replace_all_uses_with(new_value, replace_graph_outputs=True)
    graph.insert_after(anchor, new_nodes)
    graph.remove(list(old_nodes), safe=True)
    new_value.name = old_name
    drop_unused_initializers(graph, inputs)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------
# BatchNormalization as an affine map


@dataclasses.dataclass(frozen=True)
class Affine:
    """``y[c] = scale[c] * x[c] + shift[c]`` along the channel axis (float64)."""

    scale: np.ndarray
    shift: np.ndarray


def bn_affine(node: ir.Node) -> Affine | str:
    """Inference BatchNormalization as an :class:`Affine`, or the reason it is not one."""
    if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "BatchNormalization in training mode (running statistics are used)"
    if node.attributes.get_int("training_mode", 0):
        return "BatchNormalization in training mode"
    arrays = [const_array(v) for v in node.inputs[1:5]]
    if len(arrays) < 4 or any(a is None for a in arrays):
        return "BatchNormalization parameters are not constant"
    gamma, beta, mean, var = (a.astype(np.float64).reshape(-1) for a in arrays)
    eps = node.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return Affine(scale, beta - mean * scale)


# ---------------------------------------------------------------------------------------------
# Convolutions


@dataclasses.dataclass(frozen=True)
class ConvGeom:
    """Geometry of a Conv node: per-spatial-dim kernel, strides, dilations, begin/end pads."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    groups: int

    @property
    def padded(self) -> bool:
        return any(self.pads_begin) or any(self.pads_end)

    def pads(self) -> list[int]:
        return list(self.pads_begin) + list(self.pads_end)


@dataclasses.dataclass(frozen=True)
class ConvInfo:
    """A Conv whose weight (and bias, if any) are constant."""

    node: ir.Node
    weight: np.ndarray  # [Cout, Cin/groups, k...]
    bias: np.ndarray | None  # [Cout]
    geom: ConvGeom

    @property
    def cout(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cin(self) -> int:
        return int(self.weight.shape[1]) * self.geom.groups


def conv_info(node: ir.Node) -> ConvInfo | str:
    """Constant weights and geometry of a Conv, or why it cannot be folded."""
    if not is_op(node, "Conv"):
        return f"{node.op_type} is not a Conv"
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "Conv weight is not constant"
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const_array(node.inputs[2])
        if b is None:
            return "Conv bias is not constant"
    nd = w.ndim - 2
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"Conv uses auto_pad={auto_pad}"
    kernel = tuple(node.attributes.get_ints("kernel_shape", w.shape[2:]))
    if tuple(kernel) != tuple(w.shape[2:]):
        return "kernel_shape disagrees with the weight"
    pads = tuple(node.attributes.get_ints("pads", [0] * (2 * nd))) if auto_pad == "NOTSET" else (0,) * (2 * nd)
    geom = ConvGeom(
        kernel=tuple(int(k) for k in kernel),
        strides=tuple(int(s) for s in node.attributes.get_ints("strides", [1] * nd)),
        dilations=tuple(int(d) for d in node.attributes.get_ints("dilations", [1] * nd)),
        pads_begin=tuple(int(p) for p in pads[:nd]),
        pads_end=tuple(int(p) for p in pads[nd:]),
        groups=int(node.attributes.get_int("group", 1)),
    )
    if any(p < 0 for p in pads):
        return "negative pads"
    return ConvInfo(node, w, None if b is None else b.reshape(-1), geom)


def make_conv(graph: ir.Graph, x: ir.Value, weight: np.ndarray, bias: np.ndarray | None, *, strides: Sequence[int],
              dilations: Sequence[int], pads: Sequence[int], groups: int, name: str, dtype: np.dtype) -> ir.Node:
    """A new Conv node reading ``x`` with fresh initializers (not yet inserted in the graph)."""
    w = add_initializer(graph, f"{name}.weight", weight.astype(dtype))
    inputs = [x, w]
    if bias is not None:
        inputs.append(add_initializer(graph, f"{name}.bias", bias.astype(dtype)))
    attrs = {
        "kernel_shape": [int(k) for k in weight.shape[2:]],
        "strides": [int(s) for s in strides],
        "dilations": [int(d) for d in dilations],
        "pads": [int(p) for p in pads],
        "group": int(groups),
    }
    return ir.node("Conv", inputs, attrs, name=name)


def dense_weight(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped weight [Cout, Cin/g, k...] expanded to the equivalent dense [Cout, Cin, k...]."""
    if groups == 1:
        return weight
    cout, cin_g = weight.shape[:2]
    cout_g = cout // groups
    out = np.zeros((cout, cin_g * groups, *weight.shape[2:]), dtype=weight.dtype)
    for g in range(groups):
        out[g * cout_g:(g + 1) * cout_g, g * cin_g:(g + 1) * cin_g] = weight[g * cout_g:(g + 1) * cout_g]
    return out


def group_weight(dense: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`dense_weight`: keep each group's diagonal block."""
    if groups == 1:
        return dense
    cout, cin = dense.shape[:2]
    cout_g, cin_g = cout // groups, cin // groups
    return np.concatenate(
        [dense[g * cout_g:(g + 1) * cout_g, g * cin_g:(g + 1) * cin_g] for g in range(groups)], axis=0
    )


def in_channel_index(cout: int, cin_g: int, groups: int) -> np.ndarray:
    """``idx[o, j]``: the input channel that weight element ``W[o, j]`` reads."""
    cout_g = cout // groups
    grp = np.arange(cout) // cout_g
    return grp[:, None] * cin_g + np.arange(cin_g)[None, :]


def dilate_kernel(weight: np.ndarray, dilations: Sequence[int]) -> np.ndarray:
    """Insert ``d-1`` zeros between kernel taps so a dilated kernel becomes a dense one."""
    if all(d == 1 for d in dilations):
        return weight
    k = weight.shape[2:]
    size = tuple(d * (kk - 1) + 1 for d, kk in zip(dilations, k))
    out = np.zeros(weight.shape[:2] + size, dtype=weight.dtype)
    out[(slice(None), slice(None), *(slice(None, None, d) for d in dilations))] = weight
    return out


def spatial_positions(kernel: Sequence[int]) -> Iterable[tuple[int, ...]]:
    return itertools.product(*(range(k) for k in kernel))


def channel_vector(array: np.ndarray, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """``array`` as a per-channel vector [channels] if it broadcasts against a rank-``rank``
    tensor only along ``axis`` (e.g. [C,1,1] or [1,C,1,1] or a scalar for NCHW), else None."""
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    for i, d in enumerate(shape):
        if i != axis and d != 1:
            return None
        if i == axis and d not in (1, channels):
            return None
    return np.broadcast_to(array.reshape(-1).astype(np.float64), (channels,)).copy() if array.size in (1, channels) else None


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(int(d))
    return tuple(dims)


def value_rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}->{node.outputs[0].name}"


def infer_shapes(model: ir.Model) -> None:
    """Fill in value shapes with ONNX shape inference (best effort; unknown shapes stay unknown)."""
    import logging

    import onnx_ir.passes.common as common

    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        common.ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # inference is an optimisation aid; a pattern needing a shape then rejects
        pass
    finally:
        logger.setLevel(level)


def split_const_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray, int] | None:
    """For a binary node with exactly one constant operand: (other operand, constant, its index)."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    a, b = const_array(node.inputs[0]), const_array(node.inputs[1])
    if (a is None) == (b is None):
        return None
    return (node.inputs[1], a, 0) if a is not None else (node.inputs[0], b, 1)


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    attrs = node.attributes
    try:
        if "value" in attrs:
            return np.asarray(attrs["value"].as_tensor().numpy())
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key].value, dtype=dtype)
    except Exception:
        return None
    return None


_SHAPE_OPS = ("Identity", "Cast", "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Shape", "Gather",
              "Concat", "Slice")


def _eval_shape_op(node: ir.Node, depth: int) -> np.ndarray | None:
    """Evaluate a shape-only op whose data input is constant (see :func:`const_array`)."""
    if not is_op(node, *_SHAPE_OPS) or len(node.outputs) != 1:
        return None
    if node.op_type == "Shape":  # of a statically shaped value, constant or not
        shape = static_shape(node.inputs[0])
        if shape is None:
            return None
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(shape))
        return np.array(shape[start:end] if "end" in node.attributes else shape[start:], dtype=np.int64)
    if node.op_type == "Concat":
        parts = [const_array(v, depth) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts, axis=node.attributes.get_int("axis", 0))
    a = const_array(node.inputs[0], depth)
    if a is None or a.size > 1 << 20:
        return None
    try:
        if node.op_type == "Identity":
            return a
        if node.op_type == "Cast":
            return a.astype(ir.DataType(node.attributes.get_int("to")).numpy())
        if node.op_type == "CastLike":
            like = node.inputs[1]
            if like is None or like.dtype is None:
                # unknown target type: a float constant keeps its value; folds cast to the weights' dtype
                return a if np.issubdtype(a.dtype, np.floating) else None
            return a.astype(like.dtype.numpy())
        second = const_array(node.inputs[1], depth) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if node.op_type == "Gather":
            return None if second is None else np.take(a, second.astype(np.int64), axis=node.attributes.get_int("axis", 0))
        if node.op_type == "Slice":
            args = [const_array(v, depth) if v is not None else None for v in node.inputs[1:5]]
            if any(x is None for x in args[:2]) or any(v is not None and x is None for v, x in zip(node.inputs[3:5], args[2:])):
                return None
            starts, ends = args[0].reshape(-1), args[1].reshape(-1)
            axes = args[2].reshape(-1) if len(args) > 2 and args[2] is not None else np.arange(starts.size)
            steps = args[3].reshape(-1) if len(args) > 3 and args[3] is not None else np.ones(starts.size, np.int64)
            index = [slice(None)] * a.ndim
            for st, en, ax, sp in zip(starts, ends, axes, steps):
                index[int(ax) % a.ndim] = slice(int(st), int(max(min(en, 2**62), -(2**62))), int(sp))
            return a[tuple(index)]
        if node.op_type == "Expand":
            if second is None:
                return None
            shape = tuple(int(d) for d in second.reshape(-1))
            return np.broadcast_to(a, np.broadcast_shapes(a.shape, shape)).copy()
        if node.op_type == "Reshape":
            if second is None:
                return None
            shape = [int(d) for d in second.reshape(-1)]
            if not node.attributes.get_int("allowzero", 0):
                shape = [a.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return a.reshape(shape)
        axes = second if second is not None else (
            np.array(node.attributes.get_ints("axes")) if "axes" in node.attributes else None)
        if node.op_type == "Unsqueeze":
            if axes is None:
                return None
            out = a
            rank = a.ndim + axes.size
            for ax in sorted(int(x) % rank for x in axes.reshape(-1)):
                out = np.expand_dims(out, ax)
            return out
        return np.squeeze(a) if axes is None else np.squeeze(a, tuple(int(x) % a.ndim for x in axes.reshape(-1)))
    except (ValueError, TypeError, IndexError):
        return None
