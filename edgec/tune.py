"""MetaSchedule tuning: search schedules for a model's TIR functions, store them in a database.

``tune_model(model, TuneConfig(target, trials=64, db=Path("tuning/")))``:

1. the model is imported and run through the target pipeline's legalization and fusion stage
   (library dispatch, ``LegalizeOps -> AnnotateTIROpPattern -> FoldConstant -> FuseOps ->
   FuseTIR``, i.e. ``relax.pipeline.zero_pipeline`` plus dispatch), exactly what
   ``edgec compile`` schedules later, so the database's workload keys match;
2. each distinct fused TIR function is a task (``extract_tasks``), weighted by how often the
   model calls it (edgec's own hand-scheduled kernels, the int8 VNNI ones, are not tasks); the
   estimated model latency is ``sum_i weight_i * best_i`` over tasks;
3. **seeding** (CPU targets, ``seed_with_rules``): edgec's own rule-based schedule of each task
   (:func:`edgec.schedules.cpu.apply_rules`, what an untuned ``edgec compile`` uses) is built and
   timed first, the same way as any candidate, and stored as a tuning record.  The search starts
   from a database that already holds them (MetaSchedule's evolutionary search takes part of its
   first population from the best records), and ``edgec compile --db`` picks the faster of the
   rules and the search's best for every function, so tuning never makes a model slower than the
   untuned build (up to measurement noise);
4. ``tune_tasks`` (evolutionary search + XGBoost cost model, gradient task scheduler) spends up to
   ``trials`` measured candidates in all.  Candidates are built here (cross-compiled and linked for
   ARM targets) and timed either on this host or, with ``rpc``, on the device itself through a
   TVM RPC tracker (MetaSchedule's ``RPCRunner``);
5. the records land in a ``JSONDatabase`` in ``db`` (``database_workload.json`` and
   ``database_tuning_record.json``); ``edgec compile --db DIR`` applies them without re-tuning.
   Functions missing from the database get edgec's rules when compiling (dlight on GPU).

Costs on this 2-core host: ~35 s per task whatever its trial budget (the builder restarts its
worker pool per batch); MobileNetV2 has 32 tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from edgec import verify as vfy
from edgec.errors import EdgecError, InputError
from edgec.rpc import Remote
from edgec.targets import Target


def open_database(path: Path) -> Any:
    """The MetaSchedule database stored in ``path`` (created if missing)."""
    from tvm.s_tir import meta_schedule as ms

    Path(path).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path))


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """``trials``: measured candidates in all; ``rpc``: time candidates on the device through a
    tracker (``Remote.tracker(...)``), else on this host."""

    target: Target
    trials: int
    db: Path
    trials_per_iter: int = 16
    rpc: Remote | None = None
    builder_timeout_s: float = 600.0  # candidates build in seconds on an idle host, minutes on a loaded one
    runner_timeout_s: float = 60.0
    number: int = 3
    repeat: int = 1
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int | None = None
    num_cores: int | None = None  # threads the schedules plan for: host cores, or 4 on a board
    seed_with_rules: bool = True  # time edgec's own schedules first and store them as records

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise InputError("--trials must be at least 1")
        if self.rpc is not None and not self.rpc.via_tracker:
            raise InputError("tuning on a device goes through an RPC tracker", "use --tracker HOST:PORT --key KEY")


@dataclasses.dataclass(frozen=True)
class TaskReport:
    """One task: ``best_ms`` the fastest record measured in this run (the rules' schedule
    included), ``rules_ms`` edgec's rule-based schedule alone (None: not seeded, or no rule)."""

    name: str
    weight: int
    trials: int
    best_ms: float | None
    rules_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class TuneEvent:
    """Progress after each measured batch: totals and the best latency so far."""

    trials_done: int
    trials_total: int
    task: str
    task_best_ms: float | None
    estimated_model_ms: float | None  # sum of weight * best over tasks measured so far
    tasks_measured: int
    tasks_total: int


@dataclasses.dataclass(frozen=True)
class TuneResult:
    db: Path
    tasks: tuple[TaskReport, ...]
    trials_done: int
    seconds: float

    @property
    def estimated_model_ms(self) -> float | None:
        known = [t.weight * t.best_ms for t in self.tasks if t.best_ms is not None]
        return sum(known) if known else None

    def to_json(self) -> dict[str, Any]:
        return {
            "db": str(self.db),
            "tasks": [dataclasses.asdict(t) for t in self.tasks],
            "trials_done": self.trials_done,
            "seconds": self.seconds,
            "estimated_model_ms": self.estimated_model_ms,
        }


def export_aarch64(mod: Any) -> str:
    """MetaSchedule export function for ARM boards: link a shared library with the cross compiler
    (the board then needs no compiler of its own)."""
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    return path


def tuning_config(target: Target, config: TuneConfig) -> dict[str, Any]:
    """The target as MetaSchedule needs it: CPU targets must state their core count."""
    import psutil

    if target.device != "cpu":
        return dict(target.config)
    cores = config.num_cores or (4 if config.rpc is not None else (psutil.cpu_count(logical=False) or 1))
    return {**target.config, "num-cores": int(cores)}


def tuning_module(model: str | os.PathLike[str] | ir.Model | onnx.ModelProto, target: Target,
                  input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
    """The model after the target pipeline's legalization and fusion: what gets tuned."""
    from edgec.compile import _as_proto, import_onnx

    proto = _as_proto(model)
    return legalized(import_onnx(proto, vfy.input_specs(proto, input_shapes)), target)


def legalized(mod: Any, target: Target) -> Any:
    """An imported Relax module after the target pipeline's dispatch, legalization and fusion."""
    import tvm

    from edgec.targets import host as cpu

    tvm_target = target.tvm_target()
    with tvm_target:
        seq = tvm.transform.Sequential(cpu.library_dispatch_passes(tvm_target) + cpu.legalize_passes(tvm_target))
        return seq(mod)


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Which of a model's TIR functions a tuning database holds a schedule for."""

    found: tuple[str, ...]
    missing: tuple[str, ...]

    def describe(self) -> str:
        total = len(self.found) + len(self.missing)
        text = f"{len(self.found)}/{total} functions scheduled from it"
        if self.missing:
            more = ", ..." if len(self.missing) > 3 else ""
            text += f" (rest by edgec's rules: {', '.join(self.missing[:3])}{more})"
        return text


def database_coverage(mod: Any, target: Target, db: Path) -> Coverage:
    """Look up each task of the imported Relax module ``mod`` in the database ``db`` the way
    ``MetaScheduleApplyDatabase`` does when compiling (same legalization, same workload keys)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    tvm_target = tvm.target.Target(tuning_config(target, TuneConfig(target, 1, db, num_cores=1)))
    database = open_database(db)
    found: list[str] = []
    missing: list[str] = []
    for task in tunable_tasks(ms.relax_integration.extract_tasks(legalized(mod, target), tvm_target)):
        hit = database.query_tuning_record(task.dispatched[0], tvm_target, "main") is not None
        (found if hit else missing).append(task.task_name)
    return Coverage(tuple(found), tuple(missing))


def tune_model(
    model: str | os.PathLike[str] | ir.Model | onnx.ModelProto,
    config: TuneConfig,
    on_event: Callable[[TuneEvent], None] | None = None,
) -> TuneResult:
    """Tune ``model`` for ``config.target`` into ``config.db``; see the module docstring."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    import tvm

    target = config.target
    target.toolchain.check()
    local_ok = target.runs_on_host or (target.device == "cuda" and target.arch == _host_arch())
    if config.rpc is None and not local_ok:
        raise InputError(
            f"{target.name} code cannot run on this host, so candidates must be timed on the device",
            "add --tracker HOST:PORT --key KEY (boards run python -m tvm.exec.rpc_server --tracker ...)",
        )
    start = time.perf_counter()
    try:
        mod = tuning_module(model, target, config.input_shapes)
        tvm_target = tvm.target.Target(tuning_config(target, config))
        extracted = tunable_tasks(ms.relax_integration.extract_tasks(mod, tvm_target))
    except EdgecError:
        raise
    except Exception as exc:
        raise EdgecError.wrapping(
            f"TVM could not prepare the model for tuning on {target.name}", exc,
            "check that `edgec compile` works for this model and target first",
        ) from None
    if not extracted:
        raise EdgecError("the model has no TIR function to tune (edgec's own kernels cover all of it)",
                         "compile it directly with `edgec compile`")
    db_dir = Path(config.db)
    db_dir.mkdir(parents=True, exist_ok=True)
    with _named_handlers_only():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted, work_dir=str(db_dir / "logs"), seed=config.seed
        )
    names = [t.task_name for t in extracted]
    best: dict[int, float] = {}
    trials_per_task: dict[int, int] = {}
    done = [0]

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any, runner_results: Any) -> None:
            for r in runner_results:
                ms_ = _mean_ms(r)
                if ms_ is not None and ms_ < best.get(task_id, float("inf")):
                    best[task_id] = ms_
            done[0] += len(runner_results)
            trials_per_task[task_id] = trials_per_task.get(task_id, 0) + len(runner_results)
            if on_event:
                est = sum(weights[i] * b for i, b in best.items()) if best else None
                on_event(TuneEvent(done[0], config.trials, names[task_id], best.get(task_id), est, len(best), len(names)))

    builder = ms.builder.LocalBuilder(
        timeout_sec=config.builder_timeout_s,
        f_export=export_aarch64 if target.toolchain.compiler == "aarch64-linux-gnu-gcc" else None,
    )
    evaluator = ms.runner.EvaluatorConfig(number=config.number, repeat=config.repeat, enable_cpu_cache_flush=False)
    if config.rpc is not None:
        rpc_config = ms.runner.RPCConfig(
            tracker_host=config.rpc.host,
            tracker_port=config.rpc.port,
            tracker_key=config.rpc.key,
            session_timeout_sec=int(max(config.runner_timeout_s, 10)),
        )
        runner: Any = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator)
    else:
        runner = ms.runner.LocalRunner(timeout_sec=config.runner_timeout_s, evaluator_config=evaluator)
    database = open_database(db_dir)
    rules_ms: dict[int, float] = {}
    if config.seed_with_rules and target.device == "cpu":
        rules_ms = seed_with_rules(contexts, tvm_target, builder, runner, database)
        for i, v in rules_ms.items():
            best[i] = min(best.get(i, float("inf")), v)
        if on_event and rules_ms:
            est = sum(weights[i] * b for i, b in best.items())
            on_event(TuneEvent(0, config.trials, "edgec rules", None, est, len(best), len(names)))
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(db_dir / "logs"),
            max_trials_global=config.trials,
            num_trials_per_iter=config.trials_per_iter,
            builder=builder,
            runner=runner,
            database=database,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), Progress()],
        )
    except Exception as exc:
        raise EdgecError.wrapping(
            f"MetaSchedule failed while tuning for {target.name}", exc,
            f"its log is in {db_dir / 'logs'}; records measured so far stay in the database",
        ) from None
    tasks = tuple(
        TaskReport(names[i], int(extracted[i].weight), trials_per_task.get(i, 0), best.get(i), rules_ms.get(i))
        for i in range(len(names))
    )
    return TuneResult(db_dir, tasks, done[0], time.perf_counter() - start)


def seed_with_rules(contexts: Any, tvm_target: Any, builder: Any, runner: Any, database: Any) -> dict[int, float]:
    """Build and time edgec's rule-based schedule of each task (one builder batch; CPU targets:
    the rules are CPU schedules) and commit each that ran as a tuning record; returns ms per task
    index."""
    from tvm.s_tir import meta_schedule as ms

    from edgec.schedules.cpu import apply_rules

    scheduled = []
    for i, ctx in enumerate(contexts):
        sch = apply_rules(ctx.mod["main"], tvm_target)
        if sch is not None:
            scheduled.append((i, ctx, sch))
    if not scheduled:
        return {}
    built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for _, _, sch in scheduled])
    args = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, True) for _, _, sch in scheduled]
    ok = [(k, b) for k, b in enumerate(built) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args[k]) for k, b in ok])
    out: dict[int, float] = {}
    for (k, _), fut in zip(ok, futures):
        res = fut.result()
        ms_ = _mean_ms(res)
        if ms_ is None:
            continue
        i, ctx, sch = scheduled[k]
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(ctx.mod), res.run_secs, tvm_target, args[k]))
        out[i] = ms_
    return out


def _mean_ms(result: Any) -> float | None:
    """Mean run time in ms of a MetaSchedule runner result, or None when it failed."""
    secs = [float(x) for x in (result.run_secs or [])]
    return 1e3 * sum(secs) / len(secs) if result.error_msg is None and secs else None


def tunable_tasks(tasks: Any) -> list[Any]:
    """The extracted tasks MetaSchedule can search: not edgec's own hand-scheduled kernels
    (``tirx.is_scheduled``, e.g. the int8 VNNI kernels of :mod:`edgec.schedules.int8`, which are
    tensorized already and which MetaSchedule's design-space rules cannot take apart)."""
    from edgec.schedules import is_scheduled

    return [task for task in tasks if not is_scheduled(task.dispatched[0]["main"])]


@contextlib.contextmanager
def _named_handlers_only() -> Iterator[None]:
    """MetaSchedule rebuilds its logging config from the names of the handlers already on its
    logger and fails on an unnamed one (e.g. one a host application or pytest attached); detach
    those while it does, and put them back."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            logger.addHandler(h)


def _host_arch() -> str:
    from edgec.targets import host_arch

    return host_arch()
