"""edgec's schedule library: rules that schedule TVM TIR functions for edge CPUs and GPUs.

Two hooks for the compile pipeline:

- :func:`layout_passes` (Relax, before legalization): channels-last conversion that the CPU
  rules rely on (see :mod:`edgec.schedules.layout`); an empty list where edgec has none.
- :func:`default_schedule_pass` (after legalization and fusion, before lowering): a module pass
  applying edgec's schedules for that target (see :mod:`edgec.schedules.cpu`), or ``None``.
"""

from __future__ import annotations

from typing import Any


def _is_cpu(target: Any) -> bool:
    return target is not None and target.kind.name == "llvm"


def layout_passes(target: Any) -> list[Any]:
    """Relax passes to run before ``LegalizeOps`` for ``target`` (may be empty)."""
    if not _is_cpu(target):
        return []
    from edgec.schedules.layout import channels_last_passes

    return channels_last_passes()


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
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
                continue
            sch = apply_rules(func, target)
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def cpu_pipeline(target: Any) -> Any:
    """TVM's CPU pipeline (``relax.backend.cpu_generic``) with edgec's layout and schedules.

    Used by :func:`compile_module` and the benchmarks; the compile command's own pipeline calls
    :func:`layout_passes` and :func:`default_schedule_pass` at the same two points.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="EdgecScheduledCpuPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        hook = default_schedule_pass(target)
        with target:
            seq = (
                cpu.library_dispatch_passes(target)
                + layout_passes(target)
                + cpu.legalize_passes(target)
                + ([hook] if hook is not None else [])
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return tvm.transform.Sequential(seq)(mod)

    return _pipeline


def compile_module(mod: Any, target: Any) -> Any:
    """``tvm.compile`` a Relax module (weights bound) with :func:`cpu_pipeline`."""
    import tvm

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
