"""``edgec quantize``: post-training int8 quantization to QDQ ONNX, verified against the float model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from edgec import console


def _parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    from edgec.errors import InputError

    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of numbers", f"e.g. {what} 0.485,0.456,0.406") from None


@click.command("quantize", epilog="""\b
Examples:
  edgec quantize model.onnx -o model.int8.onnx --calib images/
  edgec quantize model.onnx -o model.int8.onnx --calib-dataset photos --method entropy
  edgec quantize digits.onnx -o digits.int8.onnx --calib-dataset digits --eval-dataset digits-test
  edgec quantize model.onnx -o model.int8.onnx --calib samples/ --max-drop 0.5 --sensitivity sens.json
  edgec quantize model.onnx -o model.int8.onnx --calib-dataset photos --target-sqnr 30
  edgec quantize model.onnx -o model.int8.onnx --calib images/ --activations int8 --per-tensor
\b
--calib takes a folder of images (resized, centre-cropped and normalized with --mean/--std)
or of .npy arrays (already preprocessed).  Built-in datasets (no download): digits,
digits-test (scikit-learn), photos, photos-test (scikit-image).
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the QDQ int8 model.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Folder of images or .npy files (or one .npy file).")
@click.option("--calib-dataset", default=None, metavar="NAME", help="Built-in calibration dataset.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None, help="Held-out data for the report and --max-drop (default: the calibration data).")
@click.option("--eval-dataset", default=None, metavar="NAME", help="Built-in held-out dataset (e.g. digits-test).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax", show_default=True, help="Activation range calibration.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="Kept percentage of values for --method percentile.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel or per tensor.")
@click.option("--activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True, help="uint8 asymmetric (fast on x86 VNNI) or int8 symmetric.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True, help="Correct each layer's mean output error on the calibration data.")
@click.option("--pad-channels/--no-pad-channels", default=True, show_default=True, help="Pad the stem's input channels to 4 and depthwise blocks to 16 (exact) so onnxruntime uses its fast int8 kernels.")
@click.option("--max-drop", type=float, default=None, help="Allowed top-1 drop in points; the most sensitive layers stay float until it is met.")
@click.option("--target-sqnr", type=float, default=None, metavar="DB", help="Keep the most sensitive layers in float until the output SQNR reaches DB.")
@click.option("--float-layers", default=None, help="Comma-separated node names to keep in float.")
@click.option("--samples", type=int, default=128, show_default=True, help="Use at most this many calibration samples.")
@click.option("--sensitivity", "sens_path", type=click.Path(path_type=Path), default=None, help="Run the per-layer sensitivity analysis and save it as JSON here.")
@click.option("--mean", default=None, help="Image mean per channel (after scaling to [0, 1]), default ImageNet's.")
@click.option("--std", default=None, help="Image std per channel, default ImageNet's.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model: Path, output: Path, calib: Path | None, calib_dataset: str | None, eval_path: Path | None,
            eval_dataset: str | None, method: str, percentile: float, per_channel: bool, activations: str,
            bias_correction: bool, pad_channels: bool, max_drop: float | None, target_sqnr: float | None, float_layers: str | None, samples: int,
            sens_path: Path | None, mean: str | None, std: str | None, as_json: bool) -> None:
    """Quantize MODEL to int8 (QDQ format) with calibration data and write OUTPUT.

    Weights become int8 symmetric (per channel), biases int32, activations uint8 or int8 per
    tensor.  The quantized model is checked against the float model on the evaluation data
    (SQNR, max error, top-1 agreement, accuracy when labels are known) and the report printed.
    """
    from edgec import ir as eir
    from edgec.calibration import Preprocess, source_for
    from edgec.errors import InputError
    from edgec.passes.quantize import QuantConfig, quantize_model

    proto = eir.load_proto(model)
    pre = None
    m, s = _parse_floats(mean, "--mean"), _parse_floats(std, "--std")
    if m is not None or s is not None:
        base = Preprocess()
        pre = Preprocess(mean=m or base.mean, std=s or base.std)
    source = source_for(calib, calib_dataset, pre)
    evaluation = None
    if eval_path is not None or eval_dataset is not None:
        evaluation = source_for(eval_path, eval_dataset, pre)
    if samples < 1:
        raise InputError("--samples must be at least 1")
    config = QuantConfig(
        method=method,
        per_channel=per_channel,
        activations=activations,
        percentile=percentile,
        bias_correction=bias_correction,
        float_layers=tuple(x.strip() for x in float_layers.split(",") if x.strip()) if float_layers else (),
        max_drop=max_drop,
        target_sqnr_db=target_sqnr,
        pad_channels=pad_channels,
        max_samples=samples,
    )
    with console.progress() as prog:
        task = prog.add_task("quantizing", total=None)

        def progress(what: str, done: int, total: int) -> None:
            prog.update(task, description=what, completed=done, total=total)

        report = quantize_model(proto, source, config, evaluation=evaluation,
                                with_sensitivity=sens_path is not None, progress=progress)
    eir.save_proto(report.model, output)
    if sens_path is not None:
        from edgec.ir import atomic_path

        with atomic_path(sens_path) as tmp:
            tmp.write_text(json.dumps([{"node": x.node, "op": x.op, "sqnr_db": None if math.isinf(x.sqnr_db) else x.sqnr_db}
                                       for x in report.sensitivity], indent=2) + "\n")
    if as_json:
        console.print_json({"output": str(output), **report.to_json()})
        return
    ev = report.evaluation
    console.out.print(f"{model} -> {output}: {len(report.layers_quantized)} layers int8, {len(report.layers_float)} float, "
                      f"{report.tensors_quantized} activations quantized ({config.activations}, {config.method}), "
                      f"{report.activations_removed} Relu/Clip folded into Q, {report.bias_corrected} biases corrected, "
                      f"{len(report.channels_padded)} convs channel-padded; "
                      f"calibrated on {report.calibration_samples} samples of {report.calibration_description}")
    if report.sensitivity:
        rows = [(x.node, x.op, x.sqnr_db, "float" if x.node in report.layers_float else "int8")
                for x in sorted(report.sensitivity, key=lambda x: x.sqnr_db)]
        console.out.print(console.table("Sensitivity: output SQNR with only this layer quantized (lowest first)",
                                        ["layer", "op", "SQNR dB", "kept as"], rows, numeric_from=2))
    rows = [("output SQNR vs float (dB)", ev.sqnr_db), ("max abs error", ev.max_abs)]
    if ev.max_abs_in_scales is not None:
        rows.append(("max abs error (output scales)", ev.max_abs_in_scales))
    if ev.top1_agreement is not None:
        rows.append(("top-1 agreement with float (%)", ev.top1_agreement))
    if ev.float_top1 is not None and ev.quant_top1 is not None:
        rows.append(("top-1 accuracy float (%)", ev.float_top1))
        rows.append(("top-1 accuracy int8 (%)", ev.quant_top1))
    console.out.print(console.table(f"Verification on {ev.samples} samples", ["measure", "value"], rows))
    for node, reason in report.rejected[:20]:
        console.info(f"  left {node} in float: {reason}")
    if config.max_drop is not None and ev.drop is not None and ev.drop > config.max_drop:
        console.warn(f"top-1 drop {ev.drop:.2f} points is over --max-drop {config.max_drop} even with every sensitive layer in float")
    if config.target_sqnr_db is not None and ev.sqnr_db < config.target_sqnr_db:
        console.warn(f"output SQNR {ev.sqnr_db:.1f} dB is under --target-sqnr {config.target_sqnr_db} even with every sensitive layer in float")
