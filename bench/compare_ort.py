"""edgec-compiled zoo models vs onnxruntime on this CPU, same thread count, one run.

For each zoo model (fp32): onnxruntime ms, edgec ms (TVM with edgec's layout + schedule
library, no tuning), ratio edgec/ort (< 1: edgec is faster), max |error| of edgec's output vs
onnxruntime's on the same random input.  Optionally the unscheduled TVM build too (``--baseline``,
slow: tens of seconds per model).

Timings interleave the runtimes (ort, edgec, ort, edgec, ...) in rounds and report the median of
each, so load from other processes hits both alike.  ``TVM_NUM_THREADS`` and onnxruntime's
``intra_op_num_threads`` are both set to ``--threads``.

    python bench/compare_ort.py                       # every zoo model, 2 threads
    python bench/compare_ort.py --models mobilenet_v2,resnet18 --rounds 30
    python bench/compare_ort.py --onnx my.onnx --json
    python bench/compare_ort.py --models resnet18 --profile 15   # + edgec's 15 slowest functions
    python bench/compare_ort.py --ort-no-spin                    # loaded host: no spinning workers

``--precision fp32,int8``: each zoo model also quantized by edgec (uint8 activations, int8
per-channel weights, calibrated on scikit-image photos as ``bench/quant_speed.py`` does), then
onnxruntime int8 vs edgec int8 (integer VNNI kernels, ``edgec.schedules.int8``) in the same
interleaved rounds; ``err_steps`` is the max error in units of the output quantization step (or
relative to the output range when the model's output is a float layer).  ``--int8-float-path``
also times the QDQ model through edgec's float path (dequantize -> fp32 conv, as before the
integer kernels), the before/after column.

    python bench/compare_ort.py --models mcunet,mobilenet_v2,resnet18 --precision fp32,int8 --threads 1
    python bench/compare_ort.py --models mcunet --precision int8 --int8-float-path --profile 10

``--profile N`` times every TIR function call of the edgec build through the VM's instrument
hook (wall time per call, summed over 20 runs) and prints the N slowest with their argument
shapes: where the remaining gap to onnxruntime is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def profile_functions(vm, xt, runs: int = 20) -> list[tuple[float, int, str, list]]:
    """(ms per model run, calls per run, function name, argument shapes), slowest first."""
    import collections

    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    shapes: dict[str, list] = {}
    start: list[float] = [0.0]

    def instrument(func, name, before, ret, *args):
        if before:
            start[0] = time.perf_counter()
        else:
            total[name] += time.perf_counter() - start[0]
            calls[name] += 1
            shapes[name] = [tuple(a.shape) for a in args if hasattr(a, "shape")]
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](xt)
    rows = [(t / runs * 1e3, calls[k] // runs, k, shapes[k]) for k, t in total.items()]
    return sorted(rows, reverse=True)


def _output_step(proto) -> float | None:
    """The quantization step of the model's output if it is ``DequantizeLinear`` of a constant scale."""
    from onnx import numpy_helper

    out = proto.graph.output[0].name
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] == out and n.input[1] in inits:
            return float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0])
    return None


def zoo_model(name: str, precision: str, calib_samples: int = 16):
    """A zoo model as exported (fp32), or quantized by edgec (int8: uint8 activations, int8
    per-channel weights, calibrated on ``calib_samples`` scikit-image photos)."""
    from edgec.export import export_zoo_model

    if precision == "fp32":
        return export_zoo_model(name)
    from edgec.calibration import BuiltinDataset
    from edgec.passes.quantize import QuantConfig, quantize_model
    from edgec.verify import input_specs

    fp32 = export_zoo_model(name, fold_bn=True)
    calib = BuiltinDataset("photos").load(input_specs(fp32), calib_samples)
    return quantize_model(fp32, calib, QuantConfig(activations="uint8")).model


def float_path_module(mod, target):
    """A QDQ Relax module compiled by edgec's CPU pipeline without the int8 rewrite (the float
    path: dequantize -> fp32 conv -> quantize), for before/after timings."""
    import tvm
    from tvm import relax

    from edgec.schedules.layout import channels_last_passes
    from edgec.targets import host

    passes = (
        host.library_dispatch_passes(target)
        + channels_last_passes(target)
        + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
           relax.transform.FuseOps(), relax.transform.FuseTIR()]
        + host.schedule_passes(target, None)
        + host.dataflow_lower_passes(target)
        + host.finalize_passes(target)
    )

    @tvm.transform.module_pass(opt_level=0, name="edgec_float_qdq_pipeline")
    def _pipeline(m, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(m)

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=_pipeline)


def compare(
    proto, name: str, threads: int, rounds: int, per_round: int, baseline: bool, profile: int = 0, ort_spin: bool = True,
    precision: str = "fp32", float_path: bool = False,
) -> dict:
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec import schedules
    from edgec.targets import get_target

    inp = proto.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not ort_spin:
        # onnxruntime's workers spin after each run; on a loaded 2-core host they then compete
        # with TVM's workers (and with its own next run): measured here, both runtimes were faster
        # with spinning off (ort 8.7 vs 12.5 ms, mobilenetv4_conv_small, load average ~4)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {inp.name: x})[0]

    target = get_target("host").tvm_target()
    t0 = time.perf_counter()
    mod = from_onnx(proto, keep_params_in_input=False)
    ex = schedules.compile_module(mod, target)
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xt = tvm.runtime.tensor(x)
    out = vm["main"](xt)
    y = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    err = float(np.abs(y - ref).max())

    runs = {"ort": lambda: sess.run(None, {inp.name: x}), "edgec": lambda: vm["main"](xt)}
    if baseline:
        with target:
            ex0 = tvm.compile(from_onnx(proto, keep_params_in_input=False), target)
        vm0 = relax.VirtualMachine(ex0, tvm.cpu())
        runs["tvm_unscheduled"] = lambda: vm0["main"](xt)
    if float_path and precision == "int8":
        exf = float_path_module(from_onnx(proto, keep_params_in_input=False), target)
        vmf = relax.VirtualMachine(exf, tvm.cpu())
        runs["edgec_float_path"] = lambda: vmf["main"](xt)
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            times[k] += _timed(fn, per_round)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = _output_step(proto)
    row = {
        "model": name,
        "precision": precision,
        "threads": threads,
        "ort_spinning": ort_spin,
        "ort_ms": med["ort"],
        "edgec_ms": med["edgec"],
        "ratio": med["edgec"] / med["ort"],
        "max_abs_err": err,
        "ref_range": float(np.abs(ref).max()),
        "err_steps": err / step if step else err / max(1e-12, float(np.abs(ref).max())),
        "err_unit": "output steps" if step else "of output range",
        "compile_s": compile_s,
    }
    if "edgec_float_path" in med:
        row["edgec_float_path_ms"] = med["edgec_float_path"]
    if baseline:
        row["tvm_unscheduled_ms"] = med["tvm_unscheduled"]
    if profile:
        row["profile"] = [
            {"ms": ms, "calls": n, "function": fn, "shapes": [list(s) for s in shp]}
            for ms, n, fn, shp in profile_functions(relax.VirtualMachine(ex, tvm.cpu()), xt)[:profile]
        ]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--onnx", default="", help="an ONNX file instead of the zoo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--baseline", action="store_true", help="also time TVM without schedules")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--ort-no-spin", action="store_true", help="onnxruntime workers block instead of spinning (fairer on a loaded host)"
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also print edgec's N slowest functions")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, int8 (zoo models quantized by edgec)")
    ap.add_argument("--calib-samples", type=int, default=16, help="int8: calibration photos")
    ap.add_argument("--int8-float-path", action="store_true", help="int8: also time edgec's float QDQ path (before/after)")
    args = ap.parse_args(argv)
    precisions = [p for p in args.precision.split(",") if p]
    if any(p not in ("fp32", "int8") for p in precisions):
        ap.error(f"--precision: fp32 and/or int8, not {args.precision!r}")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnx

    from edgec import models
    from edgec.export import quiet

    if args.onnx:
        def load_file():
            return onnx.load(args.onnx)

        kinds = {n.op_type for n in load_file().graph.node}
        items = [(os.path.basename(args.onnx), "int8" if "QuantizeLinear" in kinds else "fp32", load_file)]
    else:
        names = [n for n in args.models.split(",") if n] or models.names()
        items = []
        for n in names:
            for p in precisions:
                items.append((n, p, lambda n=n, p=p: zoo_model(n, p, args.calib_samples)))
    rows = []
    for name, precision, load in items:
        with quiet():
            proto = load()
        row = compare(proto, name, args.threads, args.rounds, args.per_round, args.baseline, args.profile, not args.ort_no_spin,
                      precision, args.int8_float_path)
        rows.append(row)
        if not args.json:
            base = f"  unscheduled {row['tvm_unscheduled_ms']:.1f} ms" if "tvm_unscheduled_ms" in row else ""
            if "edgec_float_path_ms" in row:
                base += f"  float-path {row['edgec_float_path_ms']:.2f} ms ({row['edgec_float_path_ms'] / row['ort_ms']:.2f}x ort)"
            if row["precision"] == "int8":
                base += f"  err {row['err_steps']:.3g} {row['err_unit']}"
            print(
                f"{name:24s} {row['precision']}  ort {row['ort_ms']:8.2f} ms  edgec {row['edgec_ms']:8.2f} ms"
                f"  edgec/ort {row['ratio']:5.2f}  max|err| {row['max_abs_err']:.2e} (range {row['ref_range']:.2f})"
                f"  compile {row['compile_s']:.0f} s{base}",
                flush=True,
            )
            for p in row.get("profile", []):
                print(f"    {p['ms']:8.3f} ms  x{p['calls']:<3d} {p['function'][:56]:56s} {p['shapes'][:2]}", flush=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
