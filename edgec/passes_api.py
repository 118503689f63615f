"""The pass contract, built on onnx-ir's pass infrastructure (:mod:`onnx_ir.passes`).

A pass is a small class.  Its :meth:`~onnx_ir.passes.PassBase.call` takes an
:class:`onnx_ir.Model` and returns a :class:`PassResult`: the model, whether it changed, and
:class:`PassStats` (patterns matched, nodes removed, and for every near-miss the reason it was
rejected).  ``requires``/``ensures`` are onnx-ir's pre/post-condition hooks.

Example of a user-defined pass (``edgec optimize in.onnx -o out.onnx --passes my_passes.py:RemoveDoubleNeg,dce``)::

    import onnx_ir as ir
    from edgec.passes_api import Pass, PassStats, register_pass

    @register_pass
    class RemoveDoubleNeg(Pass):
        name = "remove-double-neg"
        summary = "Neg(Neg(x)) -> x"

        def call(self, model: ir.Model):
            stats = PassStats()
            for node in list(model.graph):
                x = node.inputs[0] if node.op_type == "Neg" else None
                inner = x.producer() if x is not None else None
                if inner is None or inner.op_type != "Neg":
                    continue
                if node.outputs[0].is_graph_output():
                    stats.reject("neg-neg", node.name, "output is a graph output")
                    continue
                node.outputs[0].replace_all_uses_with(inner.inputs[0])
                stats.count("neg-neg")
            return self.result(model, stats)

Passes are found by name through :data:`registry`: built-in passes register with
:func:`register_pass`, third-party packages through the ``edgec.passes`` entry-point group, and a
user's file with ``path/to/file.py:ClassName`` (or ``package.module:ClassName``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import onnx_ir as ir
import onnx_ir.passes

from edgec.errors import InputError, UnknownNameError
from edgec.verify import Tolerance

__all__ = [
    "Pass",
    "PassOption",
    "PassResult",
    "PassStats",
    "Rejection",
    "PassRegistry",
    "registry",
    "register_pass",
    "load_object",
]


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A place where a pattern almost matched, and why it was left alone."""

    pattern: str
    node: str
    reason: str


@dataclasses.dataclass
class PassStats:
    """What a pass did: per-pattern match counts, rejections with reasons, free-form notes."""

    matched: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def count(self, pattern: str, n: int = 1) -> None:
        self.matched[pattern] = self.matched.get(pattern, 0) + n

    def reject(self, pattern: str, node: str, reason: str) -> None:
        self.rejected.append(Rejection(pattern, node, reason))

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def total_matched(self) -> int:
        return sum(self.matched.values())

    def merge(self, other: PassStats) -> None:
        for k, v in other.matched.items():
            self.count(k, v)
        self.rejected.extend(other.rejected)
        self.notes.extend(other.notes)

    def summary(self) -> str:
        parts = [f"{k}: {v}" for k, v in sorted(self.matched.items())]
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected")
        return ", ".join(parts) if parts else "no match"

    def to_json(self) -> dict[str, Any]:
        return {
            "matched": dict(self.matched),
            "rejected": [dataclasses.asdict(r) for r in self.rejected],
            "notes": list(self.notes),
        }


@dataclasses.dataclass
class PassResult(onnx_ir.passes.PassResult):
    """onnx-ir's ``PassResult(model, modified)`` plus edgec's :class:`PassStats`."""

    stats: PassStats = dataclasses.field(default_factory=PassStats)


@dataclasses.dataclass(frozen=True)
class PassOption:
    """A typed constructor argument of a pass, exposed as a CLI option of ``edgec optimize``.

    ``flag`` is the long option (``--patches``), ``param`` the constructor argument it fills,
    ``parse`` turns the command-line string into the argument's type.
    """

    flag: str
    param: str
    help: str
    parse: Callable[[str], Any] = str
    metavar: str = "VALUE"


class Pass(onnx_ir.passes.PassBase):
    """Base class of edgec passes.

    Class attributes a subclass sets:

    - ``name``: registry name used on the command line (``--passes name``).
    - ``summary``: one line for ``edgec passes``.
    - ``rewrites_in_place``: True (default) if ``call`` mutates and returns the given model;
      False if it returns a new model and leaves the input untouched.
    - ``tolerance``: ``None`` if the pass is exact up to float rounding (checked with the
      pipeline's tolerance); a pass that changes numbers by design (quantization) sets its own.
    - ``options``: :class:`PassOption` entries exposed by ``edgec optimize``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    rewrites_in_place: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance | None] = None
    options: ClassVar[tuple[PassOption, ...]] = ()

    @property
    def in_place(self) -> bool:
        return self.rewrites_in_place

    @property
    def changes_input(self) -> bool:
        return self.rewrites_in_place

    def result(self, model: ir.Model, stats: PassStats, modified: bool | None = None) -> PassResult:
        """Build the result; ``modified`` defaults to "some pattern matched"."""
        return PassResult(model, stats.total_matched > 0 if modified is None else modified, stats)

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> Pass:
        """Construct from parsed CLI option values (options left unset keep their defaults)."""
        kwargs = {o.param: values[o.param] for o in cls.options if values.get(o.param) is not None}
        return cls(**kwargs)

    @classmethod
    def display_name(cls) -> str:
        return cls.name or cls.__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


P = TypeVar("P", bound=type[onnx_ir.passes.PassBase])


def load_object(spec: str, what: str = "object") -> Any:
    """Resolve ``path/to/file.py:Name`` or ``package.module:Name`` to the named attribute."""
    if ":" not in spec:
        raise InputError(f"{spec!r} is not of the form FILE.py:NAME or MODULE:NAME", f"name the {what} after a colon")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise InputError(f"{spec!r} is not of the form FILE.py:NAME or MODULE:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise InputError(f"{path}: no such file", f"give the Python file that defines the {what}")
        mod_name = f"edgec_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"{path}: cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise InputError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise InputError(f"cannot import module {where!r}: {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"{where} defines no {attr!r}", f"check the {what} name") from None


class PassRegistry:
    """Maps pass names to pass classes."""

    ENTRY_POINT_GROUP = "edgec.passes"

    def __init__(self) -> None:
        self._passes: dict[str, type[onnx_ir.passes.PassBase]] = {}
        self._loaded_builtins = False

    def register(self, cls: P) -> P:
        name = getattr(cls, "name", "") or cls.__name__
        existing = self._passes.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"pass name {name!r} already registered by {existing.__module__}.{existing.__qualname__}")
        self._passes[name] = cls
        return cls

    def _load_builtins(self) -> None:
        if self._loaded_builtins:
            return
        self._loaded_builtins = True
        import pkgutil

        import edgec.passes as builtin

        for info in pkgutil.iter_modules(builtin.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"edgec.passes.{info.name}")
        for ep in importlib.metadata.entry_points(group=self.ENTRY_POINT_GROUP):
            try:
                self.register(ep.load())
            except Exception:  # a broken plugin must not break edgec; it is simply absent
                continue

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._passes)

    def classes(self) -> list[type[onnx_ir.passes.PassBase]]:
        self._load_builtins()
        return [self._passes[n] for n in sorted(self._passes)]

    def get(self, name: str) -> type[onnx_ir.passes.PassBase]:
        """A pass class by registry name or ``file.py:Class`` / ``module:Class``."""
        self._load_builtins()
        if name in self._passes:
            return self._passes[name]
        if ":" in name:
            obj = load_object(name, "pass class")
            if not (inspect.isclass(obj) and issubclass(obj, onnx_ir.passes.PassBase)):
                raise InputError(f"{name} is not a pass class", "subclass edgec.passes_api.Pass")
            return obj
        import difflib

        close = difflib.get_close_matches(name, self._passes, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownNameError(f"unknown pass {name!r}", f"{hint}`edgec passes` lists them")

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> onnx_ir.passes.PassBase:
        cls = self.get(name)
        if issubclass(cls, Pass):
            return cls.from_options(options or {})
        return cls()

    def parse_list(self, spec: str | Iterable[str], options: Mapping[str, Any] | None = None) -> list[onnx_ir.passes.PassBase]:
        """``"a,b,file.py:C"`` -> pass instances (a Windows-free split: commas separate passes)."""
        names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
        names = [n for n in names if n]
        if not names:
            raise InputError("no passes given", "e.g. --passes dce,remove-identity")
        return [self.create(n, options) for n in names]


#: The process-wide default registry.
registry = PassRegistry()


def register_pass(cls: P) -> P:
    """Class decorator: add a pass to :data:`registry` under its ``name``."""
    return registry.register(cls)
