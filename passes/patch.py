"""Patch-based inference (MCUNetV2): run the first, memory-heavy stage of a CNN patch by patch.

The stage is every node between the image input ``X`` and a split tensor ``S`` (the nodes ``S``
depends on that depend on ``X``).  ``S`` must be a cut: no other tensor of the stage is read after
it.  ``S`` (shape ``[N, C, H_S, W_S]``) is divided into a grid of ``r x c`` patches, rows
``[floor(i H_S / r), floor((i+1) H_S / r))`` and columns alike.

Receptive field.  For each patch the region each stage tensor must hold is computed backwards,
independently along H and W.  A window op (``Conv``, ``MaxPool``, ``AveragePool``) with kernel
``k``, stride ``s``, dilation ``d`` and leading padding ``p`` computes output rows ``[o0, o1)`` from
input rows

    first = o0 s - p,    last = (o1 - 1) s - p + (k - 1) d,

clipped to the tensor ``[0, H)``; pointwise ops and channel ``Concat`` need exactly their output
region.  A tensor read by several nodes gets the bounding box of what they need.

Rewrite.  Each patch becomes a branch: ``Slice`` of ``X`` to its region (with the halo), then a copy
of every stage node on the patch region.  A copied window op gets padding only where its window
leaves the tensor (the image border), ``p0' = max(0, -first)``, ``p1' = max(0, last + 1 - H)``, and its
output then has exactly ``(last - first - (k-1)d) / s + 1 = o1 - o0`` rows.  Where a tensor holds more
than a consumer needs (the bounding box of several consumers), a ``Slice`` crops it.  The patch
outputs are put back together with ``Concat`` along W (per row of patches) then H, under the
original name of ``S``; the rest of the graph is unchanged.  Every output element is computed by the
same arithmetic as before, so the result is equal up to float rounding (in practice bit-exact).

Branches are emitted one after another, so the graph order runs one patch to completion before the
next.  The memory planner (:mod:`edgec.memory`) then sees, during the stage, the input, the
assembled ``S`` (patch outputs are written into it in place) and one patch's working set.

Cost.  Halos are computed by several patches: ``MAC overhead = MACs(patched) / MACs(original) - 1``.

Refused (with the node named): ops that are not spatially local before the split (global pooling,
reductions, MatMul/attention, Reshape/Flatten/Transpose, Resize), tensors of the stage read after
the split, dynamic spatial shapes, and grids with more patches than rows or columns of ``S``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from edgec import analysis, memory
from edgec import ir as eir
from edgec.errors import InputError
from edgec.passes_api import Pass, PassOption, PassResult, PassStats, register_pass

WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})
POINTWISE_OPS = frozenset(
    """Relu Clip Sigmoid Tanh HardSigmoid HardSwish LeakyRelu PRelu Elu Selu Celu Gelu Mish Softplus Softsign
    Neg Abs Exp Log Sqrt Reciprocal Floor Ceil Round Sign Erf Add Sub Mul Div Pow Max Min Sum Mean Where
    BatchNormalization QuantizeLinear DequantizeLinear Cast Identity Dropout ThresholdedRelu Shrink""".split()
)
_WHY = {
    "GlobalAveragePool": "global pooling reads the whole feature map",
    "GlobalMaxPool": "global pooling reads the whole feature map",
    "MatMul": "a matrix product mixes all positions (attention, linear layers)",
    "Gemm": "a dense layer mixes all positions",
    "Softmax": "softmax normalizes over a whole axis",
    "Attention": "attention reads all tokens",
    "MultiHeadAttention": "attention reads all tokens",
    "Reshape": "a reshape moves data across spatial positions",
    "Flatten": "flatten moves data across spatial positions",
    "Transpose": "a transpose moves data across spatial positions",
    "Shape": "it reads the shape of the whole tensor",
    "InstanceNormalization": "instance normalization computes statistics over the whole map",
    "LayerNormalization": "layer normalization computes statistics over whole axes",
    "GroupNormalization": "group normalization computes statistics over the whole map",
}

Interval = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Region:
    """A box of a feature map: rows ``[h[0], h[1])``, columns ``[w[0], w[1])``."""

    h: Interval
    w: Interval

    def union(self, other: Region) -> Region:
        return Region((min(self.h[0], other.h[0]), max(self.h[1], other.h[1])),
                      (min(self.w[0], other.w[0]), max(self.w[1], other.w[1])))

    @property
    def size(self) -> tuple[int, int]:
        return self.h[1] - self.h[0], self.w[1] - self.w[0]


@dataclasses.dataclass(frozen=True)
class Grid:
    rows: int
    cols: int

    @classmethod
    def parse(cls, text: str) -> Grid:
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
        if not m:
            raise ValueError("expected ROWSxCOLS, e.g. 4x4")
        g = cls(int(m.group(1)), int(m.group(2)))
        if g.rows < 1 or g.cols < 1:
            raise ValueError("the grid needs at least one row and one column")
        return g

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


def parse_bytes(text: str) -> int:
    """``256KB`` / ``256KiB`` / ``0.5MB`` / ``1000`` -> bytes (KB and KiB are both 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError("expected a size such as 256KB, 1.5MB or 320000")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclasses.dataclass(frozen=True)
class _Window:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad_begin: tuple[int, int]

    def need(self, axis: int, out: Interval, size: int) -> tuple[Interval, int, int]:
        """Input interval needed for output ``out`` along ``axis``, and the local pads."""
        k, s, d, p = self.kernel[axis], self.stride[axis], self.dilation[axis], self.pad_begin[axis]
        first = out[0] * s - p
        last = (out[1] - 1) * s - p + (k - 1) * d
        return (max(0, first), min(size, last + 1)), max(0, -first), max(0, last + 1 - size)

    def cover(self, axis: int, out: Interval, size: int) -> Interval:
        """``out`` grown towards the interior until its windows reach at least one input row.

        Output rows whose windows lie entirely in the padding read no input; a patch made only of
        them would slice an empty tensor, so the patch computes a few more rows and they are cropped.
        """
        k, s, d, p = self.kernel[axis], self.stride[axis], self.dilation[axis], self.pad_begin[axis]
        o0, o1 = out
        if (o1 - 1) * s - p + (k - 1) * d < 0:  # entirely in the leading padding
            o1 = -((-(p - (k - 1) * d)) // s) + 1  # smallest o1 with (o1-1)s - p + (k-1)d >= 0
        if o0 * s - p > size - 1:  # entirely in the trailing padding
            o0 = (size - 1 + p) // s
        return o0, max(o1, o0 + 1)


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What patching a model at ``split`` with ``grid`` does to memory and compute."""

    split: str
    split_node: str
    grid: Grid
    split_shape: tuple[int, ...]
    stage_nodes: int
    activation_bytes: int
    peak_before: int
    peak_after: int
    macs_before: int
    macs_after: int

    @property
    def ratio(self) -> float:
        return self.peak_before / max(self.peak_after, 1)

    @property
    def mac_overhead(self) -> float:
        return self.macs_after / max(self.macs_before, 1) - 1.0

    @property
    def patched(self) -> bool:
        return bool(self.split)

    def summary(self) -> str:
        if not self.patched:
            return (f"the model already fits: peak {self.peak_before:,} bytes ({self.activation_bytes}-byte "
                    "activations); left unpatched")
        return (f"split at {self.split!r} ({'x'.join(map(str, self.split_shape))}), grid {self.grid}: peak "
                f"{self.peak_before:,} -> {self.peak_after:,} bytes ({self.activation_bytes}-byte activations), "
                f"{self.ratio:.2f}x lower; MACs +{100 * self.mac_overhead:.1f}% from halo recomputation")

    def to_json(self) -> dict[str, object]:
        return {"split": self.split, "split_node": self.split_node, "grid": str(self.grid),
                "split_shape": list(self.split_shape), "stage_nodes": self.stage_nodes,
                "activation_bytes": self.activation_bytes, "peak_before": self.peak_before,
                "peak_after": self.peak_after, "ratio": self.ratio, "macs_before": self.macs_before,
                "macs_after": self.macs_after, "mac_overhead": self.mac_overhead}


class _Graph:
    """The model with inferred shapes and the facts the patcher needs."""

    def __init__(self, model: ir.Model | onnx.ModelProto) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else eir.to_proto(model)
        raw = onnx.ModelProto()
        raw.CopyFrom(proto)
        for idx, node in enumerate(raw.graph.node):
            if not node.name:
                node.name = f"{node.op_type}_{idx}"
        inits = {i.name for i in raw.graph.initializer}
        self.inputs = [vi.name for vi in raw.graph.input if vi.name not in inits]
        for vi in raw.graph.input:
            if vi.name in inits:
                continue
            dims = vi.type.tensor_type.shape.dim
            dynamic = [k for k, d in enumerate(dims) if k > 0 and not d.HasField("dim_value")]
            if dynamic:
                reader = next((n.name for n in raw.graph.node if vi.name in n.input), "?")
                raise InputError(
                    f"input {vi.name!r} has dynamic dimensions {dynamic}: node {reader!r} that reads it cannot be "
                    "patched (patch regions need static spatial shapes)",
                    "export the model with a fixed input size",
                )
        self.proto = analysis.infer_shapes(raw)
        self.nodes = list(self.proto.graph.node)
        self.types = analysis.value_types(self.proto)
        self.outputs = {vi.name for vi in self.proto.graph.output}
        self.constant: set[str] = set(inits)
        for node in self.nodes:
            if node.op_type == "Constant" or (node.input and all(i == "" or i in self.constant for i in node.input)):
                self.constant.update(o for o in node.output if o)
        self.producer = {o: k for k, n in enumerate(self.nodes) for o in n.output if o}
        self._why: dict[int, str | None] = {}
        self.consumers: dict[str, list[int]] = {}
        for k, n in enumerate(self.nodes):
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(k)

    def is_const_node(self, k: int) -> bool:
        outs = [o for o in self.nodes[k].output if o]
        return bool(outs) and all(o in self.constant for o in outs)

    def shape(self, name: str) -> tuple[int, ...]:
        s = self.types.get(name, (None, 0))[0]
        if s is None:
            raise InputError(f"tensor {name!r} has no static shape", "export the model with a fixed input size")
        return s

    def stage(self, split: str) -> list[int]:
        """Indices of the non-constant nodes ``split`` depends on, in graph order."""
        seen: set[int] = set()
        todo = [split]
        while todo:
            t = todo.pop()
            k = self.producer.get(t)
            if k is None or k in seen or self.is_const_node(k):
                continue
            seen.add(k)
            todo.extend(i for i in self.nodes[k].input if i)
        return sorted(seen)

    def why_not_local(self, k: int) -> str | None:
        """None if node ``k`` can run per patch, else the reason."""
        if k not in self._why:
            self._why[k] = self._why_not_local(k)
        return self._why[k]

    def _why_not_local(self, k: int) -> str | None:
        node = self.nodes[k]
        op = node.op_type
        attrs = analysis.attributes(node)
        for o in node.output:
            if o and o in self.types and self.types[o][0] is not None and len(self.types[o][0]) != 4:
                if op in _WHY:
                    return _WHY[op]
                return f"its output {o!r} is not a 4-D feature map"
        if op in ("Resize", "Upsample"):
            return "Resize/Upsample changes the spatial grid (and its sizes may be computed at run time)"
        if op in _WHY or op.startswith("Reduce"):
            return _WHY.get(op, "a reduction reads whole axes")
        if node.domain not in ("", "ai.onnx"):
            return f"custom-domain op {node.domain}.{op} is not known to be spatially local"
        stage_inputs = [i for i in node.input if i and i not in self.constant]
        if op in WINDOW_OPS:
            if any(i not in self.constant for i in node.input[1:] if i):
                return "its weights are computed at run time"
            if len(self.shape(node.input[0])) != 4:
                return "only 2-D windows are patched"
            if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
                return "its indices output depends on the whole map"
            if attrs.get("ceil_mode", 0):
                win = self.window(k)
                h = self.shape(node.input[0])[2:]
                out = self.shape(node.output[0])[2:]
                pads = attrs.get("pads") or [0, 0, 0, 0]
                for ax in range(2):
                    fl = (h[ax] + pads[ax] + pads[ax + 2] - (win.kernel[ax] - 1) * win.dilation[ax] - 1) // win.stride[ax] + 1
                    if fl != out[ax]:
                        return "ceil_mode adds a partial window at the border"
            return None
        if op == "Concat":
            axis = int(attrs.get("axis", 0))
            if axis not in (1, -3):
                return "it concatenates along a spatial or batch axis"
            if len(stage_inputs) != len([i for i in node.input if i]):
                return "it concatenates a constant"
            return None
        if op in POINTWISE_OPS:
            if op == "BatchNormalization" and (attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1):
                return "BatchNormalization in training mode computes batch statistics"
            if op == "Dropout" and len(node.output) > 1 and node.output[1] and self.consumers.get(node.output[1]):
                return "its mask output is used"
            out_hw = self.shape(node.output[0])[2:]
            for i in node.input:
                if not i:
                    continue
                s = self.types.get(i, (None, 0))[0]
                if s is None:
                    return f"input {i!r} has no static shape"
                if i in self.constant:
                    if op in ("QuantizeLinear", "DequantizeLinear") and len(s) == 1 and int(attrs.get("axis", 1)) in (1, -3):
                        continue
                    if op == "BatchNormalization":
                        continue  # scale, bias, mean and variance are per channel
                    if any(int(d) != 1 for d in s[-2:]):
                        return f"constant {i!r} {list(s)} varies across the spatial axes"
                elif len(s) != 4 or tuple(s[2:]) != tuple(out_hw):
                    return f"input {i!r} is broadcast across the spatial axes"
            if op in ("QuantizeLinear", "DequantizeLinear") and int(attrs.get("axis", 1)) not in (1, -3):
                return "per-axis quantization along a spatial axis"
            return None
        return f"{op} is not an operation edgec knows to be spatially local"

    def window(self, k: int) -> _Window:
        node = self.nodes[k]
        attrs = analysis.attributes(node)
        if node.op_type == "Conv":
            kernel = tuple(int(v) for v in self.shape(node.input[1])[2:])
        else:
            kernel = tuple(int(v) for v in attrs["kernel_shape"])  # type: ignore[union-attr]
        stride = tuple(int(v) for v in (attrs.get("strides") or (1, 1)))  # type: ignore[union-attr]
        dil = tuple(int(v) for v in (attrs.get("dilations") or (1, 1)))  # type: ignore[union-attr]
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            in_hw = self.shape(node.input[0])[2:]
            out_hw = self.shape(node.output[0])[2:]
            begin = []
            for ax in range(2):
                total = max((out_hw[ax] - 1) * stride[ax] + (kernel[ax] - 1) * dil[ax] + 1 - in_hw[ax], 0)
                begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            pad_begin = (begin[0], begin[1])
        elif auto == "VALID":
            pad_begin = (0, 0)
        else:
            pads = attrs.get("pads") or (0, 0, 0, 0)
            pad_begin = (int(pads[0]), int(pads[1]))  # type: ignore[index]
        return _Window(kernel, stride, dil, pad_begin)  # type: ignore[arg-type]

    def blocking(self, stage: Sequence[int], split: str) -> str | None:
        """Why ``split`` cannot be a patch split point (naming the node), or None."""
        if len(self.shape(split)) != 4:
            k = self.producer[split]
            return f"split tensor {split!r} of node {self.nodes[k].name!r} is not a 4-D feature map"
        members = set(stage)
        sources = set()
        for k in stage:
            for i in self.nodes[k].input:
                if i and i not in self.constant and i not in self.producer:
                    sources.add(i)
        if len(sources) != 1:
            return f"the stage before {split!r} reads {len(sources)} graph inputs ({', '.join(sorted(sources))}); one image input is needed"
        for k in stage:
            why = self.why_not_local(k)
            if why is not None:
                n = self.nodes[k]
                return f"node {n.name!r} ({n.op_type}) before the split blocks patching: {why}"
        src = next(iter(sources))
        for t in [src] + [o for k in stage for o in self.nodes[k].output if o and o != split]:
            for c in self.consumers.get(t, []):
                if c not in members:
                    return (f"tensor {t!r} of the stage is also read by node {self.nodes[c].name!r} "
                            f"({self.nodes[c].op_type}) after the split")
            if t in self.outputs and t != src:
                return f"tensor {t!r} inside the stage is a graph output"
        return None

    def candidates(self) -> tuple[list[str], str | None]:
        """Valid split tensors in graph order, and why the first non-candidate blocked (if none)."""
        found, first_why = [], None
        for k, node in enumerate(self.nodes):
            if self.is_const_node(k):
                continue
            for o in node.output:
                if not o or self.types.get(o, (None, 0))[0] is None:
                    continue
                why = self.blocking(self.stage(o), o)
                if why is None:
                    found.append(o)
                elif first_why is None:
                    first_why = why
        return found, first_why


def _bounds(n: int, parts: int) -> list[Interval]:
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _const(name: str, values: Sequence[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _needs(g: _Graph, windows: dict[int, _Window], k: int,
           out_region: Region) -> list[tuple[int, Region, tuple[int, int, int, int] | None]]:
    """(input index, region needed, local pads t,l,b,r for window ops) for each stage input of node ``k``."""
    node = g.nodes[k]
    res = []
    for idx, i in enumerate(node.input):
        if not i or i in g.constant:
            continue
        if k in windows and idx == 0:
            full = g.shape(i)
            hi, pt, pb = windows[k].need(0, out_region.h, full[2])
            wi, pl, pr = windows[k].need(1, out_region.w, full[3])
            res.append((idx, Region(hi, wi), (pt, pl, pb, pr)))
        else:
            res.append((idx, out_region, None))
    return res


def _regions(g: _Graph, stage: Sequence[int], windows: dict[int, _Window], split: str, patch: Region) -> dict[str, Region]:
    """The region every stage tensor must hold for one patch of ``split`` (receptive field, backwards)."""
    region: dict[str, Region] = {split: patch}
    for k in reversed(stage):
        outs = [region[o] for o in g.nodes[k].output if o in region]
        r = outs[0]
        for extra in outs[1:]:
            r = r.union(extra)
        if k in windows:
            full = g.shape(g.nodes[k].input[0])
            r = Region(windows[k].cover(0, r.h, full[2]), windows[k].cover(1, r.w, full[3]))
            region[g.nodes[k].output[0]] = r
        for idx, need, _ in _needs(g, windows, k, r):
            t = g.nodes[k].input[idx]
            region[t] = need if t not in region else region[t].union(need)
    return region


def _patch_bound(g: _Graph, split: str, grid: Grid, act: int) -> int:
    """A lower bound of the patched stage's peak, without building it: while the second of three or
    more patches runs, the input, the assembled split tensor and that patch's largest tensor are live."""
    stage = g.stage(split)
    windows = {k: g.window(k) for k in stage if g.nodes[k].op_type in WINDOW_OPS}
    hs, ws = g.shape(split)[2:]
    if grid.rows * grid.cols < 3:
        return 0
    rows, cols = (_bounds(hs, grid.rows) + [(0, 0)])[:2], _bounds(ws, grid.cols)
    patch = Region(rows[0], cols[1]) if grid.cols > 1 else Region(rows[1], cols[0])
    region = _regions(g, stage, windows, split, patch)

    def nbytes(t: str) -> int:
        shape = g.shape(t)
        itemsize = act if g.types[t][1] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) else 4
        return shape[0] * shape[1] * itemsize

    src = next(i for k in stage for i in g.nodes[k].input if i and i not in g.constant and i not in g.producer)
    largest = max(nbytes(t) * r.size[0] * r.size[1] for t, r in region.items() if t != split)
    return nbytes(src) * g.shape(src)[2] * g.shape(src)[3] + nbytes(split) * hs * ws + largest


def _build(g: _Graph, split: str, grid: Grid) -> onnx.ModelProto:
    """The patched model (see the module docstring); ``split`` must have passed :meth:`_Graph.blocking`."""
    stage = g.stage(split)
    s_shape = g.shape(split)
    hs, ws = s_shape[2], s_shape[3]
    if grid.rows > hs or grid.cols > ws:
        k = g.producer[split]
        raise InputError(
            f"grid {grid} does not fit split tensor {split!r} of node {g.nodes[k].name!r}: its feature map is {hs}x{ws}",
            f"use at most {hs}x{ws} patches or split earlier",
        )
    stage_set = set(stage)
    src = next(i for k in stage for i in g.nodes[k].input if i and i not in g.constant and i not in g.producer)
    windows = {k: g.window(k) for k in stage if g.nodes[k].op_type in WINDOW_OPS}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    new_vi: list[onnx.ValueInfoProto] = []
    elem = {n: g.types.get(n, (None, onnx.TensorProto.FLOAT))[1] for n in [src] + [o for k in stage for o in g.nodes[k].output]}

    def add_vi(name: str, like: str, region: Region) -> None:
        full = g.shape(like)
        new_vi.append(helper.make_tensor_value_info(name, elem[like], [full[0], full[1], *region.size]))

    def slice_(x: str, out: str, base: Region, want: Region, like: str, node_name: str) -> str:
        starts = [want.h[0] - base.h[0], want.w[0] - base.w[0]]
        ends = [want.h[1] - base.h[0], want.w[1] - base.w[0]]
        new_inits.append(_const(out + "__starts", starts))
        new_inits.append(_const(out + "__ends", ends))
        new_inits.append(_const(out + "__axes", [2, 3]))
        new_nodes.append(helper.make_node("Slice", [x, out + "__starts", out + "__ends", out + "__axes"], [out], name=node_name))
        add_vi(out, like, want)
        return out

    def needs(k: int, out_region: Region) -> list[tuple[int, Region, tuple[int, int, int, int] | None]]:
        return _needs(g, windows, k, out_region)

    patch_outputs: list[list[str]] = []
    for pi, rows in enumerate(_bounds(hs, grid.rows)):
        row_outs = []
        for pj, cols in enumerate(_bounds(ws, grid.cols)):
            tag = f"__p{pi}_{pj}"
            region = _regions(g, stage, windows, split, Region(rows, cols))
            local: dict[str, str] = {}
            x_region = region[src]
            full_src = g.shape(src)
            local[src] = slice_(src, f"{src}{tag}", Region((0, full_src[2]), (0, full_src[3])), x_region, src,
                                f"{src}{tag}__slice")
            for k in stage:
                node = g.nodes[k]
                out_region = region[node.output[0]]
                ins = list(node.input)
                pads = None
                for c, (idx, need, p) in enumerate(needs(k, out_region)):
                    t = node.input[idx]
                    have = region[t]
                    name = local[t]
                    if need != have:
                        name = slice_(name, f"{node.output[0]}{tag}__in{c}", have, need, t, f"{node.name}{tag}__crop{c}")
                    ins[idx] = name
                    if p is not None:
                        pads = p
                outs = []
                for o in node.output:
                    if not o:
                        outs.append("")
                        continue
                    local[o] = f"{o}{tag}"
                    outs.append(local[o])
                    if o in region:
                        add_vi(local[o], o, region[o])
                copy = helper.make_node(node.op_type, ins, outs, name=f"{node.name}{tag}", domain=node.domain)
                for a in node.attribute:
                    if pads is not None and a.name in ("pads", "auto_pad", "ceil_mode"):
                        continue
                    copy.attribute.append(a)
                if pads is not None:
                    copy.attribute.append(helper.make_attribute("pads", [pads[0], pads[1], pads[2], pads[3]]))
                new_nodes.append(copy)
            if region[split] != Region(rows, cols):  # grown by Window.cover: crop back to the patch
                local[split] = slice_(local[split], f"{split}{tag}__crop", region[split], Region(rows, cols), split,
                                      f"{g.nodes[g.producer[split]].name}{tag}__crop")
            row_outs.append(local[split])
        patch_outputs.append(row_outs)
    split_node = g.nodes[g.producer[split]].name
    rows_t = []
    for pi, row_outs in enumerate(patch_outputs):
        if len(row_outs) == 1:
            rows_t.append(row_outs[0])
            continue
        name = split if len(patch_outputs) == 1 else f"{split}__row{pi}"
        new_nodes.append(helper.make_node("Concat", row_outs, [name], axis=3, name=f"{split_node}__assemble_row{pi}"))
        if name != split:
            add_vi(name, split, Region(_bounds(hs, grid.rows)[pi], (0, ws)))
        rows_t.append(name)
    if len(rows_t) > 1:
        new_nodes.append(helper.make_node("Concat", rows_t, [split], axis=2, name=f"{split_node}__assemble"))
    elif rows_t[0] != split:
        new_nodes.append(helper.make_node("Identity", rows_t, [split], name=f"{split_node}__assemble"))

    out = onnx.ModelProto()
    out.CopyFrom(g.proto)
    graph = out.graph
    del graph.node[:]
    before = [n for k, n in enumerate(g.nodes) if g.is_const_node(k)]
    after = [n for k, n in enumerate(g.nodes) if k not in stage_set and not g.is_const_node(k)]
    graph.node.extend(before + new_nodes + after)
    graph.initializer.extend(new_inits)
    stage_tensors = {o for k in stage for o in g.nodes[k].output} - {split}
    keep = [vi for vi in graph.value_info if vi.name not in stage_tensors]
    del graph.value_info[:]
    graph.value_info.extend(keep + new_vi)
    return out


def origin(step_name: str) -> str:
    """The original node a step of a patched graph was copied from (for per-layer profiles)."""
    return re.split(r"__p\d+_\d+|__assemble", step_name)[0]


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """How to patch: grid (None: 4x4, or searched under a budget), split tensor or AUTO, SRAM budget,
    the activation element size and the memory-planner model used to measure peaks."""

    grid: Grid | None = None
    split: str = "AUTO"
    sram_budget: int | None = None
    activation_bytes: int = 4
    planner: memory.PlannerOptions = memory.PlannerOptions()
    max_grid: int = 8


def _plan(a: analysis.ModelAnalysis, act: int, planner: memory.PlannerOptions) -> memory.MemoryPlan:
    return memory.plan_memory(a.schedule, act, planner)


def _evaluate(g: _Graph, before: memory.MemoryPlan, macs_before: int, split: str, grid: Grid,
              config: PatchConfig) -> tuple[PatchReport, onnx.ModelProto]:
    patched = _build(g, split, grid)
    after = analysis.analyze_proto(patched, config.planner)
    plan = _plan(after, config.activation_bytes, config.planner)
    report = PatchReport(split, g.nodes[g.producer[split]].name, grid, g.shape(split), len(g.stage(split)),
                         config.activation_bytes, before.peak_bytes, plan.peak_bytes, macs_before, after.macs)
    return report, patched


def _lower_bound(g: _Graph, schedule: memory.Schedule, plan: memory.MemoryPlan, split: str, act: int) -> int:
    """A lower bound of the patched peak: the input and the assembled split tensor are live together,
    and the steps after the split are unchanged."""
    name = g.nodes[g.producer[split]].name
    idx = next((s.index for s in plan.steps if s.name == name), len(plan.steps))
    rest = max((s.live_bytes for s in plan.steps[idx + 1:]), default=0)
    sizes = {t.name: t.nbytes(act) for t in schedule.tensors}
    src = schedule.graph_inputs
    return max(rest, sizes.get(split, 0) + sum(sizes.get(x, 0) for x in src[:1]))


def patch_model(model: ir.Model | onnx.ModelProto, config: PatchConfig = PatchConfig()) -> tuple[onnx.ModelProto, PatchReport]:
    """Patch ``model`` as configured; returns the patched model and its :class:`PatchReport`.

    A model whose peak already fits ``sram_budget`` is returned unchanged (``report.patched`` is
    False).  With ``sram_budget`` the split (unless given) and the grid (unless given) are searched: for each
    split the smallest square grid whose peak fits the budget, then among those the one with the
    least MAC overhead (then lowest peak).  Without a budget and with ``split="AUTO"`` the split
    with the lowest peak for the grid (default 4x4) is used.
    """
    g = _Graph(model)
    before_a = analysis.analyze_proto(g.proto, config.planner)
    before = _plan(before_a, config.activation_bytes, config.planner)
    if config.split == "AUTO":
        splits, why = g.candidates()
        if not splits:
            raise InputError(f"no split point can be patched: {why or 'the graph has no 4-D feature map'}",
                             "patching needs a convolutional stage right after the image input")
    else:
        if config.split not in g.producer:
            known = [o for n in g.nodes for o in n.output][:6]
            raise InputError(f"no tensor named {config.split!r} in the model",
                             f"pass a node output name (e.g. {', '.join(known)}) or AUTO")
        why = g.blocking(g.stage(config.split), config.split)
        if why is not None:
            raise InputError(f"cannot patch up to {config.split!r}: {why}", "choose an earlier --split or AUTO")
        splits = [config.split]
        hs, ws = g.shape(config.split)[2:]
        if config.grid is not None and (config.grid.rows > hs or config.grid.cols > ws):
            _build(g, config.split, config.grid)  # raises the error naming the node
    if config.sram_budget is not None and before.peak_bytes <= config.sram_budget:
        return g.proto, PatchReport("", "", Grid(1, 1), (), 0, config.activation_bytes, before.peak_bytes,
                                    before.peak_bytes, before_a.macs, before_a.macs)
    if config.grid is not None:
        grids = [config.grid]
    elif config.sram_budget is None:
        grids = [Grid(4, 4)]
    else:
        grids = [Grid(n, n) for n in range(2, config.max_grid + 1)]
    act = config.activation_bytes
    bounds = {s: _lower_bound(g, before_a.schedule, before, s, act) for s in splits}
    results: list[tuple[PatchReport, onnx.ModelProto]] = []
    best_peak: int | None = None
    for split in sorted(splits, key=lambda s: bounds[s]):
        hs, ws = g.shape(split)[2:]
        if config.sram_budget is not None and bounds[split] > config.sram_budget:
            continue  # cannot fit: the input plus the split tensor, or the steps after it, need more
        if config.sram_budget is None and best_peak is not None and bounds[split] >= best_peak:
            break  # no later split can beat the best peak found
        for grid in grids:
            if grid.rows > hs or grid.cols > ws:
                continue
            bound = _patch_bound(g, split, grid, act)
            if config.sram_budget is not None and bound > config.sram_budget:
                continue
            if config.sram_budget is None and best_peak is not None and bound >= best_peak:
                continue
            res = _evaluate(g, before, before_a.macs, split, grid, config)
            results.append(res)
            best_peak = res[0].peak_after if best_peak is None else min(best_peak, res[0].peak_after)
            if config.sram_budget is not None and res[0].peak_after <= config.sram_budget:
                break  # larger grids of this split only add halo MACs
        if config.sram_budget is not None and any(
                r.peak_after <= config.sram_budget and r.macs_after <= r.macs_before for r, _ in results):
            break  # fits with no MAC overhead: nothing can be better
    if config.sram_budget is not None:
        fitting = [r for r in results if r[0].peak_after <= config.sram_budget]
        if not fitting:
            found = min((r[0] for r in results), key=lambda r: r.peak_after, default=None)
            what = (f"the lowest peak found is {found.peak_after:,} bytes (split {found.split!r}, grid {found.grid})"
                    if found is not None else
                    f"every split point and grid needs more (no split can go below {min(bounds.values()):,} bytes: "
                    "the input plus the split tensor, or the layers after the split)")
            hint = "raise --sram-budget or use a smaller model or input resolution"
            if act > 1:
                hint = "use int8 activations (--act-dtype int8), " + hint
            if config.planner == memory.PlannerOptions():
                hint += ", or plan with in-place depthwise (--planner tinyengine)"
            raise InputError(
                f"nothing fits the SRAM budget of {config.sram_budget:,} bytes with {act}-byte activations "
                f"(grids up to {grids[-1]} tried): {what}",
                hint,
            )
        report, proto = min(fitting, key=lambda r: (r[0].macs_after, r[0].peak_after))
        return proto, report
    if not results:
        raise InputError(f"grid {grids[0]} does not fit any split point", "use a smaller grid")
    report, proto = min(results, key=lambda r: (r[0].peak_after, r[0].macs_after))
    return proto, report


def _act_bytes(text: str) -> int:
    table = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "int8": 1, "uint8": 1}
    if text.lower() not in table:
        raise ValueError("expected float32, float16 or int8")
    return table[text.lower()]


@register_pass
class PatchSchedule(Pass):
    """MCUNetV2 patch-based inference of the first stage (see :mod:`edgec.passes.patch`)."""

    name = "patch-schedule"
    summary = "run the memory-heavy first stage patch by patch (MCUNetV2), lowering peak activation memory"
    rewrites_in_place = False
    options = (
        PassOption("--patches", "grid", "patch grid ROWSxCOLS (default 4x4; searched with --sram-budget)", Grid.parse, "RxC"),
        PassOption("--split", "split", "tensor where patching stops, or AUTO (lowest peak)", str, "TENSOR"),
        PassOption("--sram-budget", "sram_budget", "search split and grid for the least MAC overhead under this peak, e.g. 256KB",
                   parse_bytes, "BYTES"),
        PassOption("--act-dtype", "activation_bytes", "activation element type the memory plan assumes (float32, int8)",
                   _act_bytes, "DTYPE"),
        PassOption("--planner", "planner", "memory model: fused (in-place activations, default) or tinyengine "
                   "(also in-place depthwise)", memory.PlannerOptions.named, "MODEL"),
    )

    def __init__(self, grid: Grid | None = None, split: str = "AUTO", sram_budget: int | None = None,
                 activation_bytes: int = 4, planner: memory.PlannerOptions = memory.PlannerOptions()) -> None:
        super().__init__()
        self.config = PatchConfig(grid, split, sram_budget, activation_bytes, planner)
        self.report: PatchReport | None = None

    def call(self, model: ir.Model) -> PassResult:
        proto, report = patch_model(model, self.config)
        self.report = report
        stats = PassStats()
        stats.note(report.summary())
        if not report.patched:
            return PassResult(model, False, stats)
        stats.count("patched stage nodes", report.stage_nodes)
        return PassResult(eir.from_proto(proto), True, stats)
