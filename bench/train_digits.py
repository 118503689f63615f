"""Train a small MobileNetV2-style CNN (inverted residuals) on scikit-learn's handwritten digits.

Real data that ships offline: 1,797 8x8 digits, split 75/25 with a fixed seed
(``edgec.calibration.digits_split``), upscaled to 16x16 and normalized to [-1, 1] exactly as the
built-in ``digits`` / ``digits-test`` calibration datasets do.  Fixed seeds, CPU, ~1 minute.

    python bench/train_digits.py -o /tmp/digits.onnx
    edgec quantize /tmp/digits.onnx -o /tmp/digits.int8.onnx --calib-dataset digits --eval-dataset digits-test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

INPUT_SHAPE = (1, 1, 16, 16)


def build_model():
    import torch
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            self.block = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )

        def forward(self, x):
            y = self.block(x)
            return x + y if self.use_res else y

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                InvertedResidual(16, 16, 1, 1),
                InvertedResidual(16, 24, 2, 4),
                InvertedResidual(24, 24, 1, 4),
                InvertedResidual(24, 32, 2, 4),
                InvertedResidual(32, 32, 1, 4),
                nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(64, 10)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    return DigitsNet()


def data():
    from edgec.calibration import digits_inputs, digits_split
    from edgec.verify import TensorSpec

    spec = TensorSpec("x", INPUT_SHAPE, np.dtype(np.float32))
    x_tr, y_tr, x_te, y_te = digits_split()
    return digits_inputs(x_tr, spec), y_tr, digits_inputs(x_te, spec), y_te


def train(epochs: int = 40, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    x_tr, y_tr, x_te, y_te = data()
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=epochs * ((len(x_tr) + 63) // 64))
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb = xt[idx]
            # light augmentation: random shifts by up to 1 pixel
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean() * 100)
    return model, acc


def export(model, path: Path) -> None:
    import onnx
    import torch

    from edgec.ir import save_proto

    tmp = path.with_suffix(".export.onnx")
    torch.onnx.export(model, (torch.zeros(INPUT_SHAPE),), str(tmp), input_names=["x"], output_names=["logits"],
                      opset_version=17, dynamo=True, external_data=False)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    # fold BatchNorm into the convs and drop shape arithmetic
    import onnxsim

    proto, ok = onnxsim.simplify(proto)
    save_proto(proto, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path("/tmp/edgec-digits.onnx"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    start = time.perf_counter()
    model, acc = train(args.epochs, args.seed)
    export(model, args.output)
    print(f"trained in {time.perf_counter() - start:.0f} s: held-out top-1 {acc:.2f}% ({args.output})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
