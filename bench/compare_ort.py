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


def compare(
    proto, name: str, threads: int, rounds: int, per_round: int, baseline: bool, profile: int = 0, ort_spin: bool = True
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
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            times[k] += _timed(fn, per_round)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "model": name,
        "precision": "fp32",
        "threads": threads,
        "ort_spinning": ort_spin,
        "ort_ms": med["ort"],
        "edgec_ms": med["edgec"],
        "ratio": med["edgec"] / med["ort"],
        "max_abs_err": err,
        "ref_range": float(np.abs(ref).max()),
        "compile_s": compile_s,
    }
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
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnx

    from edgec import models
    from edgec.export import export_zoo_model, quiet

    if args.onnx:
        items = [(os.path.basename(args.onnx), lambda: onnx.load(args.onnx))]
    else:
        names = [n for n in args.models.split(",") if n] or models.names()
        items = [(n, (lambda n=n: export_zoo_model(n))) for n in names]
    rows = []
    for name, load in items:
        with quiet():
            proto = load()
        row = compare(proto, name, args.threads, args.rounds, args.per_round, args.baseline, args.profile, not args.ort_no_spin)
        rows.append(row)
        if not args.json:
            base = f"  unscheduled {row['tvm_unscheduled_ms']:.1f} ms" if "tvm_unscheduled_ms" in row else ""
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
