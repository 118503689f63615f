"""``edgec optimize``: run a pass pipeline over an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgec import console


def _pass_options() -> list[click.Option]:
    """CLI options declared by registered passes (``Pass.options``), one per flag."""
    from edgec.passes_api import Pass, registry

    seen: dict[str, str] = {}
    opts = []
    for cls in registry.classes():
        if not issubclass(cls, Pass):
            continue
        for o in cls.options:
            if o.flag in seen:
                continue
            seen[o.flag] = o.param
            opts.append(click.Option([o.flag, o.param], default=None, metavar=o.metavar, help=f"[{cls.name}] {o.help}"))
    return opts


def _parse_pass_options(raw: dict[str, Any]) -> dict[str, Any]:
    from edgec.errors import InputError
    from edgec.passes_api import Pass, registry

    parsed: dict[str, Any] = {}
    for cls in registry.classes():
        if not issubclass(cls, Pass):
            continue
        for o in cls.options:
            value = raw.get(o.param)
            if value is None or o.param in parsed:
                continue
            try:
                parsed[o.param] = o.parse(value)
            except (ValueError, TypeError) as exc:
                raise InputError(f"{o.flag} {value!r}: {exc}") from None
    return parsed


def run_optimize(
    model_path: Path,
    output: Path,
    passes: str,
    verify: bool,
    rtol: float,
    atol: float,
    fixed_point: bool,
    seed: int | None,
    as_json: bool,
    pass_options: dict[str, Any],
) -> None:
    from edgec import ir as eir
    from edgec.passes_api import registry
    from edgec.pipeline import Pipeline, PipelineConfig, StepEvent
    from edgec.verify import Tolerance

    model = eir.load_model(model_path)
    pass_list = registry.parse_list(passes, _parse_pass_options(pass_options))
    config = PipelineConfig(verify=verify, tolerance=Tolerance(rtol=rtol, atol=atol), seed=seed, fixed_point=fixed_point)
    with console.progress() as prog:
        task = prog.add_task("optimizing", total=len(pass_list))

        def on_step(ev: StepEvent) -> None:
            if ev.report is None:
                prog.update(task, description=f"pass {ev.pass_name}", total=ev.total)
            else:
                prog.update(task, completed=ev.index)

        report = Pipeline(pass_list, config, on_step).run(model)
    eir.save_model(report.model, output)
    if as_json:
        console.print_json({"output": str(output), **report.to_json()})
        return
    rows = []
    for s in report.steps:
        eq = "-" if s.equivalence is None else ("ok " if s.equivalence.passed else "FAIL ") + f"{s.equivalence.max_rel:.1e}"
        rows.append(
            (s.pass_name + (f" #{s.iteration + 1}" if config.fixed_point else ""), s.stats.summary(), s.nodes_before, s.nodes_after,
             s.params_before, s.params_after, s.seconds * 1e3, eq)
        )
    console.out.print(
        console.table(
            f"{model_path} -> {output}",
            ["pass", "what it did", "nodes before", "nodes after", "params before", "params after", "ms", "max rel err"],
            rows,
            numeric_from=2,
        )
    )
    for s in report.steps:
        for r in s.stats.rejected[:20]:
            console.info(f"  {s.pass_name}: left {r.pattern} at {r.node or '?'} alone: {r.reason}")
        for n in s.stats.notes:
            console.info(f"  {s.pass_name}: {n}")
    if report.final is not None:
        console.out.print(f"equivalence vs input: {report.final.summary()}")
    else:
        console.out.print("equivalence not checked (--no-verify)")


@click.command("optimize", epilog="""\b
Examples:
  edgec optimize model.onnx -o model.opt.onnx --passes dce,remove-identity,constant-fold
  edgec optimize model.onnx -o out.onnx --passes my_passes.py:MyPass --rtol 1e-3
  edgec passes    # lists pass names and their options
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the optimized model.")
@click.option("--passes", "passes", required=True, help="Comma-separated pass names or FILE.py:Class.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check outputs vs the input model after each pass (onnxruntime).")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Allowed error relative to the output's range.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Allowed absolute error.")
@click.option("--fixed-point", is_flag=True, help="Repeat the pass list until nothing changes.")
@click.option("--seed", type=int, default=None, help="Seed of the random verification inputs (default: fresh).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def _optimize(model: Path, output: Path, passes: str, verify: bool, rtol: float, atol: float, fixed_point: bool,
              seed: int | None, as_json: bool, **pass_options: Any) -> None:
    """Run graph passes over MODEL and write the result to OUTPUT.

    Every pass reports what it did; with --verify (the default) the model's outputs are compared
    with the input model's on fresh random inputs after each pass, and a pass that breaks
    equivalence is named and nothing is written.
    """
    run_optimize(model, output, passes, verify, rtol, atol, fixed_point, seed, as_json, pass_options)


_optimize.params.extend(_pass_options())
command = _optimize
