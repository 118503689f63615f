"""``edgec export``: a zoo model or a model factory -> verified ONNX."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import click

from edgec import console


def _parse_value(text: str, annotation: Any, default: Any) -> Any:
    kind = annotation if isinstance(annotation, type) else type(default) if default is not inspect.Parameter.empty else None
    if isinstance(annotation, str):
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(annotation.split("|")[0].strip())
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if kind in (int, float):
        return kind(text)
    return text


def parse_model_args(model: str, pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("width_mult=0.5", "deploy=true")`` -> typed kwargs (types from the zoo builder's signature)."""
    from edgec.errors import InputError

    params: dict[str, inspect.Parameter] = {}
    if ":" not in model:
        from edgec import models

        params = models.get(model).parameters()
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--arg {pair!r} is not KEY=VALUE", "e.g. --arg width_mult=0.5")
        p = params.get(key)
        try:
            kwargs[key] = _parse_value(value, p.annotation, p.default) if p is not None else value
        except ValueError as exc:
            raise InputError(f"--arg {pair!r}: {exc}") from None
    return kwargs


def run_export(model: str, output: Path, input_shape: str | None, opset: int, dynamic_batch: bool, fold_bn: bool,
               args: tuple[str, ...], seed: int, as_json: bool) -> None:
    from edgec import ir as eir
    from edgec.errors import InputError
    from edgec.export import export, load_module, parse_shape

    shape = parse_shape(input_shape) if input_shape is not None else None
    parent = output.parent if str(output.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent}: is not a directory", "choose an output path inside a directory")
    if not parent.is_dir():
        raise InputError(f"{parent}: output directory does not exist", "create it first")
    if output.is_dir():
        raise InputError(f"{output}: is a directory", "give the path of the .onnx file to write")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: output directory is not writable", "choose a writable output directory")
    kwargs = parse_model_args(model, args)
    with console.progress() as prog:
        task = prog.add_task(f"building {model}", total=None)
        module, default_shape = load_module(model, seed=seed, **kwargs)
        if shape is None:
            if default_shape is None:
                raise InputError(f"{model}: no default input shape", "give one with --input-shape, e.g. 1,3,224,224")
            shape = default_shape
        prog.update(task, description="exporting and checking with onnxruntime")
        result = export(module, shape, opset=opset, dynamic_batch=dynamic_batch, fold_bn=fold_bn)
    if ":" not in model:
        result.model.graph.name = model
    try:
        eir.save_proto(result.model, output)
    except PermissionError:
        raise InputError(f"{output}: cannot write here (permission denied)", "choose a writable output directory") from None
    if as_json:
        console.print_json({"model": model, "output": str(output), **result.to_json()})
        return
    if result.fallback_reason:
        console.warn(f"used the TorchScript exporter: {result.fallback_reason}")
    eq = result.equivalence
    console.out.print(
        f"{model} -> {output}: {result.exporter} exporter, opset {result.opset}, input "
        f"{'N' if dynamic_batch else shape[0]},{','.join(map(str, shape[1:]))}, {len(result.model.graph.node)} nodes, "
        f"{result.seconds:.1f} s"
    )
    if eq is not None:
        console.out.print(f"ONNX vs PyTorch: {eq.summary()}")


@click.command("export", epilog="""\b
Examples:
  edgec export mobilenet_v2 -o mnv2.onnx
  edgec export mobilenet_v2 -o mnv2-160.onnx --arg width_mult=0.5 --arg resolution=160
  edgec export repvgg_a0 -o repvgg.onnx --arg deploy=true --dynamic-batch
  edgec export my_net.py:build -o my_net.onnx --input-shape 1,3,96,96
  edgec export mypkg.nets:make_model -o net.onnx --input-shape 1,3,224,224 --opset 17
  edgec models    # the zoo
""")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the ONNX model.")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Input shape (default: the zoo model's).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18, the lowest the torch.export exporter implements).")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch dimension symbolic.")
@click.option("--fold-bn", is_flag=True, help="Let the exporter fold BatchNorm into convolutions (default: keep BN nodes for edgec's verified fusion passes).")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Model argument, repeatable (e.g. width_mult=0.5, deploy=true).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the zoo model's random weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model: str, output: Path, input_shape: str | None, opset: int | None, dynamic_batch: bool, fold_bn: bool,
            args: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Export MODEL to ONNX, simplify it with onnxsim and check it against PyTorch.

    MODEL is a zoo name (see `edgec models`), path/to/file.py:factory or package.module:factory
    (a callable returning a torch.nn.Module).  The torch.export-based exporter is used; when it
    fails the TorchScript exporter is used instead and a warning says why.  The output is written
    only after onnxruntime reproduces PyTorch's outputs on fresh random inputs.
    """
    from edgec.export import DEFAULT_OPSET

    run_export(model, output, input_shape, DEFAULT_OPSET if opset is None else opset, dynamic_batch, fold_bn, args, seed, as_json)
