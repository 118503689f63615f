"""Where the int8 error of the zoo MobileNetV2 comes from: a noise budget on real photos.

Float model vs copies with one kind of error put in, output SQNR on ``photos-test`` (every
``--stride``-th sample):

- weights only: every Conv/Gemm weight replaced by its int8 per-channel quantize-dequantize
  (``s_c = max|W_c| / 127``, or the per-channel scale minimising the squared error, ``--mse``);
- one layer's weights only, for every layer (lowest SQNR first): which layers the noise comes from;
- input only: the model input rounded to the uint8 grid ``edgec quantize`` gives it.

Also printed: the SQNR of the weights themselves, so ``weight SQNR - output SQNR`` is how much
the network amplifies weight noise.

    python bench/quant_noise.py                 # MobileNetV2-1.0, 15 test crops
    python bench/quant_noise.py --top 20 --mse
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _fake_quant(w: np.ndarray, mse: bool) -> np.ndarray:
    w2 = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(w2).max(1, keepdims=True)
    amax = np.where(amax > 0, amax, 1.0)
    best, best_err = None, None
    for a in (np.linspace(0.5, 1.0, 51) if mse else (1.0,)):
        s = amax * a / 127
        d = np.clip(np.round(w2 / s), -127, 127) * s
        e = ((d - w2) ** 2).sum(1, keepdims=True)
        if best is None:
            best, best_err = d, e
        else:
            better = e < best_err
            best, best_err = np.where(better, d, best), np.minimum(e, best_err)
    return best.reshape(w.shape).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="int8 noise budget of the zoo MobileNetV2 on photos")
    ap.add_argument("--stride", type=int, default=3, help="use every N-th photos-test sample")
    ap.add_argument("--top", type=int, default=10, help="layers to list")
    ap.add_argument("--mse", action="store_true", help="also: MSE-optimal per-channel weight scales")
    args = ap.parse_args(argv)

    import onnx
    from onnx import numpy_helper

    from edgec import console
    from edgec import verify as vfy
    from edgec.calibration import BuiltinDataset
    from edgec.export import export_zoo_model, quiet
    from edgec.passes.quantize import QuantConfig, _named, activation_qparams, calibrate

    with quiet():
        proto = _named(export_zoo_model("mobilenet_v2", fold_bn=True))
    specs = vfy.input_specs(proto)
    test = BuiltinDataset("photos-test").load(specs).samples[:: args.stride]
    names = [o.name for o in proto.graph.output]

    def run(m) -> list[list[np.ndarray]]:
        s = vfy.session(m)
        return [s.run(None, t.feeds()) for t in test]

    ref = run(proto)

    def sqnr(outs) -> float:
        return vfy.compare_outputs(ref, outs, names, vfy.Tolerance()).sqnr_db

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    layers = {n.input[1]: n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits}

    def with_weights(which: set[str], mse: bool = False):
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        for i, init in enumerate(m.graph.initializer):
            if init.name in which:
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(_fake_quant(inits[init.name], mse), init.name))
        return m

    rows = []
    for mse in (False, True) if args.mse else (False,):
        sig = sum(float((inits[w] ** 2).sum()) for w in layers)
        err = sum(float(((_fake_quant(inits[w], mse) - inits[w]) ** 2).sum()) for w in layers)
        rows.append((f"all weights int8 ({'MSE' if mse else 'max'} scales)", 10 * np.log10(sig / err), sqnr(run(with_weights(set(layers), mse)))))
    # the input alone, on the uint8 grid of its calibrated (minmax) range
    data = BuiltinDataset("photos").load(specs)
    x = specs[0].name
    cal = calibrate(proto, [x], data, QuantConfig())
    qp = activation_qparams(cal.ranges[x], "uint8")
    lo, hi = qp.qrange
    sess = vfy.session(proto)
    q_in = [sess.run(None, {x: np.clip(np.round(t.feeds()[x] / qp.scale) * qp.scale, lo, hi).astype(np.float32)}) for t in test]
    sig = sum(float((t.feeds()[x] ** 2).sum()) for t in test)
    err = sum(float(((np.clip(np.round(t.feeds()[x] / qp.scale) * qp.scale, lo, hi) - t.feeds()[x]) ** 2).sum()) for t in test)
    rows.append(("input only (uint8 grid)", 10 * np.log10(sig / err), sqnr(q_in)))
    console.out.print(console.table(f"MobileNetV2 noise budget on {len(test)} photos-test crops",
                                    ["error put in", "its own SQNR dB", "output SQNR dB"], rows, numeric_from=1))
    per = []
    for w, node in layers.items():
        per.append((node, "x".join(map(str, inits[w].shape)), sqnr(run(with_weights({w})))))
    per.sort(key=lambda r: r[2])
    total = -10 * np.log10(sum(10 ** (-r[2] / 10) for r in per))
    console.out.print(console.table(
        f"one layer's weights int8 (lowest {args.top} of {len(per)}; powers of all {len(per)} summed: {total:.1f} dB)",
        ["layer", "weight shape", "output SQNR dB"], per[: args.top], numeric_from=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
