"""NVIDIA GPUs through TVM's CUDA codegen: desktop/datacenter cards and Jetson modules.

Building needs no GPU: TVM generates CUDA C, ``nvcc`` compiles it for ``--arch sm_XX``, and the
host side is LLVM code (x86_64 for ``cuda``, aarch64 for Jetson, linked by the aarch64 cross
compiler).  The pipeline is TVM's CUDA pipeline (``tvm.relax.backend.cuda``) with edgec's
scheduling stage: after legalization and fusion a MetaSchedule database when given, then
edgec's schedule hook (:func:`edgec.schedules.default_schedule_pass`), then dlight's default GPU
schedules (Matmul, GEMV, Reduction, GeneralReduction, Fallback) for every function still
unscheduled, since GPU code must at least be bound to threads.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from edgec.targets import Target, TargetOptions, host_arch, register_target
from edgec.targets import host as cpu
from edgec.targets.arm import AARCH64_TOOLCHAIN

DEFAULT_ARCH = "sm_80"


def dlight_passes(target: Any) -> list[Any]:
    from tvm.s_tir import dlight as dl

    return [
        dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )
    ]


def finalize_passes(target: Any) -> list[Any]:
    """The CPU finalization, with CUDA-graph capture right after memory planning (as in
    ``tvm.relax.backend.cuda.pipeline``)."""
    from tvm import relax

    passes = cpu.finalize_passes(target)
    passes.insert(1, relax.transform.RewriteCUDAGraph())
    return passes


def cuda_pipeline(target: Any, database: Any | None = None) -> Any:
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="edgec_cuda_pipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + cpu.schedule_passes(target, database)
                + dlight_passes(target)
                + cpu.dataflow_lower_passes(target)
                + finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


@dataclasses.dataclass(frozen=True)
class CUDATarget(Target):
    def pipeline(self, database: Any | None = None) -> Any:
        return cuda_pipeline(self.tvm_target(), database)


def check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise ValueError(f"--arch {arch!r} is not a CUDA compute capability like sm_80, sm_87, sm_90")
    return arch


@register_target("cuda", "NVIDIA GPU on this host's architecture (--arch sm_XX, default sm_80)")
def cuda(options: TargetOptions) -> Target:
    arch = check_arch(options.arch or DEFAULT_ARCH)
    # host side: the triple only (no -mcpu), so the library runs on any CPU of that architecture
    host = {"kind": "llvm", "mtriple": cpu.host_config()["mtriple"]}
    return CUDATarget(
        name="cuda",
        summary=f"NVIDIA GPU {arch}",
        config={"kind": "cuda", "arch": arch, "host": host},
        arch=host_arch(),
        device="cuda",
        examples=("edgec compile model.onnx --target cuda --arch sm_90 -o build/",),
    )


@register_target("jetson-orin-nano", "NVIDIA Jetson Orin Nano (sm_87 GPU, Cortex-A78AE host)")
def jetson_orin_nano(options: TargetOptions) -> Target:
    arch = check_arch(options.arch or "sm_87")
    return CUDATarget(
        name="jetson-orin-nano",
        summary=f"NVIDIA Jetson Orin Nano ({arch} GPU, Cortex-A78AE host)",
        config={
            "kind": "cuda",
            "arch": arch,
            "max_num_threads": 1024,
            "thread_warp_size": 32,
            "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"},
        },
        arch="aarch64",
        device="cuda",
        toolchain=AARCH64_TOOLCHAIN,
        examples=("edgec compile model.onnx --target jetson-orin-nano -o build/",),
    )
