"""A TVM target given as JSON on the command line (``--target '{"kind": "llvm", ...}'``).

The pipeline follows the target's kind: CUDA targets get the CUDA pipeline, everything else the
CPU one.  An ``mtriple`` starting with ``aarch64`` links with the aarch64 cross compiler.
"""

from __future__ import annotations

import json
from typing import Any

from edgec.errors import InputError
from edgec.targets import Target, TargetOptions, ThreadPolicy, Toolchain, host_arch


def _arch_of(triple: str | None) -> str:
    if not triple:
        return host_arch()
    return triple.split("-")[0].replace("arm64", "aarch64")


def from_json(spec: str, options: TargetOptions = TargetOptions()) -> Target:
    try:
        config: Any = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise InputError(f"target JSON does not parse: {exc}", "e.g. '{\"kind\": \"llvm\", \"mcpu\": \"cortex-a72\"}'") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise InputError("a TVM target as JSON must be an object with a \"kind\"", "e.g. '{\"kind\": \"llvm\"}'")
    import tvm

    try:
        tvm.target.Target(config)
    except Exception as exc:  # TVM's own validation of keys and values
        raise InputError.wrapping(f"TVM rejects the target {spec}", exc) from None
    if options.arch and config["kind"] == "cuda":
        config = {**config, "arch": options.arch}
    host_side = config.get("host") if config["kind"] == "cuda" else config
    triple = host_side.get("mtriple") if isinstance(host_side, dict) else None
    arch = _arch_of(triple)
    toolchain = Toolchain()
    if arch != host_arch():
        if arch == "aarch64":
            from edgec.targets.arm import AARCH64_TOOLCHAIN

            toolchain = AARCH64_TOOLCHAIN
        else:
            raise InputError(f"no cross toolchain known for {triple!r}", "use an aarch64 or host triple")
    if config["kind"] == "cuda":
        from edgec.targets.cuda import CUDATarget

        return CUDATarget("json", "TVM target from JSON", config, arch, "cuda", toolchain)
    from edgec.targets.host import CPUTarget

    from edgec.targets.arm import ARM_THREADS

    threads = ARM_THREADS if arch == "aarch64" else ThreadPolicy()
    return CPUTarget("json", "TVM target from JSON", config, arch, "cpu", toolchain, threads=threads)
