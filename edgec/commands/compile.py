"""``edgec compile``: compile an ONNX model with TVM into an artifact folder."""

from __future__ import annotations

from pathlib import Path

import click

from edgec import console


def parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """``("x=1,3,224,224", ...)`` -> ``{"x": (1, 3, 224, 224)}``."""
    from edgec.errors import InputError

    shapes: dict[str, tuple[int, ...]] = {}
    for v in values:
        name, sep, dims = v.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise InputError(f"--input-shape {v!r} is not NAME=D1,D2,...", "e.g. --input-shape input=1,3,224,224") from None
    return shapes or None


@click.command("compile", epilog="""\b
Examples:
  edgec compile mnv2.onnx --target host -o build/
  edgec compile mnv2.onnx --target cortex-a72 -o build-rpi4/      # cross-compiled, Raspberry Pi 4
  edgec compile mnv2.onnx --target cuda --arch sm_90 -o build-gpu/
  edgec compile mnv2.onnx --target '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}' -o b/
  edgec compile mnv2.onnx --target host --db tuning/ -o build/    # reuse `edgec tune` results
  edgec compile mnv2.onnx --target host --passes remove-identity,dce,constant-fold -o build/
  edgec targets    # lists target names
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_name", required=True, help="Target name (`edgec targets`) or a TVM target as JSON.")
@click.option("--arch", default=None, help="CUDA compute capability for CUDA targets, e.g. sm_87.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Artifact folder to write.")
@click.option("--db", type=click.Path(path_type=Path), default=None, help="MetaSchedule database from `edgec tune` (no re-tuning).")
@click.option("--passes", default=None, help="Graph passes to run first (comma-separated, as for `edgec optimize`).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,..", help="Static shape of a dynamic input (repeatable).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Run host builds and compare with onnxruntime.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Allowed error relative to the output's range.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Allowed absolute error.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model: Path, target_name: str, arch: str | None, output: Path, db: Path | None, passes: str | None,
            input_shapes: tuple[str, ...], verify: bool, rtol: float, atol: float, as_json: bool) -> None:
    """Compile MODEL (ONNX) for a target into an artifact folder.

    The folder holds the compiled library (cross-compiled for ARM and Jetson targets), the ONNX
    model, input/output specs and manifest.json (target, versions, model hash, passes).  Host
    builds are run and checked against onnxruntime; others are checked on the device by
    `edgec bench DIR --rpc HOST:PORT`.
    """
    from edgec import ir as eir
    from edgec.compile import CompileConfig, Stage, compile_model
    from edgec.targets import TargetOptions, get_target
    from edgec.verify import Tolerance

    target = get_target(target_name, TargetOptions(arch=arch))
    shapes = parse_shapes(input_shapes)
    proto = eir.load_proto(model)
    applied: tuple[str, ...] = ()
    rows: list[tuple[str, str, float]] = []
    if passes:
        import time

        from edgec.passes_api import registry
        from edgec.pipeline import Pipeline, PipelineConfig, pass_name

        pass_list = registry.parse_list(passes)
        t = time.perf_counter()
        report = Pipeline(pass_list, PipelineConfig(input_shapes=shapes)).run(eir.from_proto(proto))
        proto = eir.to_proto(report.model)
        applied = tuple(pass_name(p) for p in pass_list)
        what = "; ".join(f"{s.pass_name}: {s.stats.summary()}" for s in report.steps)
        rows.append(("passes", what, time.perf_counter() - t))
    config = CompileConfig(target=target, database=db, verify=verify, tolerance=Tolerance(rtol=rtol, atol=atol),
                           input_shapes=shapes, passes_applied=applied)
    with console.progress() as prog:
        task = prog.add_task(f"compiling for {target.name}", total=4 if verify and target.runs_on_host else 3)

        def on_stage(s: Stage) -> None:
            prog.update(task, advance=1, description=f"{s.name} done")

        result = compile_model(proto, output, config, on_stage)
    if as_json:
        console.print_json(result.to_json())
        return
    rows += [(s.name, s.detail, s.seconds) for s in result.stages]
    console.out.print(console.table(f"{model} -> {output}", ["step", "what it did", "seconds"], rows, numeric_from=2))
    if result.verification is None:
        console.out.print(f"not run here ({target.arch}/{target.device} build): check it on the device with "
                          f"`edgec bench {output} --rpc HOST:PORT`")
