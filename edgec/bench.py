"""Latency of a compiled artifact: locally, on an RPC server, or on a board behind a tracker.

Measurement (the shape of TVM's ``time_evaluator`` result: raw samples plus statistics):

- the model's inputs are fresh random tensors, copied to the device once;
- ``warmup`` untimed runs, then ``repeat`` samples; each sample is the mean time of ``number``
  back-to-back runs, timed on the device by ``time_evaluator`` (so network latency is excluded);
- statistics over the ``repeat`` samples ``x_1..x_n`` (milliseconds): mean, median, p90, p99
  (linear interpolation between order statistics, numpy's default), population standard
  deviation ``sqrt(sum (x_i - mean)^2 / n)``, min, max.

Before timing, the device's outputs on those inputs are compared with onnxruntime's on this host
(the ``model.onnx`` stored in the artifact): a build that runs but computes the wrong thing fails.
Threads: the runtime's thread pool (``runtime.config_threadpool``) is set from the target's
:class:`~edgec.targets.ThreadPolicy`, recorded in the artifact's manifest, with ``threads``
overriding its worker count.  Host builds: one worker per physical core this process may use
(TVM alone would take half the hardware threads on x86, assuming SMT: a single thread on a
2-vCPU VM beside a 2-thread onnxruntime); onnxruntime gets the same count.  ARM boards: one
worker per big core (all four on a Raspberry Pi 3/4/5; the fast cluster on big.LITTLE boards).
On a remote device whose policy is "all cores", the pool keeps the device's default unless
``threads`` is given.

With ``compare_ort`` onnxruntime (all graph optimizations, same threads) is also timed on this
host in the same run with the same warmup/number/repeat, one onnxruntime sample after each edgec
sample (so both see the same machine load), and ``ratio = mean_edgec / mean_ort``.

Faults are bounded: every stage runs in a worker thread watched by a stall timer; a server that is
down, a tracker with no free device, a session that dies or stops answering mid-run, or an artifact
for another architecture end in a :class:`BenchError` within bounded time that carries the samples
gathered so far.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec import verify as vfy
from edgec.compile import Artifact, flatten_outputs
from edgec.errors import EdgecError, EquivalenceError, InputError, exception_summary
from edgec.rpc import Remote, RemoteError, open_session, remote_triple
from edgec.targets import ThreadPolicy, host_arch

#: ELF e_machine values of the architectures edgec builds for.
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0xF3: "riscv64"}


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Raw samples (ms) and their statistics (see the module docstring)."""

    samples_ms: tuple[float, ...]
    mean: float
    median: float
    p90: float
    p99: float
    std: float
    min: float
    max: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no samples")
        x = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            tuple(float(v) for v in x),
            float(x.mean()),
            float(np.median(x)),
            float(np.percentile(x, 90)),
            float(np.percentile(x, 99)),
            float(x.std()),
            float(x.min()),
            float(x.max()),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"samples_ms": list(self.samples_ms)}

    def row(self) -> tuple[float, ...]:
        return (self.mean, self.median, self.p90, self.p99, self.std, self.min, self.max)


STAT_COLUMNS = ("mean ms", "median ms", "p90 ms", "p99 ms", "std ms", "min ms", "max ms")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How to measure.  ``stall_timeout_s``: longest wait for any progress (connect, upload, a
    sample) before giving up; ``check_outputs``: compare outputs with onnxruntime first."""

    warmup: int = 3
    number: int = 10
    repeat: int = 20
    compare_ort: bool = False
    check_outputs: bool = True
    tolerance: vfy.Tolerance = vfy.Tolerance(rtol=1e-4, atol=1e-5)
    seed: int | None = None
    stall_timeout_s: float = 120.0
    threads: int | None = None  # TVM runtime threads; None: the artifact's thread policy

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.number < 1 or self.repeat < 1:
            raise InputError("--warmup must be >= 0, --number and --repeat >= 1")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be at least 1")


def host_cpus() -> list[int]:
    """The CPUs this process may run on."""
    import os

    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def configure_threads(config_threadpool: Callable[..., Any], policy: ThreadPolicy, threads: int | None, cpus: Sequence[int] | None) -> None:
    """Set the TVM runtime's thread pool as ``policy`` says (``threads`` overrides its count;
    ``cpus``: this host's usable CPUs, ``None`` on a remote device).  Nothing when the policy
    leaves the runtime's default."""
    args = policy.pool_args(threads, cpus)
    if args is not None:
        mode, n, ids = args
        config_threadpool(mode, n, ids) if ids else config_threadpool(mode, n)


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """What was measured.  ``complete`` is False when the run stopped early (see ``error``)."""

    artifact: str
    target: str
    where: str
    config: BenchConfig
    stats: LatencyStats | None
    ort: LatencyStats | None
    equivalence: vfy.EquivalenceReport | None
    complete: bool
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """edgec mean / onnxruntime mean (below 1: edgec is faster)."""
        if self.stats is None or self.ort is None or self.ort.mean == 0:
            return None
        return self.stats.mean / self.ort.mean

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "target": self.target,
            "where": self.where,
            "config": dataclasses.asdict(self.config) | {"tolerance": dataclasses.asdict(self.config.tolerance)},
            "edgec": None if self.stats is None else self.stats.to_json(),
            "onnxruntime": None if self.ort is None else self.ort.to_json(),
            "ratio_vs_onnxruntime": self.ratio,
            "equivalence": None if self.equivalence is None else self.equivalence.to_json(),
            "complete": self.complete,
            "error": self.error,
        }


class BenchError(EdgecError):
    """Measurement stopped early; ``partial`` holds what was gathered before."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None, partial: BenchResult) -> None:
        super().__init__(message, hint)
        self.partial = partial


@dataclasses.dataclass(frozen=True)
class BenchEvent:
    """Progress: ``stage`` is connect/upload/check/warmup/measure/onnxruntime; ``done`` of ``total``."""

    stage: str
    done: int
    total: int
    last_ms: float | None = None


def library_arch(path: Path) -> str | None:
    """The architecture an ELF shared library was built for (None when not ELF)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return None
    little = head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine:#x}")


def _cuda_available() -> bool:
    """Is there a CUDA GPU?  With a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, as on a board
    without the compiler) TVM's CUDA runtime library is not loaded by ``import tvm``: load it."""
    import ctypes

    import tvm

    if tvm.cuda(0).exist:
        return True
    try:
        from tvm.base import _LOADED_LIBS

        lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        if lib.exists() and "tvm_runtime_cuda" not in _LOADED_LIBS:
            _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
    except (OSError, KeyError, AttributeError):
        return False
    return bool(tvm.cuda(0).exist)


def _register_cuda_compiler(arch: str) -> None:
    """CUDA artifacts carry TVM's CUDA C; the CUDA runtime compiles it on load through the global
    ``tvm_callback_cuda_compile``.  Register one that compiles for the artifact's ``--arch`` (TVM's
    own asks for the current target, which a runtime-only TVM cannot answer): NVRTC when
    ``cuda-bindings`` is installed, else nvcc (``TVM_CUDA_COMPILE_MODE`` overrides; nvcc needs the
    full TVM, not the runtime alone)."""
    import os

    import tvm_ffi
    from tvm.support import nvcc

    import importlib.util

    has_nvrtc = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE") or ("nvrtc" if has_nvrtc or not shutil.which("nvcc") else "nvcc")
    fmt = "fatbin" if mode == "nvcc" else "cubin"

    def compile_cuda(code: str) -> bytes:
        return nvcc.compile_cuda(code, target_format=fmt, arch=arch or None, compiler=mode)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def _triple_arch(triple: str) -> str:
    return triple.split("-")[0].replace("arm64", "aarch64")


class _State:
    """Shared between the worker thread and the watcher: progress and partial results."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.stage = "connect"
        self.samples: list[float] = []
        self.ort_samples: list[float] = []
        self.equivalence: vfy.EquivalenceReport | None = None
        self.error: BaseException | None = None
        self.done = False
        self.connection: Any = None

    def touch(self, stage: str | None = None) -> None:
        with self.lock:
            self.last_progress = time.monotonic()
            if stage:
                self.stage = stage


class _OrtTimer:
    """onnxruntime on this host (all graph optimizations; ``threads`` intra-op threads, 0: its
    default), one sample per call."""

    def __init__(self, model: Path, feeds: dict[str, np.ndarray], cfg: BenchConfig, threads: int) -> None:
        self.sess = vfy.session(_load(model), optimize=True, threads=threads)
        self.feeds = feeds
        self.number = cfg.number
        for _ in range(cfg.warmup + 1):
            self.sess.run(None, feeds)

    def sample_ms(self) -> float:
        t = time.perf_counter()
        for _ in range(self.number):
            self.sess.run(None, self.feeds)
        return (time.perf_counter() - t) * 1e3 / self.number


def _load(model: Path) -> Any:
    from edgec import ir as eir

    return eir.load_proto(model)


def _worker(artifact: Artifact, remote: Remote | None, cfg: BenchConfig, state: _State, emit: Callable[[BenchEvent], None]) -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine  # runtime only: works with TVM_USE_RUNTIME_LIB=1

    m = artifact.manifest
    lib_arch = library_arch(artifact.library)
    # 1. reach the device
    if remote is None:
        host = host_arch()
        if lib_arch is not None and lib_arch != host:
            raise InputError(
                f"{artifact.path} was built for {lib_arch} ({m.target}); this host is {host}",
                "run it on the device with --rpc HOST:PORT or --tracker HOST:PORT --key KEY",
            )
        if m.device == "cuda" and not _cuda_available():
            raise EdgecError(f"{artifact.path} is a CUDA build ({m.target}) and this host has no CUDA GPU", "run it on a machine with an NVIDIA GPU, or over --rpc")
        dev = tvm.cuda(0) if m.device == "cuda" else tvm.cpu(0)
        if m.device == "cuda":
            _register_cuda_compiler(str(m.tvm_target.get("arch", "")))
        lib = tvm.runtime.load_module(str(artifact.library))
        if m.device == "cpu":
            configure_threads(tvm.get_global_func("runtime.config_threadpool"), m.threads, cfg.threads, host_cpus())
    else:
        emit(BenchEvent("connect", 0, 1))
        conn = open_session(remote)
        state.connection = conn
        sess = conn.session
        state.touch("upload")
        triple = remote_triple(sess)
        if triple and lib_arch and _triple_arch(triple) != lib_arch:
            raise InputError(
                f"{artifact.path} was built for {lib_arch} ({m.target}) but the device is {_triple_arch(triple)} ({triple})",
                "rebuild for the device: edgec compile MODEL --target <its target> -o DIR",
            )
        emit(BenchEvent("upload", 0, 1))
        name = f"edgec_{m.model_sha256[:12]}_{m.target}.so"
        sess.upload(str(artifact.library), name)
        try:
            lib = sess.load_module(name)
        except Exception as exc:
            text = str(exc)
            if any(w in text for w in ("ELF", "wrong ELF class", "Exec format", "cannot open shared object")):
                raise InputError.wrapping(
                    f"the device cannot load {artifact.library.name} (built for {lib_arch}, {m.target})", exc,
                    "rebuild for the device's architecture: edgec compile MODEL --target <its target>",
                ) from None
            raise
        dev = sess.cuda(0) if m.device == "cuda" else sess.cpu(0)
        if m.device == "cpu":
            configure_threads(sess.get_function("runtime.config_threadpool"), m.threads, cfg.threads, None)
        if m.device == "cuda" and not dev.exist:
            raise EdgecError(f"the device at {remote.describe()} has no CUDA GPU")
    state.touch("check")
    vm = VirtualMachine(lib, dev)
    rng = np.random.default_rng(cfg.seed)
    feeds = vfy.random_inputs(artifact.inputs, rng)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[s.name]), device=dev) for s in artifact.inputs]
    # 2. outputs vs onnxruntime on this host
    if cfg.check_outputs:
        emit(BenchEvent("check", 0, 1))
        vm.set_input("main", *args)
        vm.invoke_stateful("main")
        got = flatten_outputs(vm.get_outputs("main"))  # element by element: works over RPC too
        proto = _load(artifact.model)
        ort_sess = vfy.session(proto)
        ref = ort_sess.run(None, feeds)
        names = [o.name for o in ort_sess.get_outputs()]
        state.equivalence = vfy.compare_outputs([ref], [got], names, cfg.tolerance)
        if not state.equivalence.passed and any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            # integer int8 kernels round like onnxruntime's own int8 kernels (or, with the ARM
            # fixed-point epilogue, within one step of them per layer), not like its float QDQ
            # reference, and one-step differences compound over the layers (mcunet: onnxruntime
            # int8 itself is 20 % of the output range off on some inputs).  Accepted when no further
            # from the reference than twice onnxruntime int8's deviation or half the output
            # range: this check catches broken builds, not rounding.
            own = vfy.compare_outputs([ref], [vfy.session(proto, optimize=True).run(None, feeds)], names, cfg.tolerance)
            span = max(float(np.abs(np.asarray(r)).max()) for r in ref)
            allowed = vfy.Tolerance(rtol=cfg.tolerance.rtol, atol=cfg.tolerance.atol + max(2.0 * own.max_abs, 0.5 * span))
            state.equivalence = vfy.compare_outputs([ref], [got], names, allowed)
        state.touch("warmup")
        if not state.equivalence.passed:
            raise EquivalenceError(
                f"outputs on the device differ from onnxruntime's: {state.equivalence.summary()}",
                "the build is wrong for this device; check the target (-mcpu/-mattr) and rebuild",
            )
    # 3. warmup, then samples one repeat at a time (kept if the run stops later)
    vm.set_input("main", *args)
    for i in range(cfg.warmup):
        vm.invoke_stateful("main")
        state.touch("warmup")
        emit(BenchEvent("warmup", i + 1, cfg.warmup))
    dev.sync()
    timer = vm.time_evaluator("invoke_stateful", dev, number=cfg.number, repeat=1)
    # 4. onnxruntime on this host in the same run, samples interleaved with edgec's so that both
    #    see the same machine load
    ort = _OrtTimer(artifact.model, feeds, cfg, (cfg.threads or 0) if remote is None else 0) if cfg.compare_ort else None
    for i in range(cfg.repeat):
        ms = float(timer("main").results[0]) * 1e3
        state.samples.append(ms)
        state.touch("measure")
        emit(BenchEvent("measure", i + 1, cfg.repeat, ms))
        if ort is not None:
            state.ort_samples.append(ort.sample_ms())
            state.touch("measure")


def run_bench(
    artifact: Artifact | str | Path,
    remote: Remote | None = None,
    config: BenchConfig = BenchConfig(),
    on_event: Callable[[BenchEvent], None] | None = None,
) -> BenchResult:
    """Measure ``artifact`` here (``remote=None``) or on the device; see the module docstring.

    Raises :class:`BenchError` (with ``.partial``) when the run stops early, and
    :class:`~edgec.errors.EdgecError` subclasses for bad input or an unreachable device.
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    policy = art.manifest.threads
    if remote is None and config.threads is None and art.manifest.device == "cpu":
        config = dataclasses.replace(config, threads=policy.local_count(host_cpus()))
    where = "this host" if remote is None else remote.describe()
    if art.manifest.device == "cpu":
        where += ", " + policy.describe(config.threads, host_cpus() if remote is None else None)
    if remote is not None:
        from edgec.emulate import emulated_label

        label = emulated_label(remote)  # a board emulated on this host: its latency says so
        if label:
            where += f" ({label})"
    state = _State()
    events: list[BenchEvent] = []
    events_lock = threading.Lock()

    def emit(ev: BenchEvent) -> None:
        with events_lock:
            events.append(ev)

    def target() -> None:
        try:
            _worker(art, remote, config, state, emit)
        except BaseException as exc:  # handed to the watching thread, without the frames
            state.error = exc.with_traceback(None)  # (they hold the remote session open)
        finally:
            # Drop the last references to the RPC session: closing it frees the board, which
            # then registers with its tracker again.
            state.connection = None
            import gc

            gc.collect()
            state.done = True

    thread = threading.Thread(target=target, name="edgec-bench", daemon=True)
    thread.start()
    stalled: str | None = None
    while True:
        thread.join(0.05)
        with events_lock:
            pending, events[:] = list(events), []
        if on_event:
            for ev in pending:
                on_event(ev)
        if state.done and not thread.is_alive():
            break
        with state.lock:
            idle = time.monotonic() - state.last_progress
            stage = state.stage
        if idle > config.stall_timeout_s:
            stalled = stage
            break

    def partial(error: str | None) -> BenchResult:
        return BenchResult(
            str(art.path),
            art.manifest.target,
            where,
            config,
            LatencyStats.from_samples(state.samples) if state.samples else None,
            LatencyStats.from_samples(state.ort_samples) if state.ort_samples else None,
            state.equivalence,
            error is None,
            error,
        )

    if stalled is not None:
        conn = state.connection
        if conn is not None:
            conn.abort()  # unblocks the worker waiting on the silent server
            thread.join(5.0)
        msg = f"no progress for {config.stall_timeout_s:g} s during {stalled} on {where}"
        raise BenchError(
            msg + f" ({len(state.samples)} of {config.repeat} samples gathered)",
            "the device or its RPC server stopped answering; check it and retry (--timeout sets the limit)",
            partial(msg),
        )
    if state.error is not None:
        exc = state.error
        if isinstance(exc, (InputError, RemoteError)) and not state.samples:
            raise exc
        if isinstance(exc, EquivalenceError):
            raise exc
        text = exc.message if isinstance(exc, EdgecError) else exception_summary(exc)
        if state.samples or state.stage in ("warmup", "measure", "onnxruntime", "check"):
            raise BenchError(
                f"the run on {where} failed during {state.stage}: {text} ({len(state.samples)} of {config.repeat} samples gathered)",
                "the session died (device rebooted, server killed, out of memory?); check the device and retry",
                partial(text),
            ) from None
        if isinstance(exc, EdgecError):
            raise exc
        raise BenchError(f"the run on {where} failed during {state.stage}: {text}", "check the device and the artifact", partial(text)) from None
    return partial(None)
