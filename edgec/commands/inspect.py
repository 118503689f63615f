"""``edgec inspect``: op histogram, parameters, MACs, activation sizes and the activation memory plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgec import console


def _parse_shapes(specs: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from edgec.errors import InputError

    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise InputError(f"--shape {spec!r} is not NAME=D0,D1,...", "e.g. --shape x=1,3,224,224") from None
    return shapes


def _shape(s: Any) -> str:
    return "x".join(str(d) for d in s) if s else "?"


def plot_memory(path: Path, curves: list[tuple[str, list[tuple[str, int]]]], title: str, budget: int | None) -> None:
    """Memory over layers, one line per curve (before / after patching), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgec.ir import atomic_path

    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    for label, profile in curves:
        ax.plot(range(len(profile)), [v / 1024 for _, v in profile], label=label, linewidth=1.5)
    if budget:
        ax.axhline(budget / 1024, color="gray", linestyle="--", linewidth=1, label=f"budget {budget / 1024:.0f} KiB")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("live activation memory (KiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_inspect(model_path: Path, as_json: bool, show_memory: bool, plot: Path | None, act_dtype: str,
                planner_name: str, shapes: dict[str, tuple[int, ...]], patches: str | None, split: str,
                sram_budget: str | None, show_layers: bool) -> None:
    from edgec import analysis, memory
    from edgec import ir as eir
    from edgec.errors import InputError

    act = {"float32": 4, "int8": 1}[act_dtype]
    try:
        planner = memory.PlannerOptions.named(planner_name)
    except ValueError as exc:
        raise InputError(f"--planner {planner_name!r}: {exc}") from None
    proto = eir.load_proto(model_path)
    res = analysis.analyze(proto, shapes or None, planner)
    plan = memory.plan_memory(res.schedule, act, planner)

    patched_plan = patch_report = None
    patched_origin: list[str] = []
    if patches is not None or sram_budget is not None:
        from edgec.passes.patch import Grid, PatchConfig, origin, parse_bytes, patch_model

        try:
            grid = Grid.parse(patches) if patches else None
            budget = parse_bytes(sram_budget) if sram_budget else None
        except ValueError as exc:
            raise InputError(str(exc)) from None
        patched, patch_report = patch_model(analysis.infer_shapes(proto, shapes or None),
                                            PatchConfig(grid, split, budget, act, planner))
        after = analysis.analyze_proto(patched, planner)
        patched_plan = memory.plan_memory(after.schedule, act, planner)
        patched_origin = [origin(s.name) for s in after.schedule.steps]

    if as_json:
        out: dict[str, Any] = {"model": str(model_path), **res.to_json(), "memory": plan.to_json()}
        if patch_report is not None and patched_plan is not None:
            out["patched"] = {**patch_report.to_json(), "memory": patched_plan.to_json()}
        console.print_json(out)
    else:
        hb = console.human_bytes
        rows = [
            ("nodes", len(res.nodes)),
            ("parameters", res.params),
            ("parameter bytes", hb(res.param_bytes)),
            ("MACs", res.macs),
            ("peak activations float32", f"{hb(res.memory_fp32.peak_bytes)} at {res.memory_fp32.peak_step_name}"),
            ("peak activations int8", f"{hb(res.memory_int8.peak_bytes)} at {res.memory_int8.peak_step_name}"),
            (f"arena ({act_dtype}, best fit)", f"{hb(plan.arena_bytes)}, fragmentation {100 * plan.fragmentation:.1f}%"),
        ]
        console.out.print(console.table(str(model_path), ["", "value"], rows, numeric_from=1))
        console.out.print(console.table("Ops", ["op", "count"], list(res.op_histogram)))
        if show_layers:
            layer_rows = [
                (n.name, n.op_type, _shape(n.output_shapes[0] if n.output_shapes else None), n.macs, n.params,
                 hb(n.output_bytes))
                for n in res.nodes if not n.constant
            ]
            console.out.print(console.table("Layers", ["node", "op", "output", "MACs", "params", "output bytes"],
                                            layer_rows, numeric_from=3))
        if show_memory:
            mem_rows = [(s.index, s.name, s.op_type, hb(s.output_bytes), hb(s.live_bytes),
                         "<- peak" if s.index == plan.peak_step else "") for s in plan.steps]
            console.out.print(console.table(f"Activation memory per step ({act_dtype}, planner {planner_name})",
                                            ["#", "node", "op", "output", "live", ""], mem_rows, numeric_from=3))
        if patch_report is not None and patched_plan is not None:
            console.out.print(
                console.table(
                    "Patch-based inference",
                    ["split", "grid", "peak before", "peak after", "ratio", "MAC overhead", "arena after"],
                    [(patch_report.split, str(patch_report.grid), hb(plan.peak_bytes), hb(patched_plan.peak_bytes),
                      f"{plan.peak_bytes / max(patched_plan.peak_bytes, 1):.2f}x",
                      f"+{100 * patch_report.mac_overhead:.1f}%", hb(patched_plan.arena_bytes))],
                    numeric_from=2,
                )
            )
    if show_memory or plot is not None:
        target = plot if plot is not None else model_path.with_suffix(".memory.png")
        curves = [("original", list(memory.layer_profile(plan, [s.name for s in res.schedule.steps])))]
        if patched_plan is not None and patch_report is not None:
            names = [s.name for s in res.schedule.steps]
            known = set(names)
            # steps with no original layer (the input slices) count towards the first layer
            aligned = [o if o in known else names[0] for o in patched_origin]
            after_by_layer = dict(memory.layer_profile(patched_plan, aligned))
            curves.append((f"patched {patch_report.grid} up to {patch_report.split}",
                           [(n, after_by_layer.get(n, 0)) for n in names]))
        plot_memory(target, curves, f"{model_path.name}: activation memory ({act_dtype})",
                    parse_bytes(sram_budget) if sram_budget else None)
        console.info(f"wrote {target}")


def parse_bytes(text: str) -> int:
    from edgec.passes.patch import parse_bytes as pb

    return pb(text)


@click.command("inspect", epilog="""\b
Examples:
  edgec inspect model.onnx
  edgec inspect model.onnx --json
  edgec inspect model.onnx --memory --act-dtype int8 --plot mem.png
  edgec inspect model.onnx --memory --act-dtype int8 --patches 4x4 --split AUTO
  edgec inspect model.onnx --memory --act-dtype int8 --sram-budget 256KB --planner tinyengine
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@click.option("--memory", "show_memory", is_flag=True, help="Print the per-step memory profile and write a PNG plot.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where to write the memory plot (default: MODEL with suffix .memory.png).")
@click.option("--act-dtype", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="Activation element type for the memory plan.")
@click.option("--planner", "planner_name", default="fused", show_default=True,
              help="Memory model: fused (in-place activations and concat), tinyengine (+ in-place depthwise), plain.")
@click.option("--shape", "shapes", multiple=True, help="Static shape of an input, NAME=D0,D1,... (repeatable).")
@click.option("--patches", default=None, help="Also plan the model patched with this grid (e.g. 4x4).")
@click.option("--split", default="AUTO", show_default=True, help="Split tensor for --patches/--sram-budget.")
@click.option("--sram-budget", default=None, help="Also plan the patched model that fits this budget (e.g. 256KB).")
@click.option("--layers/--no-layers", "show_layers", default=True, show_default=True, help="Print the per-layer table.")
def command(model: Path, as_json: bool, show_memory: bool, plot: Path | None, act_dtype: str, planner_name: str,
            shapes: tuple[str, ...], patches: str | None, split: str, sram_budget: str | None, show_layers: bool) -> None:
    """Op histogram, parameters, MACs per layer, activation sizes and peak activation memory of MODEL.

    Shapes come from ONNX shape inference; peak memory is planned for execution in graph order
    (see docs/inspect.md for the MAC and memory conventions).
    """
    run_inspect(model, as_json, show_memory, plot, act_dtype, planner_name, _parse_shapes(shapes), patches, split,
                sram_budget, show_layers)
