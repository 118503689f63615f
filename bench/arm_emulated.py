"""edgec vs onnxruntime on an EMULATED ARM64 board (qemu user-mode on this host), one run.

For each zoo model: compiled by ``edgec compile --target <cpu>`` (cross-compiled, linked with
aarch64-linux-gnu-gcc) and timed by ``edgec bench --rpc`` on an emulated board (``edgec device
emulate arm64``), against onnxruntime's own aarch64 build timed inside the same emulated userland
(``edgec.emulate.ort_latency``).  Both sides: same emulated core (``QEMU_CPU``), same thread count
(``TVM_NUM_THREADS`` on the board, onnxruntime ``intra_op_num_threads``), fresh random inputs.

Every number is EMULATED: qemu translating arm64 code on this x86 host, not a real Cortex-A72.
Only the ratio edgec / onnxruntime (both emulated, same run) means something, and even that
weighs instructions by qemu's translation cost, not by the real core's pipeline.

Timing interleaves the two runtimes in ``--rounds`` rounds (edgec, onnxruntime, edgec, ...),
each round ``--repeat`` samples of one run each after one warmup, and reports the median over
all samples of each side, so load from other processes on this shared host hits both alike.
Correctness is checked in the same run: edgec's outputs on the board vs onnxruntime on this host
(``edgec bench``'s check), and the emulated onnxruntime's outputs vs this host's onnxruntime.

    python bench/arm_emulated.py                                   # mobilenet_v2 1.0 224, cortex-a72, 1 thread
    python bench/arm_emulated.py --models mobilenet_v2,mcunet --rounds 3 --repeat 3
    python bench/arm_emulated.py --width 0.35 --resolution 96 --cpu cortex-a76 --json
    python bench/arm_emulated.py --db tuning-db/                   # apply a MetaSchedule database
    python bench/arm_emulated.py --models mcunet --precision fp32,int8
    python bench/arm_emulated.py --models mcunet --precision int8 --int8-float-path --cpu cortex-a76

``--precision int8``: the model quantized by ``edgec quantize`` (QDQ, uint8 activations, int8
per-channel weights, calibrated on scikit-image photos, as ``bench/quant_speed.py`` does); both
runtimes run that same QDQ model; their outputs may differ by a rounding step here and there
(the check then allows 5 % of the output range; the error column says how far apart they are).
``--int8-float-path`` also times the QDQ model compiled without edgec's integer kernels
(dequantize -> fp32 conv -> quantize, i.e. before ``edgec.schedules.int8`` covered ARM) in the
same rounds.

Needs root and the board's Debian packages (``sudo bash scripts/arm_board.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def quantized(proto):  # noqa: ANN001, ANN201
    """``proto`` quantized as ``edgec quantize`` does by default (calibrated on scikit-image photos)."""
    from edgec.calibration import BuiltinDataset
    from edgec.passes.quantize import QuantConfig, quantize_model
    from edgec.verify import input_specs

    calib = BuiltinDataset("photos").load(input_specs(proto), 16)
    return quantize_model(proto, calib, QuantConfig(activations="uint8")).model


@contextlib.contextmanager
def float_qdq_path():  # noqa: ANN201
    """Compile QDQ models without the integer kernels (edgec's layout hook asks
    ``edgec.schedules.int8.int8_passes`` at each compile)."""
    from edgec.schedules import int8

    saved = int8.int8_passes
    int8.int8_passes = lambda target: []  # noqa: ARG005
    try:
        yield
    finally:
        int8.int8_passes = saved


def measure(name: str, precision: str, args: argparse.Namespace, board, work: Path) -> dict:  # noqa: ANN001
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgec import emulate as em
    from edgec.bench import BenchConfig, run_bench
    from edgec.compile import CompileConfig, compile_model
    from edgec.export import export_zoo_model
    from edgec.rpc import Remote
    from edgec.targets import get_target

    kw = {}
    if args.width is not None:
        kw["width_mult"] = args.width
    if args.resolution is not None:
        kw["resolution"] = args.resolution
    proto = export_zoo_model(name, fold_bn=True, **kw)
    if precision == "int8":
        proto = quantized(proto)
    t = time.perf_counter()
    art = compile_model(proto, work / f"{name}-{precision}", CompileConfig(target=get_target(args.cpu), database=args.db)).artifact
    compile_s = time.perf_counter() - t
    float_art = None
    if precision == "int8" and args.int8_float_path:
        with float_qdq_path():
            float_art = compile_model(proto, work / f"{name}-{precision}-float", CompileConfig(target=get_target(args.cpu),
                                                                                             database=args.db)).artifact
    remote = Remote.direct(f"{board.connect_host}:{board.port}", connect_timeout_s=30.0)
    from edgec.verify import Tolerance

    # int8: integer kernels round like onnxruntime's int8 kernels, and one-step differences
    # compound over the layers (on some inputs onnxruntime's own int8 output is 20-40 % of the
    # range away from its float QDQ reference): the check only catches a broken build, the error
    # is reported next to onnxruntime int8's own error on the same input
    tolerance = Tolerance(rtol=1e-4, atol=1e-5) if precision == "fp32" else Tolerance(rtol=1.0, atol=0.0)
    check_seed = 1234
    tvm_ms: list[float] = []
    ort_ms: list[float] = []
    float_ms: list[float] = []
    where = ""
    device_err = 0.0
    ort_err = 0.0
    ort_version = ""
    for r in range(args.rounds):
        res = run_bench(art, remote, BenchConfig(warmup=1, number=1, repeat=args.repeat, stall_timeout_s=args.timeout,
                                                 check_outputs=(r == 0), threads=args.threads, tolerance=tolerance,
                                                 seed=check_seed))
        tvm_ms += res.stats.samples_ms
        where = res.where
        if res.equivalence is not None:
            device_err = res.equivalence.max_rel
        o = em.ort_latency(art.model, em.OrtRunConfig(cpu=args.cpu, warmup=1, number=1, repeat=args.repeat,
                                                      threads=args.threads, seed=r, timeout_s=args.timeout))
        ort_ms += o.stats.samples_ms
        if float_art is not None:
            fres = run_bench(float_art, remote, BenchConfig(warmup=1, number=1, repeat=args.repeat, stall_timeout_s=args.timeout,
                                                            check_outputs=False, threads=args.threads))
            float_ms += fres.stats.samples_ms
        ort_version = o.ort_version
        if r == 0:
            host = ort.InferenceSession(str(art.model), providers=["CPUExecutionProvider"]).run(None, o.inputs)
            ort_err = max(float(np.abs(h - e).max() / max(float(np.abs(h).max()), 1e-12)) for h, e in zip(host, o.outputs))
        print(f"  {name} {precision} round {r + 1}/{args.rounds}: edgec {statistics.median(res.stats.samples_ms):.1f} ms, "
              f"onnxruntime {statistics.median(o.stats.samples_ms):.1f} ms (emulated)", file=sys.stderr)
    ort_int8_err = None
    if precision == "int8":  # onnxruntime int8 (optimized session) vs its float QDQ reference, same input
        from edgec import verify as vfy

        feeds = vfy.random_inputs(art.inputs, np.random.default_rng(check_seed))
        ref = vfy.session(onnx.load(str(art.model))).run(None, feeds)
        own = vfy.session(onnx.load(str(art.model)), optimize=True).run(None, feeds)
        ort_int8_err = max(float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12)) for a, b in zip(ref, own))
    m = onnx.load(str(art.model))
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    e, o_ = statistics.median(tvm_ms), statistics.median(ort_ms)
    return {"model": name, "precision": precision, "input": shape, "cpu": args.cpu, "threads": args.threads, "where": where,
            "edgec_ms_median": e, "onnxruntime_ms_median": o_, "ratio": e / o_, "edgec_samples": len(tvm_ms),
            "ort_samples": len(ort_ms), "edgec_max_rel_err_vs_host_ort": device_err,
            "emulated_ort_max_rel_err_vs_host_ort": ort_err, "onnxruntime": ort_version, "compile_s": compile_s,
            "database": str(args.db) if args.db else None, "label": "emulated",
            "edgec_float_path_ms_median": statistics.median(float_ms) if float_ms else None,
            "ort_int8_max_rel_err_vs_reference": ort_int8_err}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenet_v2")
    p.add_argument("--width", type=float, default=None, help="width_mult passed to the zoo builders")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--cpu", default="cortex-a72", help="edgec target and emulated core (cortex-a53/a72/a76)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--precision", default="fp32", help="fp32, int8 or fp32,int8 (int8: the edgec-quantized QDQ model)")
    p.add_argument("--db", type=Path, default=None, help="MetaSchedule database folder (edgec tune --db)")
    p.add_argument("--int8-float-path", action="store_true",
                   help="also time int8 models without the integer kernels (dequantize -> fp32 conv), same rounds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from edgec import console
    from edgec import emulate as em

    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgec-arm-bench-") as tmp:
        config = em.BoardConfig(cpu=args.cpu, port=em.free_port(), threads=args.threads, die_with_parent=True,
                                start_timeout_s=300)
        with em.emulated_board(config, progress=lambda s: print(s, file=sys.stderr)) as board:
            for name in args.models.split(","):
                for precision in args.precision.split(","):
                    rows.append(measure(name.strip(), precision.strip(), args, board, Path(tmp)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["model", "precision", "input", "edgec ms (emulated)", "onnxruntime ms (emulated)", "edgec / ort", "edgec err", "ort-arm err"]
    table = [(r["model"], r["precision"], "x".join(map(str, r["input"])), r["edgec_ms_median"], r["onnxruntime_ms_median"], r["ratio"],
              r["edgec_max_rel_err_vs_host_ort"], r["emulated_ort_max_rel_err_vs_host_ort"]) for r in rows]
    cols += ["ort int8 err"]
    table = [t + (r["ort_int8_max_rel_err_vs_reference"] if r["ort_int8_max_rel_err_vs_reference"] is not None else "",)
             for t, r in zip(table, rows)]
    if args.int8_float_path:
        cols += ["int8 float path ms", "float path / ort"]
        table = [t + ((r["edgec_float_path_ms_median"], r["edgec_float_path_ms_median"] / r["onnxruntime_ms_median"])
                      if r["edgec_float_path_ms_median"] else ("", "")) for t, r in zip(table, rows)]
    console.out.print(console.table(
        f"EMULATED {args.cpu} (qemu user-mode on this x86 host, {args.threads} thread(s)): edgec vs onnxruntime aarch64",
        cols, table, numeric_from=3))
    console.out.print(f"onnxruntime {rows[0]['onnxruntime'] if rows else '?'} (aarch64 wheel) in the emulated userland; "
                      f"medians of {args.rounds} interleaved rounds x {args.repeat} samples; errors are max |diff| / max |ref| "
                      f"vs onnxruntime on this host (edgec err: vs its float QDQ reference, as is 'ort int8 err' for "
                      f"onnxruntime's int8 session on the same input); total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
