"""Fusion passes: fold BatchNormalization, constant scales, Pad, MatMul+Add, Transpose/Reshape chains.

Every fold below is exact in real arithmetic; weights are combined in float64 and rounded once.
A fold absorbs an intermediate value only when the next node of the pattern is its single reader
and it is not a graph output ("used elsewhere" is the reason given otherwise).  Patterns are
matched on ONNX operators, never on names, so models from any exporter qualify.

``fold-bn``
    BatchNormalization in inference mode is ``y[c] = s[c] x[c] + t[c]``, ``s = gamma/sqrt(var+eps)``,
    ``t = beta - mean*s``.

    - After ``Conv`` (any groups, depthwise included): ``W'[o] = s[o] W[o]``, ``b' = s*b + t``
      (``b = 0`` without bias).
    - After ``ConvTranspose`` (weight ``[Cin, Cout/g, k...]``): output channel of ``W[i, j]`` is
      ``o = (i div (Cin/g)) * (Cout/g) + j``, so ``W'[i, j] = s[o] W[i, j]``, ``b' = s*b + t``.
    - After ``Gemm`` ``Y = alpha A B + beta C``: column ``m`` of ``B`` times ``s[m]``,
      ``C' = s*(beta C) + t``, ``beta' = 1``.
    - Before ``Conv`` (BN output read only by the Conv): ``conv(s x + t) = conv(x; W'') + b''``
      with ``W''[o, j] = W[o, j] s[in(o, j)]`` and ``b'' = b + sum_{j,k} W[o, j, k] t[in(o, j)]``,
      where ``in(o, j)`` is the input channel weight ``W[o, j]`` reads.  The Conv pads ``s x + t``
      with zeros but the folded Conv pads ``x``, which would give ``t``: exact only when the Conv has
      no padding or ``t = 0`` (rejected otherwise).

``fold-scale``
    ``Mul``/``Add``/``Sub``/``Div`` by a per-channel constant ``v`` (a scalar or a shape that
    broadcasts only along the channel axis) is the affine map ``s*y + t`` with ``(s, t)`` =
    ``(v, 0)``, ``(1, v)``, ``(1, -v)`` for ``y - v``, ``(-1, v)`` for ``v - y``, ``(1/v, 0)`` for
    ``y / v``; it folds into a preceding Conv/ConvTranspose/Gemm as in ``fold-bn``, or into a
    following Conv as the "before" case (``Mul``/``Div`` always: ``0 * v = 0`` keeps zero padding;
    ``Add``/``Sub`` only without padding).

``matmul-add-to-gemm``
    ``MatMul(A, B) + C`` with 2-D ``A`` and ``B`` and ``C`` broadcastable to ``[N, M]`` is
    ``Gemm(A, B, C)`` (``alpha = beta = 1``).  ``Gemm`` needs 2-D ``A``: a batched MatMul is left alone.

``fold-pad``
    ``Pad`` (mode ``constant``, non-negative pads on spatial axes only) followed by a single reader:

    - ``Conv`` with pad value 0: the Conv's own padding is zeros, so ``pads' = pads + pad``.
    - ``AveragePool`` with pad value 0: the Pad's zeros count in the mean, which is
      ``count_include_pad=1``; exact when the pool has no padding of its own or already counts it.
    - ``MaxPool`` with pad value ``-inf``: MaxPool's padding never wins the max, like ``-inf``.
      (A zero pad is not exact for MaxPool: ``max(0, x) != x`` for negative windows.)

``cancel-transpose-reshape``
    ``Transpose(perm2) o Transpose(perm1) = Transpose(perm)`` with ``perm[i] = perm1[perm2[i]]``,
    removed when ``perm`` is the identity.  ``Reshape(s2) o R(x)`` where ``R`` is Reshape, Flatten,
    Squeeze or Unsqueeze is ``Reshape(x, s2)``: all of them keep the row-major element order, so
    only the final shape matters (``s2`` must be constant and free of ``0``, which would copy a
    dimension of the intermediate).  A Reshape to the shape its input already has is removed.

``fuse-activation``
    Decomposed activations become the single ONNX operator every backend (TVM, onnxruntime,
    TensorRT) lowers to one fused kernel: ``Clip(x + 3, 0, 6) / 6`` (or ``* 1/6``) and
    ``Relu6(x+3)/6`` written as ``Min(Max(x+3, 0), 6)`` -> ``HardSigmoid(alpha=1/6, beta=1/2)``;
    ``x * HardSigmoid(x; 1/6, 1/2)`` and ``(x * Clip(x + 3, 0, 6)) / 6`` -> ``HardSwish(x)`` (opset >= 14);
    ``Clip(x, 0, +inf)`` / ``Max(x, 0)`` -> ``Relu(x)``.

``fuse``
    Runs the recommended order to a fixed point: ``remove-identity``, ``cancel-transpose-reshape``,
    ``fold-pad``, ``reparam``, ``fuse-activation`` (before ``fold-scale`` moves the ``/6`` of a
    decomposed HardSwish into the next Conv), ``fold-bn``, ``fold-scale``, ``collapse-linear``,
    ``matmul-add-to-gemm``, ``dce``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgec.passes_api import Pass, PassOption, PassResult, PassStats, register_pass, registry

from .reparam import REASSOCIATION_TOLERANCE
from ._match import (
    Affine,
    bn_affine,
    channel_vector,
    const_array,
    conv_info,
    drop_unused_initializers,
    in_channel_index,
    infer_shapes,
    is_op,
    node_label,
    replace_with_node,
    single_use_by,
    split_const_operand,
    static_shape,
    value_rank,
)

__all__ = [
    "FoldBatchNorm",
    "FoldScale",
    "MatMulAddToGemm",
    "FoldPad",
    "CancelTransposeReshape",
    "FuseActivation",
    "Fuse",
    "FUSE_ORDER",
]

#: the order ``fuse`` runs (each name is a registered pass).
FUSE_ORDER = (
    "remove-identity",
    "cancel-transpose-reshape",
    "fold-pad",
    "reparam",
    "fuse-activation",
    "fold-bn",
    "fold-scale",
    "collapse-linear",
    "matmul-add-to-gemm",
    "dce",
)


def _attrs(node: ir.Node, **overrides) -> list[ir.Attr]:
    attrs = {k: v for k, v in node.attributes.items()}
    for attr in ir.convenience.convert_attributes(overrides):
        attrs[attr.name] = attr
    return list(attrs.values())


def _new_init(graph: ir.Graph, hint: str, array: np.ndarray) -> ir.Value:
    from ._match import add_initializer

    return add_initializer(graph, hint, array)


def _channels_of(node: ir.Node) -> tuple[int, int] | str:
    """(output channels, output rank) of a Conv/ConvTranspose/Gemm with constant weights."""
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return f"{node.op_type} weight is not constant"
    if node.op_type == "Conv":
        return int(w.shape[0]), w.ndim
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * node.attributes.get_int("group", 1), w.ndim
    if w.ndim != 2:
        return "Gemm B is not 2-D"
    return int(w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]), 2


def fold_affine_after(graph: ir.Graph, node: ir.Node, aff: Affine) -> ir.Node | str:
    """A copy of Conv/ConvTranspose/Gemm ``node`` computing ``s * node(x) + t`` per output channel."""
    w = const_array(node.inputs[1])
    if w is None:
        return f"{node.op_type} weight is not constant"
    if not np.issubdtype(w.dtype, np.floating):
        return "weights are not floating point"
    dtype = w.dtype
    third = node.inputs[2] if len(node.inputs) > 2 else None
    c = const_array(third) if third is not None else None
    if third is not None and c is None:
        return f"{node.op_type} bias is not constant"
    s, t = aff.scale, aff.shift
    w64 = w.astype(np.float64)
    label = node_label(node)
    if node.op_type == "Conv":
        w_new = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b_new = (np.zeros(w.shape[0]) if c is None else c.astype(np.float64).reshape(-1)) * s + t
        attrs = _attrs(node)
    elif node.op_type == "ConvTranspose":
        g = node.attributes.get_int("group", 1)
        cin, cout_g = w.shape[:2]
        cin_g = cin // g
        oc = (np.arange(cin) // cin_g)[:, None] * cout_g + np.arange(cout_g)[None, :]
        w_new = w64 * s[oc].reshape(oc.shape + (1,) * (w.ndim - 2))
        b_new = (np.zeros(cout_g * g) if c is None else c.astype(np.float64).reshape(-1)) * s + t
        attrs = _attrs(node)
    else:  # Gemm
        trans_b = node.attributes.get_int("transB", 0)
        w_new = w64 * (s[:, None] if trans_b else s[None, :])
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        base = np.zeros(s.shape) if c is None else beta * c.astype(np.float64)
        if base.ndim > 2:
            return "Gemm C has rank > 2"
        b_new = base * s + t
        attrs = _attrs(node, beta=1.0, alpha=float(alpha))
    inputs = [node.inputs[0], _new_init(graph, f"{label}.weight", w_new.astype(dtype)),
              _new_init(graph, f"{label}.bias", b_new.astype(dtype))]
    return ir.Node("", node.op_type, inputs, attrs, name=f"{label}_folded")


def fold_affine_before(graph: ir.Graph, conv: ir.Node, x: ir.Value, aff: Affine) -> ir.Node | str:
    """A copy of ``conv`` reading ``x`` and computing ``conv(s*x + t)`` (per input channel)."""
    info = conv_info(conv)
    if isinstance(info, str):
        return info
    if not np.issubdtype(info.weight.dtype, np.floating):
        return "weights are not floating point"
    if info.geom.padded and np.any(aff.shift != 0):
        return "the Conv pads with zeros, which would not pass through the shift: not exact at the borders"
    if aff.scale.size != info.cin:
        return "channel count mismatch"
    w = info.weight.astype(np.float64)
    idx = in_channel_index(info.cout, w.shape[1], info.geom.groups)
    w_new = w * aff.scale[idx].reshape(idx.shape + (1,) * (w.ndim - 2))
    b = np.zeros(info.cout) if info.bias is None else info.bias.astype(np.float64)
    b_new = b + (w.sum(axis=tuple(range(2, w.ndim))) * aff.shift[idx]).sum(axis=1)
    label = node_label(conv)
    inputs = [x, _new_init(graph, f"{label}.weight", w_new.astype(info.weight.dtype)),
              _new_init(graph, f"{label}.bias", b_new.astype(info.weight.dtype))]
    return ir.Node("", "Conv", inputs, _attrs(conv), name=f"{label}_folded")


_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _fold_into_producer(graph, node: ir.Node, y: ir.Value, aff_for, pattern_prefix: str, stats: PassStats) -> bool | str:
    """Try ``aff(producer(y))`` -> producer'.  ``aff_for(channels, rank)`` builds the affine map."""
    p = y.producer()
    if not is_op(p, *_PRODUCERS):
        return "no Conv/ConvTranspose/Gemm before it"
    pattern = f"{p.op_type.lower()}-{pattern_prefix}"
    why = single_use_by(y, node)
    if why is not None:
        return f"{pattern}: {p.op_type} output is used elsewhere ({why})"
    ch = _channels_of(p)
    if isinstance(ch, str):
        return f"{pattern}: {ch}"
    aff = aff_for(*ch)
    if isinstance(aff, str):
        return f"{pattern}: {aff}"
    new = fold_affine_after(graph, p, aff)
    if isinstance(new, str):
        return f"{pattern}: {new}"
    replace_with_node(graph, node, [p, node], [new], node.outputs[0], new.outputs[0])
    stats.count(pattern)
    return True


def _fold_into_consumer(graph, node: ir.Node, x: ir.Value, aff_for, pattern_prefix: str, stats: PassStats) -> bool | str:
    out = node.outputs[0]
    uses = out.uses()
    if out.is_graph_output() or len(uses) != 1 or not is_op(uses[0].node, "Conv") or uses[0].idx != 0:
        return "no single Conv reads its output"
    conv = uses[0].node
    pattern = f"{pattern_prefix}-conv"
    w = const_array(conv.inputs[1])
    if w is None:
        return f"{pattern}: Conv weight is not constant"
    cin = w.shape[1] * conv.attributes.get_int("group", 1)
    aff = aff_for(cin, w.ndim)
    if isinstance(aff, str):
        return f"{pattern}: {aff}"
    new = fold_affine_before(graph, conv, x, aff)
    if isinstance(new, str):
        return f"{pattern}: {new}"
    replace_with_node(graph, conv, [node, conv], [new], conv.outputs[0], new.outputs[0])
    stats.count(pattern)
    return True


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold BatchNormalization into an adjacent Conv/ConvTranspose/Gemm (before or after)"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        for node in list(graph):
            if node.graph is not graph or not is_op(node, "BatchNormalization"):
                continue
            aff = bn_affine(node)
            if isinstance(aff, str):
                stats.reject("bn", node_label(node), aff)
                continue

            def aff_for(channels: int, rank: int, aff=aff):
                return aff if aff.scale.size == channels else "channel count mismatch"

            x = node.inputs[0]
            after = _fold_into_producer(graph, node, x, aff_for, "bn", stats)
            if after is True:
                continue
            before = _fold_into_consumer(graph, node, x, aff_for, "bn", stats)
            if before is True:
                continue
            stats.reject("bn", node_label(node), f"{after}; {before}")
        return self.result(model, stats)


def _scale_affine(op: str, const_index: int, v: np.ndarray) -> Affine | str:
    if op == "Mul":
        return Affine(v, np.zeros_like(v))
    if op == "Add":
        return Affine(np.ones_like(v), v)
    if op == "Sub":
        return Affine(np.ones_like(v), -v) if const_index == 1 else Affine(-np.ones_like(v), v)
    if const_index == 0:
        return "constant / tensor is not linear"
    if np.any(v == 0):
        return "division by zero"
    return Affine(1.0 / v, np.zeros_like(v))


@register_pass
class FoldScale(Pass):
    name = "fold-scale"
    summary = "fold Mul/Add/Sub/Div by a per-channel constant into an adjacent Conv/ConvTranspose/Gemm"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        for node in list(graph):
            if node.graph is not graph or not is_op(node, "Mul", "Add", "Sub", "Div"):
                continue
            split = split_const_operand(node)
            if split is None:
                continue
            y, const, ci = split
            if not np.issubdtype(const.dtype, np.floating):
                continue
            op = node.op_type

            def aff_for(channels: int, rank: int, const=const, ci=ci, op=op):
                v = channel_vector(const, rank, channels)
                if v is None:
                    return f"constant of shape {list(const.shape)} is not per-channel"
                return _scale_affine(op, ci, v)

            prefix = op.lower()
            after = _fold_into_producer(graph, node, y, aff_for, prefix, stats)
            if after is True:
                continue
            if op == "Div" and ci == 0:
                continue
            before = _fold_into_consumer(graph, node, y, aff_for, prefix, stats)
            if before is True:
                continue
            if is_op(y.producer(), *_PRODUCERS) or (not before.startswith("no single")):
                stats.reject(prefix, node_label(node), f"{after}; {before}")
        return self.result(model, stats)


@register_pass
class MatMulAddToGemm(Pass):
    name = "matmul-add-to-gemm"
    summary = "MatMul(A, B) + C with 2-D A and B -> Gemm"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        infer_shapes(model)
        for node in list(graph):
            if node.graph is not graph or not is_op(node, "Add"):
                continue
            mm_side = [i for i, v in enumerate(node.inputs) if v is not None and is_op(v.producer(), "MatMul")]
            if not mm_side:
                continue
            i = mm_side[0]
            mm_out, c = node.inputs[i], node.inputs[1 - i]
            mm = mm_out.producer()
            label = node_label(mm)
            why = single_use_by(mm_out, node)
            if why is not None:
                stats.reject("matmul-add", label, f"MatMul output is used elsewhere ({why})")
                continue
            a, b = mm.inputs
            ra, rb, rc = value_rank(a), value_rank(b), value_rank(c)
            if const_array(b) is not None:
                rb = const_array(b).ndim
            if const_array(c) is not None:
                rc = const_array(c).ndim
            if ra != 2 or rb != 2:
                stats.reject("matmul-add", label, f"Gemm needs 2-D operands; A has rank {ra}, B rank {rb}")
                continue
            if rc is None or rc > 2:
                stats.reject("matmul-add", label, f"the addend has rank {rc}; Gemm's C must broadcast to [N, M]")
                continue
            cshape = static_shape(c)
            if const_array(c) is not None:
                cshape = const_array(c).shape
            outshape = static_shape(node.outputs[0])
            bshape = const_array(b).shape if const_array(b) is not None else static_shape(b)
            row = cshape is not None and (len(cshape) < 2 or cshape[0] == 1)
            fits = cshape is not None and (
                (row and bshape is not None and cshape[-1:] in ((), (1,), (bshape[1],)))
                or (outshape is not None and np.broadcast_shapes(cshape, outshape) == outshape)
            )
            if not fits:
                stats.reject("matmul-add", label, "cannot prove the addend broadcasts to the MatMul output")
                continue
            gemm = ir.node("Gemm", [a, b, c], name=f"{label}_gemm")
            replace_with_node(graph, node, [mm, node], [gemm], node.outputs[0], gemm.outputs[0])
            stats.count("matmul-add")
        return self.result(model, stats)


def _pad_spec(pad: ir.Node, rank: int) -> tuple[list[int], float] | str:
    """(pads on spatial axes [begin..., end...], pad value) of a constant-mode Pad, or why not."""
    if pad.attributes.get_string("mode", "constant") != "constant":
        return f"Pad mode is {pad.attributes.get_string('mode', 'constant')}"
    if "pads" in pad.attributes:  # opset < 11
        pads = np.array(pad.attributes.get_ints("pads"))
        value = pad.attributes.get_float("value", 0.0)
    else:
        pads = const_array(pad.inputs[1]) if len(pad.inputs) > 1 else None
        if pads is None:
            return "pads are not constant"
        value = 0.0
        if len(pad.inputs) > 2 and pad.inputs[2] is not None:
            v = const_array(pad.inputs[2])
            if v is None:
                return "pad value is not constant"
            value = float(np.asarray(v).reshape(-1)[0]) if v.size else 0.0
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            axes = const_array(pad.inputs[3])
            if axes is None:
                return "axes are not constant"
            full = np.zeros(2 * rank, dtype=np.int64)
            k = len(axes)
            for j, ax in enumerate(axes.reshape(-1)):
                ax = int(ax) % rank
                full[ax], full[rank + ax] = pads[j], pads[k + j]
            pads = full
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if len(pads) != 2 * rank:
        return "pads do not match the input rank"
    if any(p < 0 for p in pads):
        return "negative pads (cropping)"
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return "pads the batch or channel axis"
    return pads[2:rank] + pads[rank + 2:], value


@register_pass
class FoldPad(Pass):
    name = "fold-pad"
    summary = "fold a constant Pad into the next Conv/AveragePool/MaxPool's pads"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        for node in list(graph):
            if node.graph is not graph or not is_op(node, "Pad"):
                continue
            out = node.outputs[0]
            uses = out.uses()
            if out.is_graph_output() or len(uses) != 1:
                continue
            nxt = uses[0].node
            if not is_op(nxt, "Conv", "AveragePool", "MaxPool") or uses[0].idx != 0:
                continue
            pattern = f"pad-{nxt.op_type.lower()}"
            label = node_label(node)
            rank = value_rank(node.inputs[0])
            if rank is None and nxt.op_type == "Conv":
                w = const_array(nxt.inputs[1])
                rank = None if w is None else w.ndim
            if rank is None:
                ks = nxt.attributes.get_ints("kernel_shape", None)
                rank = None if ks is None else len(ks) + 2
            if rank is None:
                stats.reject(pattern, label, "input rank unknown")
                continue
            spec = _pad_spec(node, rank)
            if isinstance(spec, str):
                stats.reject(pattern, label, spec)
                continue
            extra, value = spec
            if nxt.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
                stats.reject(pattern, label, f"{nxt.op_type} uses auto_pad")
                continue
            nd = rank - 2
            own = list(nxt.attributes.get_ints("pads", [0] * (2 * nd)))
            overrides: dict[str, object] = {}
            if nxt.op_type == "Conv":
                if value != 0.0:
                    stats.reject(pattern, label, f"pad value {value} is not the Conv's zero padding")
                    continue
            elif nxt.op_type == "AveragePool":
                if value != 0.0:
                    stats.reject(pattern, label, f"pad value {value} is not zero")
                    continue
                if any(own) and not nxt.attributes.get_int("count_include_pad", 0):
                    stats.reject(pattern, label, "the pool excludes its own padding from the mean but would include the Pad's")
                    continue
                overrides["count_include_pad"] = 1
            else:
                if not (math.isinf(value) and value < 0):
                    stats.reject(pattern, label, f"pad value {value} is not -inf: MaxPool padding never wins the max")
                    continue
                if nxt.attributes.get_int("ceil_mode", 0):
                    stats.reject(pattern, label, "MaxPool uses ceil_mode")
                    continue
            if len(nxt.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in nxt.outputs[1:]):
                stats.reject(pattern, label, "MaxPool indices output is used")
                continue
            overrides["pads"] = [a + b for a, b in zip(own, extra)]
            if nxt.op_type != "Conv":
                kernel = list(nxt.attributes.get_ints("kernel_shape", []))
                if any(p >= k for p, k in zip(overrides["pads"], kernel + kernel)):
                    stats.reject(pattern, label, "pooling pads must stay smaller than the kernel")
                    continue
            new = ir.Node("", nxt.op_type, [node.inputs[0], *nxt.inputs[1:]], _attrs(nxt, **overrides),
                          num_outputs=1, name=f"{node_label(nxt)}_padded")
            replace_with_node(graph, nxt, [node, nxt], [new], nxt.outputs[0], new.outputs[0])
            stats.count(pattern)
        return self.result(model, stats)


_RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


@register_pass
class CancelTransposeReshape(Pass):
    name = "cancel-transpose-reshape"
    summary = "merge/cancel consecutive Transposes and Reshapes, drop identity ones"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        infer_shapes(model)
        for node in list(graph):
            if node.graph is not graph:
                continue
            if is_op(node, "Transpose"):
                self._transpose(graph, node, stats)
            elif is_op(node, "Reshape"):
                self._reshape(graph, node, stats)
        for node in list(graph):  # producers left without readers
            if node.graph is graph and is_op(node, "Transpose", *_RESHAPE_LIKE) and not any(
                o.uses() or o.is_graph_output() for o in node.outputs
            ):
                inputs = list(node.inputs)
                graph.remove(node, safe=True)
                drop_unused_initializers(graph, inputs)
        return self.result(model, stats)

    @staticmethod
    def _identity(graph: ir.Graph, node: ir.Node, x: ir.Value) -> None:
        ident = ir.node("Identity", [x], name=f"{node_label(node)}_id")
        replace_with_node(graph, node, [node], [ident], node.outputs[0], ident.outputs[0])
        # an Identity whose input is not a graph boundary can go; remove-identity handles the rest
        out = ident.outputs[0]
        if not out.is_graph_output():
            out.replace_all_uses_with(x)
            graph.remove(ident, safe=True)

    def _transpose(self, graph: ir.Graph, node: ir.Node, stats: PassStats) -> None:
        x = node.inputs[0]
        rank = value_rank(x)
        perm2 = node.attributes.get_ints("perm", None)
        if perm2 is None:
            if rank is None:
                return
            perm2 = list(reversed(range(rank)))
        perm2 = list(perm2)
        p = x.producer()
        if is_op(p, "Transpose"):
            perm1 = p.attributes.get_ints("perm", None)
            if perm1 is None:
                perm1 = list(reversed(range(len(perm2))))
            perm = [perm1[i] for i in perm2]
            src = p.inputs[0]
            if perm == list(range(len(perm))):
                self._identity(graph, node, src)
                stats.count("transpose-transpose cancelled")
            else:
                new = ir.node("Transpose", [src], {"perm": perm}, name=f"{node_label(node)}_merged")
                replace_with_node(graph, node, [node], [new], node.outputs[0], new.outputs[0])
                stats.count("transpose-transpose merged")
            return
        if perm2 == list(range(len(perm2))):
            self._identity(graph, node, x)
            stats.count("identity transpose")

    def _reshape(self, graph: ir.Graph, node: ir.Node, stats: PassStats) -> None:
        x = node.inputs[0]
        label = node_label(node)
        p = x.producer()
        shape = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if is_op(p, *_RESHAPE_LIKE):
            if shape is None:
                stats.reject("reshape-reshape", label, "target shape is not constant")
            elif np.any(shape == 0) and not node.attributes.get_int("allowzero", 0):
                stats.reject("reshape-reshape", label, "target shape copies a dimension (0) of the intermediate")
            else:
                node.replace_input_with(0, p.inputs[0])
                stats.count("reshape-reshape")
                x = node.inputs[0]
        xs, ys = static_shape(x), static_shape(node.outputs[0])
        if xs is not None and ys is not None and xs == ys:
            self._identity(graph, node, x)
            stats.count("identity reshape")


_SIXTH = 1.0 / 6.0


def _scalar(v: ir.Value | None) -> float | None:
    a = const_array(v)
    if a is None or a.size != 1:
        return None
    return float(a.reshape(-1)[0])


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    if is_op(node, "Relu"):
        return 0.0, math.inf
    if not is_op(node, "Clip"):
        return None
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        return node.attributes.get_float("min", -math.inf), node.attributes.get_float("max", math.inf)
    lo = -math.inf if len(node.inputs) < 2 or node.inputs[1] is None else _scalar(node.inputs[1])
    hi = math.inf if len(node.inputs) < 3 or node.inputs[2] is None else _scalar(node.inputs[2])
    if lo is None or hi is None:
        return None
    return lo, hi


@register_pass
class FuseActivation(Pass):
    name = "fuse-activation"
    summary = "decomposed HardSigmoid/HardSwish/Relu -> the single ONNX operator backends fuse"

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        opset = model.opset_imports.get("", 0)
        for node in list(graph):
            if node.graph is not graph:
                continue
            if is_op(node, "Clip") and _clip_bounds(node) == (0.0, math.inf):
                new = ir.node("Relu", [node.inputs[0]], name=f"{node_label(node)}_relu")
                replace_with_node(graph, node, [node], [new], node.outputs[0], new.outputs[0])
                stats.count("relu")
            elif is_op(node, "Div", "Mul"):
                self._hard_sigmoid(graph, node, stats)
        if opset >= 14:
            for node in list(graph):
                if node.graph is graph and is_op(node, "Div", "Mul"):
                    self._hard_swish_scaled(graph, node, stats)
            for node in list(graph):
                if node.graph is graph and is_op(node, "Mul"):
                    self._hard_swish(graph, node, stats)
        return self.result(model, stats)

    @staticmethod
    def _hard_sigmoid(graph: ir.Graph, node: ir.Node, stats: PassStats) -> None:
        split = split_const_operand(node)
        if split is None:
            return
        y, c, ci = split
        if c.size != 1 or (node.op_type == "Div" and ci == 0):
            return
        k = float(c.reshape(-1)[0])
        factor = 1.0 / k if node.op_type == "Div" else k
        if not math.isclose(factor, _SIXTH, rel_tol=1e-6):
            return
        clip = y.producer()
        if _clip_bounds(clip) != (0.0, 6.0) or single_use_by(y, node) is not None:
            return
        add_out = clip.inputs[0]
        add = add_out.producer()
        if not is_op(add, "Add") or single_use_by(add_out, clip) is not None:
            return
        split2 = split_const_operand(add)
        if split2 is None or split2[1].size != 1 or float(split2[1].reshape(-1)[0]) != 3.0:
            return
        hs = ir.node("HardSigmoid", [split2[0]], {"alpha": _SIXTH, "beta": 0.5}, name=f"{node_label(node)}_hsig")
        replace_with_node(graph, node, [add, clip, node], [hs], node.outputs[0], hs.outputs[0])
        stats.count("hard-sigmoid")

    @staticmethod
    def _hard_swish_scaled(graph: ir.Graph, node: ir.Node, stats: PassStats) -> bool:
        """``(x * Clip(x + 3, 0, 6)) / 6`` (or ``* 1/6``) -> HardSwish(x)."""
        split = split_const_operand(node)
        if split is None:
            return False
        m_out, c, ci = split
        if c.size != 1 or (node.op_type == "Div" and ci == 0):
            return False
        k = float(c.reshape(-1)[0])
        if k == 0 or not math.isclose(1.0 / k if node.op_type == "Div" else k, _SIXTH, rel_tol=1e-6):
            return False
        mul = m_out.producer()
        if not is_op(mul, "Mul") or single_use_by(m_out, node) is not None:
            return False
        for x, h in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            clip = h.producer() if h is not None else None
            if _clip_bounds(clip) != (0.0, 6.0) or single_use_by(h, mul) is not None:
                continue
            add_out = clip.inputs[0]
            add = add_out.producer()
            if not is_op(add, "Add") or single_use_by(add_out, clip) is not None:
                continue
            split2 = split_const_operand(add)
            if split2 is None or split2[0] is not x or split2[1].size != 1 or float(split2[1].reshape(-1)[0]) != 3.0:
                continue
            new = ir.node("HardSwish", [x], name=f"{node_label(node)}_hswish")
            replace_with_node(graph, node, [add, clip, mul, node], [new], node.outputs[0], new.outputs[0])
            stats.count("hard-swish")
            return True
        return False

    @staticmethod
    def _hard_swish(graph: ir.Graph, node: ir.Node, stats: PassStats) -> None:
        a, b = node.inputs
        for x, h in ((a, b), (b, a)):
            hs = h.producer() if h is not None else None
            if not is_op(hs, "HardSigmoid") or hs.inputs[0] is not x or single_use_by(h, node) is not None:
                continue
            if not (math.isclose(hs.attributes.get_float("alpha", 0.2), _SIXTH, rel_tol=1e-6)
                    and hs.attributes.get_float("beta", 0.5) == 0.5):
                continue
            new = ir.node("HardSwish", [x], name=f"{node_label(node)}_hswish")
            replace_with_node(graph, node, [hs, node], [new], node.outputs[0], new.outputs[0])
            stats.count("hard-swish")
            return


def _parse_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


@register_pass
class Fuse(Pass):
    name = "fuse"
    summary = "all fusion and reparameterization passes in the recommended order, to a fixed point"
    tolerance = REASSOCIATION_TOLERANCE  # it runs reparam and collapse-linear
    options = (PassOption("--fuse-rounds", "max_rounds", "fixed-point rounds of `fuse` (default 4)", int, "N"),)

    def __init__(self, max_rounds: int = 4) -> None:
        super().__init__()
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        overridable = [v.name for v in model.graph.inputs if v.is_initializer()]
        if overridable:
            stats.note(
                f"{len(overridable)} initializers are also graph inputs (old ONNX IR), so they can change at run "
                "time and are not folded; drop them from the inputs (onnx_ir.passes.common."
                "RemoveInitializersFromInputsPass) if they are fixed weights"
            )
        any_modified = False
        for _ in range(max(1, self.max_rounds)):
            modified = False
            for name in FUSE_ORDER:
                result = registry.create(name)(model)
                model = result.model
                if result.modified:
                    modified = True
                    sub = getattr(result, "stats", None)
                    if isinstance(sub, PassStats):
                        for k, v in sub.matched.items():
                            stats.count(k if name == "dce" or k.startswith(name) else f"{name}: {k}", v)
                        stats.notes.extend(sub.notes)
            any_modified = any_modified or modified
            if not modified:
                break
        # rejections from a final clean pass describe what is left, not what was later folded
        for name in FUSE_ORDER:
            if name in ("dce", "remove-identity"):
                continue
            probe = registry.create(name)(model)
            sub = getattr(probe, "stats", None)
            if isinstance(sub, PassStats):
                stats.rejected.extend(sub.rejected)
            model = probe.model
            if probe.modified:
                any_modified = True
        return self.result(model, stats, any_modified)
