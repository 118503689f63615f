"""Exact channel padding that lets onnxruntime run int8 convolutions on its fast kernels.

onnxruntime's x86/ARM int8 convolutions (MLAS "symmetric" kernels, used for int8 weights with
zero point 0) need, for a regular convolution, input channels that are a multiple of 4, and for
a depthwise convolution a channel count that is a multiple of 16 (8 on ARM64); other shapes fall
back to a generic im2col / depthwise path that is slower than the float32 NCHWc kernels.  Both
paddings below add channels whose contribution is exactly zero, so the float model computes the
same outputs (the pass checks this with onnxruntime) and only the int8 kernels change.

Input channels of a Conv that reads a graph input (the stem: RGB has 3 channels)
    ``y = conv(x, W) + b`` with ``x`` of ``C`` channels.  Append ``P`` zero channels to the
    input (``Pad`` on axis 1) and ``P`` zero input channels to ``W``:
    ``conv([x, 0], [W, W']) = conv(x, W) + conv(0, W') = conv(x, W)`` for any ``W'``; ``W' = 0``.
    The Pad is inserted in float before the input's QuantizeLinear; once the QDQ model is built,
    :func:`pad_after_quantize` moves it after the QuantizeLinear (``Q(0)`` is the zero point, which
    reads back as 0), so it pads uint8 values.

Depthwise channels of ``A -> [act] -> D -> [act] -> B``
    ``A`` a Conv (groups 1) with ``C`` output channels, ``D`` a depthwise Conv (``groups = C``),
    ``B`` a Conv (groups 1) that reads only ``D``'s output, each intermediate tensor read by one
    node.  Pad ``C`` to ``C' = ceil(C / m) * m``: ``A`` gets ``C' - C`` extra filters (zero weights
    and bias), ``D`` extra groups (zero kernels and bias) and ``groups = C'``, ``B`` extra
    zero input channels.  Whatever values the extra channels hold (``act(0)`` may be non-zero),
    ``B`` multiplies them by 0, and the original channels see exactly the same inputs.  Compute
    grows by ``C'/C`` in the three layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: activations allowed between the padded convolutions (element-wise, one input)
_ELEMENTWISE = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh")


@dataclasses.dataclass(frozen=True)
class PaddedChannels:
    """What :func:`pad_channels` changed: stem convs whose input was padded, depthwise blocks, and
    ``aliases``: (new padded tensor, the original tensor it pads), for calibrating on the original."""

    inputs: tuple[str, ...]
    depthwise: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_group(node: onnx.NodeProto, value: int) -> None:
    for a in node.attribute:
        if a.name == "group":
            a.i = value
            return
    node.attribute.append(helper.make_attribute("group", value))


def pad_channels(proto: onnx.ModelProto, input_multiple: int = 4, depthwise_multiple: int = 16) -> tuple[onnx.ModelProto, PaddedChannels]:
    """A copy of ``proto`` with the paddings of the module docstring applied (float model in, float model out).

    Nodes must have unique names.  Only constant initializer weights are touched; anything
    that does not match exactly is left alone.  Every tensor of ``proto`` keeps its name (the
    padded ones hold extra channels); the padded stem inputs are new tensors (``aliases``).
    Calibrate activation ranges on ``proto``, not on the result: the extra channels are zeros
    that would skew percentile and entropy histograms.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    arrays = {n: numpy_helper.to_array(t) for n, t in inits.items()}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in g.node:
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
        for o in node.output:
            producer[o] = node
    graph_inputs = {i.name for i in g.input if i.name not in inits}
    graph_outputs = {o.name for o in g.output}
    used_names = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    weight_uses = {name: len(consumers.get(name, [])) for name in inits}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    def set_array(node: onnx.NodeProto, idx: int, value: np.ndarray) -> None:
        name = fresh(f"{node.input[idx]}_padded")
        g.initializer.append(numpy_helper.from_array(value, name))
        arrays[name] = value
        node.input[idx] = name

    def conv_ok(node: onnx.NodeProto) -> bool:
        return (node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in arrays
                and arrays[node.input[1]].ndim == 4 and arrays[node.input[1]].dtype == np.float32
                and (len(node.input) < 3 or not node.input[2] or node.input[2] in arrays))

    def only_reader(t: str) -> onnx.NodeProto | None:
        users = consumers.get(t, [])
        return users[0] if len(users) == 1 and t not in graph_outputs else None

    def through_act(t: str) -> tuple[str, onnx.NodeProto | None]:
        """Skip one element-wise activation that is ``t``'s only reader."""
        user = only_reader(t)
        if user is not None and user.op_type in _ELEMENTWISE and user.input[0] == t:
            return user.output[0], user
        return t, None

    padded_inputs: list[str] = []
    padded_dw: list[str] = []
    aliases: list[tuple[str, str]] = []
    for node in list(g.node):
        if not conv_ok(node) or _attr(node, "group", 1) != 1:
            continue
        x = node.input[0]
        w = arrays[node.input[1]]
        c = w.shape[1]
        # 1. the stem: input channels of a conv that is the only reader of a graph input
        if x in graph_inputs and only_reader(x) is node and c % input_multiple and weight_uses.get(node.input[1]) == 1:
            p = -c % input_multiple
            pads = fresh(f"{node.name}_channel_pads")
            g.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, p, 0, 0], np.int64), pads))
            xp = fresh(f"{x}_channels{c + p}")
            pad_node = helper.make_node("Pad", [x, pads], [xp], name=fresh(f"{node.name}_channel_pad"), mode="constant")
            g.node.insert(list(g.node).index(node), pad_node)
            node.input[0] = xp
            aliases.append((xp, x))
            set_array(node, 1, np.concatenate([w, np.zeros((w.shape[0], p, *w.shape[2:]), w.dtype)], axis=1))
            padded_inputs.append(node.name)
        # 2. A -> [act] -> depthwise D -> [act] -> B
        ca = w.shape[0]
        if ca % depthwise_multiple == 0:
            continue
        t, _ = through_act(node.output[0])
        d = only_reader(t)
        if d is None or not conv_ok(d) or d.input[0] != t or _attr(d, "group", 1) != ca or arrays[d.input[1]].shape[:2] != (ca, 1):
            continue
        t2, _ = through_act(d.output[0])
        b = only_reader(t2)
        if b is None or not conv_ok(b) or b.input[0] != t2 or _attr(b, "group", 1) != 1 or arrays[b.input[1]].shape[1] != ca:
            continue
        if any(weight_uses.get(n.input[k], 1) != 1 for n in (node, d, b) for k in (1, 2) if len(n.input) > k and n.input[k]):
            continue  # shared weights: padding one reader would change the other
        p = -ca % depthwise_multiple
        wa = arrays[node.input[1]]
        set_array(node, 1, np.concatenate([wa, np.zeros((p, *wa.shape[1:]), wa.dtype)], axis=0))
        wd = arrays[d.input[1]]
        set_array(d, 1, np.concatenate([wd, np.zeros((p, *wd.shape[1:]), wd.dtype)], axis=0))
        for conv in (node, d):
            if len(conv.input) > 2 and conv.input[2]:
                bias = arrays[conv.input[2]]
                set_array(conv, 2, np.concatenate([bias, np.zeros(p, bias.dtype)]))
        _set_group(d, ca + p)
        wb = arrays[b.input[1]]
        set_array(b, 1, np.concatenate([wb, np.zeros((wb.shape[0], p, *wb.shape[2:]), wb.dtype)], axis=1))
        padded_dw.append(d.name)
    if padded_inputs or padded_dw:
        # drop the replaced initializers and stale value_info (channel counts changed)
        live = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name in live or i.name in {x.name for x in g.input}]
        del g.initializer[:]
        g.initializer.extend(keep)
        del g.value_info[:]
    return out, PaddedChannels(tuple(padded_inputs), tuple(padded_dw), tuple(aliases))


def spatial_mean_to_gap(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """``ReduceMean(x, axes={2, 3}, keepdims=1)`` of a 4-d ``x`` -> ``GlobalAveragePool(x)`` (the same
    numbers: the mean over H and W per (n, c)), so the pooling head runs as onnxruntime's
    QLinearGlobalAveragePool instead of dequantize -> float ReduceMean -> quantize."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in [*inferred.graph.value_info, *inferred.graph.input]:
            if vi.type.tensor_type.HasField("shape"):
                ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    except Exception:  # noqa: BLE001 - no shapes, no rewrite
        return proto, ()
    changed: list[str] = []
    for node in g.node:
        if node.op_type != "ReduceMean" or _attr(node, "keepdims", 1) != 1 or ranks.get(node.input[0]) != 4:
            continue
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in consts:
                continue
            axes = [int(a) for a in np.asarray(consts[node.input[1]]).ravel()]
        else:
            axes = list(_attr(node, "axes", []))
        if sorted(a % 4 for a in axes) != [2, 3]:
            continue
        del node.input[1:]
        del node.attribute[:]
        node.op_type = "GlobalAveragePool"
        changed.append(node.name)
    return (out, tuple(changed)) if changed else (proto, ())


def pad_after_quantize(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``Pad(x, constant 0) -> QuantizeLinear`` -> ``QuantizeLinear(x) -> Pad(constant = zero point)``.

    Exact: ``Q(0) = clamp(round(0 / s) + z) = z``, and Q is element-wise, so quantizing the padded
    tensor equals padding the quantized one with ``z``.  The quantize then reads the unpadded
    tensor (3 of 4 stem channels) and the pad moves 1-byte instead of 4-byte values; with the
    pad in front, onnxruntime ran mcunet's int8 graph about 7 % slower.  Applies to a per-tensor
    Q that is the only reader of a constant-mode Pad with a zero (or absent) pad value.
    """
    g = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            if i:
                readers.setdefault(i, []).append(node)
    outputs = {o.name for o in g.output}
    moves: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for pad in g.node:
        if pad.op_type != "Pad" or _attr(pad, "mode", b"constant") not in (b"constant", "constant"):
            continue
        if len(pad.input) > 2 and pad.input[2] and (pad.input[2] not in consts or np.any(consts[pad.input[2]] != 0)):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # axes input: keep it simple
        users = readers.get(pad.output[0], [])
        if len(users) != 1 or pad.output[0] in outputs or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        if len(q.input) < 3 or q.input[1] not in consts or consts[q.input[1]].size != 1 or q.input[2] not in consts:
            continue
        moves.append((pad, q))
    if not moves:
        return proto, 0
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    by_name = {n.name: n for n in g.node}
    for pad0, q0 in moves:
        pad, q = by_name[pad0.name], by_name[q0.name]
        x, qout = pad.input[0], q.output[0]
        mid = f"{qout}_unpadded"
        q.input[0], q.output[0] = x, mid
        pads = list(pad.input[1:2])
        del pad.input[:]
        pad.input.extend([mid, *pads, q.input[2]])
        pad.output[0] = qout
        nodes = [n for n in g.node if n.name != pad.name]
        nodes.insert(next(i for i, n in enumerate(nodes) if n.name == q.name) + 1, pad)
        del g.node[:]
        g.node.extend(nodes)
    return out, len(moves)
