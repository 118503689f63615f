"""Export every zoo model at its default input shape and measure it.

For each model: export time (torch.export-based exporter + onnxsim + equivalence check), ONNX
node count (BatchNorm kept), parameters, MACs, worst error vs PyTorch on fresh random inputs,
and batch-1 latency of onnxruntime (all graph optimizations, 2 threads, median of --runs after
warm-up).  (PyTorch eager latency is not measured: on the shared 2-core machine its OpenMP
barriers made it 10-150x slower than onnxruntime, a scheduling artefact, not a property of the model.)

    python bench/export_zoo.py [--models mobilenet_v2,mcunet] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from edgec import models
from edgec import verify
from edgec.export import export


def median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("| model | input | exporter | export s | ONNX nodes | BN nodes | params | MACs | max rel err | ORT ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        spec = models.get(name)
        shape = spec.default_input_shape
        net = spec.build()
        res = export(net, shape)
        ops = [n.op_type for n in res.model.graph.node]
        with torch.device("meta"):
            info = models.model_info(spec.builder(), shape)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sess = verify.session(res.model, optimize=True, threads=2)
        ort_ms = median_ms(lambda: sess.run(None, {"input": x}), args.runs)
        del sess
        eq = res.equivalence
        print(
            f"| {name} | {'x'.join(map(str, shape))} | {res.exporter} | {res.seconds:.1f} | {len(ops)} | {ops.count('BatchNormalization')} "
            f"| {info.params / 1e6:.2f} M | {info.macs / 1e6:.0f} M | {eq.max_rel:.1e} | {ort_ms:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
