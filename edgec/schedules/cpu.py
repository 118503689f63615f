"""Rule-based CPU schedules (x86 AVX2/AVX-512, ARM NEON) for channels-last edge CNNs.

After :mod:`edgec.schedules.layout` every conv, pooling, mean and matmul of an edge CNN is one
*reduction block* whose output's innermost axis ``c`` (output channel, or matmul column) is
contiguous in memory, wrapped by injective producers (padding) and consumers (bias, ReLU6,
residual add).  One rule covers all of them (conv2d pointwise/dense/depthwise/grouped,
dense/matmul, pooling, mean):

``y[s_0, ..., s_{n-2}, c] = sum_r f(x, w)[s, c, r]``

is computed as a register-blocked micro-kernel::

    parallel for (s_0 .. s_{n-3}, s_{n-2}/Tw, c/(V*Tc)):     # one fused parallel loop
        acc[Tw][Tc*V] = 0                                      # accumulator tile, on the stack
        for r in reductions:                                   # kernel rows/cols, input channels
            unroll for i < Tw: unroll for j < Tc: vector(V) acc[i][j*V:(j+1)*V] += ...
        epilogue(acc) -> y                                     # bias/clip/add fused, vectorized

``V`` is the target's float lanes (16 on AVX-512, 8 on AVX2, 4 on NEON); ``Tc`` vectors by
``Tw`` output pixels (along the output row) are chosen so the ``Tw*Tc`` accumulators fit the
register file (32 on AVX-512/NEON, 16 on AVX2) with room for the operands.  Padding producers
are inlined (the bounds test depends on ``h, w`` only, never on the vector lane), epilogues are
computed per tile while the accumulators are hot, so each output element is written once.

Injective functions (transposes, standalone elementwise ops) are flattened, vectorized by ``V``
and parallelized.  Anything else gets its outer spatial loops parallelized.  Every rule keeps the
numbers of the unscheduled function exactly (only loop order changes; summation order within
one output element changes only through the reduction loop order, which is unchanged).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class CpuParams:
    """Register-file parameters of a CPU target family."""

    vector_bits: int
    registers: int

    def lanes(self, dtype_bits: int) -> int:
        return max(1, self.vector_bits // dtype_bits)


def cpu_params(target: Any) -> CpuParams:
    """Vector width and vector register count of an llvm ``target``."""
    from tvm.target import codegen

    mtriple = str(target.attrs["mtriple"]) if "mtriple" in target.attrs else ""
    is_arm = mtriple.startswith(("aarch64", "arm64", "arm"))
    bits = 128
    if not is_arm:
        # llvm_get_vector_width reports 512 for AVX2-only CPUs; ask for the features instead
        try:
            if codegen.llvm_cpu_has_features(["avx512f"], target):
                bits = 512
            elif codegen.llvm_cpu_has_features(["avx2"], target):
                bits = 256
        except Exception:  # noqa: BLE001 - a CPU llvm does not know: SSE-sized vectors
            bits = 128
    registers = 32 if (bits == 512 or is_arm) else 16
    return CpuParams(vector_bits=bits, registers=registers)


def _extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _pick(extent: int, candidates: list[int]) -> int:
    for c in candidates:
        if c <= extent and extent % c == 0:
            return c
    return 1


def _block_dtype_bits(sch: Any, block: Any) -> int:
    buf = _region_buffer(sch.get(block).writes[0])
    return int(tvm_dtype_bits(buf.dtype))


def _region_buffer(region: Any) -> Any:
    buf = getattr(region, "buffer", None)
    return buf if buf is not None else region.source


def tvm_dtype_bits(dtype: Any) -> int:
    import tvm

    return int(tvm.runtime.DataType(str(dtype)).bits)


def _vectorize_tail(sch: Any, block: Any, lanes: int, below: Any | None = None) -> None:
    """Vectorize the innermost loop of ``block`` by ``lanes`` if its extent allows.

    ``below``: the loop ``block`` was computed at; only loops nested under it are ``block``'s own.
    When every own loop had extent 1 (e.g. a per-channel epilogue of a global mean in NCHW) the
    innermost loop is the shared parallel loop, which also holds the reduction: vectorizing that
    would vectorize the reduction's loop nest, so nothing is done.
    """
    loops = sch.get_loops(block)
    if below is not None:
        anchor = sch.get(below)
        idx = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(anchor)]
        loops = loops[idx[0] + 1 :] if idx else loops
    if not loops:
        return
    inner = loops[-1]
    ext = _extent(sch, inner)
    if ext is None or ext <= 1:
        return
    if ext % lanes == 0 and ext > lanes:
        _, inner = sch.split(inner, factors=[None, lanes])
        sch.vectorize(inner)
    elif ext <= lanes:
        sch.vectorize(inner)


_TC_CANDIDATES = (4, 3, 2, 1)
_TC_WIDE = (8, 7, 6, 5)
_TW_MAX = 8


def tile_shape(c_vectors: int, w_ext: int, registers: int, max_tile: int | None = None) -> tuple[int, int]:
    """Register tile ``(Tw pixels, Tc vectors)`` of the reduction rule.

    Live vector registers in the inner loop: ``Tw*Tc`` accumulators, ``Tc`` weight vectors and one
    broadcast (or input) operand, so ``Tc*(Tw+1) + 1 <= registers`` (no spills: measured on
    AVX-512, ``Tw=7, Tc=4`` spills and runs ~1.5x slower than ``Tw=7, Tc=2``).  ``Tc`` divides
    the channel vectors and ``Tw`` the output row (no tail tiles).  Among those, the largest tile
    ``Tw*Tc`` (most FMAs per operand load), ties broken towards the squarer tile (fewest loads
    per FMA, ``(Tw+Tc)/(Tw*Tc)``).

    ``Tc`` in 5..8 only when no ``Tc`` in 2..4 divides the channel vectors: odd vector counts
    (40 channels = 5 vectors of 8 lanes, 200 = 25, 1000 classes = 125) otherwise fall back to
    ``Tc = 1``, one accumulator chain per pixel, latency-bound.  Measured (1 thread, AVX-512):
    1x1 conv 160 -> 40 at 9x9 30 -> 11 us, 40 -> 200 40 -> 17 us, the 160 -> 1000 classifier
    23.5 -> 7.3 us, 1280 -> 1000 180 -> 67 us.  Where 2..4 divide, a wide ``Tc`` lost: 3x3 conv
    256 -> 256 at 14x14 2.3 -> 3.2 ms with ``(Tw, Tc) = (2, 8)`` instead of ``(7, 2)``.

    ``max_tile``: at most that many accumulator vectors ``Tw*Tc`` (see :func:`stack_tile_vectors`).
    """

    def best_of(candidates: tuple[int, ...]) -> tuple[int, int]:
        best = (1, 1)
        best_key = (0, 0)
        for tc in candidates:
            if tc > c_vectors or c_vectors % tc:
                continue
            for tw in range(min(_TW_MAX, w_ext), 0, -1):
                if w_ext % tw or tc * (tw + 1) + 1 > registers or (max_tile is not None and tw * tc > max_tile):
                    continue
                key = (tw * tc, -(tw + tc))
                if key > best_key:
                    best, best_key = (tw, tc), key
                break
        return best

    best = best_of(_TC_CANDIDATES)
    if best[1] == 1 and c_vectors > 1:
        wide = best_of(_TC_WIDE)
        if wide[0] * wide[1] > best[0] * best[1]:
            best = wide
    return best


@dataclasses.dataclass(frozen=True)
class ChannelTile:
    """The register tile of the reduction rule along the output's channel axis.

    ``lanes`` channels per vector (``V``), ``vectors`` vectors per tile (``Tc``), ``pixels``
    output pixels per tile (``Tw``); ``streaming``: a matrix-vector product whose tile is a wide
    chunk of ``vectors`` (see :func:`stream_chunk`).  ``block = Tc * V`` output channels: the
    block edgec's weight packing (:func:`edgec.schedules.layout.pack_weights`) lays out
    contiguously, so the packing and the schedule must use this one function.
    """

    lanes: int
    vectors: int
    pixels: int
    streaming: bool

    @property
    def block(self) -> int:
        return self.lanes * self.vectors


#: dense reductions at least this long with at most _NARROW_VECTORS output vectors get long rows
_NARROW_MIN_REDUCTION = 64
_NARROW_VECTORS = 3
_TW_LONG = 28


def narrow_tile(c_vectors: int, w_ext: int, reduce_len: int, registers: int, pointwise: bool = True) -> tuple[int, int] | None:
    """``(Tw, 1)``, a long row of output pixels one vector wide, for pointwise reductions (1x1 convs,
    every reduction step one input channel) with few output vectors (to 16/24/32 channels), or None.

    There every register tile reads all ``C`` input channels' weights of its ``Tc*V`` outputs
    (``C*Tc*V`` floats) to produce ``Tw`` pixels, so the weight stream per output is ``C/Tw``:
    more pixels per tile cut it, while the tile's input pixels (``Tw*C`` floats) stay in L1 across
    the few channel tiles.  ``Tw`` is the largest divisor of the row up to 28 with
    ``Tw + 2 <= registers``.  Measured (1 thread, AVX-512, warm): 1x1 conv 144 -> 24 at 56x56
    300 -> 226 us with ``(28, 1)`` instead of ``(8, 3)``, 32 -> 16 at 112x112 191 -> 174 us,
    192 -> 32 at 28x28 96 -> 87 us.  Depthwise convs (reduction 9-49) are excluded: 32 channels at
    112x112 with ``(14, 2)`` ran 163 -> 271 us; so are 3x3 convs (``pointwise`` False): 32 -> 32
    stride 2 at 112x112 565 -> 625 us with ``(28, 1)``.
    """
    if not pointwise or reduce_len < _NARROW_MIN_REDUCTION or c_vectors > _NARROW_VECTORS or w_ext <= _TW_MAX:
        return None
    for tw in range(min(_TW_LONG, w_ext, registers - 2), _TW_MAX, -1):
        if w_ext % tw == 0:
            return tw, 1
    return None


#: TVM 0.27's ``LowerTVMBuiltin`` keeps a CPU allocation on the stack only if its scope is
#: ``"global"`` and it is smaller than this many bytes (``runtime::kMaxStackAlloca``); any other
#: allocation (every ``"local"`` one, whatever its size) becomes a ``TVMBackendAllocWorkspace`` /
#: ``TVMBackendFreeWorkspace`` call pair.
STACK_ALLOCA_BYTES = 1024
#: reductions shorter than this keep their accumulator tile on the stack (:func:`stack_tile_vectors`)
_STACK_TILE_MAX_REDUCTION = 256
#: scope of the register tile's accumulator buffer (see :func:`stack_tile_vectors`).
ACCUMULATOR_SCOPE = "global"


def stack_tile_vectors(lanes: int, dtype_bytes: int = 4) -> int:
    """Most accumulator vectors ``Tw*Tc`` of a tile whose accumulator buffer stays on the stack.

    The accumulator tile is allocated inside the parallel loop, once per tile.  On the stack
    (``"global"`` scope, under :data:`STACK_ALLOCA_BYTES`) LLVM promotes it to registers; otherwise
    every tile calls the workspace allocator and frees, and zero-fills the buffer with a
    ``memset`` call.  That costs little against a dense conv's tile (hundreds of reduction steps)
    but dominated the depthwise convs (9-49 steps per tile).  Measured (warm, 1 thread, AVX-512),
    depthwise 3x3 with the tile capped to 15 vectors (on the stack) instead of 16-24 (workspace):
    144 ch at 56x56 212 -> 130 us, 32 ch at 112x112 162 -> 108 us, 192 ch at 28x28 60 -> 46 us,
    576 ch at 14x14 54 -> 38 us, stride 2 96 ch at 112x112 140 -> 94 us; 1x1 convs (tile (7, 2)
    instead of (7, 3)) 96 -> 576 at 14x14 206 -> 191 us, 64 -> 384 95 -> 85 us, 160 -> 960 at
    7x7 139 -> 131 us; dense 3x3 convs (576+ taps) and 320 -> 1280 unchanged within 1%, so the cap
    applies below 256 taps only.
    """
    return max(1, (STACK_ALLOCA_BYTES - 1) // (lanes * dtype_bytes))


def channel_tile(
    c_ext: int,
    w_ext: int,
    pixels: int,
    weight_bytes: int,
    lanes: int,
    registers: int,
    reduce_len: int = 0,
    pointwise: bool = False,
) -> ChannelTile:
    """The tile of a reduction with ``c_ext`` output channels (innermost output axis), an output
    row of ``w_ext`` pixels, ``pixels`` output pixels in all, ``weight_bytes`` of weights,
    ``reduce_len`` multiply-adds per output (``pointwise``: all over the innermost axis, a 1x1
    conv or a matmul).  Reductions under 256 taps (depthwise, 1x1 convs from fewer than 256
    channels) keep their accumulator tile on the stack (:func:`stack_tile_vectors`)."""
    v = _pick(c_ext, [lanes, lanes // 2, lanes // 4]) if lanes > 1 else 1
    if v < 4 and c_ext < lanes and c_ext > 1:
        v = c_ext  # narrow channels (e.g. 3): one short vector
    max_tile = stack_tile_vectors(v) if 0 < reduce_len < _STACK_TILE_MAX_REDUCTION else None
    tw, tc = narrow_tile(c_ext // v, w_ext, reduce_len, registers, pointwise) or tile_shape(c_ext // v, w_ext, registers, max_tile)
    streaming = pixels == 1 and weight_bytes >= _STREAM_MIN_BYTES
    if streaming:
        tw, tc = 1, stream_chunk(c_ext // v)
    return ChannelTile(lanes=v, vectors=tc, pixels=tw, streaming=streaming)


def schedule_reduction(func: Any, target: Any) -> Any | None:
    """The register-blocked reduction rule; None if ``func`` is not of that shape."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    main = reductions[0]
    index = [sch.get(b).same_as(sch.get(main)) for b in blocks].index(True)
    producers, consumers = blocks[:index], blocks[index + 1 :]

    block = sch.get(main)
    loops = sch.get_loops(main)
    iters = list(block.iter_vars)
    if len(loops) != len(iters):
        return None
    # loops must bind 1:1 to iter vars in order (true for legalized, unscheduled functions)
    realize = _realize(sch, main)
    if realize is None:
        return None
    for loop, value in zip(loops, realize.iter_values):
        if not (isinstance(value, tirx.Var) and value.same_as(sch.get(loop).loop_var)):
            return None
    kinds = ["S" if iv.iter_type == tirx.IterVar.DataPar else "R" if iv.iter_type == tirx.IterVar.CommReduce else "O" for iv in iters]
    if "O" in kinds or "R" not in kinds:
        return None
    n_spatial = kinds.index("R")
    if n_spatial < 1 or any(k != "R" for k in kinds[n_spatial:]):
        return None
    # the innermost spatial iter must be the innermost index of the output
    write = block.writes[0]
    last_index = write.region[-1].min if write.region else None
    if last_index is None or not (isinstance(last_index, tirx.Var) and last_index.same_as(iters[n_spatial - 1].var)):
        return None
    if any(_extent(sch, lp) is None for lp in loops):
        return None

    params = cpu_params(target)
    lanes = params.lanes(_block_dtype_bits(sch, main))
    operand_bytes = _operand_bytes(sch, main, iters, n_spatial)

    reduce_len = 1
    for lp in loops[n_spatial:]:
        reduce_len *= _extent(sch, lp) or 1
    out_elems = 1
    for lp in loops[:n_spatial]:
        out_elems *= _extent(sch, lp) or 1
    in_elems = operand_bytes[0] // max(1, _block_dtype_bits(sch, main) // 8) if operand_bytes else 0
    inline = not _materialize_producers(reduce_len, in_elems, out_elems)
    kept = []
    for p in reversed(producers):
        if not inline:
            kept.append(p)
            continue
        try:
            sch.compute_inline(p)
        except Exception:  # noqa: BLE001 - a producer that cannot be inlined stays a separate loop nest
            kept.append(p)
    epilogue = None
    if consumers:
        for cblock in consumers[:-1]:
            try:
                sch.compute_inline(cblock)
            except Exception:  # noqa: BLE001
                return None
        epilogue = consumers[-1]

    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    c_loop = spatial[-1]
    c_ext = _extent(sch, c_loop)
    w_ext = _extent(sch, spatial[-2]) if len(spatial) >= 2 else 1
    pixels = 1
    for lp in spatial[:-1]:
        pixels *= _extent(sch, lp) or 1
    weight_bytes = operand_bytes[1] if operand_bytes is not None else c_ext * reduce_len * 4
    pointwise = reduce_len == (_extent(sch, reduce[-1]) or 0)
    ct = channel_tile(c_ext, w_ext, pixels, weight_bytes, lanes, params.registers, reduce_len, pointwise)
    v, tw, tc, streaming = ct.lanes, ct.pixels, ct.vectors, ct.streaming
    if len(spatial) >= 2:
        w_loop = spatial[-2]
        w_o, w_i = sch.split(w_loop, factors=[None, tw])
        outer = list(spatial[:-2]) + [w_o]
    else:
        w_i = None
        outer = []
    c_o, c_m, c_v = sch.split(c_loop, factors=[None, tc, v])
    tile = ([w_i] if w_i is not None else []) + [c_m, c_v]
    n_pixel_tiles = 1
    for lp in outer:
        n_pixel_tiles *= _extent(sch, lp) or 1
    blocks = pixel_blocks(operand_bytes, n_pixel_tiles, c_ext // (tc * v)) if outer else 1
    if blocks == 1:
        sch.reorder(c_o, *outer, *reduce, *tile)
        fused = sch.fuse(c_o, *outer) if outer else c_o
    elif blocks < n_pixel_tiles:
        pixel = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        p_o, p_i = sch.split(pixel, factors=[blocks, None])
        sch.reorder(p_o, c_o, p_i, *reduce, *tile)
        fused = sch.fuse(p_o, c_o, p_i)
    else:
        sch.reorder(*outer, c_o, *reduce, *tile)
        fused = sch.fuse(*outer, c_o) if outer else c_o
    parallel = not run_serially(out_elems * reduce_len)
    if parallel:
        sch.parallel(fused)
    if w_i is not None:
        sch.unroll(w_i)
    if not streaming:
        sch.unroll(c_m)
    if unroll_kernel_columns(reduce_len, inline) and len(reduce) >= 2:
        for r in reduce[-2:]:
            sch.unroll(r)
    if v > 1:
        sch.vectorize(c_v)

    for p in kept:
        per_tile = reduce_len >= _AT_TILE_MIN_REDUCTION and (_extent(sch, reduce[-1]) or 1) >= lanes
        _producer_at_tile(sch, p, fused if per_tile else None, lanes, parallel)

    if epilogue is not None:
        sch.set_scope(main, 0, ACCUMULATOR_SCOPE)
        sch.reverse_compute_at(epilogue, fused)
        _vectorize_tail(sch, epilogue, lanes, below=fused)
    else:
        epilogue = sch.cache_write(main, 0, ACCUMULATOR_SCOPE)
        sch.reverse_compute_at(epilogue, fused)
        _vectorize_tail(sch, epilogue, lanes, below=fused)
    init = sch.decompose_reduction(main, reduce[0])
    init_loops = sch.get_loops(init)
    if v > 1:
        sch.vectorize(init_loops[-1])
    return sch


_STREAM_MIN_BYTES = 256 * 1024
_STREAM_CHUNKS = (4, 8, 2, 6, 5, 3, 7)
_STREAM_MIN_CHUNK = 8


def stream_chunk(c_vectors: int) -> int:
    """Channel vectors per parallel chunk of a matrix-vector product (one output pixel).

    A classifier ``y[k] = sum_c x[c] * W[c, k]`` (or a 1x1 conv on a 1x1 map) has no pixel reuse:
    it streams its weights once, and they are cold (read once per inference, evicted by the
    rest of the network).  With register tiles of ``Tc`` vectors each weight row is read in
    ``Tc*V``-float pieces at a stride of ``C_out`` floats, which the hardware prefetchers
    follow poorly.  Instead each parallel chunk holds a wide slice of the outputs (its
    accumulators in L1, not registers) and walks the reduction reading ``chunk*V`` contiguous
    floats of every weight row.  Chunks: 4 (or another count dividing the vectors, preferring
    even counts for 2-core boards) of at least 8 vectors each.
    """
    for n in _STREAM_CHUNKS:
        if c_vectors % n == 0 and c_vectors // n >= _STREAM_MIN_CHUNK:
            return c_vectors // n
    return c_vectors


def _operand_bytes(sch: Any, block_rv: Any, iters: list[Any], n_spatial: int) -> tuple[int, int] | None:
    """(bytes of the data operand, bytes of the weight operand) of a reduction block, or None.

    The weight is the read buffer whose indices do not depend on the output-pixel iterators
    (every spatial iter but the channel one), the data operand is the largest other read.
    """
    import math

    from tvm import tirx

    pixel_vars = [iv.var for iv in iters[: n_spatial - 1]]

    def uses_pixel(region: Any) -> bool:
        for r in region.region:
            free = tirx.analysis.undefined_vars(r.min, [])
            if any(f.same_as(v) for f in free for v in pixel_vars):
                return True
        return False

    data, weight = 0, 0
    for region in sch.get(block_rv).reads:
        buf = _region_buffer(region)
        try:
            size = math.prod(int(d) for d in buf.shape) * max(1, tvm_dtype_bits(buf.dtype) // 8)
        except (TypeError, ValueError):
            return None
        if uses_pixel(region):
            data = max(data, size)
        else:
            weight = max(weight, size)
    if not pixel_vars or data == 0 or weight == 0:
        return None
    return data, weight


def _channel_tiles_outside(operand_bytes: tuple[int, int] | None, n_pixel_tiles: int, n_channel_tiles: int) -> bool:
    """Whether the channel-tile loop should be the outer one (cache blocking of the weights).

    The outer loop's slice of its operand stays in cache while the inner loop streams the whole
    other operand, once per outer iteration:

    - pixel tiles outside: ``n_pixel_tiles * weight + data`` bytes read;
    - channel tiles outside: ``n_channel_tiles * data + weight`` bytes read.

    Large weights with few pixels (late 1x1 convs: 7x7 x 320 -> 1280, 1.6 MB of weights) are
    read once instead of once per output row with the channel tiles outside.
    """
    if operand_bytes is None or n_channel_tiles <= 1:
        return False
    data, weight = operand_bytes
    return n_channel_tiles * data + weight < n_pixel_tiles * weight + data


#: pixel blocks of a reduction whose weights are blocked (channel tiles inside each block): the
#: first of these that divides its pixel tiles (see :func:`pixel_blocks`)
_PIXEL_BLOCKS = (4, 2)
#: weights up to this size are re-read per pixel tile rather than split the output by channels
#: when the pixel tiles do not divide into blocks (about one core's L2 cache)
PIXEL_OUTSIDE_MAX_WEIGHT = 1 << 20


def pixel_blocks(operand_bytes: tuple[int, int] | None, n_pixel_tiles: int, n_channel_tiles: int) -> int:
    """How a reduction's parallel loop orders its pixel tiles (output rows) and channel tiles.

    The parallel loop is split into one contiguous range per thread.  With the pixel tiles
    outermost, each thread computes a band of output rows; the next layer splits its rows the
    same way, so most of what each thread reads was written by itself and is still in its own
    cache.  With the channel tiles outermost (weight blocking, :func:`_channel_tiles_outside`),
    each thread computes some channels of every row, and the next layer reads half its input
    from the other core's cache.  Returned:

    - ``n_pixel_tiles``: pixel tiles outermost (weights re-read once per pixel tile);
    - ``1``: channel tiles outermost (weights read once);
    - between: that many blocks of pixel tiles outermost, the channel tiles inside each block
      (weights read once per block): row bands per thread with most of the weight blocking.

    Blocks: 4, else 2, whichever divides the pixel tiles (4 bands serve 1, 2 and 4 threads).
    Where neither divides (7x7 maps), pixel tiles outermost if the weights fit about one core's L2
    (:data:`PIXEL_OUTSIDE_MAX_WEIGHT`), else channel tiles outermost: re-reading ResNet-18's
    9.4 MB of 512-channel 3x3 weights per row would stream them from memory on a board without
    an L3 cache.  Measured (AVX-512 host, 2 threads, each runtime in its own process, median of
    per-round ratios to onnxruntime, channel tiles outermost -> row bands): mcunet 0.99 -> 0.95,
    mobilenet_v2 1.07 -> 0.83, mobilenetv4_conv_small 1.03 -> 0.99 (1.10 -> 0.90 while this VM's
    two vCPUs sat far apart: a 350 ns cache-line round trip instead of 60 ns), repvgg_a0 0.62 ->
    0.56, mobileone_s0 0.27 -> 0.24, resnet18 0.63 both; 1 thread within 2% either way.
    """
    if not _channel_tiles_outside(operand_bytes, n_pixel_tiles, n_channel_tiles):
        return n_pixel_tiles
    for blocks in _PIXEL_BLOCKS:
        if n_pixel_tiles % blocks == 0:
            return blocks
    weight = operand_bytes[1] if operand_bytes is not None else 0
    return n_pixel_tiles if weight <= PIXEL_OUTSIDE_MAX_WEIGHT else 1


def unroll_kernel_columns(reduce_len: int, inline_padding: bool) -> bool:
    """Whether the innermost two reduction loops (kernel columns, and the unit channel loop of a
    depthwise conv) are unrolled: for short reductions (depthwise, < 64 taps) whose padding is
    inlined (stride-2 depthwise, see :func:`_materialize_producers`).  Unrolled, LLVM hoists the
    column bounds tests out of the tile and shares the input loads of neighbouring columns.
    Measured (warm, 1 thread, AVX-512): stride-2 depthwise 96 ch at 112x112 175 -> 135 us; with
    materialized padding (stride 1) unrolling lost (144 ch at 56x56 213 -> 250 us), so not there.
    """
    return inline_padding and reduce_len < _AT_TILE_MIN_REDUCTION


_MATERIALIZE_MAX_COPY = 0.25
#: reductions with fewer multiply-adds than this run serially (no parallel loop, see below).
PARALLEL_MIN_MACS = 500_000


def run_serially(macs: int) -> bool:
    """Whether a reduction of ``macs`` multiply-adds gets no parallel loop.

    Every parallel loop is a call into TVM's thread pool, which costs microseconds even with one
    thread (the pool's launch and barrier) and, with more threads, wakes workers that may be
    descheduled on a busy board.  A tiny function gains less from a second core than that.
    First measured on a loaded host (mcunet, ~50 functions of 5-70 us; same-run A/B): 1 thread
    1.31 -> 1.12 ms with functions under 2M multiply-adds serial, 2 threads 1.66 -> 1.18 ms.
    On a quiet host, each runtime in its own process (``bench/compare_isolated.py``), 2M kept
    mcunet at its 1-thread time with 2 threads (0.80 ms, onnxruntime 0.60); with 500K: 2 threads
    0.58 ms, 1 thread 0.82 ms (+2%), mobilenet_v2 at 2 threads 3.87 -> 3.69 ms,
    mobilenetv4_conv_small 2.21 -> 2.09 ms; 50K-250K measured the same as 500K on mcunet.
    """
    return macs < PARALLEL_MIN_MACS


def _materialize_producers(reduce_len: int, in_elems: int, out_elems: int) -> bool:
    """Whether a reduction's producers (zero padding) get their own loop nest instead of inlining.

    Inlined padding puts a bounds test on every input load of the micro-kernel (``Tw`` tests per
    ``Tw*Tc`` FMAs at every reduction step).  A materialized padded input costs one copy,
    ``in_elems`` stores, against ``out_elems * reduce_len`` multiply-adds of the reduction.
    Materialize when the copy is under a quarter of the reduction's work: dense convs (ratio
    ~1e-2), stride-1 depthwise 3x3 (~1/9); keep the inlined test for stride-2 depthwise (~4/9),
    where the padded copy is 4x the output.  Measured on AVX-512: dense 3x3 convs 2x faster,
    stride-1 depthwise ~15% faster, stride-2 depthwise 1.5x slower if materialized.
    """
    if in_elems <= 0 or out_elems <= 0:
        return False
    return in_elems < _MATERIALIZE_MAX_COPY * out_elems * reduce_len


_AT_TILE_MIN_REDUCTION = 64


def _producer_at_tile(sch: Any, block_rv: Any, fused: Any | None, lanes: int, parallel: bool = True) -> None:
    """Compute a kept producer (padding) per tile of the parallel loop ``fused``, else (``fused``
    None, or that fails) as its own parallel loop nest.

    Per tile, only the input patch that tile reads is padded (``(Tw-1)*stride + kw`` columns by
    ``kh`` rows by the tile's input channels), into a buffer TVM allocates per iteration of the
    parallel loop: no second parallel region (each costs a thread-pool wake-up, which stalls on
    a loaded machine) and the patch is in cache when the micro-kernel reads it.  Used for long
    reductions (dense convs, ``>= 64`` taps per output), where the patch is small next to the
    tile's work; a depthwise tile would copy ~4x its output per tile, so depthwise padding stays
    one separate pass over the input (measured: ~10-25% faster that way).

    Also only where the innermost reduction axis (the input channels in NHWC) is at least a
    vector long: then the per-tile patch is copied in vectors.  The stem conv reading the NCHW
    model input (3 channels, kernel columns innermost) would copy its patch element by element
    with a bounds test each: one separate pass over the padded 3-channel input is cheaper
    (ResNet-18's 7x7 stem: 2.5 -> 2.27 ms, 1 thread).
    """
    if fused is not None:
        try:
            sch.compute_at(block_rv, fused)
            _vectorize_tail(sch, block_rv, lanes, below=fused)
            return
        except Exception:  # noqa: BLE001 - fall back to a separate parallel loop nest
            pass
    _schedule_producer(sch, block_rv, lanes, parallel)


def _schedule_producer(sch: Any, block_rv: Any, lanes: int, parallel: bool = True) -> None:
    """A producer kept as its own loop nest: outer loops parallel, innermost vectorized."""
    if parallel:
        _parallel_outer(sch, block_rv)
    try:
        _vectorize_tail(sch, block_rv, lanes)
    except Exception:  # noqa: BLE001 - leave it scalar
        pass


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _realize(sch: Any, block_rv: Any) -> Any | None:
    from tvm import s_tir

    loops = sch.get_loops(block_rv)
    body = sch.get(loops[-1]).body if loops else None
    while body is not None and not isinstance(body, s_tir.SBlockRealize):
        body = getattr(body, "body", None)
    return body


def _is_reduction(sch: Any, block_rv: Any) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block_rv).iter_vars)


def _parallel_outer(sch: Any, block_rv: Any) -> None:
    """Parallelize the leading spatial loops of ``block_rv`` (fused), vectorize its tail."""
    from tvm import tirx

    loops = sch.get_loops(block_rv)
    iters = sch.get(block_rv).iter_vars
    lead = []
    for loop, iv in zip(loops, iters):
        if iv.iter_type != tirx.IterVar.DataPar or _extent(sch, loop) is None:
            break
        lead.append(loop)
    if len(lead) > 1:
        lead = lead[:-1] if len(lead) == len(loops) else lead
    if not lead:
        return
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    sch.parallel(fused)


def schedule_injective(func: Any, target: Any) -> Any | None:
    """Inline a chain of injective blocks into the last one; parallel + vectorized flat loop."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks or any(_is_reduction(sch, b) for b in blocks):
        return None
    for b in blocks[:-1]:
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001
            return None
    last = blocks[-1]
    loops = sch.get_loops(last)
    if not loops or any(_extent(sch, lp) is None for lp in loops):
        return None
    # a vector must not straddle rows of the innermost axis: with 64 uint8 lanes over 48 channels the
    # indices (i % 48, i // 48 % W, ...) are not provably contiguous and every lane became a scalar
    # access (int8 residual add 112x112x48: 0.83 ms; repvgg_a0 int8 1.01 -> 0.84x ort, same-run A/B)
    lanes = math.gcd(cpu_params(target).lanes(_block_dtype_bits(sch, last)), _extent(sch, loops[-1]))
    flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = _extent(sch, flat)
    if lanes >= 4 and total >= 4 * lanes and total % lanes == 0:
        outer, inner = sch.split(flat, factors=[None, lanes])
        sch.vectorize(inner)
        sch.parallel(outer)
    elif total > 1:
        sch.parallel(flat)
    return sch


def schedule_fallback(func: Any, target: Any) -> Any | None:
    """Parallelize the outer spatial loops of every root block."""
    from tvm import s_tir

    del target
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        try:
            _parallel_outer(sch, b)
        except Exception:  # noqa: BLE001 - leave that block serial
            pass
    return sch


#: rules in the order they are tried; the first that returns a schedule wins.
RULES = (schedule_reduction, schedule_injective, schedule_fallback)


def apply_rules(func: Any, target: Any) -> Any | None:
    """Schedule one PrimFunc with the first applicable rule, or None (the Winograd stages' own
    rules of :mod:`edgec.schedules.winograd` first, then :data:`RULES`)."""
    from edgec.schedules import winograd

    for rule in winograd.RULES + RULES:
        try:
            sch = rule(func, target)
        except Exception:  # noqa: BLE001 - a rule that does not fit this function
            sch = None
        if sch is not None:
            return sch
    return None
