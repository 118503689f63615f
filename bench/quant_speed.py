"""onnxruntime latency of int8 (QDQ) vs fp32 zoo models on this CPU, printed as ratios.

Each zoo model is exported with BatchNorm folded, quantized by edgec (calibrated on scikit-image
photos) with uint8 activations (the default) and, for comparison, int8 activations; then fp32
and int8 sessions (all graph optimizations, ``--threads`` intra-op threads) are timed in
interleaved rounds so that load from other processes hits both alike.  Reported: median ms
per inference and ``speedup = fp32 ms / int8 ms``.  The last columns time the uint8 model
quantized with ``pad_channels=False`` in the same rounds (before/after of the channel padding).

Form: ``exported`` is the model as the zoo exports it; ``edgec fuse`` is the form a user deploys,
``edgec optimize --passes fuse`` (reparameterization of multi-branch blocks, BN/activation
folding; verified against the exported model) run before quantizing -- fp32 and int8 of that
row both start from it.  The fused row is shown for the models ``fuse`` changes (``--forms``).

    python bench/quant_speed.py                          # every zoo model
    python bench/quant_speed.py --models mobilenet_v2 --runs 200
    python bench/quant_speed.py --models mobileone_s0 --forms fused
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


def fused(proto):
    """``edgec optimize --passes fuse`` on ``proto`` (verified by the pipeline), as a ModelProto."""
    from edgec import ir as eir
    from edgec.passes_api import registry
    from edgec.pipeline import Pipeline

    report = Pipeline([registry.create("fuse")]).run(eir.from_proto(proto))
    return eir.to_proto(report.model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="onnxruntime int8 vs fp32 latency of the zoo models")
    ap.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples")
    ap.add_argument("--forms", choices=["exported", "fused", "both"], default="both",
                    help="time the exported model, the `edgec fuse` deploy form, or both (fused only where fuse changes it)")
    ap.add_argument("--no-pad-column", action="store_true",
                    help="skip the u8/s8 model quantized with pad_channels=False (same-run before/after of the channel padding)")
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
            exported = export_zoo_model(name, fold_bn=True)
        specs = input_specs(exported)
        if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].shape[1] != 3:
            console.warn(f"{name}: not a single RGB image input, skipped")
            continue
        forms = []
        if args.forms in ("exported", "both"):
            forms.append(("exported", exported))
        if args.forms in ("fused", "both"):
            with quiet():
                deploy = fused(exported)
            if args.forms == "fused" or len(deploy.graph.node) != len(exported.graph.node):
                forms.append((f"edgec fuse ({len(exported.graph.node)} -> {len(deploy.graph.node)} nodes)", deploy))
        calib = BuiltinDataset("photos").load(specs, args.samples)
        for form, fp32 in forms:
            rep = quantize_model(fp32, calib, QuantConfig(activations="uint8", bias_correction=False))
            models_ = [fp32, rep.model, quantize_model(fp32, calib, QuantConfig(activations="int8", bias_correction=False)).model]
            if not args.no_pad_column:
                models_.append(quantize_model(fp32, calib, QuantConfig(activations="uint8", bias_correction=False, pad_channels=False)).model)
            feed = random_inputs(specs, np.random.default_rng(0))
            ms = time_sessions([_session(m, args.threads) for m in models_], feed, args.runs)
            row = [name, form, "x".join(map(str, specs[0].shape[2:])), ms[0], ms[1], ms[0] / ms[1], ms[2], ms[0] / ms[2]]
            if not args.no_pad_column:
                row += [len(rep.channels_padded), ms[3], ms[0] / ms[3]]
            rows.append(tuple(row))
            console.info(f"{name} ({form}): fp32 {ms[0]:.2f} ms, u8/s8 {ms[1]:.2f} ms ({ms[0] / ms[1]:.2f}x), "
                         f"s8/s8 {ms[2]:.2f} ms ({ms[0] / ms[2]:.2f}x)"
                         + ("" if args.no_pad_column else f", u8/s8 unpadded {ms[3]:.2f} ms ({ms[0] / ms[3]:.2f}x)"))
    console.out.print(console.table(
        f"onnxruntime {args.threads} threads: fp32 vs int8 QDQ (median ms; speedup = fp32 / int8)",
        ["model", "form", "input", "fp32 ms", "u8/s8 ms", "speedup u8/s8", "s8/s8 ms", "speedup s8/s8"]
        + ([] if args.no_pad_column else ["convs padded", "u8/s8 unpadded ms", "speedup unpadded"]), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
