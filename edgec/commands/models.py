"""``edgec models``: list the model zoo."""

from __future__ import annotations

import click

from edgec import console


@click.command("models", epilog="""\b
Examples:
  edgec models
  edgec models --json
  edgec export mcunet -o mcunet.onnx --arg resolution=96
""")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--no-size", is_flag=True, help="Skip building the models to count parameters and MACs (faster).")
def command(as_json: bool, no_size: bool) -> None:
    """List the zoo models that `edgec export` accepts by name.

    Parameters and multiply-accumulates (Conv2d and Linear, batch 1, default input) are counted
    on PyTorch's meta device (shapes only, no weights).  Model arguments (--arg KEY=VALUE of
    `edgec export`) are listed per model.
    """
    from edgec import models

    rows = []
    with console.progress() as prog:
        task = prog.add_task("counting parameters and MACs", total=len(models.names()))
        for name in models.names():
            spec = models.get(name)
            info = None
            if not no_size:
                import torch

                with torch.device("meta"):  # shapes only: no weights allocated, nothing computed
                    info = models.model_info(spec.builder().eval(), spec.default_input_shape)
            args = {k: (None if p.default is p.empty else p.default) for k, p in spec.parameters().items()}
            rows.append((spec, info, args))
            prog.advance(task)
    if as_json:
        console.print_json(
            [
                {
                    "name": spec.name,
                    "description": spec.description,
                    "input_shape": list(spec.default_input_shape),
                    "params": None if info is None else info.params,
                    "macs": None if info is None else info.macs,
                    "arguments": args,
                }
                for spec, info, args in rows
            ]
        )
        return
    table_rows = []
    for spec, info, args in rows:
        table_rows.append(
            (
                spec.name,
                spec.description,
                " ".join(args),
                ",".join(map(str, spec.default_input_shape)),
                "-" if info is None else f"{info.params / 1e6:.2f} M",
                "-" if info is None else f"{info.macs / 1e6:,.0f} M",
            )
        )
    console.out.print(
        console.table("Model zoo (edgec export NAME -o out.onnx)", ["name", "description", "arguments (--arg)", "input", "params", "MACs"],
                      table_rows, numeric_from=3)
    )
