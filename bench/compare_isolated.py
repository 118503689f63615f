"""edgec vs onnxruntime with each runtime timed in its own process (multi-thread comparisons).

``bench/compare_ort.py`` runs both runtimes in one process and interleaves them.  At one thread
that is the fairest comparison; at several threads the two runtimes' thread pools share the
process and the cores: onnxruntime's workers keep spinning after each of its runs while TVM's
workers want the same cores, and TVM's pool partitions work statically, so one preempted worker
stalls the whole call.  On this 2-core host that made 2-thread fp32 ratios swing 1.5-2.5x between
runs.  Here every measurement is a fresh process that loads one runtime only (the edgec module
compiled once beforehand and exported as a shared library, the ONNX file for onnxruntime), warms
up, and times ``--per-round`` runs; the processes alternate (ort, edgec, ort, edgec, ...) for
``--rounds`` rounds so background load hits both alike.  Reported: the median over all samples,
the best round median (less sensitive to a round that met a load spike), and the median of the
per-round ratios (each round's two processes run back to back, so a change in the host's state
between rounds, such as this VM's vCPUs moving apart, hits both sides of a round ratio alike).

    python bench/compare_isolated.py --models resnet18,mobilenet_v2 --threads 2
    python bench/compare_isolated.py --models mcunet --precision int8 --threads 2 --rounds 6
    python bench/compare_isolated.py --threads 2 --json        # every zoo model, fp32
    python bench/compare_isolated.py --models mcunet --variants new,chanouter   # library A/B

``--variants``: the edgec module compiled once per variant of ``bench/ab_fp32.py`` (``new`` is the
library as it is), each timed in its own processes in the same alternation.

Same models, inputs and thread settings as ``compare_ort.py`` (``TVM_NUM_THREADS`` and
onnxruntime's ``intra_op_num_threads`` both ``--threads``; onnxruntime's default spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _input(path: str):
    import numpy as np
    import onnx

    inp = onnx.load(path, load_external_data=False).graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return inp.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def worker(kind: str, onnx_path: str, lib_path: str, threads: int, warmup: int, runs: int, out_path: str) -> None:
    """One measurement process: time ``runs`` calls of one runtime, write ms samples and output."""
    import numpy as np

    name, x = _input(onnx_path)
    if kind == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

        def fn():
            return sess.run(None, {name: x})[0]
    else:
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(tvm.runtime.load_module(lib_path), tvm.cpu())
        xt = tvm.runtime.tensor(x)

        def fn():
            out = vm["main"](xt)
            return out

    y = fn()
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    if kind != "ort":
        y = y.numpy() if hasattr(y, "numpy") else y[0].numpy()
    np.save(out_path + ".npy", np.asarray(y))
    with open(out_path, "w") as f:
        json.dump(ms, f)


def _spawn(kind: str, onnx_path: str, lib_path: str, threads: int, warmup: int, runs: int, tmp: str) -> tuple[list[float], "object"]:
    import numpy as np

    out = os.path.join(tmp, f"{kind}.json")
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, onnx_path, lib_path, str(threads), str(warmup), str(runs), out]
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        ms = json.load(f)
    return ms, np.load(out + ".npy")


def _build(proto, variant: str, lib_path: str) -> float:
    """Compile ``proto`` with the library (``variant`` of ``ab_fp32.py``) to ``lib_path``; seconds."""
    import contextlib

    from tvm.relax.frontend.onnx import from_onnx

    from edgec import schedules
    from edgec.targets import get_target

    context = contextlib.nullcontext()
    if variant != "new":
        from ab_fp32 import variant as library_variant  # this script's sibling

        context = library_variant(variant)
    t0 = time.perf_counter()
    with context:
        ex = schedules.compile_module(from_onnx(proto, keep_params_in_input=False), get_target("host").tvm_target())
    ex.export_library(lib_path)
    return time.perf_counter() - t0


def compare(
    proto, name: str, precision: str, threads: int, rounds: int, per_round: int, warmup: int, variants: tuple[str, ...] = ("new",)
) -> list[dict]:
    """One row per variant (``new``: the library as it is), each against the same onnxruntime runs."""
    import numpy as np
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgec-iso-") as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        onnx.save(proto, onnx_path)
        libs = {v: os.path.join(tmp, f"model-{v}.so") for v in variants}
        compile_s = {v: _build(proto, v, lib) for v, lib in libs.items()}
        kinds = ["ort", *variants]
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        round_medians: dict[str, list[float]] = {k: [] for k in kinds}
        outputs = {}
        for _ in range(rounds):
            for kind in kinds:
                ms, y = _spawn("ort" if kind == "ort" else "edgec", onnx_path, libs.get(kind, ""), threads, warmup, per_round, tmp)
                samples[kind] += ms
                round_medians[kind].append(statistics.median(ms))
                outputs[kind] = y
    med = {k: statistics.median(v) for k, v in samples.items()}
    best = {k: min(v) for k, v in round_medians.items()}
    ref = outputs["ort"]
    return [
        {
            "model": name,
            "precision": precision,
            "threads": threads,
            "variant": v,
            "ort_ms": med["ort"],
            "edgec_ms": med[v],
            "ratio": med[v] / med["ort"],
            "ort_best_round_ms": best["ort"],
            "edgec_best_round_ms": best[v],
            "best_round_ratio": best[v] / best["ort"],
            # each round's processes run back to back, in the same state of the host (this VM's
            # two vCPUs sometimes sit far apart and every 2-thread run slows down): round ratios
            "round_ratio": statistics.median(e / o for e, o in zip(round_medians[v], round_medians["ort"])),
            "max_abs_err": float(np.abs(outputs[v].astype(np.float64) - ref).max()),
            "ref_range": float(np.abs(ref).max()),
            "compile_s": compile_s[v],
            "samples": {"ort": samples["ort"], "edgec": samples[v]},
        }
        for v in variants
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind, onnx_path, lib_path, threads, warmup, runs, out = argv[1:]
        worker(kind, onnx_path, lib_path, int(threads), int(warmup), int(runs), out)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, int8 (zoo models quantized by edgec)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="processes per runtime (alternating)")
    ap.add_argument("--per-round", type=int, default=20, help="timed runs per process")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per process")
    ap.add_argument("--calib-samples", type=int, default=16, help="int8: calibration photos")
    ap.add_argument("--variants", default="new", help="comma-separated library variants of bench/ab_fp32.py (new: as it is)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v) or ("new",)
    precisions = [p for p in args.precision.split(",") if p]
    if any(p not in ("fp32", "int8") for p in precisions):
        ap.error(f"--precision: fp32 and/or int8, not {args.precision!r}")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from compare_ort import zoo_model  # this script's sibling: the same models and quantization

    from edgec import models
    from edgec.export import quiet

    names = [n for n in args.models.split(",") if n] or models.names()
    rows = []
    for n in names:
        for p in precisions:
            with quiet():
                proto = zoo_model(n, p, args.calib_samples)
            for row in compare(proto, n, p, args.threads, args.rounds, args.per_round, args.warmup, variants):
                rows.append(row)
                if args.json:
                    continue
                label = "" if variants == ("new",) else f" [{row['variant']}]"
                print(
                    f"{n:24s} {p}{label}  threads {args.threads}  ort {row['ort_ms']:8.2f} ms  edgec {row['edgec_ms']:8.2f} ms"
                    f"  edgec/ort {row['ratio']:5.2f}  (best rounds {row['ort_best_round_ms']:.2f} / "
                    f"{row['edgec_best_round_ms']:.2f}: {row['best_round_ratio']:.2f}; median round ratio {row['round_ratio']:.2f})"
                    f"  max|err| {row['max_abs_err']:.2e}"
                    f" (range {row['ref_range']:.2f})",
                    flush=True,
                )
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
