"""Peak activation memory before/after patch-based inference (MCUNetV2), with the MAC overhead.

Prints, per zoo model, grid and planner: split, peak before/after (edgec's planner, int8 and
float32 activations), ratio and MAC overhead; all numbers are measured in this run.  With ``--tvm``
the original and the patched model are also imported into TVM (Relax), memory-planned by TVM's own
``StaticPlanBlockMemory`` (bytes of ``R.memory.alloc_storage``, float32, inputs and outputs not
included), compiled for the host and run: the outputs must equal onnxruntime's.

    python bench/patch_memory.py                       # MobileNetV2-1.0 224 and MCUNet, int8
    python bench/patch_memory.py --tvm --models mobilenet_v2
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
import onnx

from edgec import analysis, memory, verify
from edgec.export import export_zoo_model
from edgec.passes.patch import Grid, PatchConfig, patch_model

CONFIGS = [
    # (grid or None for the budget search, split, budget bytes, planner)
    (Grid(4, 4), "AUTO", None, "fused"),
    (Grid(8, 8), "AUTO", None, "fused"),
    (Grid(4, 4), "AUTO", None, "tinyengine"),
    (Grid(8, 8), "AUTO", None, "tinyengine"),
    (None, "AUTO", 256 * 1024, "tinyengine"),
]


def tvm_planned_bytes(proto: onnx.ModelProto) -> tuple[int, str]:
    """Bytes TVM's static memory planner allocates for ``proto`` (float32), and its own estimate text."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(proto, keep_params_in_input=False)
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        seq = tvm.transform.Sequential(
            cpu.legalize_passes(target) + cpu.dataflow_lower_passes(target) + [relax.transform.StaticPlanBlockMemory()]
        )
        planned = seq(mod)
    text = planned["main"].script()
    sizes = [int(v) for v in re.findall(r"R\.memory\.alloc_storage\(R\.shape\(\[(\d+)\]\)", text)]
    est = relax.analysis.estimate_memory_usage(planned)
    return sum(sizes), " ".join(line.strip() for line in est.splitlines() if "Without" in line)


def tvm_outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Compile ``proto`` with TVM for the host and run it on ``feeds``."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    ex = tvm.compile(from_onnx(proto, keep_params_in_input=False), tvm.target.Target({"kind": "llvm"}))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[s.name]) for s in verify.input_specs(proto)])
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [np.asarray(o.numpy()) for o in outs]


def max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,mcunet")
    ap.add_argument("--tvm", action="store_true", help="also plan, compile and run with TVM (slow: minutes)")
    ap.add_argument("--tvm-only", action="store_true", help="only the fused 4x4 row and its TVM comparison")
    args = ap.parse_args(argv)
    rows = []
    tvm_rows = []
    for name in args.models.split(","):
        kwargs = {"resolution": 224} if name == "mobilenet_v2" else {}
        proto = export_zoo_model(name, **kwargs)
        shape = verify.input_specs(proto)[0].shape
        base = analysis.analyze(proto)
        for grid, split, budget, planner_name in (CONFIGS[:1] if args.tvm_only else CONFIGS):
            planner = memory.PlannerOptions.named(planner_name)
            start = time.perf_counter()
            try:
                patched, rep = patch_model(proto, PatchConfig(grid, split, budget, 1, planner))
            except Exception as exc:  # a budget that nothing fits is a result, not a crash
                rows.append((name, "x".join(map(str, shape)), planner_name, "-" if grid is None else str(grid),
                             f"budget {budget // 1024} KiB: {exc}", "", "", "", "", "", ""))
                continue
            seconds = time.perf_counter() - start
            after = analysis.analyze(patched, planner=planner)
            fp32_before = memory.plan_memory(base.schedule, 4, planner).peak_bytes
            fp32_after = memory.plan_memory(after.schedule, 4, planner).peak_bytes
            err = verify.compare_models(proto, patched, samples=1, seed=0).max_abs
            label = str(rep.grid) + (f" (budget {budget // 1024} KiB)" if budget else "")
            if not rep.patched:
                label = f"none: fits the {budget // 1024} KiB budget as is"
            rows.append((name, "x".join(map(str, shape)), planner_name, label, rep.split,
                         f"{rep.peak_before / 1024:.1f}", f"{rep.peak_after / 1024:.1f}", f"{rep.ratio:.2f}x",
                         f"{fp32_before / 1024:.0f} -> {fp32_after / 1024:.0f}", f"+{100 * rep.mac_overhead:.1f}%",
                         f"{err:.1e} ({seconds:.0f}s)"))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            if (args.tvm or args.tvm_only) and grid == Grid(4, 4) and planner_name == "fused":
                t0 = time.perf_counter()
                before_b, before_est = tvm_planned_bytes(proto)
                after_b, after_est = tvm_planned_bytes(patched)
                feeds = verify.random_inputs(verify.input_specs(proto), np.random.default_rng(0))
                ort_ref = verify.run(proto, feeds)
                tvm_orig, tvm_patched = tvm_outputs(proto, feeds), tvm_outputs(patched, feeds)
                err_tvm, err_tvm_orig, err_tvm_tvm = (max_abs(tvm_patched, ort_ref), max_abs(tvm_orig, ort_ref),
                                                      max_abs(tvm_patched, tvm_orig))
                tvm_rows.append((name, str(rep.grid), rep.split, f"{before_b / 1024:.0f}", f"{after_b / 1024:.0f}",
                                 f"{before_b / max(after_b, 1):.2f}x", f"{fp32_before / 1024:.0f}",
                                 f"{fp32_after / 1024:.0f}", f"{err_tvm_tvm:.1e}", f"{err_tvm:.1e}", f"{err_tvm_orig:.1e}",
                                 f"{time.perf_counter() - t0:.0f}s"))
                print(" | ".join(tvm_rows[-1]), before_est, after_est, file=sys.stderr, flush=True)
    head = ("model", "input", "planner", "grid", "split", "peak before KiB (int8)", "peak after KiB (int8)", "ratio",
            "fp32 peak KiB before -> after", "MAC overhead", "max abs err vs original (search time)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if tvm_rows:
        head = ("model", "grid", "split", "TVM planned KiB before", "TVM planned KiB after", "TVM ratio",
                "edgec fp32 KiB before", "edgec fp32 KiB after", "max abs TVM patched vs TVM original",
                "TVM patched vs onnxruntime original", "TVM original vs onnxruntime original", "time")
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in tvm_rows:
            print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
