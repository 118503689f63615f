"""Run passes in order, time them, and prove after each that the model kept its numbers.

:class:`Pipeline` wraps a list of passes (edgec :class:`~edgec.passes_api.Pass` objects or any
:class:`onnx_ir.passes.PassBase`).  With ``verify`` on, the model's outputs on fresh random
inputs are recorded before the first pass and compared after every pass that modified the model
with the tolerance of that pass (its own ``tolerance`` if it declares one, else the pipeline's).
A mismatch raises :class:`~edgec.errors.EquivalenceError` naming the pass.  Each comparison is
against the outputs of the model just before the pass, so the blame is exact; the last report
compares the final model with the original.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from edgec import ir as eir
from edgec import verify as vfy
from edgec.errors import EquivalenceError
from edgec.passes_api import PassResult, PassStats


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How a :class:`Pipeline` runs.

    ``fixed_point`` repeats the whole pass list until no pass changes the model (at most
    ``max_iterations`` rounds).  ``seed=None`` draws fresh random inputs each run.
    """

    verify: bool = True
    tolerance: vfy.Tolerance = vfy.Tolerance()
    samples: int = 2
    seed: int | None = None
    fixed_point: bool = False
    max_iterations: int = 8
    input_shapes: Mapping[str, tuple[int, ...]] | None = None


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One pass application."""

    pass_name: str
    iteration: int
    seconds: float
    modified: bool
    stats: PassStats
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    equivalence: vfy.EquivalenceReport | None

    def to_json(self) -> dict[str, object]:
        return {
            "pass": self.pass_name,
            "iteration": self.iteration,
            "seconds": self.seconds,
            "modified": self.modified,
            "stats": self.stats.to_json(),
            "nodes": [self.nodes_before, self.nodes_after],
            "params": [self.params_before, self.params_after],
            "equivalence": None if self.equivalence is None else self.equivalence.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class PipelineReport:
    model: ir.Model
    steps: tuple[StepReport, ...]
    final: vfy.EquivalenceReport | None

    @property
    def modified(self) -> bool:
        return any(s.modified for s in self.steps)

    def to_json(self) -> dict[str, object]:
        return {
            "steps": [s.to_json() for s in self.steps],
            "final": None if self.final is None else self.final.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """Progress callback payload: a pass is about to run (``report is None``) or has run."""

    pass_name: str
    index: int
    total: int
    report: StepReport | None


def pass_name(p: onnx_ir.passes.PassBase) -> str:
    name = getattr(type(p), "name", "")
    return name if isinstance(name, str) and name else type(p).__name__


class _Reference:
    """Fixed random inputs and the outputs of the current model on them."""

    def __init__(self, model: ir.Model, config: PipelineConfig) -> None:
        proto = eir.to_proto(model)
        specs = vfy.input_specs(proto, config.input_shapes)
        rng = np.random.default_rng(config.seed)
        self.feeds = [vfy.random_inputs(specs, rng) for _ in range(config.samples)]
        self.original = self._run(proto)
        self.current = self.original
        self.names = [o.name for o in proto.graph.output]

    def _run(self, proto) -> list[list[np.ndarray]]:
        sess = vfy.session(proto)
        return [sess.run(None, f) for f in self.feeds]

    def check(self, model: ir.Model, tol: vfy.Tolerance) -> vfy.EquivalenceReport:
        outs = self._run(eir.to_proto(model))
        report = vfy.compare_outputs(self.current, outs, self.names, tol)
        self.current = outs
        return report

    def final(self, tol: vfy.Tolerance) -> vfy.EquivalenceReport:
        return vfy.compare_outputs(self.original, self.current, self.names, tol)


class Pipeline:
    """Run ``passes`` over a model; see the module docstring."""

    def __init__(
        self,
        passes: Sequence[onnx_ir.passes.PassBase],
        config: PipelineConfig = PipelineConfig(),
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.config = config
        self.on_step = on_step

    def _tolerance(self, p: onnx_ir.passes.PassBase) -> vfy.Tolerance:
        own = getattr(p, "tolerance", None)
        return own if isinstance(own, vfy.Tolerance) else self.config.tolerance

    def run(self, model: ir.Model) -> PipelineReport:
        cfg = self.config
        ref = _Reference(model, cfg) if cfg.verify else None
        steps: list[StepReport] = []
        loosest = cfg.tolerance
        rounds = cfg.max_iterations if cfg.fixed_point else 1
        total = len(self.passes) * (1 if not cfg.fixed_point else rounds)
        index = 0
        for iteration in range(rounds):
            any_modified = False
            for p in self.passes:
                name = pass_name(p)
                if self.on_step:
                    self.on_step(StepEvent(name, index, total, None))
                nodes_before, params_before = eir.count_nodes(model), eir.count_params(model)
                start = time.perf_counter()
                result = p(model)
                seconds = time.perf_counter() - start
                model = result.model
                stats = result.stats if isinstance(result, PassResult) else PassStats()
                equivalence = None
                if ref is not None and result.modified:
                    tol = self._tolerance(p)
                    if tol.rtol > loosest.rtol or tol.atol > loosest.atol:
                        loosest = vfy.Tolerance(max(tol.rtol, loosest.rtol), max(tol.atol, loosest.atol))
                    equivalence = ref.check(model, tol)
                step = StepReport(
                    name,
                    iteration,
                    seconds,
                    result.modified,
                    stats,
                    nodes_before,
                    eir.count_nodes(model),
                    params_before,
                    eir.count_params(model),
                    equivalence,
                )
                steps.append(step)
                index += 1
                if self.on_step:
                    self.on_step(StepEvent(name, index, total, step))
                if equivalence is not None and not equivalence.passed:
                    raise EquivalenceError(
                        f"pass {name!r} changed the model's outputs: {equivalence.summary()}",
                        "this is a bug in the pass; run without it, or report it with the model",
                    )
                any_modified = any_modified or result.modified
            if not any_modified:
                break
        final = ref.final(loosest) if ref is not None else None
        return PipelineReport(model, tuple(steps), final)
