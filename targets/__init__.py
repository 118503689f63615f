"""Compilation targets: one module per target family behind one interface, found by name.

A :class:`Target` says everything ``edgec compile`` needs to know about a device:

- ``tvm_target()``: the TVM target (a JSON dict turned into :class:`tvm.target.Target`);
- ``pipeline(database)``: the Relax compilation pipeline for it (the per-target pipeline
  modules, in the style of ``tvm.relax.backend.cpu_generic`` / ``cuda``), which calls edgec's
  schedule hook :func:`edgec.schedules.default_schedule_pass` after legalization and fusion and
  before lowering;
- ``toolchain``: the C compiler that links the library (a cross compiler for ARM boards), with
  the Debian package that provides it;
- ``arch`` / ``device``: the machine architecture the library runs on and the TVM device kind.

Targets are found through :data:`registry`: built-in ones register with :func:`register_target`
in the modules of this package, third-party packages through the ``edgec.targets`` entry-point
group (the entry point names a :class:`TargetFactory`: a callable taking :class:`TargetOptions`
and returning a :class:`Target`).  A TVM target given as JSON (``'{"kind": "llvm", ...}'``) is
accepted too (:mod:`edgec.targets.custom`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import pkgutil
import platform
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgec.errors import InputError, ToolMissingError, UnknownNameError

__all__ = [
    "Target",
    "TargetOptions",
    "TargetFactory",
    "Toolchain",
    "ThreadPolicy",
    "TargetRegistry",
    "registry",
    "register_target",
    "get_target",
    "host_arch",
]


def host_arch() -> str:
    """Machine architecture of this host in the names used by edgec (``x86_64``, ``aarch64``)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """The C compiler that links a compiled library, and where it comes from."""

    compiler: str | None = None  # None: TVM's default host compiler
    debian_package: str | None = None
    options: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise :class:`ToolMissingError` naming the package when the compiler is absent."""
        if self.compiler and shutil.which(self.compiler) is None:
            pkg = self.debian_package or "a package providing it"
            raise ToolMissingError(
                f"cross compiler {self.compiler!r} not found on PATH",
                f"install it: sudo apt-get install {pkg}",
            )

    def fcompile(self) -> Any:
        """The ``fcompile`` argument of ``export_library`` (None: TVM's default)."""
        if not self.compiler:
            return None
        from tvm.support import cc

        return cc.cross_compiler(self.compiler, options=list(self.options))


def _physical_cores(cpus: Sequence[int]) -> int:
    """How many physical cores ``cpus`` span (SMT siblings count once), from Linux's sysfs."""
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def _big_cpus(cpus: Sequence[int]) -> list[int]:
    """The CPUs of ``cpus`` with the highest ``cpuinfo_max_freq`` (all of them when unknown)."""
    freq = {}
    for c in cpus:
        try:
            freq[c] = int(Path(f"/sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq").read_text())
        except (OSError, ValueError):
            return list(cpus)
    top = max(freq.values(), default=0)
    return [c for c in cpus if freq.get(c) == top] or list(cpus)


@dataclasses.dataclass(frozen=True)
class ThreadPolicy:
    """How TVM's CPU runtime should size and place its thread pool for a library built for a target.

    ``cores``: ``"all"``: every CPU the process may use, one worker per physical core, each worker
    free to run on any of them (TVM's affinity mode kSpecifyThreadShareAllCore, -3); ``"big"``:
    the fastest cluster only, one worker pinned per core (TVM's kBig, 1: cores ranked by their
    ``cpuinfo_max_freq``), for big.LITTLE boards, where a worker on a slow core holds up every
    parallel loop.  On boards whose cores are all alike (Raspberry Pi 3/4/5) "big" is every core.
    ``threads``: the worker count; ``None``: one per core of that set.

    Why edgec sets it at all: TVM's runtime defaults to half the hardware threads on x86 (it
    assumes SMT), which on a VM without SMT leaves half the cores idle beside an onnxruntime that
    uses all of them.
    """

    cores: str = "all"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.cores not in ("all", "big"):
            raise ValueError(f"thread policy cores={self.cores!r}: 'all' or 'big'")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"thread policy threads={self.threads}: at least 1")

    def pool_args(self, threads: int | None = None, cpus: Sequence[int] | None = None) -> tuple[int, int, list[str]] | None:
        """Arguments of ``runtime.config_threadpool(mode, nthreads, cpus)``, or ``None`` to keep
        the runtime's default.  ``threads`` overrides the policy's count; ``cpus`` are the CPUs the
        process may use when they are known (on this host), ``None`` on a remote device."""
        n = threads if threads is not None else self.threads
        if self.cores == "big":
            return (1, n or 0, [])
        if cpus is None:
            if n is None:
                return None  # a remote device whose CPUs we do not know: its runtime's default
            cpus = range(n)
        cpus = list(cpus)
        return (-3, n if n is not None else _physical_cores(cpus), [str(c) for c in cpus])

    def local_count(self, cpus: Sequence[int]) -> int:
        """The worker count the policy gives on this host, whose usable CPUs are ``cpus``."""
        if self.threads is not None:
            return self.threads
        return _physical_cores(cpus) if self.cores == "all" else len(_big_cpus(cpus))

    def describe(self, threads: int | None = None, cpus: Sequence[int] | None = None) -> str:
        """e.g. "2 threads", "big cores", "4 threads on big cores"."""
        args = self.pool_args(threads, cpus)
        if args is None:
            return "the device's default threads"
        n = args[1]
        count = f"{n} thread{'s' if n != 1 else ''}" if n else ""
        if self.cores == "big":
            return f"{count} on big cores" if count else "big cores"
        return count

    def to_json(self) -> dict[str, Any]:
        return {"cores": self.cores, "threads": self.threads}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> ThreadPolicy:
        return cls() if not d else cls(cores=str(d.get("cores", "all")), threads=d.get("threads"))


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """Options of a target given on the command line (``--arch sm_87`` for CUDA)."""

    arch: str | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target; subclasses provide :meth:`pipeline`.

    ``config`` is the TVM target as a JSON-able dict, ``arch`` the machine architecture of the
    host side code (``x86_64``, ``aarch64``), ``device`` the TVM device the model runs on
    (``cpu`` or ``cuda``), ``threads`` how the CPU runtime's thread pool should run it.
    """

    name: str
    summary: str
    config: dict[str, Any]
    arch: str
    device: str = "cpu"
    toolchain: Toolchain = Toolchain()
    examples: tuple[str, ...] = ()
    threads: ThreadPolicy = ThreadPolicy()

    def tvm_target(self) -> Any:
        import tvm

        return tvm.target.Target(self.config)

    def pipeline(self, database: Any | None = None) -> Any:
        """The Relax pipeline (a ``tvm.transform.Pass``); ``database`` is a MetaSchedule DB."""
        raise NotImplementedError

    @property
    def runs_on_host(self) -> bool:
        """True when a library built for this target can be loaded and run on this machine."""
        return self.device == "cpu" and self.arch == host_arch() and not self.toolchain.compiler

    def describe(self) -> str:
        return json.dumps(self.config, sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "tvm_target": self.config,
            "arch": self.arch,
            "device": self.device,
            "cross_compiler": self.toolchain.compiler,
            "debian_package": self.toolchain.debian_package,
            "threads": self.threads.to_json(),
        }


#: A callable building a :class:`Target` from command-line options.
TargetFactory = Callable[[TargetOptions], Target]


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    summary: str
    factory: TargetFactory


class TargetRegistry:
    """Maps target names to factories (built-ins, then the ``edgec.targets`` entry points)."""

    ENTRY_POINT_GROUP = "edgec.targets"

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._loaded = False

    def register(self, name: str, summary: str) -> Callable[[TargetFactory], TargetFactory]:
        def deco(factory: TargetFactory) -> TargetFactory:
            self._entries[name] = _Entry(name, summary, factory)
            return factory

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        import edgec.targets as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"edgec.targets.{info.name}")
        for name, entry in _BUILTINS.items():
            self._entries.setdefault(name, entry)
        for ep in importlib.metadata.entry_points(group=self.ENTRY_POINT_GROUP):
            try:
                factory = ep.load()
            except Exception:  # a broken plugin must not break edgec; it is simply absent
                continue
            summary = (getattr(factory, "__doc__", "") or "").strip().splitlines()
            self._entries.setdefault(ep.name, _Entry(ep.name, summary[0] if summary else "", factory))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[_Entry]:
        self._load()
        return [self._entries[n] for n in sorted(self._entries)]

    def get(self, name: str, options: TargetOptions = TargetOptions()) -> Target:
        """A target by registry name, or from a TVM target given as JSON."""
        self._load()
        spec = name.strip()
        if spec.startswith("{"):
            from edgec.targets.custom import from_json

            return from_json(spec, options)
        entry = self._entries.get(spec)
        if entry is None:
            import difflib

            close = difflib.get_close_matches(spec, self._entries, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownNameError(
                f"unknown target {spec!r}",
                f"{hint}`edgec targets` lists them; or give a TVM target as JSON, e.g. '{{\"kind\": \"llvm\"}}'",
            )
        try:
            return entry.factory(options)
        except (InputError, ToolMissingError):
            raise
        except (TypeError, ValueError) as exc:
            raise InputError(f"target {spec!r}: {exc}") from None


#: The process-wide target registry.
registry = TargetRegistry()

#: Targets defined by the modules of this package (every registry starts with them).
_BUILTINS: dict[str, _Entry] = {}


def register_target(name: str, summary: str) -> Callable[[TargetFactory], TargetFactory]:
    """Decorator registering a built-in target factory under ``name``."""

    def deco(factory: TargetFactory) -> TargetFactory:
        _BUILTINS[name] = _Entry(name, summary, factory)
        return factory

    return deco


def get_target(name: str, options: TargetOptions = TargetOptions()) -> Target:
    """Shorthand for ``registry.get(name, options)``."""
    return registry.get(name, options)
