"""int8 accuracy on real data that ships offline.

1. digits: a MobileNetV2-style CNN trained on scikit-learn's handwritten digits
   (bench/train_digits.py, fixed seed), calibrated on the training split, evaluated on the
   held-out split: fp32 vs int8 top-1 (target: int8 within 0.5 points of fp32).
2. photos: the zoo's MobileNetV2 (seeded weights) on scikit-image's bundled photographs,
   calibrated on one set of photos and evaluated on different ones: SQNR of int8 vs fp32 logits
   (target: >= 30 dB with entropy or percentile calibration) and top-1 agreement.

    python bench/quant_accuracy.py                 # both, every calibration method
    python bench/quant_accuracy.py --only digits --methods percentile
    python bench/quant_accuracy.py --only photos --methods percentile --target-sqnr 30   # mixed precision
    python bench/quant_accuracy.py --only photos --bn-stats sklearn-photos              # BN re-estimated on other photos
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

METHODS = ("minmax", "percentile", "entropy", "mse")


def digits(model_path: Path, methods: list[str], activations: str) -> list[tuple]:
    import onnx

    from edgec.calibration import BuiltinDataset
    from edgec.passes.quantize import QuantConfig, quantize_model

    if not model_path.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        import train_digits

        train_digits.main(["-o", str(model_path)])
    proto = onnx.load(str(model_path))
    rows = []
    for m in methods:
        t = time.perf_counter()
        rep = quantize_model(proto, BuiltinDataset("digits"), QuantConfig(method=m, activations=activations, max_samples=256),
                             evaluation=BuiltinDataset("digits-test"))
        ev = rep.evaluation
        rows.append(("digits CNN", m, activations, ev.samples, ev.float_top1, ev.quant_top1, ev.float_top1 - ev.quant_top1,
                     ev.top1_agreement, ev.sqnr_db, time.perf_counter() - t))
    return rows


def sklearn_photo_batch(n: int = 32, size: int = 224, seed: int = 0):
    """``n`` random crops (30-100 % of the short side, random flips) of scikit-learn's two sample
    photographs (china.jpg, flower.jpg), ImageNet-normalized: images disjoint from both the
    ``photos`` (calibration) and ``photos-test`` (evaluation) sets, which are scikit-image's."""
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from edgec.calibration import Preprocess

    pre = Preprocess()
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    rng = np.random.default_rng(seed)
    images = load_sample_images().images
    out = []
    for k in range(n):
        im = images[k % len(images)]
        h, w = im.shape[:2]
        side = rng.uniform(0.3, 1.0) * min(h, w)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        crop = Image.fromarray(im).crop((int(x0), int(y0), int(x0 + side), int(y0 + side))).resize((size, size), Image.BILINEAR)
        a = np.asarray(crop, np.float32) / 255.0
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out.append(((a - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def mobilenet_v2(width: float, bn_stats: str):
    """The zoo MobileNetV2 (BN folded).  ``bn_stats="noise"``: the zoo's own BN statistics (seeded N(0, 1)
    images); ``"sklearn-photos"``: BN running statistics (and the logit scale) re-estimated on
    :func:`sklearn_photo_batch` -- a data-dependent initialization, still random weights, not a trained model."""
    from edgec import models
    from edgec.export import export, export_zoo_model
    from edgec.models import _common

    kwargs = {} if width == 1.0 else {"width_mult": width}
    if bn_stats == "noise":
        return export_zoo_model("mobilenet_v2", fold_bn=True, **kwargs)
    module = models.get("mobilenet_v2").build(seed=0, **kwargs)
    x = sklearn_photo_batch()
    _common.calibrate_batchnorm(module, x)
    _common.scale_classifier(module, x)
    return export(module, (1, 3, 224, 224), fold_bn=True, seed=0).model


def macs_by_node(proto) -> dict[str, int]:
    """Multiply-accumulates of every Conv / Gemm / MatMul node (output size x reduction length)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    weights = {i.name: numpy_helper.to_array(i).shape for i in proto.graph.initializer}
    out: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in weights and n.output[0] in shapes:
            w = weights[n.input[1]]
            red = int(np.prod(w[1:])) if n.op_type == "Conv" else int(w[1] if n.op_type == "Gemm" and any(
                a.name == "transB" and a.i for a in n.attribute) else w[0])
            out[n.name] = int(np.prod(shapes[n.output[0]])) * red
    return out


def photos(methods: list[str], activations: str, width: float, bn_stats: str = "noise",
           target_sqnr: float | None = None) -> list[tuple]:
    from edgec.calibration import BuiltinDataset
    from edgec.passes.quantize import QuantConfig, quantize_model

    proto = mobilenet_v2(width, bn_stats)
    rows = []
    for m in methods:
        t = time.perf_counter()
        rep = quantize_model(proto, BuiltinDataset("photos"), QuantConfig(method=m, activations=activations, target_sqnr_db=target_sqnr),
                             evaluation=BuiltinDataset("photos-test"))
        ev = rep.evaluation
        name = f"MobileNetV2-{width:g} photos" + ("" if bn_stats == "noise" else f" (BN stats: {bn_stats})")
        if target_sqnr is not None:
            from edgec.passes.quantize import _named

            macs = macs_by_node(_named(proto))
            share = 100.0 * sum(macs.get(n, 0) for n in rep.layers_float) / max(sum(macs.values()), 1)
            name += (f", {len(rep.layers_float)}/{len(rep.layers_float) + len(rep.layers_quantized)} layers "
                     f"({share:.0f} % of MACs) float")
        rows.append((name, m, activations, ev.samples, None, None, None, ev.top1_agreement, ev.sqnr_db,
                     time.perf_counter() - t))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="int8 vs fp32 accuracy on offline real data")
    ap.add_argument("--only", choices=["digits", "photos"], default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--activations", choices=["uint8", "int8"], default="uint8")
    ap.add_argument("--digits-model", type=Path, default=Path("/tmp/edgec-digits.onnx"))
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    ap.add_argument("--bn-stats", choices=["noise", "sklearn-photos"], default="noise",
                    help="MobileNetV2 BN statistics: the zoo's (noise) or re-estimated on scikit-learn's sample photos")
    ap.add_argument("--target-sqnr", type=float, default=None, help="keep sensitive layers float until this SQNR (dB)")
    args = ap.parse_args(argv)
    from edgec import console
    from edgec.export import quiet

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: list[tuple] = []
    with quiet():
        if args.only in (None, "digits"):
            rows += digits(args.digits_model, methods, args.activations)
        if args.only in (None, "photos"):
            rows += photos(methods, args.activations, args.width, args.bn_stats, args.target_sqnr)
    console.out.print(console.table(
        "int8 vs fp32 on held-out real data",
        ["model / data", "method", "acts", "samples", "fp32 top-1 %", "int8 top-1 %", "drop (points)", "top-1 agreement %", "SQNR dB", "s"],
        [tuple("-" if v is None else v for v in r) for r in rows], numeric_from=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
