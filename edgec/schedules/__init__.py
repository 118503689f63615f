"""edgec's schedule library: rules that schedule TVM TIR functions for edge CPUs and GPUs.

Two hooks for the compile pipeline:

- :func:`layout_passes` (Relax, before legalization): QDQ Conv/Gemm to integer kernels (VNNI,
  ARM ``sdot`` or plain SIMD, by CPU features; see :mod:`edgec.schedules.int8`), then the channels-last conversion that
  the CPU rules rely on (see :mod:`edgec.schedules.layout`); an empty list where edgec has none.
- :func:`default_schedule_pass` (after legalization and fusion, before lowering): a module pass
  applying edgec's schedules for that target (see :mod:`edgec.schedules.cpu`), or ``None``.
"""

from __future__ import annotations

from typing import Any


def _is_cpu(target: Any) -> bool:
    return target is not None and target.kind.name == "llvm"


def is_scheduled(func: Any) -> bool:
    """True for a PrimFunc that is scheduled already (``tirx.is_scheduled``): by edgec's rules, by a
    tuning database, or one of edgec's hand-written kernels such as the int8 VNNI ones."""
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1


def layout_passes(target: Any) -> list[Any]:
    """Relax passes to run before ``LegalizeOps`` for ``target`` (may be empty)."""
    if not _is_cpu(target):
        return []
    from edgec.schedules.int8 import int8_passes
    from edgec.schedules.layout import channels_last_passes

    return int8_passes(target) + channels_last_passes(target)


def default_schedule_pass(target: Any) -> Any | None:
    """A ``tvm.ir.transform.Pass`` scheduling the module's TIR functions for ``target``, or None."""
    if not _is_cpu(target):
        return None
    import tvm
    from tvm import tirx

    from edgec.schedules.cpu import apply_rules

    @tvm.transform.module_pass(opt_level=0, name="EdgecCpuSchedule")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if is_scheduled(func):
                continue
            sch = apply_rules(func, target)
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def cpu_pipeline(target: Any) -> Any:
    """The compile command's CPU pipeline (``edgec.targets.host.cpu_pipeline``), no database.

    It calls :func:`layout_passes` before legalization and :func:`default_schedule_pass` after
    fusion; kept here so benchmarks and tests can compile a Relax module exactly as
    ``edgec compile`` does without building an artifact.
    """
    from edgec.targets.host import cpu_pipeline as host_cpu_pipeline

    return host_cpu_pipeline(target)


def compile_module(mod: Any, target: Any) -> Any:
    """``tvm.compile`` a Relax module (weights bound) with :func:`cpu_pipeline`."""
    import tvm

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
