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
_TW_MAX = 8


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

    for p in reversed(producers):
        try:
            sch.compute_inline(p)
        except Exception:  # noqa: BLE001 - a producer that cannot be inlined stays a separate loop nest
            _parallel_outer(sch, p)
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
    v = _pick(c_ext, [lanes, lanes // 2, lanes // 4]) if lanes > 1 else 1
    if v < 4 and c_ext < lanes and c_ext > 1:
        v = c_ext  # narrow channels (e.g. 3): one short vector
    acc_budget = params.registers - 4
    tc = _pick(c_ext // v, [c for c in _TC_CANDIDATES if c * v <= max(v, c_ext)])
    if len(spatial) >= 2:
        w_loop = spatial[-2]
        w_ext = _extent(sch, w_loop)
        max_w = max(1, min(_TW_MAX, acc_budget // tc))
        tw = _pick(w_ext, [c for c in (8, 7, 6, 5, 4, 3, 2) if c <= max_w])
        w_o, w_i = sch.split(w_loop, factors=[None, tw])
        outer = list(spatial[:-2]) + [w_o]
    else:
        w_i = None
        outer = []
    c_o, c_m, c_v = sch.split(c_loop, factors=[None, tc, v])
    tile = ([w_i] if w_i is not None else []) + [c_m, c_v]
    sch.reorder(*outer, c_o, *reduce, *tile)
    fused = sch.fuse(*outer, c_o) if outer else c_o
    sch.parallel(fused)
    if w_i is not None:
        sch.unroll(w_i)
    sch.unroll(c_m)
    if v > 1:
        sch.vectorize(c_v)

    if epilogue is not None:
        sch.set_scope(main, 0, "local")
        sch.reverse_compute_at(epilogue, fused)
        _vectorize_tail(sch, epilogue, lanes, below=fused)
    else:
        wb = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(wb, fused)
        _vectorize_tail(sch, wb, lanes, below=fused)
    init = sch.decompose_reduction(main, reduce[0])
    init_loops = sch.get_loops(init)
    if v > 1:
        sch.vectorize(init_loops[-1])
    return sch


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
    lanes = cpu_params(target).lanes(_block_dtype_bits(sch, last))
    flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = _extent(sch, flat)
    if total >= 4 * lanes and total % lanes == 0:
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
    """Schedule one PrimFunc with the first applicable rule, or None."""
    for rule in RULES:
        try:
            sch = rule(func, target)
        except Exception:  # noqa: BLE001 - a rule that does not fit this function
            sch = None
        if sch is not None:
            return sch
    return None
