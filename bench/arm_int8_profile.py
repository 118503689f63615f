"""Per-kernel profile of an int8 zoo model on an EMULATED ARM core, against onnxruntime in the same process.

Builds the zoo model quantized as ``edgec quantize`` does (as ``bench/arm_emulated.py --precision
int8``), compiles it with this checkout's CPU pipeline for ``--cpu`` (cross-compiled), and runs one
Python process inside the emulated arm64 userland (``edgec.emulate``: qemu user-mode, ``QEMU_CPU``
= the core) that

- times the whole Relax VM call and onnxruntime's aarch64 build on the same QDQ model, interleaved
  over ``--rounds`` rounds, with ``time.process_time`` (CPU time of the emulated process: other
  load on this shared host changes wall time far more than CPU time);
- with ``--kernels``, times every TIR function the VM calls on random inputs of its argument
  shapes (CPU time, best of the rounds, times the number of calls), largest first;
- with ``--ort-nodes``, prints onnxruntime's own per-node profile (wall time).

``--extra LIB.so`` adds modules built earlier (e.g. by an older checkout, copied somewhere) to the
same timed rounds: a same-process A/B.  Every number is EMULATED: only ratios in one run mean
something, and qemu weighs instructions by its translation cost (each ``sdot`` is a helper call),
not by a real core's pipeline.

    python bench/arm_int8_profile.py --model resnet18 --cpu cortex-a76 --kernels
    python bench/arm_int8_profile.py --model repvgg_a0 --cpu cortex-a76 --rounds 5 --keep /tmp/r.so

Needs root and the board's packages, like ``bench/arm_emulated.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

_INNER = r'''
import json, os, statistics, sys, time
import numpy as np
import tvm
from tvm import relax
import onnxruntime as ort

cfg = json.loads(sys.argv[1])
x = np.random.default_rng(0).standard_normal(cfg["shape"]).astype(np.float32)
dev = tvm.cpu()
mods = []
for so in cfg["libs"]:
    lib = tvm.runtime.load_module(so)
    vm = relax.VirtualMachine(lib, dev)
    xi = tvm.runtime.tensor(x, dev)
    vm["main"](xi)
    mods.append((so, lib, vm, xi, []))
o = ort.SessionOptions()
o.intra_op_num_threads = 1
o.inter_op_num_threads = 1
if cfg["ort_nodes"]:
    o.enable_profiling = True
    o.profile_file_prefix = os.path.join(os.path.dirname(cfg["libs"][0]), "ortprof")
s = ort.InferenceSession(cfg["model"], o, providers=["CPUExecutionProvider"])
feed = {s.get_inputs()[0].name: x}
s.run(None, feed)
ot = []
for _ in range(cfg["rounds"]):
    for so, lib, vm, xi, ts in mods:
        t = time.process_time(); vm["main"](xi); ts.append(time.process_time() - t)
    t = time.process_time(); s.run(None, feed); ot.append(time.process_time() - t)
o_ms = statistics.median(ot) * 1e3
print("onnxruntime int8: CPU ms median %.1f" % o_ms)
for so, lib, vm, xi, ts in mods:
    m = statistics.median(ts) * 1e3
    print("edgec %s: CPU ms median %.1f  edgec/ort %.3f" % (os.path.basename(so), m, m / o_ms))
if cfg["ort_nodes"]:
    ev = json.load(open(s.end_profiling()))
    runs = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in runs[len(runs) // 2:]:
        print("ort node %-12s %8.2f ms  %s" % (e["args"].get("op_name"), e["dur"] / 1e3, e["name"]))
if cfg["kernels"]:
    rng = np.random.default_rng(0)
    lib = mods[0][1]
    rows = []
    for name, sig in cfg["kernels"].items():
        args = []
        for shp, dt in sig["params"]:
            if dt.startswith("float"):
                a = rng.standard_normal(shp).astype(dt)
            elif dt == "int32" and len(shp) == 1:
                a = rng.integers(1 << 20, 1 << 21, shp).astype(dt)
            else:
                a = rng.integers(0, 100, shp).astype(dt)
            args.append(tvm.runtime.tensor(a, dev))
        f = lib.get_function(name, query_imports=True)
        f(*args)
        rows.append([name, f, args, sig, []])
    for _ in range(cfg["rounds"]):
        for r in rows:
            t = time.process_time(); r[1](*r[2]); r[4].append(time.process_time() - t)
    out = sorted(((min(ts) * 1e3 * sig["calls"], min(ts) * 1e3, sig["calls"], name, sig["params"][0][0], sig["params"][-1][0])
                  for name, f, args, sig, ts in rows), reverse=True)
    for r in out:
        print("kernel %8.2f ms = %7.2f x%d  %s  %s -> %s" % r)
    print("kernels total %.1f ms" % sum(r[0] for r in out))
'''


def kernel_signatures(lowered) -> dict:  # noqa: ANN001
    """``{prim func name: {"params": [[shape, dtype], ...], "calls": n}}`` of the Relax main's calls."""
    import tvm
    from tvm import relax, tirx

    sigs: dict = {}

    def ty(e):  # noqa: ANN001, ANN202
        return [[int(d) for d in e.ty.shape], str(e.ty.dtype)]

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, c) -> None:  # noqa: ANN001
            op = c.op
            if isinstance(op, tvm.ir.Op) and op.name == "relax.call_tir":
                gv, ins = c.args[0], list(c.args[1].fields)
                outs = c.ty_args[0]
                outs = list(outs.fields) if isinstance(outs, relax.TupleType) else [outs]
                params = [ty(a) for a in ins] + [[[int(d) for d in o.shape], str(o.dtype)] for o in outs]
            elif isinstance(op, tvm.ir.GlobalVar) and isinstance(lowered[op], tirx.PrimFunc):
                gv, params = op, [ty(a) for a in c.args]
            else:
                super().visit_call_(c)
                return
            d = sigs.setdefault(gv.name_hint, {"params": params, "calls": 0})
            d["calls"] += 1

    _Calls().visit_expr(lowered["main"])
    return sigs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--cpu", default="cortex-a76")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kernels", action="store_true", help="time every TIR function of the module")
    p.add_argument("--ort-nodes", action="store_true", help="print onnxruntime's per-node profile")
    p.add_argument("--extra", type=Path, action="append", default=[], help="another compiled module (.so) to time alongside")
    p.add_argument("--keep", type=Path, default=None, help="copy the compiled module here")
    args = p.parse_args()

    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from arm_emulated import quantized

    from edgec import emulate as em
    from edgec.export import export_zoo_model
    from edgec.schedules import cpu_pipeline
    from edgec.targets import get_target

    proto = quantized(export_zoo_model(args.model, fold_bn=True))
    td = get_target(args.cpu)
    target = td.tvm_target()
    mod = from_onnx(proto, keep_params_in_input=False)
    root = em.prepare("arm64")
    em._check_can_run()  # noqa: SLF001 - the same root check as the board
    inside = Path("/tmp") / f"edgec-prof-{uuid.uuid4().hex[:12]}"
    work = root / inside.relative_to("/")
    work.mkdir(parents=True)
    try:
        with target, tvm.transform.PassContext(opt_level=3):
            lowered = cpu_pipeline(target)(mod)
            ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
        ex.export_library(str(work / "model.so"), fcompile=td.toolchain.fcompile())
        if args.keep is not None:
            shutil.copy(work / "model.so", args.keep)
        onnx.save(proto, str(work / "model.onnx"))
        libs = [str(inside / "model.so")]
        for i, extra in enumerate(args.extra):
            shutil.copy(extra, work / f"extra{i}-{extra.name}")
            libs.append(str(inside / f"extra{i}-{extra.name}"))
        shape = [int(d.dim_value) for d in proto.graph.input[0].type.tensor_type.shape.dim]
        cfg = {"libs": libs, "model": str(inside / "model.onnx"), "shape": shape, "rounds": args.rounds,
               "ort_nodes": args.ort_nodes, "kernels": kernel_signatures(lowered) if args.kernels else None}
        (work / "run.py").write_text(_INNER)
        r = subprocess.run(em.chroot_command(root, [em.PYTHON_IN_ROOT, str(inside / "run.py"), json.dumps(cfg)]),
                           env=em._env(args.cpu, 1), capture_output=True, text=True)  # noqa: SLF001
        print(f"EMULATED {args.cpu} (qemu user-mode), 1 thread, {args.model} int8, CPU time of the emulated process")
        print(r.stdout.replace(str(inside) + "/", ""))
        if r.returncode != 0:
            print(re.sub(r"\n+", "\n", r.stderr)[-2000:], file=sys.stderr)
            sys.exit(r.returncode)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
