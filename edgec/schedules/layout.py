"""Relax-level preparation for edgec's CPU schedules: channels-last layout.

Every CPU rule in :mod:`edgec.schedules.cpu` vectorizes the innermost *output channel* axis.
That axis is contiguous only in a channels-last layout, so before legalization the graph is
converted to NHWC activations with HWIO weights:

- ``conv2d``: ``y[n, h, w, k] = sum_{r, s, c} x[n, h*sh + r*dh - ph, w*sw + s*dw - pw, c] * W[r, s, c, k]``
  (depthwise: ``W[r, s, 0, c]``, the single input channel per group), so the weights of one
  output pixel's ``k`` block are one contiguous vector load, and in depthwise convs the input
  is a contiguous vector too.
- pooling, reductions and elementwise ops follow the layout of their inputs (TVM's layout
  inference), so they become channels-last too.
- ``layout_transform`` of constant weights is folded at compile time (``FoldConstant``), so only
  the model's input and output pay a transpose.

ONNX ``Clip`` imports as ``call_tir(maximum/minimum, (x, scalar))`` which ConvertLayout cannot
see through; :func:`canonicalize_clip` turns those back into ``R.maximum`` / ``R.minimum`` so the
whole conv -> bias -> clip chain stays in NHWC and fuses into one PrimFunc.
"""

from __future__ import annotations

from typing import Any

#: desired layouts handed to ``relax.transform.ConvertLayout``.
CHANNELS_LAST: dict[str, list[str]] = {
    "relax.nn.conv2d": ["NHWC", "HWIO"],
}


def canonicalize_clip() -> Any:
    """A module pass rewriting ``call_tir(maximum|minimum, (x, scalar_const))`` to Relax ops."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.mod_ = mod

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's naming)
            call = super().visit_call_(call)
            if call.op != call_tir or not isinstance(call.args[0], tvm.ir.GlobalVar):
                return call
            name = call.args[0].name_hint
            kind = "maximum" if name.startswith("maximum") else "minimum" if name.startswith("minimum") else None
            if kind is None or not isinstance(call.args[1], relax.Tuple) or len(call.args[1].fields) != 2:
                return call
            x, bound = call.args[1].fields
            if not isinstance(bound, tvm.ir.expr.GenericConst) or len(bound.value.shape) != 0:
                return call
            func = self.mod_[call.args[0]]
            if not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 3:
                return call
            op = relax.op.maximum if kind == "maximum" else relax.op.minimum
            return op(x, bound)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCanonicalizeClip")
    def _pass(mod: Any, _ctx: Any) -> Any:
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass


def convert_layout_or_keep() -> Any:
    """``ConvertLayout(CHANNELS_LAST)``, or the module unchanged where TVM cannot convert it.

    TVM 0.27's ConvertLayout fails on some graphs (e.g. ``R.nn.dropout``, whose result is a
    tuple: "Expected nested to match tuple").  Layout is an optimization, never a requirement:
    such a model is compiled in its original layout (the schedule rules then use their
    fallbacks), instead of failing to compile.
    """
    import tvm
    from tvm import relax

    convert = relax.transform.ConvertLayout(CHANNELS_LAST)

    @tvm.transform.module_pass(opt_level=0, name="EdgecConvertLayoutOrKeep")
    def _pass(mod: Any, _ctx: Any) -> Any:
        try:
            return convert(mod)
        except (tvm.error.InternalError, tvm.error.DiagnosticError):
            return mod

    return _pass


def channels_last_passes() -> list[Any]:
    """Relax passes before legalization: BN/bias folding into conv weights (:mod:`edgec.schedules.fold`),
    clip canonicalization, NHWC/HWIO, weight folding."""
    from tvm import relax

    from edgec.schedules.fold import fold_conv_affine

    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        fold_conv_affine(),
        canonicalize_clip(),
        convert_layout_or_keep(),
        relax.transform.FoldConstant(),
    ]
