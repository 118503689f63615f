"""onnxruntime latency of int8 (QDQ) vs fp32 zoo models on this CPU, printed as ratios.

Each zoo model is exported with BatchNorm folded, quantized by edgec (calibrated on scikit-image
photos) with uint8 activations (the default) and, for comparison, int8 activations; then fp32
and int8 sessions (all graph optimizations, ``--threads`` intra-op threads) are timed in
interleaved rounds so that load from other processes hits both alike.  Reported: median ms
per inference and ``speedup = fp32 ms / int8 ms``.

    python bench/quant_speed.py                          # every zoo model
    python bench/quant_speed.py --models mobilenet_v2 --runs 200
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _session(proto, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_sessions(sessions: list, feed: dict, runs: int, rounds: int = 5) -> list[float]:
    """Median ms per run of each session, timed in interleaved rounds."""
    for s in sessions:
        for _ in range(5):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for k, s in enumerate(sessions):
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
    return [float(np.median(t)) for t in times]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="onnxruntime int8 vs fp32 latency of the zoo models")
    ap.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples")
    args = ap.parse_args(argv)

    from edgec import console, models
    from edgec.calibration import BuiltinDataset
    from edgec.export import export_zoo_model, quiet
    from edgec.passes.quantize import QuantConfig, quantize_model
    from edgec.verify import input_specs, random_inputs

    names = [n.strip() for n in args.models.split(",")] if args.models else models.names()
    rows = []
    for name in names:
        with quiet():
            fp32 = export_zoo_model(name, fold_bn=True)
        specs = input_specs(fp32)
        if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].shape[1] != 3:
            console.warn(f"{name}: not a single RGB image input, skipped")
            continue
        calib = BuiltinDataset("photos").load(specs, args.samples)
        q_u8 = quantize_model(fp32, calib, QuantConfig(activations="uint8", bias_correction=False)).model
        q_s8 = quantize_model(fp32, calib, QuantConfig(activations="int8", bias_correction=False)).model
        feed = random_inputs(specs, np.random.default_rng(0))
        ms = time_sessions([_session(m, args.threads) for m in (fp32, q_u8, q_s8)], feed, args.runs)
        rows.append((name, "x".join(map(str, specs[0].shape[2:])), ms[0], ms[1], ms[0] / ms[1], ms[2], ms[0] / ms[2]))
        console.info(f"{name}: fp32 {ms[0]:.2f} ms, u8/s8 {ms[1]:.2f} ms ({ms[0] / ms[1]:.2f}x), s8/s8 {ms[2]:.2f} ms ({ms[0] / ms[2]:.2f}x)")
    console.out.print(console.table(
        f"onnxruntime {args.threads} threads: fp32 vs int8 QDQ (median ms; speedup = fp32 / int8)",
        ["model", "input", "fp32 ms", "u8/s8 ms", "speedup u8/s8", "s8/s8 ms", "speedup s8/s8"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
