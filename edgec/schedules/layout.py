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

The model's input stays NCHW, so ConvertLayout puts a ``permute_dims(x, [0, 2, 3, 1])`` in front
of the first conv (the stem, 3 input channels).  A transpose with 3 channels innermost does not
vectorize (every output vector is a gather): measured 72 us for a 3x144x144 input and 174 us for
3x224x224, more than the stem conv itself.  :func:`fuse_input_transpose` folds the transpose into
the conv instead: a conv that reads NCHW data and writes NHWC output,

``y[n, h, w, k] = sum_{c, r, s} xp[n, c, h*sh + r*dh, w*sw + s*dw] * W[r, s, c, k]``

(``xp``: ``x`` zero-padded in NCHW, rows contiguous), the same sum as the transpose followed by
the NHWC conv, term for term.  The register-tiled rule then broadcasts input scalars (as for any
dense conv) while the output channel axis stays the vector axis.

Weight packing (:func:`pack_weights`, last, needs the target).  The register tile of
:mod:`edgec.schedules.cpu` computes ``B = Tc*V`` output channels at a time and, per reduction
step ``(r, s, c)``, reads ``W[r, s, c, k0:k0+B]``: in HWIO that is ``B`` floats at a stride of
``K``, and one tile's weights are spread over the whole tensor.  Constant weights are packed
at compile time to ``Wp[k / B, r, s, c, k % B] = W[r, s, c, k]`` (``[K/B, KH, KW, Cg, B]``;
matmul ``Wp[k / B, c, k % B] = W[c, k]``), so one tile's weights are one contiguous stream in
reduction order, and the conv becomes edgec's TE compute

``y[n, h, w, k] = sum_{r, s, c} xp[n, h*sh + r*dh, w*sw + s*dw, g(k)*Cg + c] * Wp[k / B, r, s, c, k % B]``

(``g(k) = k / (K/groups)``), the same terms in the same order as TOPI's NHWC conv.  ``B`` comes
from :func:`edgec.schedules.cpu.channel_tile` for the op's output shape, the function the
schedule uses too, so the tile's ``k / B`` and ``k % B`` reduce to its loop variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: desired layouts handed to ``relax.transform.ConvertLayout``.
CHANNELS_LAST: dict[str, list[str]] = {
    "relax.nn.conv2d": ["NHWC", "HWIO"],
}


def mutator_pass(name: str, make_rewriter: Callable[[Any], Any], prepare: Callable[[Any, Any], None] | None = None) -> Any:
    """A module pass that visits every Relax function with one ``relax.PyExprMutator``,
    ``make_rewriter(mod)`` (made once, on the first Relax function: its block builder collects
    the TE functions the rewrites add), then dead-code elimination.  ``prepare(rewriter, func)``
    runs before each function is visited (e.g. to count the function's variable uses)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: Any, _ctx: Any) -> Any:
        rewriter = None
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter = rewriter or make_rewriter(mod)
                if prepare is not None:
                    prepare(rewriter, func)
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        if rewriter is None:
            return mod
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass


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


def _out_extent(size: int, pad_lo: int, pad_hi: int, kernel: int, dilation: int, stride: int) -> int:
    """Output extent of one spatial axis of a convolution."""
    return (size + pad_lo + pad_hi - (kernel - 1) * dilation - 1) // stride + 1


def conv2d_nchw_to_nhwc(data: Any, kernel: Any, strides: Any, padding: Any, dilation: Any) -> Any:
    """TE conv2d reading ``data`` in NCHW, ``kernel`` in HWIO, writing NHWC (groups = 1)."""
    from tvm import te, topi

    n, c, h, w = (int(d) for d in data.shape)
    kh, kw, _, k = (int(d) for d in kernel.shape)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh, ow = _out_extent(h, pt, pb, kh, dh, sh), _out_extent(w, pl, pr, kw, dw, sw)
    if pt or pl or pb or pr:
        data = topi.nn.pad(data, [0, 0, pt, pl], [0, 0, pb, pr], name="pad_temp")
    rc = te.reduce_axis((0, c), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (n, oh, ow, k),
        lambda b, y, x, f: te.sum(data[b, rc, y * sh + ry * dh, x * sw + rx * dw] * kernel[ry, rx, rc, f], axis=[rc, ry, rx]),
        name="conv2d_nhwc",
    )


def fuse_input_transpose() -> Any:
    """A module pass: ``conv2d(permute_dims(x, NCHW->NHWC), W_HWIO)`` -> one NCHW-in/NHWC-out conv.

    Only where the transposed tensor is a parameter of the function (the model input) and has no
    other use, the conv is ungrouped, float32, with NHWC/HWIO/NHWC layouts (what ConvertLayout
    produces).
    """
    import tvm
    from tvm import relax

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    permute_op = tvm.ir.Op.get("relax.permute_dims")

    def uses_of(func: Any) -> dict[Any, int]:
        counts: dict[Any, int] = {}

        @relax.expr_functor.visitor
        class _Counter(relax.PyExprVisitor):
            def visit_var_(self, var: Any) -> None:  # noqa: N802 (TVM's naming)
                counts[var] = counts.get(var, 0) + 1

            def visit_dataflow_var_(self, var: Any) -> None:  # noqa: N802 (TVM's naming)
                counts[var] = counts.get(var, 0) + 1

        _Counter().visit_expr(func)
        return counts

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any, uses: dict[Any, int]) -> None:
            super().__init__(mod)
            self.uses = uses

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's naming)
            call = super().visit_call_(call)
            if call.op != conv_op:
                return call
            a = call.attrs
            if (
                str(a.data_layout) != "NHWC"
                or str(a.kernel_layout) != "HWIO"
                or str(a.out_layout) != "NHWC"
                or int(a.groups) != 1
                or (a.out_dtype is not None and str(a.out_dtype) not in ("", "float32"))
            ):
                return call
            data, kernel = call.args
            if not isinstance(data, relax.Var) or self.uses.get(data, 0) != 1:
                return call
            bound = self.lookup_binding(data)
            if not isinstance(bound, relax.Call) or bound.op != permute_op:
                return call
            axes = bound.attrs.axes
            if axes is None or [int(v) for v in axes] != [0, 2, 3, 1]:
                return call
            src = bound.args[0]
            # only the model's own input (a parameter, not a computed value: QDQ models keep
            # their quantize -> dequantize -> conv pattern for the int8 lowering)
            if not isinstance(src, relax.Var) or self.lookup_binding(src) is not None:
                return call
            for t in (src, kernel):
                ty = getattr(t, "ty", None)
                shape = getattr(ty, "shape", None)
                if str(getattr(ty, "dtype", "")) != "float32" or shape is None:
                    return call
                dims = getattr(shape, "values", shape)
                if len(dims) != 4 or any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
                    return call
            return self.builder_.call_te(
                conv2d_nchw_to_nhwc,
                src,
                kernel,
                strides=a.strides,
                padding=a.padding,
                dilation=a.dilation,
                primfunc_name_hint="conv2d_nchw_nhwc",
            )

    def _prepare(rewriter: Any, func: Any) -> None:
        rewriter.uses = uses_of(func)

    return mutator_pass("EdgecFuseInputTranspose", lambda mod: _Rewriter(mod, {}), _prepare)


def pack_hwio(w: Any, block: int) -> Any:
    """HWIO weights ``[KH, KW, Cg, K]`` packed to ``[K/B, KH, KW, Cg, B]`` (numpy)."""
    kh, kw, cg, k = w.shape
    return w.reshape(kh, kw, cg, k // block, block).transpose(3, 0, 1, 2, 4).copy()


def pack_matrix(w: Any, block: int) -> Any:
    """Matmul weights ``[C, K]`` packed to ``[K/B, C, B]`` (numpy)."""
    c, k = w.shape
    return w.reshape(c, k // block, block).transpose(1, 0, 2).copy()


def conv2d_nhwc_packed(data: Any, wp: Any, strides: Any, padding: Any, dilation: Any, groups: int) -> Any:
    """TE conv2d, NHWC data, packed ``[K/B, KH, KW, Cg, B]`` weights, NHWC output (any groups).

    ``y[n, h, w, k] = sum_{r, s, c} xp[n, h*sh + r*dh, w*sw + s*dw, g(k)*Cg + c] * Wp[k / B, r, s, c, k % B]``
    with ``g(k) = k / (K/groups)``: TOPI's NHWC conv term for term (same reduction order
    ``r, s, c``), only the weight index differs.
    """
    from tvm import te, topi

    n, h, w, c = (int(d) for d in data.shape)
    kb, kh, kw, cg, b = (int(d) for d in wp.shape)
    k = kb * b
    kg = k // groups
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh, ow = _out_extent(h, pt, pb, kh, dh, sh), _out_extent(w, pl, pr, kw, dw, sw)
    if pt or pl or pb or pr:
        data = topi.nn.pad(data, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, cg), name="rc")

    def body(bn: Any, y: Any, x: Any, f: Any) -> Any:
        ch = rc if groups == 1 else (f // kg) * cg + rc
        return te.sum(
            data[bn, y * sh + ry * dh, x * sw + rx * dw, ch] * wp[f // b, ry, rx, rc, f % b], axis=[ry, rx, rc]
        )

    return te.compute((n, oh, ow, k), body, name="conv2d_nhwc")


def matmul_packed(data: Any, wp: Any) -> Any:
    """TE ``y[i, k] = sum_c x[i, c] * Wp[k / B, c, k % B]`` (``Wp``: ``[C, K]`` packed, see :func:`pack_matrix`)."""
    from tvm import te

    m, c = (int(d) for d in data.shape)
    kb, _, b = (int(d) for d in wp.shape)
    rc = te.reduce_axis((0, c), name="k")
    return te.compute((m, kb * b), lambda i, f: te.sum(data[i, rc] * wp[f // b, rc, f % b], axis=[rc]), name="T_matmul_NN")


def _const_f32(e: Any, ndim: int) -> Any | None:
    """The numpy value of a float32 Relax constant of rank ``ndim``, or None."""
    import numpy as np
    import tvm

    if not isinstance(e, tvm.ir.expr.Constant):
        return None
    v = e.value.numpy()
    return v if v.dtype == np.float32 and v.ndim == ndim else None


def float_nhwc_conv(call: Any) -> tuple[Any, Any, list[int], list[int]] | None:
    """``(data, weights, input shape, output shape)`` of a float32 NHWC/HWIO ``conv2d`` call whose
    weights are a constant (numpy ``weights``) and whose 4-d shapes are static; else ``None``."""
    from edgec.schedules.fold import static_shape

    a = call.attrs
    if (
        str(a.data_layout) != "NHWC"
        or str(a.kernel_layout) != "HWIO"
        or str(a.out_layout) != "NHWC"
        or (a.out_dtype is not None and str(a.out_dtype) not in ("", "float32", "void"))
    ):
        return None
    data, kernel = call.args
    w = _const_f32(kernel, 4)
    shape, out = static_shape(data), static_shape(call)
    if w is None or shape is None or out is None or len(shape) != 4 or len(out) != 4:
        return None
    if str(getattr(getattr(data, "ty", None), "dtype", "")) != "float32":
        return None
    return data, w, shape, out


def pack_weights(target: Any) -> Any:
    """A module pass: conv2d (NHWC/HWIO) and matmul with constant float32 weights read packed weights.

    Which block ``B`` (output channels contiguous per weight row) each op gets is the register
    tile's channel block of :func:`edgec.schedules.cpu.channel_tile` for the op's output shape
    on ``target``; ops whose block is all the output channels (``K/B = 1``: packed = HWIO) are
    left as they are.
    """
    import tvm
    from tvm import relax

    from edgec.schedules.cpu import channel_tile, cpu_params
    from edgec.schedules.fold import static_shape

    params = cpu_params(target)
    lanes = params.lanes(32)
    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    matmul_op = tvm.ir.Op.get("relax.matmul")

    def block_for(k: int, w_ext: int, pixels: int, weight_bytes: int, pointwise: bool) -> int | None:
        reduce_len = weight_bytes // 4 // k
        b = channel_tile(k, w_ext, pixels, weight_bytes, lanes, params.registers, reduce_len, pointwise).block
        return b if 0 < b < k and k % b == 0 else None

    def f32(e: Any) -> bool:
        return str(getattr(getattr(e, "ty", None), "dtype", "")) == "float32"

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's naming)
            call = super().visit_call_(call)
            if call.op == conv_op:
                return self._conv(call)
            if call.op == matmul_op:
                return self._matmul(call)
            return call

        def _conv(self, call: Any) -> Any:
            a = call.attrs
            conv = float_nhwc_conv(call)
            if conv is None:
                return call
            data, w, shape, out = conv
            groups = int(a.groups)
            k = int(w.shape[3])
            if k % groups or shape[3] % groups or int(w.shape[2]) * groups != shape[3]:
                return call
            b = block_for(k, out[2], out[0] * out[1] * out[2], w.nbytes, int(w.shape[0]) * int(w.shape[1]) == 1)
            if b is None:
                return call
            return self.builder_.call_te(
                conv2d_nhwc_packed,
                data,
                relax.const(pack_hwio(w, b)),
                strides=a.strides,
                padding=a.padding,
                dilation=a.dilation,
                groups=groups,
                primfunc_name_hint="conv2d_packed",
            )

        def _matmul(self, call: Any) -> Any:
            data, weight = call.args
            w = _const_f32(weight, 2)
            shape, out = static_shape(data), static_shape(call)
            if w is None or shape is None or len(shape) != 2 or out is None or not f32(data):
                return call
            a = call.attrs
            if a.out_dtype is not None and str(a.out_dtype) not in ("", "float32", "void"):
                return call
            b = block_for(int(w.shape[1]), shape[0], shape[0], w.nbytes, True)
            if b is None:
                return call
            return self.builder_.call_te(matmul_packed, data, relax.const(pack_matrix(w, b)), primfunc_name_hint="matmul_packed")

    return mutator_pass("EdgecPackWeights", _Rewriter)


def channels_last_passes(target: Any | None = None) -> list[Any]:
    """Relax passes before legalization: BN/bias folding into conv weights (:mod:`edgec.schedules.fold`),
    parallel conv branches of one input merged into one conv (:mod:`edgec.schedules.branches`),
    clip canonicalization, NHWC/HWIO, weight folding; with a ``target``, weight packing for its
    register tiles (:func:`pack_weights`)."""
    from tvm import relax

    from edgec.schedules.branches import merge_conv_branches
    from edgec.schedules.fold import fold_conv_affine

    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        fold_conv_affine(),
        merge_conv_branches(),
        canonicalize_clip(),
        convert_layout_or_keep(),
        relax.transform.FoldConstant(),
        fuse_input_transpose(),
    ]
    if target is not None:
        from edgec.schedules.winograd import winograd_convs

        passes.append(winograd_convs(target))
        passes.append(pack_weights(target))
    return passes
