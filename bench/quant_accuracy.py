"""int8 accuracy on real data that ships offline.

1. digits: a MobileNetV2-style CNN trained on scikit-learn's handwritten digits
   (bench/train_digits.py, fixed seed), calibrated on the training split, evaluated on the
   held-out split: fp32 vs int8 top-1 (target: int8 within 0.5 points of fp32).
2. photos: the zoo's MobileNetV2 (seeded weights) on scikit-image's bundled photographs,
   calibrated on one set of photos and evaluated on different ones: SQNR of int8 vs fp32 logits
   (target: >= 30 dB with entropy or percentile calibration) and top-1 agreement.

    python bench/quant_accuracy.py                 # both, every calibration method
    python bench/quant_accuracy.py --only digits --methods percentile
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


def photos(methods: list[str], activations: str, width: float) -> list[tuple]:
    from edgec.calibration import BuiltinDataset
    from edgec.export import export_zoo_model
    from edgec.passes.quantize import QuantConfig, quantize_model

    kwargs = {} if width == 1.0 else {"width_mult": width}
    proto = export_zoo_model("mobilenet_v2", fold_bn=True, **kwargs)
    rows = []
    for m in methods:
        t = time.perf_counter()
        rep = quantize_model(proto, BuiltinDataset("photos"), QuantConfig(method=m, activations=activations),
                             evaluation=BuiltinDataset("photos-test"))
        ev = rep.evaluation
        rows.append((f"MobileNetV2-{width:g} photos", m, activations, ev.samples, None, None, None, ev.top1_agreement, ev.sqnr_db,
                     time.perf_counter() - t))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="int8 vs fp32 accuracy on offline real data")
    ap.add_argument("--only", choices=["digits", "photos"], default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--activations", choices=["uint8", "int8"], default="uint8")
    ap.add_argument("--digits-model", type=Path, default=Path("/tmp/edgec-digits.onnx"))
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    args = ap.parse_args(argv)
    from edgec import console
    from edgec.export import quiet

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: list[tuple] = []
    with quiet():
        if args.only in (None, "digits"):
            rows += digits(args.digits_model, methods, args.activations)
        if args.only in (None, "photos"):
            rows += photos(methods, args.activations, args.width)
    console.out.print(console.table(
        "int8 vs fp32 on held-out real data",
        ["model / data", "method", "acts", "samples", "fp32 top-1 %", "int8 top-1 %", "drop (points)", "top-1 agreement %", "SQNR dB", "s"],
        [tuple("-" if v is None else v for v in r) for r in rows], numeric_from=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
