"""Compile an ONNX model with Apache TVM into a deployable artifact folder.

``compile_model(model, out_dir, CompileConfig(target=get_target("cortex-a72")))``:

1. **import**: ``tvm.relax.frontend.onnx.from_onnx`` with the model's static input shapes
   (symbolic dimensions take ``input_shapes`` or 1), weights bound as constants;
2. **build**: ``tvm.compile`` with the target's own Relax pipeline (:mod:`edgec.targets`), which
   applies a MetaSchedule database when ``database`` is given and edgec's schedule hook;
3. **export**: ``export_library`` linked by the target's toolchain (a cross compiler for ARM);
4. **verify** (host-runnable targets): the library runs on ``samples`` fresh random inputs and
   its outputs are compared with onnxruntime's, ``max|y - y_ort| <= atol + rtol * max|y_ort|``
   (:mod:`edgec.verify`).  Other targets are verified on the device by ``edgec bench``.

The artifact folder (written to a temporary folder and renamed into place, so a failure leaves
no half-written artifact) holds::

    model.so        compiled library (TVM Relax VM executable)
    model.onnx      the ONNX model it came from (reference for output checks on the device)
    specs.json      input and output names, shapes, dtypes
    manifest.json   target, edgec / TVM versions, model sha256, passes applied, database, checks,
                    the target's thread policy (how the runtime's thread pool should run it)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgec import ir as eir
from edgec import verify as vfy
from edgec.errors import EdgecError, EquivalenceError, InputError, ToolMissingError
from edgec.targets import Target, ThreadPolicy, host_arch

LIBRARY = "model.so"
MODEL = "model.onnx"
SPECS = "specs.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """How to compile.  ``database``: a MetaSchedule database folder (``edgec tune --db``)."""

    target: Target
    database: Path | None = None
    verify: bool = True
    tolerance: vfy.Tolerance = vfy.Tolerance(rtol=1e-4, atol=1e-5)
    samples: int = 2
    seed: int | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    passes_applied: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an artifact is: enough to reproduce it and to refuse running it on the wrong device."""

    format_version: int
    target: str
    tvm_target: dict[str, Any]
    arch: str
    device: str
    edgec_version: str
    tvm_version: str
    model_sha256: str
    passes_applied: tuple[str, ...]
    database: str | None
    schedule_hook: bool
    library: str
    created: str
    verification: dict[str, Any] | None
    threads: ThreadPolicy = ThreadPolicy()  # absent in artifacts from before it existed: the default

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes_applied"] = list(self.passes_applied)
        d["threads"] = self.threads.to_json()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d) - {"threads"}
        if missing:
            raise InputError(f"manifest.json lacks {sorted(missing)}", "rebuild the artifact with `edgec compile`")
        kw = {k: d[k] for k in names if k in d}
        kw["passes_applied"] = tuple(kw["passes_applied"])
        try:
            kw["threads"] = ThreadPolicy.from_json(d.get("threads"))
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"manifest.json: bad thread policy {d.get('threads')!r}: {exc}", "rebuild the artifact with `edgec compile`") from None
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A compiled artifact folder (see the module docstring)."""

    path: Path
    manifest: Manifest
    inputs: tuple[vfy.TensorSpec, ...]
    outputs: tuple[vfy.TensorSpec, ...]

    @property
    def library(self) -> Path:
        return self.path / self.manifest.library

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Artifact:
        p = Path(path)
        if not (p / MANIFEST).is_file():
            raise InputError(f"{p}: not an edgec artifact (no {MANIFEST})", "build one with `edgec compile MODEL --target T -o DIR`")
        try:
            manifest = Manifest.from_json(json.loads((p / MANIFEST).read_text()))
            specs = json.loads((p / SPECS).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{p}: artifact is damaged: {exc}", "rebuild it with `edgec compile`") from None
        if not (p / manifest.library).is_file():
            raise InputError(f"{p}: library {manifest.library} is missing", "rebuild it with `edgec compile`")

        def spec(d: Mapping[str, Any]) -> vfy.TensorSpec:
            return vfy.TensorSpec(d["name"], tuple(d["shape"]), np.dtype(d["dtype"]))

        return cls(p, manifest, tuple(spec(s) for s in specs["inputs"]), tuple(spec(s) for s in specs["outputs"]))

    def runs_here(self) -> bool:
        return self.manifest.device == "cpu" and self.manifest.arch == host_arch()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a compilation, for progress and the report."""

    name: str
    detail: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class CompileResult:
    artifact: Artifact
    stages: tuple[Stage, ...]
    verification: vfy.EquivalenceReport | None

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": str(self.artifact.path),
            "manifest": self.artifact.manifest.to_json(),
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }


def _as_proto(model: str | os.PathLike[str] | ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return eir.to_proto(model)
    return eir.load_proto(model)


def import_onnx(proto: onnx.ModelProto, specs: Sequence[vfy.TensorSpec]) -> Any:
    """The model as a Relax IRModule with static input shapes and weights bound."""
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = {s.name: list(s.shape) for s in specs}
    dtype_dict = {s.name: np.dtype(s.dtype).name for s in specs}
    try:
        return from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    except Exception as exc:  # unsupported operator, bad attribute: the user's model, not our bug
        raise EdgecError.wrapping(
            "TVM's ONNX importer rejected the model", exc,
            "simplify it first (`edgec optimize --passes constant-fold,...`) or replace the unsupported operator",
        ) from None


def build(mod: Any, target: Target, database: Path | None = None) -> Any:
    """``tvm.compile`` with the target's pipeline, inside the database's context if given."""
    import contextlib

    import tvm

    tvm_target = target.tvm_target()
    ctx: Any = contextlib.nullcontext()
    if database is not None:
        from edgec.tune import open_database

        ctx = open_database(database)
    with tvm_target, ctx, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, tvm_target, relax_pipeline=target.pipeline(database))


def _check_tools(target: Target) -> None:
    target.toolchain.check()
    if target.device == "cuda" and shutil.which("nvcc") is None:
        raise ToolMissingError("nvcc (the CUDA compiler) not found on PATH", "install it: sudo apt-get install nvidia-cuda-toolkit")


def run_local(library: Path | Any, device: str, feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]) -> list[list[np.ndarray]]:
    """Run a compiled library (path or executable) on this machine; outputs per feed."""
    import tvm
    from tvm.runtime.vm import VirtualMachine  # runtime only: works with TVM_USE_RUNTIME_LIB=1

    lib = tvm.runtime.load_module(str(library)) if isinstance(library, (str, Path)) else library
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    vm = VirtualMachine(lib, dev)
    outs = []
    for feed in feeds:
        args = [tvm.runtime.tensor(np.ascontiguousarray(feed[n]), device=dev) for n in input_names]
        outs.append(flatten_outputs(vm["main"](*args)))
    return outs


def flatten_outputs(result: Any) -> list[np.ndarray]:
    """A VM result (tensor or nested tuple of tensors) as a flat list of numpy arrays."""
    if hasattr(result, "numpy"):
        return [result.numpy()]
    flat: list[np.ndarray] = []
    for item in result:
        flat.extend(flatten_outputs(item))
    return flat


def _check_output_dir(out_dir: Path) -> Path:
    """The folder the artifact goes in must not hold anything but a previous artifact."""
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{parent}: output directory does not exist", "create it first")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists())):
        raise InputError(f"{out_dir}: exists and is not an edgec artifact", "give a new or empty folder, or a previous build")
    return parent


def _write_artifact_dir(out_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=_check_output_dir(out_dir)))


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent if str(out_dir.parent) else "."))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def compile_model(
    model: str | os.PathLike[str] | ir.Model | onnx.ModelProto,
    out_dir: str | os.PathLike[str],
    config: CompileConfig,
    on_stage: Callable[[Stage], None] | None = None,
) -> CompileResult:
    """Compile ``model`` for ``config.target`` into ``out_dir``; see the module docstring."""
    import tvm

    import edgec
    from edgec import schedules

    target = config.target
    _check_tools(target)
    if config.database is not None and not Path(config.database).is_dir():
        raise InputError(f"{config.database}: tuning database folder not found", "create one with `edgec tune MODEL --db DIR`")
    out = Path(out_dir)
    _check_output_dir(out)  # before minutes of building
    stages: list[Stage] = []

    def stage(name: str, detail: str, start: float) -> None:
        s = Stage(name, detail, time.perf_counter() - start)
        stages.append(s)
        if on_stage:
            on_stage(s)

    t = time.perf_counter()
    proto = _as_proto(model)
    specs_in = vfy.input_specs(proto, config.input_shapes)
    specs_out = vfy.output_specs(proto)
    mod = import_onnx(proto, specs_in)
    stage("import", f"{len(proto.graph.node)} ONNX nodes -> {len(mod.functions)} Relax functions", t)

    t = time.perf_counter()
    try:
        ex = build(mod, target, Path(config.database) if config.database else None)
    except EdgecError:
        raise
    except Exception as exc:
        raise EdgecError.wrapping(
            f"TVM failed to compile for {target.name}", exc,
            "check the target (`edgec targets`); if the model is unusual, simplify it with `edgec optimize`",
        ) from None
    db_note = ""
    if config.database:
        from edgec.tune import database_coverage

        db_note = f", database {config.database}: {database_coverage(mod, target, Path(config.database)).describe()}"
    stage("build", f"{target.name}: {target.describe()}{db_note}", t)

    tmp = _write_artifact_dir(out)
    try:
        t = time.perf_counter()
        try:
            ex.export_library(str(tmp / LIBRARY), fcompile=target.toolchain.fcompile())
        except Exception as exc:
            raise EdgecError.wrapping(
                "linking the library failed", exc, f"check the toolchain {target.toolchain.compiler or 'g++'}"
            ) from None
        eir.save_proto(proto, tmp / MODEL)
        out_specs = specs_out
        stage("export", f"{LIBRARY} ({(tmp / LIBRARY).stat().st_size / 1024:.0f} KiB)", t)

        report: vfy.EquivalenceReport | None = None
        if config.verify and target.runs_on_host:
            t = time.perf_counter()
            rng = np.random.default_rng(config.seed)
            feeds = [vfy.random_inputs(specs_in, rng) for _ in range(config.samples)]
            sess = vfy.session(proto)
            ref = [sess.run(None, f) for f in feeds]
            got = run_local(tmp / LIBRARY, target.device, feeds, [s.name for s in specs_in])
            names = [o.name for o in sess.get_outputs()]
            report = vfy.compare_outputs(ref, got, names, config.tolerance)
            if not report.passed and any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
                # integer kernels (edgec.schedules.int8) round like onnxruntime's own int8 kernels, not
                # like its float QDQ reference: one step here and there, compounding over the layers.
                # Accepted when no further from the reference than onnxruntime's int8 session is (x2).
                ort_int8 = vfy.session(proto, optimize=True)
                own = vfy.compare_outputs(ref, [ort_int8.run(None, f) for f in feeds], names, config.tolerance)
                allowed = vfy.Tolerance(rtol=config.tolerance.rtol, atol=config.tolerance.atol + 2.0 * own.max_abs)
                report = vfy.compare_outputs(ref, got, names, allowed)
            # output shapes as TVM computes them (ONNX may leave them symbolic)
            out_specs = tuple(vfy.TensorSpec(s.name, tuple(g.shape), np.dtype(g.dtype)) for s, g in zip(specs_out, got[0]))
            stage("verify", f"vs onnxruntime on this host: {report.summary()}", t)
            if not report.passed:
                raise EquivalenceError(
                    f"the compiled model's outputs differ from onnxruntime's: {report.summary()}",
                    "loosen --rtol/--atol if the difference is rounding, else report the model",
                )
        verification = report.to_json() if report is not None else None
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            target=target.name,
            tvm_target=dict(target.config),
            arch=target.arch,
            device=target.device,
            edgec_version=edgec.__version__,
            tvm_version=tvm.__version__,
            model_sha256=eir.model_hash(proto),
            passes_applied=tuple(config.passes_applied),
            database=str(config.database) if config.database else None,
            schedule_hook=schedules.default_schedule_pass(target.tvm_target()) is not None,
            library=LIBRARY,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            verification=verification,
            threads=target.threads,
        )
        (tmp / SPECS).write_text(
            json.dumps({"inputs": [s.to_json() for s in specs_in], "outputs": [s.to_json() for s in out_specs]}, indent=2)
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(Artifact.load(out), tuple(stages), report)
