"""Relax-level folding of per-channel affine epilogues into conv2d weights and one bias.

After ``DecomposeOpsForInference`` an ONNX ``Conv -> BatchNormalization`` is

``y = ((conv(x, W) + b - m) / s) * g + be``

i.e. a chain of ``add / subtract / multiply / divide`` by constants broadcast along the output
channel ``k`` (shape ``()``, ``(C,1,1)`` or ``(1,C,1,1)`` in NCHW).  Every such chain is an affine
map per channel, ``y[k] = a[k] * conv(x, W)[k] + c[k]``, composed step by step:

- ``+ t``: ``c += t``;  ``- t``: ``c -= t``;
- ``* t``: ``a *= t, c *= t``;  ``/ t``: ``a /= t, c /= t`` (only for ``t != 0``).

Because convolution is linear in its weights and each output channel ``k`` uses only
``W[k, ...]``, ``a[k] * conv(x, W)[k] = conv(x, a[k] * W[k, ...])[k]`` (grouped and depthwise
convs included), so the chain becomes

``y = conv(x, W') + c``,  ``W'[k, ...] = a[k] * W[k, ...]``

computed once at compile time (float64, then cast).  The compiled function's epilogue is then a
single bias add (plus any clip / residual), instead of a subtract, a divide, a multiply and an
add per output element.  This is the folding onnxruntime's graph optimizer applies to its own
fp32 session; the result differs from the unfolded graph by float rounding only.

Only intermediate values with a single use are folded (a value also read elsewhere keeps its
own conv), and only when the conv weight is a compile-time constant in ``OIHW`` with ``NCHW``
data (i.e. before layout conversion).

A chain of two or more such steps on any other NCHW tensor (e.g. the BN of RepVGG's identity
branch, ``(x - m) / s * g + be``) becomes ``x * a + c``: one multiply and one add per element
instead of a subtract, a divide, a multiply and an add.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


@dataclasses.dataclass(frozen=True)
class _Affine:
    """``a * conv(x, W) + c`` per output channel (numpy float64 vectors of length C)."""

    conv: Any  # the original relax conv2d Call, or None for a chain on any other tensor
    base: Any  # that other tensor (a relax Var) when ``conv`` is None
    scale: Any
    shift: Any
    steps: int


def _count_uses(func: Any) -> dict[Any, int]:
    from tvm import relax

    uses: dict[Any, int] = {}

    def visit(e: Any) -> None:
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                visit(a)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                visit(f)
        elif isinstance(e, relax.TupleGetItem):
            visit(e.tuple_value)
        elif isinstance(e, relax.SeqExpr):
            for block in e.blocks:
                for b in block.bindings:
                    visit(b.value)
            visit(e.body)
        elif isinstance(e, relax.If):
            visit(e.cond)
            visit(e.true_branch)
            visit(e.false_branch)

    visit(func.body)
    return uses


def _is_const(e: Any) -> bool:
    import tvm

    return isinstance(e, tvm.ir.expr.Constant)


def _channel_vector(const: Any, channels: int) -> Any | None:
    """The per-output-channel vector of a constant broadcast over NCHW, or None."""
    import numpy as np

    v = const.value.numpy()
    if v.dtype != np.float32:
        return None
    if v.ndim == 0:
        return np.full(channels, float(v), np.float64)
    shape = list(v.shape)
    if len(shape) > 4:
        return None
    shape = [1] * (4 - len(shape)) + shape  # right-aligned broadcast against (N, C, H, W)
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,)).copy()


def static_shape(e: Any) -> list[int] | None:
    """The static shape of a Relax expression's tensor type, or None (unknown, dynamic, not a tensor)."""
    shape = getattr(getattr(e, "ty", None), "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def _conv_state(call: Any) -> _Affine | None:
    import numpy as np
    from tvm import relax

    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.nn.conv2d":
        return None
    attrs = call.attrs
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW":
        return None
    if not _is_const(call.args[1]) or call.args[1].value.numpy().dtype != np.float32:
        return None
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "float32", "void"):
        return None
    channels = int(call.args[1].value.shape[0])
    return _Affine(call, None, np.ones(channels), np.zeros(channels), 0)


def rewrite_function(func: Any) -> Any:
    """``func`` with its conv -> per-channel affine chains folded (``func`` itself if none)."""
    import numpy as np
    from tvm import relax

    if True:
        uses = _count_uses(func)
        states: dict[Any, _Affine] = {}
        replace: dict[Any, _Affine] = {}
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            return func
        for block in body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    continue
                v = b.value
                st = _conv_state(v)
                if st is None and isinstance(v, relax.Call) and getattr(v.op, "name", "") in _OPS and len(v.args) == 2:
                    op = v.op.name
                    lhs, rhs = v.args
                    if op in ("relax.add", "relax.multiply") and _is_const(lhs) and isinstance(rhs, relax.Var):
                        lhs, rhs = rhs, lhs
                    prev = states.get(lhs) if isinstance(lhs, relax.Var) else None
                    single_use = prev is not None and uses.get(lhs, 0) == 1
                    if (prev is None or not single_use) and isinstance(lhs, relax.Var) and _is_const(rhs):
                        shape = static_shape(lhs)
                        if shape is not None and len(shape) == 4 and str(getattr(lhs.ty, "dtype", "")) == "float32":
                            # a new chain on a tensor that is not (or no longer) foldable into a conv
                            prev = _Affine(None, lhs, np.ones(shape[1]), np.zeros(shape[1]), 0)
                            single_use = True
                    if prev is not None and single_use and _is_const(rhs):
                        t = _channel_vector(rhs, prev.scale.shape[0])
                        out_shape = static_shape(b.var)
                        in_shape = static_shape(lhs)
                        if t is not None and out_shape is not None and out_shape == in_shape and not (op == "relax.divide" and np.any(t == 0)):
                            a, c = prev.scale.copy(), prev.shift.copy()
                            if op == "relax.add":
                                c += t
                            elif op == "relax.subtract":
                                c -= t
                            elif op == "relax.multiply":
                                a *= t
                                c *= t
                            else:
                                a /= t
                                c /= t
                            st = _Affine(prev.conv, prev.base, a, c, prev.steps + 1)
                            replace.pop(lhs, None)
                            replace[b.var] = st
                if st is not None:
                    states[b.var] = st
        # a conv chain folds from one step on; a chain on another tensor becomes one multiply + add,
        # a gain from two steps on
        replace = {k: s for k, s in replace.items() if s.steps > (0 if s.conv is not None else 1)}
        if not replace:
            return func

        @relax.expr_functor.mutator
        class _Mutator(relax.PyExprMutator):
            def visit_var_binding_(self, binding: Any) -> None:  # noqa: N802 (TVM's naming)
                st = replace.get(binding.var)
                if st is None:
                    super().visit_var_binding_(binding)
                    return
                conv = st.conv
                if conv is None:
                    new = self.visit_expr(st.base)
                    if np.any(st.scale != 1):
                        new = relax.op.multiply(new, relax.const(st.scale.astype(np.float32).reshape(1, -1, 1, 1)))
                    if np.any(st.shift != 0):
                        new = relax.op.add(new, relax.const(st.shift.astype(np.float32).reshape(1, -1, 1, 1)))
                    self._emit(binding, new)
                    return
                w = conv.args[1].value.numpy()
                w2 = (w.astype(np.float64) * st.scale.reshape(-1, 1, 1, 1)).astype(np.float32)
                a = conv.attrs
                new = relax.op.nn.conv2d(
                    self.visit_expr(conv.args[0]),
                    relax.const(w2),
                    strides=a.strides,
                    padding=a.padding,
                    dilation=a.dilation,
                    groups=a.groups,
                    data_layout="NCHW",
                    kernel_layout="OIHW",
                    out_layout="NCHW",
                )
                if np.any(st.shift != 0):
                    new = relax.op.add(new, relax.const(st.shift.astype(np.float32).reshape(1, -1, 1, 1)))
                self._emit(binding, new)

            def _emit(self, binding: Any, new: Any) -> None:
                if isinstance(binding.var, relax.DataflowVar):
                    nv = self.builder_.emit(new)
                else:
                    nv = self.builder_.emit_output(new)
                self.set_var_remap(binding.var, nv)

        mut = _Mutator()
        new_body = mut.visit_expr(func.body)
        return relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs, func.span)


def function_rewrite_pass(name: str, rewrite: Callable[[Any], Any]) -> Any:
    """A module pass applying ``rewrite`` (a Relax function -> the same or a new function) to every
    Relax function, then dead-code elimination if anything changed.  A rewrite that raises leaves
    its function as it was: these rewrites are optimizations, never needed for correctness."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: Any, _ctx: Any) -> Any:
        out = mod
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                try:
                    new = rewrite(func)
                except Exception:  # noqa: BLE001 - an optimization; keep the function as it was
                    new = func
                if new is not func:
                    out = tvm.IRModule(dict(out.functions_items()), attrs=out.attrs)
                    out[gv] = new
        return relax.transform.DeadCodeElimination()(out) if out is not mod else mod

    return _pass


def fold_conv_affine() -> Any:
    """A module pass folding per-channel affine chains after ``conv2d`` into its weights + bias."""
    return function_rewrite_pass("EdgecFoldConvAffine", rewrite_function)
