"""The int8 QDQ model compiled with Apache TVM: host and arm64 builds vs onnxruntime's int8 output.

For each model: quantize with edgec (uint8 activations, per-channel int8 weights), compile for
the host with ``edgec.compile`` (edgec's layout and schedule hooks) and with TVM's default Relax
pipeline, and for ``cortex-a72`` (cross-compiled library, ``--arm-pipeline``), run the host
build (and the arm64 build over RPC when ``--rpc HOST:PORT`` points at a board, e.g.
``edgec device emulate arm64``) on held-out real inputs and compare with onnxruntime running the
same QDQ model.  The error is reported as ``max |y_tvm - y_ort|`` and in units of the output
scale: the scale of the output's QuantizeLinear when there is one, else the step an 8-bit
quantization of the observed output range would have (``(max - min) / 255``).

    python bench/quant_tvm.py
    python bench/quant_tvm.py --models digits --rpc 127.0.0.1:9090
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _models(names: list[str], digits_path: Path):
    import onnx

    from edgec.calibration import BuiltinDataset
    from edgec.export import export_zoo_model, quiet

    for name in names:
        if name == "digits":
            if not digits_path.exists():
                sys.path.insert(0, str(Path(__file__).parent))
                import train_digits

                train_digits.main(["-o", str(digits_path)])
            yield "digits CNN", onnx.load(str(digits_path)), BuiltinDataset("digits"), BuiltinDataset("digits-test")
        else:
            with quiet():
                proto = export_zoo_model(name, fold_bn=True)
            yield name, proto, BuiltinDataset("photos"), BuiltinDataset("photos-test")


def _output_scale(quant, ref: np.ndarray) -> tuple[float, str]:
    from edgec.passes.quantize import _output_scale as q_scale

    s = q_scale(quant)
    if s is not None:
        return s, "output Q scale"
    return float(ref.max() - ref.min()) / 255.0, "8-bit step of the output range"


def _compile_default(proto, specs, target, out_dir: Path) -> None:
    """``tvm.compile`` with TVM's default Relax pipeline (no edgec layout/schedule hooks)."""
    import tvm

    from edgec.compile import import_onnx

    mod = import_onnx(proto, specs)
    tvm_target = target.tvm_target()
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, tvm_target)
    out_dir.mkdir(parents=True)
    ex.export_library(str(out_dir / "model.so"), fcompile=target.toolchain.fcompile())


def _run_remote(library: Path, address: str, feeds: list[np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from edgec.compile import flatten_outputs
    from edgec.rpc import Remote, open_session

    conn = open_session(Remote.direct(address, session_timeout_s=1800))
    sess = conn.session
    sess.upload(str(library), library.name)
    lib = sess.load_module(library.name)
    dev = sess.cpu(0)
    vm = VirtualMachine(lib, dev)
    outs = []
    for x in feeds:
        vm.set_input("main", tvm.runtime.tensor(np.ascontiguousarray(x), device=dev))
        vm.invoke_stateful("main")
        outs.append(flatten_outputs(vm.get_outputs("main"))[0])
    return outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TVM builds of int8 QDQ models vs onnxruntime")
    ap.add_argument("--models", default="digits,mobilenet_v2")
    ap.add_argument("--samples", type=int, default=8, help="held-out inputs compared")
    ap.add_argument("--rpc", default=None, help="HOST:PORT of an arm64 RPC server (edgec device emulate arm64)")
    ap.add_argument("--arm-pipeline", choices=["edgec", "tvm-default"], default="tvm-default")
    ap.add_argument("--digits-model", type=Path, default=Path("/tmp/edgec-digits.onnx"))
    args = ap.parse_args(argv)

    from edgec import console
    from edgec import verify as vfy
    from edgec.compile import CompileConfig, compile_model, run_local
    from edgec.passes.quantize import QuantConfig, quantize_model
    from edgec.targets import get_target

    rows = []
    for label, proto, calib, held_out in _models([m.strip() for m in args.models.split(",")], args.digits_model):
        specs = vfy.input_specs(proto)
        quant = quantize_model(proto, calib.load(specs, 64), QuantConfig(method="percentile")).model
        test = held_out.load(specs, args.samples)
        feeds = [s.arrays[0] for s in test.samples]
        sess = vfy.session(quant)
        ref = [sess.run(None, {specs[0].name: x})[0] for x in feeds]
        scale, scale_kind = _output_scale(quant, np.stack(ref))
        with tempfile.TemporaryDirectory() as tmp:
            for target_name, pipeline in (("host", "edgec"), ("host", "tvm-default"), ("cortex-a72", args.arm_pipeline)):
                t = time.perf_counter()
                out_dir = Path(tmp) / f"{target_name}-{pipeline}"
                if pipeline == "edgec":
                    compile_model(quant, out_dir, CompileConfig(target=get_target(target_name), verify=False))
                else:
                    _compile_default(quant, specs, get_target(target_name), out_dir)
                build_s = time.perf_counter() - t
                target_name = f"{target_name} ({pipeline})"
                got: list[np.ndarray] | None = None
                where = "not run"
                if target_name.startswith("host"):
                    got = [o[0] for o in run_local(out_dir / "model.so", "cpu", [{specs[0].name: x} for x in feeds], [specs[0].name])]
                    where = "host"
                elif args.rpc:
                    got = _run_remote(out_dir / "model.so", args.rpc, feeds)
                    where = f"RPC {args.rpc}"
                if got is None:
                    rows.append((label, target_name, build_s, where, "-", "-", "-", "-"))
                    continue
                err = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, ref, strict=True))
                agree = float(np.mean([g.argmax() == r.argmax() for g, r in zip(got, ref, strict=True)]) * 100)
                rows.append((label, target_name, build_s, where, err, err / scale, scale_kind, agree))
    console.out.print(console.table(
        f"TVM build of the int8 QDQ model vs onnxruntime int8 ({args.samples} held-out inputs)",
        ["model", "target", "build s", "ran on", "max abs err", "in output scales", "scale", "top-1 agreement %"], rows, numeric_from=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
