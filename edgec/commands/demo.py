"""``edgec demo``: the whole job on one zoo model, end to end, in one table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from edgec import console

#: Cleanup first, then fusion (``fuse`` runs all fusion passes to a fixed point; the single
#: passes stand in when it is not registered), then cleanup of what fusion left dead.
CLEANUP = ("remove-identity", "dce", "constant-fold")
FUSION = ("fuse",)
FUSION_FALLBACK = ("fold-bn", "fold-scale", "fold-pad", "fuse-activation")


def demo_passes(available: set[str]) -> list[str]:
    chosen = [p for p in CLEANUP if p in available]
    fusion = [p for p in FUSION if p in available] or [p for p in FUSION_FALLBACK if p in available]
    chosen += fusion
    if fusion and "dce" in available:
        chosen.append("dce")
    return chosen


@click.command("demo", epilog="""\b
Examples:
  edgec demo                                  # MobileNetV2 on this machine's CPU
  edgec demo --model resnet18
  edgec demo --model mcunet --resolution 96
  edgec demo --db tuning/                     # with schedules from `edgec tune`
  edgec demo --target cortex-a72 --rpc 192.168.1.20:9090    # compile for a Pi 4, measure there
  edgec demo --json
""")
@click.option("--model", "model_name", default="mobilenet_v2", show_default=True, help="Zoo model (`edgec models`).")
@click.option("--resolution", type=int, default=None, help="Input resolution for zoo models that take one (default: the model's).")
@click.option("-t", "--target", "target_name", default="host", show_default=True, help="Compile target (`edgec targets`).")
@click.option("--arch", default=None, help="CUDA compute capability for CUDA targets.")
@click.option("--rpc", "rpc_addr", default=None, metavar="HOST:PORT", help="Measure on this TVM RPC server (non-host targets).")
@click.option("--db", type=click.Path(path_type=Path), default=None, help="MetaSchedule database from `edgec tune`.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("edgec-demo"), show_default=True,
              help="Folder for the ONNX files and the artifact.")
@click.option("--repeat", type=int, default=10, show_default=True, help="Latency samples.")
@click.option("--number", type=int, default=3, show_default=True, help="Runs averaged into one sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model_name: str, resolution: int | None, target_name: str, arch: str | None, rpc_addr: str | None, db: Path | None, output: Path,
            repeat: int, number: int, as_json: bool) -> None:
    """Export a zoo model, optimize it, compile it with TVM, check it and measure it.

    One table: each step, what it did and how long it took; then latency statistics of the
    compiled model next to onnxruntime on this host, measured in the same run, as a ratio.
    """
    from edgec import ir as eir
    from edgec.bench import STAT_COLUMNS, BenchConfig, run_bench
    from edgec.compile import CompileConfig, compile_model
    from edgec.errors import InputError
    from edgec.export import export_zoo_model
    from edgec.passes_api import registry
    from edgec.pipeline import Pipeline, PipelineConfig
    from edgec.rpc import Remote
    from edgec.targets import TargetOptions, get_target

    target = get_target(target_name, TargetOptions(arch=arch))
    remote = Remote.direct(rpc_addr) if rpc_addr else None
    if not target.runs_on_host and remote is None:
        raise InputError(
            f"{target.name} code does not run on this host, so the demo cannot measure it here",
            "add --rpc HOST:PORT of a device running python -m tvm.exec.rpc_server (or use --target host)",
        )
    output.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, float]] = []
    report: dict[str, Any] = {"model": model_name, "target": target.name}
    with console.progress() as prog:
        task = prog.add_task("export", total=4)

        t = time.perf_counter()
        proto = export_zoo_model(model_name, **({"resolution": resolution} if resolution else {}))
        model = eir.from_proto(proto)
        eir.save_proto(proto, output / f"{model_name}.onnx")
        rows.append(("export", f"{model_name} -> ONNX: {eir.count_nodes(model)} nodes, {eir.count_params(model):,} params",
                     time.perf_counter() - t))
        prog.update(task, advance=1, description="graph passes")

        names = demo_passes(set(registry.names()))
        t = time.perf_counter()
        pipe = Pipeline(registry.parse_list(names), PipelineConfig())
        result = pipe.run(model)
        for s in result.steps:
            rows.append((f"  pass {s.pass_name}", f"{s.stats.summary()}; nodes {s.nodes_before} -> {s.nodes_after}", s.seconds))
        final = result.final.summary() if result.final is not None else "not checked"
        rows.append(("passes", f"{len(names)} passes, outputs vs exported model: {final}", time.perf_counter() - t))
        optimized = output / f"{model_name}.opt.onnx"
        eir.save_model(result.model, optimized)
        prog.update(task, advance=1, description=f"compile for {target.name}")

        compiled = compile_model(result.model, output / f"{model_name}-{target.name}",
                                 CompileConfig(target, database=db, passes_applied=tuple(names)))
        for s in compiled.stages:
            rows.append((f"  {s.name}", s.detail, s.seconds))
        rows.append(("compile", f"TVM -> {compiled.artifact.path}", sum(s.seconds for s in compiled.stages)))
        prog.update(task, advance=1, description="measure")

        t = time.perf_counter()
        bench = run_bench(compiled.artifact, remote, BenchConfig(warmup=2, number=number, repeat=repeat, compare_ort=True))
        eq = bench.equivalence.summary() if bench.equivalence else "-"
        rows.append(("measure", f"{repeat} samples x {number} runs on {bench.where}, onnxruntime same run; outputs {eq}",
                     time.perf_counter() - t))
        prog.update(task, advance=1)

    report["steps"] = [{"step": r[0].strip(), "what": r[1], "seconds": r[2]} for r in rows]
    report["bench"] = bench.to_json()
    ratio = bench.ratio
    untuned = db is None and target.device == "cpu" and not compiled.artifact.manifest.schedule_hook
    note = None
    if ratio is not None and ratio > 1.5:
        why = ("TVM's default CPU pipeline applies no schedules (no database given, edgec's schedule library "
               "has none for this target), so these are plain loops" if untuned else
               "the schedules in use do not match onnxruntime's hand-written kernels yet")
        note = (f"edgec is {ratio:.1f}x slower than onnxruntime here: {why}. "
                f"Tune it: edgec tune {optimized} --target {target.name} --trials 2000 --db tuning/, "
                f"then edgec demo --db tuning/")
    report["note"] = note
    if as_json:
        console.print_json(report)
        return
    console.out.print(console.table(f"edgec demo: {model_name} on {target.name}", ["step", "what it did", "seconds"], rows,
                                    numeric_from=2))
    stat_rows = []
    if bench.stats is not None:
        stat_rows.append((f"edgec ({target.name})", *bench.stats.row()))
    if bench.ort is not None:
        stat_rows.append(("onnxruntime (this host)", *bench.ort.row()))
    console.out.print(console.table("latency", ["what", *STAT_COLUMNS], stat_rows))
    if ratio is not None:
        console.out.print(f"edgec / onnxruntime mean latency: {ratio:.2f}x ({'faster' if ratio < 1 else 'slower'} than onnxruntime)")
    if note:
        console.out.print(f"[yellow]note:[/yellow] {note}")
