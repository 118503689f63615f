"""Relax-level merge of parallel conv branches of one input into one conv (RepVGG / MobileOne).

Training-form RepVGG and MobileOne blocks compute ``y = sum_b f_b(x)`` where every branch
``f_b`` is linear in ``x`` and reads the same tensor ``x``:

- ``conv(x, W_b) [+ c_b]``: any kernel size, pads ``p_b``; the BN after it is already folded into
  ``W_b, c_b`` by :mod:`edgec.schedules.fold`, which runs first;
- ``x * s + t``, ``x * s``, ``x + t`` (the identity branch's BN, folded to one multiply-add, per
  channel ``s[c], t[c]``) or ``x`` itself: a 1x1 conv, pads 0, stride 1, whose kernel is ``s[c]``
  at ``W[c, c mod Cg]`` (``Cg = C/groups`` input channels per group: the identity in grouped
  form), bias ``t``; only with ``C_in = C_out`` and stride 1.

The sum is a tree of ``add`` of two tensors of the same shape whose inner results have no other
reader (any association order).  Convolution is linear in its kernel, so, once every kernel is
placed on one grid,

``sum_b conv(x, W_b) + c_b = conv(x, sum_b W_b') + sum_b c_b``.

Placement (per spatial axis, dilation ``d``): output ``o`` of branch ``b`` reads input
``o*s - p_b + i*d`` at tap ``i < k_b``.  With the merged begin pad ``P = max_b p_b`` that input is
tap ``j = i + (P - p_b)/d`` of the merged kernel, so kernel ``b`` goes at offset
``(P - p_b)/d`` (an integer, else no merge) and the merged size is ``K = max_b (offset_b + k_b)``.
Inputs out of range read zeros in every branch and in the merged conv alike, so borders are
exact; the merged end pad is chosen so the output size is the branches' (every branch's output
is the same shape, since they are added).  This is the algebra of ``passes/reparam.py`` on the
ONNX graph, done here inside the compiler so a model exported in training form compiles to a
plain conv stack (one conv, one bias, the ReLU fused) without the user running ``edgec optimize``.

Only branches with the same input, strides, dilation and groups, float32 constant ``OIHW``
weights on ``NCHW`` data (before layout conversion), and single-use intermediate values merge;
branches with another stride (or input) stay separate summands added to the merged conv, as does
anything else in the sum (a residual from elsewhere).  The weights are summed in float64 and cast
once: the result differs from the branch-by-branch sum by float rounding only (summation order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

_ADD = "relax.add"
_MUL = "relax.multiply"
_CONV = "relax.nn.conv2d"


@dataclasses.dataclass(frozen=True)
class _Branch:
    """One linear branch of ``x``: ``conv(x, weight) + bias`` (``weight`` OIHW float64, numpy)."""

    x: Any
    weight: Any
    bias: Any
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    identity: bool  # an affine map of x itself (a 1x1 conv with stride 1, no padding)

    @property
    def key(self) -> tuple:
        return (self.x, self.strides, self.dilation, self.groups)


def _op_name(e: Any) -> str:
    import tvm

    return getattr(e.op, "name", "") if isinstance(e, tvm.relax.Call) else ""


def _f32_shape4(e: Any) -> list[int] | None:
    from edgec.schedules.fold import static_shape

    shape = static_shape(e)
    if shape is None or len(shape) != 4 or str(getattr(e.ty, "dtype", "")) != "float32":
        return None
    return shape


def _conv_branch(v: Any, bias: Any, channels: int) -> _Branch | None:
    """A ``conv2d`` call (NCHW, constant float32 OIHW weight) as a branch, or None."""
    import numpy as np
    from tvm import relax

    a = v.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return None
    if a.out_dtype is not None and str(a.out_dtype) not in ("", "float32", "void"):
        return None
    x, w = v.args
    from edgec.schedules.fold import _is_const

    if not isinstance(x, relax.Var) or _f32_shape4(x) is None or not _is_const(w):
        return None
    weight = w.value.numpy()
    if weight.dtype != np.float32 or weight.ndim != 4 or weight.shape[0] != channels:
        return None
    pad = [int(p) for p in a.padding]
    if len(pad) == 2:
        pad = pad + pad
    return _Branch(
        x=x,
        weight=weight.astype(np.float64),
        bias=bias,
        strides=tuple(int(s) for s in a.strides),
        padding=tuple(pad),
        dilation=tuple(int(d) for d in a.dilation),
        groups=int(a.groups),
        identity=False,
    )


class _Parser:
    """Classifies the leaves of an add tree, given the function's bindings and use counts."""

    def __init__(self, bindings: dict[Any, Any], uses: dict[Any, int]) -> None:
        self.bindings = bindings
        self.uses = uses

    def single(self, e: Any) -> Any | None:
        """The value bound to ``e`` if ``e`` is a variable read only once, else None."""
        from tvm import relax

        if not isinstance(e, relax.Var) or self.uses.get(e, 0) != 1:
            return None
        return self.bindings.get(e)

    def leaves(self, e: Any, out: list[Any]) -> None:
        """The summands of the add tree rooted at the (binding value) ``e``."""
        for arg in e.args:
            v = self.single(arg)
            if v is not None and self.is_tensor_add(v):
                self.leaves(v, out)
            else:
                out.append(arg)

    @staticmethod
    def is_tensor_add(v: Any) -> bool:
        from tvm import relax

        if _op_name(v) != _ADD or len(v.args) != 2:
            return False
        a, b = v.args
        if not (isinstance(a, relax.Var) and isinstance(b, relax.Var)):
            return False
        sa, sb, so = _f32_shape4(a), _f32_shape4(b), _f32_shape4(v)
        return sa is not None and sa == sb == so

    def branch(self, leaf: Any, channels: int) -> _Branch | None:
        """``leaf`` (a summand) as a linear branch, or None."""
        import numpy as np
        from tvm import relax

        from edgec.schedules.fold import _channel_vector, _is_const

        v = self.single(leaf)
        if v is None:
            # the input itself (an identity branch without BN) may be read elsewhere too
            return self._affine(leaf, np.ones(channels), np.zeros(channels)) if _f32_shape4(leaf) else None
        bias = np.zeros(channels)
        scale = np.ones(channels)
        name = _op_name(v)
        if name == _ADD and len(v.args) == 2:
            lhs, rhs = v.args
            if _is_const(lhs):
                lhs, rhs = rhs, lhs
            t = _channel_vector(rhs, channels) if _is_const(rhs) else None
            if t is None:
                return None
            bias = t
            inner = self.single(lhs)
            if inner is None:
                return self._affine(lhs, scale, bias)
            v, leaf, name = inner, lhs, _op_name(inner)
        if name == _CONV:
            return _conv_branch(v, bias, channels)
        if name == _MUL and len(v.args) == 2:
            lhs, rhs = v.args
            if _is_const(lhs):
                lhs, rhs = rhs, lhs
            s = _channel_vector(rhs, channels) if _is_const(rhs) else None
            if s is None or not isinstance(lhs, relax.Var):
                return None
            return self._affine(lhs, s, bias)
        return None

    @staticmethod
    def _affine(x: Any, scale: Any, bias: Any) -> _Branch | None:
        """``x * scale + bias`` per channel as a 1x1 conv branch (groups filled in when merged)."""
        import numpy as np
        from tvm import relax

        if not isinstance(x, relax.Var) or _f32_shape4(x) is None:
            return None
        return _Branch(
            x=x,
            weight=np.asarray(scale, np.float64),  # per-channel scale; the kernel depends on groups
            bias=np.asarray(bias, np.float64),
            strides=(1, 1),
            padding=(0, 0, 0, 0),
            dilation=(1, 1),
            groups=0,
            identity=True,
        )


def _identity_kernel(scale: Any, channels: int, groups: int) -> Any:
    """``[C, C/groups, 1, 1]`` kernel with ``scale[c]`` at ``[c, c mod (C/groups)]``."""
    import numpy as np

    cg = channels // groups
    w = np.zeros((channels, cg, 1, 1), np.float64)
    c = np.arange(channels)
    w[c, c % cg, 0, 0] = scale
    return w


@dataclasses.dataclass(frozen=True)
class MergedConv:
    """The merged conv: ``conv(x, weight, strides, padding, dilation, groups) + bias``."""

    x: Any
    weight: Any  # OIHW float64
    bias: Any
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int


def merge(branches: list[_Branch], in_hw: tuple[int, int], out_hw: tuple[int, int]) -> MergedConv | None:
    """One conv for the sum of ``branches`` (same input, strides, dilation, groups; identity
    branches given as 1x1 convs), or None where their taps do not line up."""
    import numpy as np

    first = branches[0]
    sh, sw = first.strides
    dh, dw = first.dilation
    # per axis: begin pads, kernel sizes -> offsets and merged kernel size
    geo = []
    for axis in (0, 1):
        d = (dh, dw)[axis]
        begin = [b.padding[axis] for b in branches]
        big = max(begin)
        offs = []
        for b, p in zip(branches, begin):
            if (big - p) % d:
                return None
            offs.append((big - p) // d)
        size = max(o + b.weight.shape[2 + axis] for o, b in zip(offs, branches))
        n_in, n_out, s = in_hw[axis], out_hw[axis], (sh, sw)[axis]
        # end pad: the smallest one giving the branches' output size
        end = None
        for e in range(0, d * size + s + 1):
            if (n_in + big + e - d * (size - 1) - 1) // s + 1 == n_out:
                end = e
                break
        if end is None:
            return None
        geo.append((big, end, offs, size))
    (pt, pb, offs_h, kh), (pl, pr, offs_w, kw) = geo
    o, i = first.weight.shape[:2]
    w = np.zeros((o, i, kh, kw), np.float64)
    bias = np.zeros(o, np.float64)
    for b, oh, ow in zip(branches, offs_h, offs_w):
        if b.weight.shape[:2] != (o, i):
            return None
        w[:, :, oh : oh + b.weight.shape[2], ow : ow + b.weight.shape[3]] += b.weight
        bias += b.bias
    return MergedConv(first.x, w, bias, first.strides, (pt, pl, pb, pr), first.dilation, first.groups)


def plan_sum(parser: _Parser, root: Any, out_shape: list[int]) -> tuple[list[MergedConv], list[Any]] | None:
    """The merged convs and the remaining summands of the add tree ``root``, or None (no merge)."""
    leaves: list[Any] = []
    parser.leaves(root, leaves)
    if len(leaves) < 2:
        return None
    channels = out_shape[1]
    parsed = [parser.branch(leaf, channels) for leaf in leaves]
    groups: dict[tuple, list[int]] = {}
    for n, br in enumerate(parsed):
        if br is not None and not br.identity:
            groups.setdefault(br.key, []).append(n)
    merged: list[MergedConv] = []
    used: set[int] = set()
    for key, members in groups.items():
        x, strides, _dil, g = key
        in_shape = _f32_shape4(x)
        if in_shape is None:
            continue
        convs = [parsed[n] for n in members]
        taken = list(members)
        # identity branches of the same x join a stride-1 group with C_in == C_out
        if strides == (1, 1) and in_shape[1] == channels and channels % g == 0:
            for n, br in enumerate(parsed):
                if br is not None and br.identity and br.x.same_as(x) and n not in used and n not in taken:
                    convs.append(dataclasses.replace(br, weight=_identity_kernel(br.weight, channels, g), groups=g))
                    taken.append(n)
        if len(convs) < 2:
            continue
        m = merge(convs, (in_shape[2], in_shape[3]), (out_shape[2], out_shape[3]))
        if m is None:
            continue
        merged.append(m)
        used.update(taken)
    if not merged:
        return None
    rest = [leaf for n, leaf in enumerate(leaves) if n not in used]
    return merged, rest


def rewrite_function(func: Any) -> Any:
    """``func`` with its sums of parallel conv branches merged (``func`` itself if none)."""
    import numpy as np
    from tvm import relax

    from edgec.schedules.fold import _count_uses

    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func
    uses = _count_uses(func)
    bindings: dict[Any, Any] = {}
    for block in body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
    parser = _Parser(bindings, uses)
    # roots: tensor adds whose result is not itself an inner node of a larger add tree
    inner: set[Any] = set()
    for var, v in bindings.items():
        if parser.is_tensor_add(v):
            for arg in v.args:
                av = parser.single(arg)
                if av is not None and parser.is_tensor_add(av):
                    inner.add(arg)
    plans: dict[Any, tuple[list[MergedConv], list[Any]]] = {}
    for var, v in bindings.items():
        if var in inner or not parser.is_tensor_add(v):
            continue
        shape = _f32_shape4(var)
        plan = plan_sum(parser, v, shape) if shape is not None else None
        if plan is not None:
            plans[var] = plan
    if not plans:
        return func

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_var_binding_(self, binding: Any) -> None:  # noqa: N802 (TVM's naming)
            plan = plans.get(binding.var)
            if plan is None:
                super().visit_var_binding_(binding)
                return
            merged, rest = plan
            terms = []
            for m in merged:
                conv = relax.op.nn.conv2d(
                    self.visit_expr(m.x),
                    relax.const(m.weight.astype(np.float32)),
                    strides=list(m.strides),
                    padding=list(m.padding),
                    dilation=list(m.dilation),
                    groups=m.groups,
                    data_layout="NCHW",
                    kernel_layout="OIHW",
                    out_layout="NCHW",
                )
                if np.any(m.bias != 0):
                    conv = relax.op.add(self.builder_.emit(conv), relax.const(m.bias.astype(np.float32).reshape(1, -1, 1, 1)))
                terms.append(conv)
            terms += [self.visit_expr(r) for r in rest]
            new = terms[0]
            for t in terms[1:]:
                new = relax.op.add(self.builder_.emit(new), t)
            if isinstance(binding.var, relax.DataflowVar):
                nv = self.builder_.emit(new)
            else:
                nv = self.builder_.emit_output(new)
            self.set_var_remap(binding.var, nv)

    new_body = _Mutator().visit_expr(func.body)
    return relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs, func.span)


def merge_conv_branches() -> Any:
    """A module pass merging sums of parallel conv / identity branches of one input into one conv."""
    from edgec.schedules.fold import function_rewrite_pass

    return function_rewrite_pass("EdgecMergeConvBranches", rewrite_function)
