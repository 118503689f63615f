"""CPU targets and their Relax pipeline; the ``host`` target (this machine's CPU).

The CPU pipeline follows ``tvm.relax.backend.cpu_generic.pipeline`` stage by stage:

1. library dispatch (sampling, sort/scan);
2. edgec's layout hook (:func:`edgec.schedules.layout_passes`, e.g. channels-last), then
   legalization and fusion: ``LegalizeOps -> AnnotateTIROpPattern -> FoldConstant -> FuseOps ->
   FuseTIR``: every Relax operator becomes a TIR PrimFunc, element-wise tails are fused into
   their producer;
3. scheduling: a MetaSchedule database when given (``MetaScheduleApplyDatabase``; functions
   missing from it stay as they are), then edgec's schedule hook
   :func:`edgec.schedules.default_schedule_pass` (``None``: nothing);
4. dataflow lowering and finalization (memory planning, VM shape lowering).

Without a database or schedules TVM's CPU code is unscheduled loops: correct but slow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgec.targets import Target, TargetOptions, host_arch, register_target


def library_dispatch_passes(target: Any) -> list[Any]:
    from tvm import relax

    return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def layout_passes(target: Any) -> list[Any]:
    """edgec's Relax layout rewrites that its schedules rely on (before legalization), if any."""
    from edgec import schedules

    hook = getattr(schedules, "layout_passes", None)
    return list(hook(target)) if hook is not None else []


def legalize_passes(target: Any) -> list[Any]:
    from tvm import relax

    return layout_passes(target) + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def schedule_passes(target: Any, database: Any | None) -> list[Any]:
    """Tuning database first (it knows best), then edgec's schedule library."""
    from tvm import relax

    from edgec import schedules

    passes: list[Any] = []
    if database is not None:
        passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
    hook = schedules.default_schedule_pass(target)
    if hook is not None:
        passes.append(hook)
    return passes


def dataflow_lower_passes(target: Any) -> list[Any]:
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]


def finalize_passes(target: Any) -> list[Any]:
    from tvm import relax

    return [
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def cpu_pipeline(target: Any, database: Any | None = None) -> Any:
    """The whole CPU pipeline as one module pass (run inside ``with target``)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="edgec_cpu_pipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                library_dispatch_passes(target)
                + legalize_passes(target)
                + schedule_passes(target, database)
                + dataflow_lower_passes(target)
                + finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


@dataclasses.dataclass(frozen=True)
class CPUTarget(Target):
    """A CPU reached through LLVM (host or cross-compiled)."""

    def pipeline(self, database: Any | None = None) -> Any:
        return cpu_pipeline(self.tvm_target(), database)


def host_config() -> dict[str, Any]:
    """LLVM target for this machine's CPU (its triple and CPU name, so its vector units are used)."""
    import tvm

    triple = tvm.get_global_func("target.llvm_get_system_triple")()
    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    config: dict[str, Any] = {"kind": "llvm", "mtriple": str(triple)}
    if cpu and str(cpu) != "generic":
        config["mcpu"] = str(cpu)
    return config


@register_target("host", "this machine's CPU (LLVM, native vector units)")
def host(options: TargetOptions) -> Target:
    if options.arch:
        raise ValueError("--arch applies to CUDA targets only")
    return CPUTarget(
        name="host",
        summary="this machine's CPU (LLVM, native vector units)",
        config=host_config(),
        arch=host_arch(),
        examples=("edgec compile model.onnx --target host -o build/",),
    )
