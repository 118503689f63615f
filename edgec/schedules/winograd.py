"""Winograd convolution for dense 3x3 stride-1 convs on CPUs (channels-last, fp32).

A 3x3 conv computes each ``m x m`` output tile from an ``a x a`` input patch, ``a = m + 2``.  The
minimal-filtering algorithm F(m x m, 3 x 3) (Lavin & Gray 2016) writes it as

``Y = A^T [ (G g G^T) (.) (B^T d B) ] A``

per tile and channel pair (``(.)``: element-wise product over the ``a x a`` transform points),
with the Cook-Toom matrices ``A`` (``a x m``), ``B`` (``a x a``), ``G`` (``a x 3``) of TVM's
``topi.nn.winograd_util`` (points 0, -1, 1, 1/2, -2, -1/2).  Summed over input channels the
element-wise products become one matrix product per transform point ``t = (e, n)``:

1. input transform (here, per tile ``p`` and input channel ``c``; zero padding by bounds tests)
   ``V[t, p, c] = sum_{i,j} B[i, e] B[j, n] xp[p, i, j, c]``;
2. batched GEMM ``M[t, p, k] = sum_c V[t, p, c] U[t, c, k]`` with the weights transformed at
   compile time (they are constants), ``U[t, c, k] = sum_{r,s} G[e, r] G[n, s] W[r, s, c, k]``,
   computed in float64 and packed per channel tile like every edgec weight
   (``Up[t, k / Bk, c, k % Bk]``);
3. output transform ``Y[p, i, j, k] = sum_{e,n} A[e, i] A[n, j] M[t, p, k]``, into which the
   conv's element-wise epilogue (bias, ReLU, residual add) is fused by ``FuseOps``.

Multiplies per output: ``9 C`` direct, ``a^2 C / m^2`` in the GEMM (4x fewer for F(4, 3), 2.25x
for F(2, 3)), plus the transforms, which are linear in the tensor sizes (no ``C`` factor).  The
transforms' sums are expanded at compile time into their non-zero terms (``B`` and ``A`` are
sparse), one expression per transform point, selected by the unrolled point index.

Numerics: both are exact in real arithmetic; in float32 F(2, 3) (coefficients 0, +-1, 1/2)
rounds about like the direct sum, F(4, 3) scales intermediate values by up to 8x and back.
Measured max abs error vs onnxruntime (random input, 1 thread): ResNet-18 2.4e-5 with F(4, 3),
1.3e-5 with F(2, 3), 1.9e-5 direct (output range 9); RepVGG-A0 6.9e-5 / 3.9e-5 / 4.9e-5.

Where it pays (1 thread, AVX-512, per conv in ResNet-18): 64 -> 64 at 56x56 2.18 ms direct ->
0.56 ms GEMM + 0.05 ms input + 0.07 ms output transform; 256 -> 256 at 14x14 2.13 -> ~0.95 ms.
F(2, 3) (16 points) ran slower than F(4, 3) everywhere measured (ResNet-18 0.71 vs 0.60x
onnxruntime, same run).

The rewrite runs at Relax level on ``conv2d`` in NHWC/HWIO with a constant float32 kernel
(after the channels-last conversion, before weight packing); which convs qualify and with which
``m`` is :func:`winograd_tile`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

#: block names of the three stages (the schedule rules recognize them by these)
INPUT_BLOCK = "winograd_input"
GEMM_BLOCK = "winograd_gemm"
OUTPUT_BLOCK = "winograd_output"
#: TVM's ``OpPatternKind::kOpaque``: the input transform fuses with nothing (see :func:`winograd_convs`)
_OPAQUE = 8


@dataclasses.dataclass(frozen=True)
class WinogradConfig:
    """Which 3x3 stride-1 convs become Winograd convs, with which output tile ``m``.

    ``min_channels``: input and output channels at least this many (the transforms cost
    ``O(pixels * C)``, the saved multiplies ``O(pixels * C^2)``; measured, whole single-conv
    models at 1 thread: 8 -> 8 at 56x56 0.109 -> 0.089 ms, 16 -> 16 0.312 -> 0.229 ms, 16 -> 16 at
    14x14 0.020 -> 0.015 ms, so Winograd pays from 8 channels; RGB convs stay direct); ``max_weight_bytes``: at most
    this many bytes of transformed weights ``a^2 * C * K * 4``, a memory cap: transformed weights
    are ``a^2 / 9`` times the conv's (4x for F(4x4)); ResNet-18's 512-channel 3x3 convs at 7x7
    would carry 37.7 MB each instead of 9.4 MB (+85 MB for the model) for 20.24 -> 18.77 ms, so
    they stay direct; ``tile``: ``m`` (2 or 4); ``min_tiles``: F(2x2, 3x3) instead of F(4x4, 3x3)
    where the output has fewer F(4x4) tiles than this (0: never; ResNet-18's 14x14 maps with F(2x2)
    measured 19.96 -> 20.11 ms, so off).
    """

    tile: int = 4
    min_channels: int = 8
    max_weight_bytes: int = 12 * 1024 * 1024
    min_tiles: int = 0


DEFAULT = WinogradConfig()


def matrices(m: int) -> tuple[Any, Any, Any]:
    """``(A, B, G)`` of F(m x m, 3 x 3) as float64 numpy arrays (``a x m``, ``a x a``, ``a x 3``)."""
    import numpy as np
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a = m + 2
    A, B, G = _cook_toom_convolution(_interpolation_points(a), m, 3)
    return np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64), np.asarray(G, dtype=np.float64)


def transform_weights(w: Any, m: int) -> Any:
    """HWIO ``[3, 3, C, K]`` weights -> ``U[a*a, C, K]`` (float64 math, float32 result)."""
    import numpy as np

    _, _, G = matrices(m)
    u = np.einsum("er,ns,rsck->enck", G, G, w.astype(np.float64))
    a = m + 2
    return u.reshape(a * a, w.shape[2], w.shape[3]).astype(np.float32)


def winograd_tile(
    kernel: tuple[int, int, int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    config: WinogradConfig | None = None,
    out_hw: tuple[int, int] | None = None,
) -> int | None:
    """The output tile ``m`` for a conv with HWIO ``kernel`` shape (output ``out_hw``), or None
    (direct conv)."""
    config = config if config is not None else DEFAULT
    kh, kw, c, k = kernel
    if (kh, kw) != (3, 3) or tuple(strides) != (1, 1) or tuple(dilation) != (1, 1) or groups != 1:
        return None
    if c < config.min_channels or k < config.min_channels:
        return None
    m = config.tile
    if m == 4 and out_hw is not None and (-(-out_hw[0] // 4)) * (-(-out_hw[1] // 4)) < config.min_tiles:
        m = 2
    a = m + 2
    if a * a * c * k * 4 > config.max_weight_bytes:
        return None
    return m


def _terms(coef: Any) -> list[tuple[int, float]]:
    return [(i, float(v)) for i, v in enumerate(coef) if v != 0.0]


def _lin(terms: list[tuple[int, float]], value: Any) -> Any:
    """``sum_i v_i * value(i)`` over the non-zero terms, multiplies by +-1 written as add/sub."""
    expr = None
    for i, v in terms:
        x = value(i)
        if v == 1.0:
            t, neg = x, False
        elif v == -1.0:
            t, neg = x, True
        else:
            t, neg = x * v, False
        if expr is None:
            expr = -t if neg else t
        else:
            expr = expr - t if neg else expr + t
    return expr


def _select(index: Any, exprs: list[Any]) -> Any:
    from tvm import tirx

    out = exprs[-1]
    for i in range(len(exprs) - 2, -1, -1):
        out = tirx.Select(index == i, exprs[i], out)
    return out


def input_transform(data: Any, m: int, padding: Any) -> Any:
    """TE ``V[t, p, c]`` of NHWC ``data`` (zero padding ``(top, left, bottom, right)``), in two
    separable stages: ``R[p, e, j, c] = sum_i B[i, e] xp[p, i, j, c]`` (block ``winograd_input_rows``),
    then ``V[(e, n), p, c] = sum_j B[j, n] R[p, e, j, c]``.  Each stage's sum is expanded into its
    non-zero terms per row of ``B`` and chosen by a select on ``e`` (or ``n``), which folds away
    once the schedule unrolls that loop."""
    from tvm import te, tirx

    _, B, _ = matrices(m)
    a = m + 2
    n, h, w, c = (int(d) for d in data.shape)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = -(-oh // m), -(-ow // m)
    zero = tirx.const(0.0, data.dtype)

    def rows(p: Any, e: Any, j: Any, ch: Any) -> Any:
        b = p // (th * tw)
        y0 = (p // tw) % th * m - pt
        x = p % tw * m - pl + j

        def d(i: int) -> Any:
            y = y0 + i
            return tirx.if_then_else(tirx.all(y >= 0, y < h, x >= 0, x < w), data[b, y, x, ch], zero)

        return _select(e, [_lin(_terms(B[:, k]), d) for k in range(a)])

    r = te.compute((n * th * tw, a, a, c), rows, name=INPUT_BLOCK + "_rows")

    def body(t: Any, p: Any, ch: Any) -> Any:
        e, nu = t // a, t % a
        return _select(nu, [_lin(_terms(B[:, k]), lambda j: r[p, e, j, ch]) for k in range(a)])

    return te.compute((a * a, n * th * tw, c), body, name=INPUT_BLOCK)


def batched_gemm(v: Any, up: Any) -> Any:
    """TE ``M[t, p, k] = sum_c V[t, p, c] * Up[t, k / B, c, k % B]``."""
    from tvm import te

    tt, p, c = (int(d) for d in v.shape)
    _, kb, _, bk = (int(d) for d in up.shape)
    rc = te.reduce_axis((0, c), name="rc")
    return te.compute(
        (tt, p, kb * bk), lambda t, q, k: te.sum(v[t, q, rc] * up[t, k // bk, rc, k % bk], axis=[rc]), name=GEMM_BLOCK
    )


def output_transform(mm: Any, m: int, out_shape: tuple[int, int, int, int]) -> Any:
    """TE NHWC ``Y[n, y, x, k]`` from ``M[t, p, k]`` (tiles overhanging the output are cut), in two
    separable stages: ``S[p, i, n, k] = sum_e A[e, i] M[(e, n), p, k]`` (block
    ``winograd_output_rows``), then ``Y[.., i, j, k] = sum_n A[n, j] S[p, i, n, k]``."""
    from tvm import te

    A, _, _ = matrices(m)
    a = m + 2
    n, oh, ow, k = out_shape
    th, tw = -(-oh // m), -(-ow // m)

    def rows(p: Any, i: Any, nu: Any, ch: Any) -> Any:
        return _select(i, [_lin(_terms(A[:, q]), lambda e: mm[e * a + nu, p, ch]) for q in range(m)])

    s = te.compute((n * th * tw, m, a, k), rows, name=OUTPUT_BLOCK + "_rows")

    def body(b: Any, y: Any, x: Any, ch: Any) -> Any:
        p = b * (th * tw) + (y // m) * tw + x // m
        return _select(x % m, [_lin(_terms(A[:, q]), lambda nu: s[p, y % m, nu, ch]) for q in range(m)])

    return te.compute((n, oh, ow, k), body, name=OUTPUT_BLOCK)


def gemm_block(k: int, tiles: int, points: int, c: int, target: Any) -> int:
    """Channel block ``B`` of the GEMM's packed weights: the reduction rule's tile for that GEMM."""
    from edgec.schedules.cpu import channel_tile, cpu_params

    params = cpu_params(target)
    ct = channel_tile(k, tiles, points * tiles, k * c * 4, params.lanes(32), params.registers, c, True)
    b = ct.block
    return b if 0 < b <= k and k % b == 0 else k


def winograd_convs(target: Any, config: WinogradConfig | None = None) -> Any:
    """A module pass: qualifying NHWC/HWIO float32 ``conv2d`` with constant weights -> the three
    Winograd stages (input transform, batched GEMM, output transform); see the module docstring.

    The input transform's PrimFunc is marked opaque for ``FuseOps``: otherwise the previous conv's
    output transform (injective) would be fused into it and recomputed once per transform point.
    """
    import numpy as np
    import tvm
    from tvm import relax

    from edgec.schedules.layout import float_nhwc_conv, mutator_pass, pack_matrix

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    config = config if config is not None else DEFAULT

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's naming)
            call = super().visit_call_(call)
            if call.op != conv_op:
                return call
            a = call.attrs
            conv = float_nhwc_conv(call)
            if conv is None:
                return call
            data, w, _shape, out = conv
            m = winograd_tile(
                tuple(int(d) for d in w.shape),
                tuple(int(v) for v in a.strides),
                tuple(int(v) for v in a.dilation),
                int(a.groups),
                config,
                (out[1], out[2]),
            )
            if m is None:
                return call
            c, k = int(w.shape[2]), int(w.shape[3])
            tiles = out[0] * (-(-out[1] // m)) * (-(-out[2] // m))
            u = transform_weights(w, m)
            bk = gemm_block(k, tiles, (m + 2) ** 2, c, target)
            up = np.stack([pack_matrix(u[t], bk) for t in range(u.shape[0])])
            vcall = self.builder_.call_te(input_transform, data, m=m, padding=a.padding, primfunc_name_hint="winograd_input")
            gv = vcall.args[0]
            self.builder_.update_func(gv, self.builder_.get()[gv].with_attr("op_pattern", _OPAQUE))
            v = self.builder_.emit(vcall)
            mm = self.builder_.emit(self.builder_.call_te(batched_gemm, v, relax.const(up), primfunc_name_hint="winograd_gemm"))
            return self.builder_.call_te(output_transform, mm, m=m, out_shape=tuple(out), primfunc_name_hint="winograd_output")

    return mutator_pass("EdgecWinograd", _Rewriter)


def _block_named(sch: Any, name: str) -> Any | None:
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - not this function
        return None


def _channel_vector(c_ext: int, lanes: int) -> int:
    for v in (lanes, lanes // 2, lanes // 4):
        if v >= 1 and c_ext % v == 0:
            return v
    return 1


def _tile_loops(sch: Any, outer: Any, unrolled: tuple[Any, Any], cv: Any, v: int, rows: Any, parallel: bool) -> None:
    """The two transforms' shared loop schedule: ``outer`` (tiles) parallel when it pays, the
    tile's two point loops ``unrolled``, the channel vector ``cv`` (``v`` lanes) vectorized, and
    the row stage ``rows`` computed per first point row into a stack buffer, its own point loops
    unrolled and its channel loop vectorized."""
    from edgec.schedules.cpu import ACCUMULATOR_SCOPE, _extent

    if parallel:
        sch.parallel(outer)
    for lp in unrolled:
        sch.unroll(lp)
    if v > 1:
        sch.vectorize(cv)
    sch.set_scope(rows, 0, ACCUMULATOR_SCOPE)
    sch.compute_at(rows, unrolled[0])
    r_loops = sch.get_loops(rows)
    for lp in r_loops[-3:-1]:
        if _extent(sch, lp) > 1:
            sch.unroll(lp)
    if v > 1 and _extent(sch, r_loops[-1]) == v:
        sch.vectorize(r_loops[-1])


def schedule_input(func: Any, target: Any) -> Any | None:
    """The input transform: parallel over tiles, one channel vector at a time, the ``a x a``
    points unrolled; the row stage computed per row ``e`` of points into an ``a``-vector
    buffer on the stack (its selects fold, its patch loads are shared by LLVM)."""
    from tvm import s_tir

    from edgec.schedules.cpu import _extent, cpu_params, run_serially

    sch = s_tir.Schedule(func)
    blk = _block_named(sch, INPUT_BLOCK)
    rows = _block_named(sch, INPUT_BLOCK + "_rows")
    if blk is None or rows is None:
        return None
    t, p, c = sch.get_loops(blk)
    a = math.isqrt(_extent(sch, t))
    c_ext = _extent(sch, c)
    v = _channel_vector(c_ext, cpu_params(target).lanes(32))
    e, nu = sch.split(t, factors=[a, a])
    co, cv = sch.split(c, factors=[None, v])
    sch.reorder(p, co, e, nu, cv)
    _tile_loops(sch, p, (e, nu), cv, v, rows, not run_serially(a * a * _extent(sch, p) * c_ext * a))
    return sch


def schedule_output(func: Any, target: Any) -> Any | None:
    """The output transform with its fused epilogue: parallel over tiles, one channel vector at a
    time, the ``m x m`` outputs of a tile unrolled; the row stage computed per output row ``i``
    into an ``a``-vector buffer on the stack."""
    from tvm import s_tir

    from edgec.schedules.cpu import _extent, _region_buffer, _schedule_producer, cpu_params, run_serially

    sch = s_tir.Schedule(func)
    blk = _block_named(sch, OUTPUT_BLOCK)
    rows = _block_named(sch, OUTPUT_BLOCK + "_rows")
    if blk is None or rows is None:
        return None
    m = _output_tile(sch, rows)
    if m is None:
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    shape = [int(d) for d in _region_buffer(sch.get(blk).writes[0]).shape]
    # the fused epilogue is inlined into the last block of the output's NHWC shape; any block
    # after that (the model output's transpose back to NCHW) stays its own loop nest
    same = max(i for i, b in enumerate(blocks) if [int(d) for d in _region_buffer(sch.get(b).writes[0]).shape] == shape)
    for b in blocks[:same]:
        if sch.get(b).same_as(sch.get(rows)):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - stays its own loop nest
            if sch.get(b).same_as(sch.get(blk)):
                return None
            _schedule_producer(sch, b, cpu_params(target).lanes(32), False)
    last = blocks[same]
    rest = blocks[same + 1 :]
    loops = sch.get_loops(last)
    if len(loops) != 4:
        return None
    n, y, x, c = loops
    yo, yi = sch.split(y, factors=[None, m])
    xo, xi = sch.split(x, factors=[None, m])
    lanes = cpu_params(target).lanes(32)
    c_ext = _extent(sch, c)
    v = _channel_vector(c_ext, lanes)
    co, cv = sch.split(c, factors=[None, v])
    sch.reorder(n, yo, xo, co, yi, xi, cv)
    fused = sch.fuse(n, yo, xo)
    elems = math.prod(shape)
    _tile_loops(sch, fused, (yi, xi), cv, v, rows, not run_serially(elems * (m + 2) ** 2 // m))
    for b in rest:
        _schedule_producer(sch, b, lanes, not run_serially(elems * 8))
    return sch


def _output_tile(sch: Any, blk: Any) -> int | None:
    """``m`` of the output transform block: the ``M`` it reads is ``[(m + 2)^2, P, K]``."""
    import math

    from edgec.schedules.cpu import _region_buffer

    for region in sch.get(blk).reads:
        shape = [int(d) for d in _region_buffer(region).shape]
        a = math.isqrt(shape[0]) if len(shape) == 3 else 0
        if a * a == shape[0] and a in (4, 6):
            return a - 2
    return None


#: tried before edgec's generic CPU rules
RULES = (schedule_input, schedule_output)
