"""Same-run A/B of edgec's fp32 schedule library: each model compiled once per *variant* in one
process, timed interleaved with onnxruntime (rounds x 5 runs, medians), ratios printed per variant.

A variant switches one feature of the library off by monkeypatching it (this script only; the
library has no switches):

  new       the library as it is
  nomerge   no merge of parallel conv branches (edgec.schedules.branches)
  oldacc    accumulator tiles in "local" scope, no stack cap (edgec.schedules.cpu)
  base      nomerge + oldacc (the library of the fourth session)
  cap64     stack cap for reductions under 64 taps instead of 256
  nopack    no weight pre-packing (edgec.schedules.layout.pack_weights)
  chanouter channel tiles outermost for weight-blocked reductions (no row bands, cpu.pixel_blocks)
  par100k   parallel loops from 100K multiply-adds instead of cpu.PARALLEL_MIN_MACS
  nounroll  no kernel-column unroll for stride-2 depthwise
  nonarrow  no long rows for narrow 1x1 convs
  inlinedw  depthwise padding inlined instead of a padded copy
  nowino    no Winograd convs (edgec.schedules.winograd: every 3x3 conv direct)
  f2        Winograd F(2x2, 3x3) instead of F(4x4, 3x3)
  minc8     Winograd from 8 channels instead of 32
  f2small   F(2x2, 3x3) where F(4x4, 3x3) has fewer than 32 tiles per image (14x14 and smaller maps)
  nocap     Winograd also where the transformed weights exceed the cap (ResNet-18's 512-channel convs)

Usage (environment: T = threads for both runtimes, default 1; NOSPIN=1 turns onnxruntime's
spinning off):

  T=1 python bench/ab_fp32.py mcunet,mobilenet_v2 base,new 8

Exported models are cached in ~/.cache/edgec/ab.  Used for the before/after tables of
bench/RESULTS.md, "Schedule library vs onnxruntime (issue 7, fp32, host CPU)".
"""
import os, sys, time, statistics
import contextlib
import dataclasses

CACHE = os.path.expanduser("~/.cache/edgec/ab")

@contextlib.contextmanager
def variant(name):
    """Monkeypatch the schedule library into variant ``name`` for the ``with`` block (also used
    by ``compare_isolated.py --variants``)."""
    import tvm
    import edgec.schedules.branches as br
    import edgec.schedules.winograd as wg
    from edgec.schedules import layout, cpu

    saved = []  # (module, attribute, original value), restored in reverse order

    def patch(mod, attr, value):
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)

    def nop_pass(*_a, **_k):
        return tvm.transform.module_pass(lambda m, c: m, opt_level=0, name="nop")

    def old_accumulators():
        patch(cpu, "ACCUMULATOR_SCOPE", "local")
        patch(cpu, "stack_tile_vectors", lambda *a, **k: 10**6)

    if name == "nomerge":
        patch(br, "merge_conv_branches", nop_pass)
    if name == "base":
        patch(br, "merge_conv_branches", nop_pass)
        old_accumulators()
    if name == "cap64":
        patch(cpu, "_STACK_TILE_MAX_REDUCTION", 64)
    if name == "oldacc":
        old_accumulators()
    if name == "nopack":
        patch(layout, "pack_weights", nop_pass)
    if name == "chanouter":
        patch(cpu, "pixel_blocks", lambda ob, n, c: 1 if cpu._channel_tiles_outside(ob, n, c) else n)
    if name == "par100k":
        patch(cpu, "PARALLEL_MIN_MACS", 100_000)
    if name == "nounroll":
        patch(cpu, "unroll_kernel_columns", lambda *a: False)
    if name == "nonarrow":
        patch(cpu, "narrow_tile", lambda *a: None)
    if name == "inlinedw":
        f = cpu._materialize_producers
        patch(cpu, "_materialize_producers", lambda r, i, o: False if r <= 49 else f(r, i, o))
    if name in ("nowino", "f2", "nocap", "f2small", "minc8"):
        patch(wg, "DEFAULT", {
            "nowino": wg.WinogradConfig(min_channels=10**9),
            "f2": dataclasses.replace(wg.DEFAULT, tile=2),
            "nocap": dataclasses.replace(wg.DEFAULT, max_weight_bytes=10**12),
            "f2small": dataclasses.replace(wg.DEFAULT, min_tiles=32),
            "minc8": dataclasses.replace(wg.DEFAULT, min_channels=8),
        }[name])
    for k, v in [kv.split("=") for kv in os.environ.get("ENV_" + name.upper(), "").split(",") if kv]:
        os.environ[k] = v
    try:
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)

def build(proto, name):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from edgec import schedules
    from edgec.targets import get_target

    target = get_target("host").tvm_target()
    with variant(name):
        ex = schedules.compile_module(from_onnx(proto, keep_params_in_input=False), target)
    return relax.VirtualMachine(ex, tvm.cpu())

def main():
    os.environ["TVM_NUM_THREADS"] = os.environ.get("T", "1")
    import numpy as np, onnxruntime as ort, tvm
    from edgec.export import export_zoo_model, quiet

    os.makedirs(CACHE, exist_ok=True)
    variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["nopack", "new"]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    for name in sys.argv[1].split(","):
        import onnx
        cache = os.path.join(CACHE, f"{name}.onnx")
        if os.path.exists(cache):
            proto = onnx.load(cache)
        else:
            with quiet():
                proto = export_zoo_model(name)
            onnx.save(proto, cache)
        inp = proto.graph.input[0]
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        so = ort.SessionOptions(); so.intra_op_num_threads = int(os.environ["TVM_NUM_THREADS"]); so.inter_op_num_threads = 1
        if os.environ.get("NOSPIN"):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ref = sess.run(None, {inp.name: x})[0]
        xt = tvm.runtime.tensor(x)
        runs = {"ort": lambda: sess.run(None, {inp.name: x})}
        errs = {}
        for v in variants:
            vm = build(proto, v)
            out = vm["main"](xt)
            errs[v] = float(np.abs(out.numpy() - ref).max())
            runs[v] = (lambda vm=vm: vm["main"](xt))
        times = {k: [] for k in runs}
        for f in runs.values(): f()
        for _ in range(rounds):
            for k, f in runs.items():
                for _ in range(5):
                    t = time.perf_counter(); f(); times[k].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        la = os.getloadavg()[0]
        print(f"{name:24s} load {la:.1f} ort {med['ort']:.2f} ms | " + " | ".join(f"{v} {med[v]:.2f} ({med[v]/med['ort']:.2f}x, err {errs[v]:.1e})" for v in variants), flush=True)


if __name__ == "__main__":
    main()
