"""Integer int8 (VNNI) kernels for QDQ Conv/Gemm/MatMul (edgec.schedules.int8) vs onnxruntime.

Every model here is a QDQ model made by ``edgec.passes.quantize.quantize_model`` (or by hand), compiled
with edgec's CPU pipeline for this host (AVX-512 VNNI) and run on fresh random inputs; the output
must match onnxruntime running the same QDQ model to within one output quantization step, and the
compiled module must actually contain the integer kernels (so a rewrite that silently stops
matching fails here).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
from graphs import make_model, tensor
from onnx import helper

from edgec.calibration import CalibrationSet, Sample
from edgec.passes.quantize import QuantConfig, quantize_model
from edgec.schedules import int8


def _host():
    from edgec.targets import get_target

    return get_target("host").tvm_target()


def _quantize(model: onnx.ModelProto, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.ModelProto:
    cal = CalibrationSet("random", tuple(Sample(("x",), (rng.standard_normal(shape).astype(np.float32),)) for _ in range(8)))
    return quantize_model(model, cal, QuantConfig(activations="uint8", bias_correction=False, pad_channels=False)).model


def _conv_model(cin: int, cout: int, k: int, stride: int, pads: list[int], hw: tuple[int, int], act: str, bias: bool,
                rng: np.random.Generator, dilation: int = 1) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    w = (rng.standard_normal((cout, cin, k, k)) / math.sqrt(cin * k * k)).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.3).astype(np.float32)
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", inputs, ["c"], pads=pads, strides=[stride] * 2, kernel_shape=[k, k], dilations=[dilation] * 2)]
    inits = [tensor("w", w)] + ([tensor("b", b)] if bias else [])
    nodes.append(_act(act, "c", "y", inits))
    h, wd = hw
    oh = (h + pads[0] + pads[2] - dilation * (k - 1) - 1) // stride + 1
    ow = (wd + pads[1] + pads[3] - dilation * (k - 1) - 1) // stride + 1
    shape = (1, cin, h, wd)
    return make_model(nodes, [("x", shape)], [("y", (1, cout, oh, ow))], inits), shape


def _act(act: str, src: str, dst: str, inits: list) -> onnx.NodeProto:
    if act == "relu":
        return helper.make_node("Relu", [src], [dst])
    if act == "clip":
        inits += [tensor("lo", np.array(0.0, np.float32)), tensor("hi", np.array(1.5, np.float32))]
        return helper.make_node("Clip", [src, "lo", "hi"], [dst])
    return helper.make_node("Identity", [src], [dst])


#: x86 targets this host runs: its own (AVX-512 VNNI micro-kernel) and AVX2 without VNNI (the plain
#: widening kernel, as on ARM cores without the dot-product extension)
HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}


def _target(name: str):
    import tvm

    return _host() if name == "host" else tvm.target.Target(HASWELL)


def _compile(proto: onnx.ModelProto, target_name: str = "host"):
    """``proto`` built by edgec's CPU pipeline; "haswell": with the plain widening micro-kernel
    forced (edgec keeps the float path on x86 without VNNI, the kernel is the ARM one's twin)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module

    target = _target(target_name)
    mod = from_onnx(proto, keep_params_in_input=False)
    saved = int8.micro_kernel
    if target_name == "haswell":
        int8.micro_kernel = lambda t: int8.generic_kernel(256, 16)
    try:
        with target:
            rewritten = tvm.transform.Sequential(int8.int8_passes(target))(mod)
        ex = compile_module(mod, target)
    finally:
        int8.micro_kernel = saved
    kernels = [gv.name_hint for gv, f in rewritten.functions_items() if gv.name_hint.startswith("edgec_int8")]
    return relax.VirtualMachine(ex, tvm.cpu()), kernels


def _output_scale(proto: onnx.ModelProto) -> float | None:
    out = proto.graph.output[0].name
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] == out:
            init = {i.name: i for i in proto.graph.initializer}
            return float(onnx.numpy_helper.to_array(init[n.input[1]]))
    return None


def _check(proto: onnx.ModelProto, shape: tuple[int, ...], rng: np.random.Generator, n_kernels: int, runs: int = 3,
           target: str = "host") -> float:
    """Max |edgec - onnxruntime| in output steps over ``runs`` fresh inputs (float outputs: relative)."""
    import onnxruntime as ort
    import tvm

    vm, kernels = _compile(proto, target)
    assert len(kernels) == n_kernels, f"expected {n_kernels} integer kernels, the rewrite made {kernels}"
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    scale = _output_scale(proto)
    worst = 0.0
    for _ in range(runs):
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 1.5)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert got.shape == ref.shape
        err = float(np.abs(got.astype(np.float64) - ref).max())
        worst = max(worst, err / scale if scale is not None else err / max(1e-6, float(np.abs(ref).max())))
    return worst


CONV_CASES = [
    # cin, cout, k, stride, pads (t, l, b, r), hw, act, bias
    (16, 32, 1, 1, [0, 0, 0, 0], (9, 9), "relu", True),
    (8, 16, 3, 1, [1, 1, 1, 1], (10, 10), "relu", True),
    (5, 21, 3, 2, [1, 0, 1, 2], (11, 9), "none", True),
    (3, 16, 3, 2, [1, 1, 1, 1], (16, 16), "clip", True),
    (24, 40, 1, 2, [0, 0, 0, 0], (7, 7), "none", False),
    (12, 70, 5, 1, [2, 2, 2, 2], (6, 13), "relu", False),
    (64, 64, 3, 1, [1, 1, 1, 1], (14, 14), "clip", True),
]


@pytest.mark.parametrize("target", ["host", "haswell"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}_k{c[2]}s{c[3]}_{c[6]}{'_bias' if c[7] else ''}")
def test_conv_matches_onnxruntime(case, target):
    rng = np.random.default_rng(CONV_CASES.index(case))
    cin, cout, k, stride, pads, hw, act, bias = case
    fp32, shape = _conv_model(cin, cout, k, stride, pads, hw, act, bias, rng)
    q = _quantize(fp32, shape, rng)
    assert _check(q, shape, rng, n_kernels=1, target=target) <= 1.0


def test_dilated_conv_matches_onnxruntime():
    rng = np.random.default_rng(7)
    fp32, shape = _conv_model(8, 16, 3, 1, [2, 2, 2, 2], (12, 12), "relu", True, rng, dilation=2)
    q = _quantize(fp32, shape, rng)
    assert _check(q, shape, rng, n_kernels=1) <= 1.0


def _residual_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """conv 1x1 -> relu -> depthwise 3x3 (stays float) -> conv 1x1, + residual add, maxpool, GAP, Gemm."""
    c = 16
    shape = (1, c, 12, 12)
    w1 = (rng.standard_normal((32, c, 1, 1)) / 4).astype(np.float32)
    wd = (rng.standard_normal((32, 1, 3, 3)) / 3).astype(np.float32)
    w2 = (rng.standard_normal((c, 32, 1, 1)) / 6).astype(np.float32)
    wf = (rng.standard_normal((10, c)) / 4).astype(np.float32)
    bf = rng.standard_normal(10).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wd"], ["d"], pads=[1, 1, 1, 1], group=32),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("Conv", ["dr", "w2"], ["p"]),
        helper.make_node("Add", ["p", "x"], ["s"]),
        helper.make_node("MaxPool", ["s"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["mp"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [tensor("w1", w1), tensor("wd", wd), tensor("w2", w2), tensor("wf", wf), tensor("bf", bf)]
    return make_model(nodes, [("x", shape)], [("y", (1, 10))], inits), shape


@pytest.mark.parametrize("target", ["host", "haswell"])
def test_residual_block_with_float_depthwise_and_gemm(target):
    """Integer 1x1 convs and Gemm, depthwise (integer with the host's VNNI kernel, float with the
    plain AVX2 one), residual add / maxpool / GAP in NHWC."""
    rng = np.random.default_rng(3)
    fp32, shape = _residual_model(rng)
    q = _quantize(fp32, shape, rng)
    # the Gemm's output is float (relative error); its int32 result and bias are exact
    assert _check(q, shape, rng, n_kernels=4 if target == "host" else 3, target=target) <= 1e-2


def _mobileone_block(rng: np.random.Generator) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A MobileOne training-form block: 1x1 conv -> relu -> (3x3 depthwise + 3x3 depthwise + 1x1
    depthwise + BatchNorm identity) -> relu -> 1x1 conv; the BatchNorm (a float op on the dequantized
    tensor) must stay NHWC with the rest."""
    c = 24
    shape = (1, 8, 10, 10)
    inits = [tensor("w0", (rng.standard_normal((c, 8, 1, 1)) / 3).astype(np.float32)),
             tensor("wa", (rng.standard_normal((c, 1, 3, 3)) / 3).astype(np.float32)),
             tensor("wb", (rng.standard_normal((c, 1, 3, 3)) / 3).astype(np.float32)),
             tensor("wc", (rng.standard_normal((c, 1, 1, 1))).astype(np.float32)),
             tensor("bb", (rng.standard_normal(c) * 0.2).astype(np.float32)),
             tensor("w2", (rng.standard_normal((16, c, 1, 1)) / 5).astype(np.float32))]
    for name, v in (("g", rng.uniform(0.5, 1.5, c)), ("be", rng.standard_normal(c) * 0.3), ("mu", rng.standard_normal(c) * 0.3),
                    ("var", rng.uniform(0.5, 2.0, c))):
        inits.append(tensor(name, v.astype(np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wa", "bb"], ["da"], pads=[1, 1, 1, 1], group=c),
        helper.make_node("Conv", ["ar", "wb"], ["db"], pads=[1, 1, 1, 1], group=c),
        helper.make_node("Conv", ["ar", "wc"], ["dc"], group=c),
        helper.make_node("BatchNormalization", ["ar", "g", "be", "mu", "var"], ["bn"]),
        helper.make_node("Add", ["da", "db"], ["s1"]), helper.make_node("Add", ["s1", "dc"], ["s2"]),
        helper.make_node("Add", ["s2", "bn"], ["s3"]), helper.make_node("Relu", ["s3"], ["sr"]),
        helper.make_node("Conv", ["sr", "w2"], ["y"]),
    ]
    return make_model(nodes, [("x", shape)], [("y", (1, 16, 10, 10))], inits), shape


def test_mobileone_block_batchnorm_branch_stays_nhwc():
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(5)
    fp32, shape = _mobileone_block(rng)
    q = _quantize(fp32, shape, rng)
    assert "BatchNormalization" in [n.op_type for n in q.graph.node]
    target = _host()
    with target:
        rewritten = tvm.transform.Sequential(int8.int8_passes(target))(from_onnx(q, keep_params_in_input=False))
    text = str(rewritten["main"])
    assert "R.nn.batch_norm" not in text
    # only the model input is transposed (to NHWC) and the last conv's output (back to NCHW)
    moves = [ln for ln in text.splitlines() if "R.permute_dims(lv" in ln and "(1, 10, 10" in ln or "R.permute_dims(lv" in ln and ", 10, 10)" in ln]
    assert len(moves) <= 2, moves
    assert _check(q, shape, rng, n_kernels=2) <= 1.0


def _dense_model(rng: np.random.Generator, matmul: bool, act: str, m: int = 1) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    k, n = 37, 50
    w = (rng.standard_normal((k, n)) / 6).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    inits = [tensor("w", w if matmul else np.ascontiguousarray(w.T)), tensor("b", b)]
    core = helper.make_node("MatMul", ["x", "w"], ["mm"]) if matmul else helper.make_node("Gemm", ["x", "w", "b"], ["mm"], transB=1)
    nodes = [core]
    src = "mm"
    if matmul:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["mb"]))
        src = "mb"
    nodes.append(_act(act, src, "z", inits))
    nodes.append(helper.make_node("Mul", ["z", "two"], ["y"]))  # a float consumer: the layer's output stays quantized
    inits.append(tensor("two", np.array(2.0, np.float32)))
    return make_model(nodes, [("x", (m, k))], [("y", (m, n))], inits), (m, k)


@pytest.mark.parametrize("matmul,act,m", [(False, "relu", 1), (True, "none", 3), (False, "clip", 4)])
def test_dense_matches_onnxruntime(matmul, act, m):
    rng = np.random.default_rng(11 + m)
    fp32, shape = _dense_model(rng, matmul, act, m)
    q = _quantize(fp32, shape, rng)
    kinds = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in kinds
    # output = 2 * DQ(y_q): one step is 2 * s_y; compare in the quantized layer's steps
    import onnxruntime as ort
    import tvm

    vm, kernels = _compile(q)
    assert kernels == ["edgec_int8_dense"]
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    init = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_q")]
    step = 2.0 * float(init[dq[-1].input[1]])
    for _ in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert float(np.abs(got - ref).max()) <= step * 1.0001


def _exact_conv(x: np.ndarray, w: np.ndarray, conv: int8.QConv) -> np.ndarray:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.strides, conv.dilation
    pt, pl, pb, pr = conv.padding
    oh, ow = conv.out_hw
    xp = np.full((1, conv.height + pt + pb, conv.width + pl + pr, conv.in_channels), conv.x_zero_point, np.int64)
    xp[:, pt:pt + conv.height, pl:pl + conv.width] = x
    acc = np.zeros((1, oh, ow, conv.out_channels), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            acc += np.einsum("nhwc,kc->nhwk", patch, w[:, :, i, j].astype(np.int64))
    return acc


KERNEL_CASES = [
    int8.QConv(10, 10, 8, 16, (3, 3), (1, 1), (1, 1, 1, 1), x_zero_point=7, out_zero_point=3, lo=3, hi=255),
    int8.QConv(11, 9, 5, 21, (3, 3), (2, 2), (1, 0, 1, 2), x_zero_point=100, out_zero_point=128),
    int8.QConv(7, 7, 64, 40, (1, 1), x_zero_point=0, hi=200),
    int8.QConv(13, 13, 6, 33, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), x_zero_point=255, out_zero_point=255),
    int8.QConv(1, 3, 160, 100, x_zero_point=12, out_dtype="float32", lo=-math.inf, hi=math.inf),
    int8.QConv(1, 2, 20, 17, x_zero_point=1, out_dtype="float32", lo=0.0, hi=math.inf),
    int8.QConv(20, 17, 3, 16, (7, 7), (2, 2), (3, 3, 2, 3), x_zero_point=9, out_zero_point=5),  # an RGB stem
    # the stem as `edgec quantize` pads it: 4 input channels, the 4th with zero weights
    int8.QConv(18, 18, 4, 8, (7, 7), (2, 2), (3, 3, 3, 3), x_zero_point=200, out_zero_point=0, used_channels=3),
]


#: micro-kernels this host runs: its own (AVX-512 VNNI), the plain widening kernel of an AVX2 core
#: (as on ARM cores without the dot-product extension), and variants with the fixed-point epilogue
#: and with signed (x - 128) activations, which is the arithmetic of the ARM micro-kernels
HOST_MICRO = {
    "vnni": ("host", int8.VNNI),
    "vnni-fixed": ("host", dataclasses.replace(int8.VNNI, fixed_point=True)),
    "generic256": ("haswell", int8.generic_kernel(256, 16)),
    "generic256-signed-fixed": ("haswell", dataclasses.replace(int8.generic_kernel(256, 16, fixed_point=True), act_dtype="int8")),
    # window rows flattened to KW*C taps (row_flat: the sdot kernel's small-channel convs), on vpdpbusd
    "vnni-flat-rows": ("host", dataclasses.replace(int8.VNNI, flat_rows=True, fixed_point=True)),
}


def kernel_inputs(conv: int8.QConv, tile: int8.Tile, rng: np.random.Generator):
    """``(conv with the micro-kernel's epilogue, kernel arguments, reference output)``: random
    uint8 input, int8 weights, int32 bias, per-channel scales; the reference is int64 numpy."""
    x = rng.integers(0, 256, (1, conv.height, conv.width, conv.in_channels)).astype(np.uint8)
    w = rng.integers(-128, 128, (conv.out_channels, conv.in_channels) + conv.kernel).astype(np.int8)
    w[:, conv.taps_channels:] = 0
    bq = rng.integers(-5000, 5000, conv.out_channels).astype(np.int32)
    sw = rng.random(conv.out_channels) * 0.01 + 1e-3
    sy = 0.5 if conv.out_dtype == "uint8" else None
    if sy is not None and tile.micro.fixed_point:
        conv = dataclasses.replace(conv, shift=int8.requant_shift(0.02 * sw / sy))
        assert conv.shift > 0
    rq = int8.requant_constants(w, sw, 0.02, conv.x_zero_point, None, bq, 0.02 * sw, sy, tile, conv.shift)
    oh, ow = conv.out_hw
    args = [x, int8.pack_conv_weight(w, conv, tile), rq.ib, rq.m, rq.fb, np.zeros((1, oh, ow, conv.out_channels), conv.out_dtype)]
    acc = _exact_conv(x, w, conv) - conv.x_zero_point * w.reshape(conv.out_channels, -1).astype(np.int64).sum(1) + bq
    f = acc * (0.02 * sw)
    ref = np.clip(np.round(f / sy) + conv.out_zero_point, conv.lo, conv.hi) if sy is not None else np.clip(f, conv.lo, conv.hi)
    return conv, args, ref


def check_kernel_output(conv: int8.QConv, got: np.ndarray, ref: np.ndarray) -> None:
    if conv.out_dtype == "uint8":
        diff = np.abs(got.astype(np.int64) - ref)
        assert diff.max() <= 1  # float32 / fixed-point epilogue vs float64 reference: ties may round apart
        assert (diff > 0).mean() < 0.01
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def run_kernel(conv: int8.QConv, tile: int8.Tile, run, rng: np.random.Generator) -> None:
    """Check one compiled kernel against the int64 numpy reference; ``run(conv, args) -> out``."""
    conv, args, ref = kernel_inputs(conv, tile, rng)
    got = run(conv, args)
    check_kernel_output(conv, got, ref)


@pytest.mark.parametrize("micro", list(HOST_MICRO))
@pytest.mark.parametrize("conv", KERNEL_CASES, ids=lambda c: f"{c.height}x{c.width}x{c.in_channels}to{c.out_channels}_k{c.kernel[0]}_{c.out_dtype}")
def test_kernel_exact_integer_arithmetic(conv, micro):
    """The scheduled kernel (tensorized vpdpbusd or the plain widening kernel, padding, signed
    activations, float or fixed-point epilogue) against an int64 numpy reference."""
    import tvm

    target_name, mk = HOST_MICRO[micro]
    tgt = _target(target_name)
    tile = int8.choose_tile(conv, mk)
    dev = tvm.cpu()

    def run(conv, args):
        lib = tvm.compile(tvm.IRModule({"main": int8.conv_primfunc(conv, tile)}), target=tgt)
        t = [tvm.runtime.tensor(a, dev) for a in args]
        lib(*t)
        return t[-1].numpy()

    run_kernel(conv, tile, run, np.random.default_rng(conv.in_channels))


def _exact_depthwise(x: np.ndarray, w: np.ndarray, conv: int8.QConv) -> np.ndarray:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.strides, conv.dilation
    pt, pl, pb, pr = conv.padding
    oh, ow = conv.out_hw
    xp = np.full((conv.height + pt + pb, conv.width + pl + pr, conv.in_channels), conv.x_zero_point, np.int64)
    xp[pt:pt + conv.height, pl:pl + conv.width] = x[0]
    acc = np.zeros((oh, ow, conv.in_channels), np.int64)
    for i in range(kh):
        for j in range(kw):
            acc += xp[i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] * w[:, 0, i, j].astype(np.int64)
    return acc[None]


DW_CASES = [
    int8.QConv(12, 12, 32, 32, (3, 3), (1, 1), (1, 1, 1, 1), x_zero_point=3, out_zero_point=2, lo=2),
    int8.QConv(14, 14, 48, 48, (3, 3), (2, 2), (0, 0, 1, 1), x_zero_point=130),
    int8.QConv(13, 11, 21, 21, (5, 5), (2, 2), (2, 2, 2, 2), x_zero_point=200, out_zero_point=100),
    int8.QConv(7, 7, 16, 16, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), x_zero_point=255, out_zero_point=255),
]


@pytest.mark.parametrize("micro", ["vnni", "generic256-signed-fixed"])
@pytest.mark.parametrize("conv", DW_CASES, ids=lambda c: f"{c.height}x{c.width}x{c.in_channels}_k{c.kernel[0]}s{c.strides[0]}")
def test_depthwise_kernel_exact_integer_arithmetic(conv, micro):
    """The integer depthwise kernel (float and fixed-point epilogue) against int64 numpy."""
    import tvm

    target_name, mk = HOST_MICRO[micro]
    tile = int8.choose_dw_tile(conv, mk)
    assert tile.micro.act_shift == 0 and tile.micro.fixed_point == mk.fixed_point and tile.micro.lanes == mk.lanes
    rng = np.random.default_rng(conv.in_channels)
    x = rng.integers(0, 256, (1, conv.height, conv.width, conv.in_channels)).astype(np.uint8)
    w = rng.integers(-128, 128, (conv.out_channels, 1) + conv.kernel).astype(np.int8)
    bq = rng.integers(-5000, 5000, conv.out_channels).astype(np.int32)
    sw = rng.random(conv.out_channels) * 0.01 + 1e-3
    if mk.fixed_point:
        conv = dataclasses.replace(conv, shift=int8.requant_shift(0.02 * sw / 0.5))
    rq = int8.requant_constants(w, sw, 0.02, conv.x_zero_point, None, bq, 0.02 * sw, 0.5, tile, conv.shift)
    oh, ow = conv.out_hw
    args = [x, int8.pack_dw_weight(w, tile), rq.ib, rq.m, rq.fb, np.zeros((1, oh, ow, conv.out_channels), "uint8")]
    lib = tvm.compile(tvm.IRModule({"main": int8.dw_primfunc(conv, tile)}), target=_target(target_name))
    t = [tvm.runtime.tensor(a) for a in args]
    lib(*t)
    acc = _exact_depthwise(x, w, conv) - conv.x_zero_point * w.reshape(conv.out_channels, -1).astype(np.int64).sum(1) + bq
    ref = np.clip(np.round(acc * 0.02 * sw / 0.5) + conv.out_zero_point, conv.lo, conv.hi)
    check_kernel_output(conv, t[-1].numpy(), ref)


def _depthwise_model(rng: np.random.Generator, c: int, hw: int, stride: int, pads: list[int], k: int):
    """conv 1x1 (8 -> c) -> relu -> depthwise k x k (+ bias) -> clip(0, 6)."""
    w1 = (rng.standard_normal((c, 8, 1, 1)) / 3).astype(np.float32)
    wd = (rng.standard_normal((c, 1, k, k)) / 3).astype(np.float32)
    bd = (rng.standard_normal(c) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "wd", "bd"], ["d"], pads=pads, strides=[stride] * 2, group=c, kernel_shape=[k, k]),
             helper.make_node("Clip", ["d", "lo", "hi"], ["y"])]
    oh = (hw + pads[0] + pads[2] - k) // stride + 1
    ow = (hw + pads[1] + pads[3] - k) // stride + 1
    inits = [tensor("w1", w1), tensor("wd", wd), tensor("bd", bd), tensor("lo", np.array(0.0, np.float32)),
             tensor("hi", np.array(6.0, np.float32))]
    return make_model(nodes, [("x", (1, 8, hw, hw))], [("y", (1, c, oh, ow))], inits), (1, 8, hw, hw)


DW_MODELS = [(24, 14, 2, [0, 0, 1, 1], 3), (20, 9, 1, [1, 1, 1, 1], 3), (32, 12, 1, [2, 2, 2, 2], 5)]


@pytest.mark.parametrize("fixed_point", [False, True])
@pytest.mark.parametrize("case", DW_MODELS, ids=lambda c: f"c{c[0]}_k{c[4]}s{c[2]}")
def test_depthwise_layers_match_onnxruntime(case, fixed_point, monkeypatch):
    """Depthwise QDQ convs through the rewrite (as on ARM, where micro-kernels take them; forced on
    this host's VNNI micro-kernel here) match onnxruntime within one step."""
    orig = int8.micro_kernel
    monkeypatch.setattr(int8, "micro_kernel", lambda t: dataclasses.replace(orig(t), depthwise=True, depthwise_max_taps=1 << 20, fixed_point=fixed_point))
    rng = np.random.default_rng(case[0])
    fp32, shape = _depthwise_model(rng, *case)
    q = _quantize(fp32, shape, rng)
    assert _check(q, shape, rng, n_kernels=2) <= 1.0


def _add_model(rng: np.random.Generator, act: bool):
    """conv 1x1 -> relu, + the input (a residual add of two quantized tensors) [-> relu] -> conv 1x1."""
    c, hw = 12, 10
    w1 = (rng.standard_normal((c, c, 1, 1)) / 3).astype(np.float32)
    w2 = (rng.standard_normal((16, c, 1, 1)) / 3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Add", ["ar", "x"], ["s"])]
    src = "s"
    if act:
        nodes.append(helper.make_node("Relu", ["s"], ["sr"]))
        src = "sr"
    nodes.append(helper.make_node("Conv", [src, "w2"], ["y"]))
    shape = (1, c, hw, hw)
    return make_model(nodes, [("x", shape)], [("y", (1, 16, hw, hw))], [tensor("w1", w1), tensor("w2", w2)]), shape


@pytest.mark.parametrize("act", [False, True])
def test_integer_residual_add_matches_onnxruntime(act, monkeypatch):
    """quantize(DQ(a) + DQ(b)) in int32 (as on the ARM micro-kernels, forced here)."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    orig = int8.micro_kernel
    monkeypatch.setattr(int8, "micro_kernel", lambda t: dataclasses.replace(orig(t), fixed_point=True, integer_add=True))
    rng = np.random.default_rng(21 + act)
    fp32, shape = _add_model(rng, act)
    q = _quantize(fp32, shape, rng)
    target = _host()
    with target:
        rewritten = tvm.transform.Sequential(int8.int8_passes(target))(from_onnx(q, keep_params_in_input=False))
    assert "R.right_shift" in str(rewritten["main"])  # the add is integer
    assert _check(q, shape, rng, n_kernels=2) <= 1.0


def test_integer_add_constants():
    import numpy as np

    # (scales with no exact ties: where the float reference itself lands on x.5 it rounds either way)
    for sa, sb, sy in ((0.0213, 0.0377, 0.0419), (0.1031, 0.00117, 0.0097), (0.0511, 0.0493, 0.0557)):
        ra, rb = sa / sy, sb / sy
        shift = int(np.floor(np.log2(2.0**31 / (255.0 * (2.0 * (ra + rb) + 1.0)))))
        ma, mb = round(ra * 2**shift), round(rb * 2**shift)
        assert 255 * (ma + mb) + (255 << shift) + (1 << shift) < 2**31 and shift >= 12
        a, b = np.arange(256)[:, None], np.arange(256)[None, :]
        za, zb, zy = 3, 250, 17
        got = (a * ma + b * mb + (zy << shift) + (1 << (shift - 1)) - za * ma - zb * mb) >> shift
        ref = np.floor((sa * (a - za) + sb * (b - zb)) / sy + 0.5) + zy
        assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3


def test_depthwise_stays_float_without_the_flag(monkeypatch):
    rng = np.random.default_rng(1)
    fp32, shape = _depthwise_model(rng, *DW_MODELS[0])
    q = _quantize(fp32, shape, rng)
    orig = int8.micro_kernel
    monkeypatch.setattr(int8, "micro_kernel", lambda t: dataclasses.replace(orig(t), depthwise=False))
    assert _check(q, shape, rng, n_kernels=1) <= 1.0  # the 1x1 conv only


def test_host_depthwise_3x3_integer_5x5_float():
    """On this host (VNNI) 3x3 depthwise convs get the integer kernel, 5x5 ones stay float."""
    micro = int8.micro_kernel(_host())
    assert micro.depthwise and micro.depthwise_max_taps == 9
    for i, case in enumerate(DW_MODELS):
        rng = np.random.default_rng(40 + i)
        fp32, shape = _depthwise_model(rng, *case)
        q = _quantize(fp32, shape, rng)
        assert _check(q, shape, rng, n_kernels=2 if case[4] == 3 else 1) <= 1.0


@pytest.mark.parametrize("micro", [int8.VNNI, int8.SDOT, int8.generic_kernel(128, 32), int8.generic_kernel(256, 16)],
                         ids=lambda m: m.name)
def test_tiles_fit_registers_and_cover_the_output(micro):
    for ow in (1, 3, 7, 9, 14, 28, 36, 56, 72, 112):
        for k in (8, 16, 24, 40, 64, 96, 160, 1000):
            conv = int8.QConv(ow, ow, 16, k)
            t = int8.choose_tile(conv, micro)
            assert t.micro == micro
            assert t.tw * t.tc + t.tc + 1 <= micro.budget < micro.registers
            assert t.out_width % t.tw == 0 and t.out_width >= ow and t.out_width - ow < t.tw
            assert t.k_blocks % t.tc == 0 and t.k_blocks * micro.lanes >= k
            assert int8.fits_stack(t.tw * t.tc * micro.lanes * 4)  # the accumulator tile stays in registers


def test_sdot_by_element_tiles_and_flattened_rows():
    """``sdot`` by element on 16-channel multiples: the tile's registers include 4 weight vectors per
    channel block, and the dense 3x3 convs of ResNet / RepVGG get tiles without padded columns; the
    RGB stem (3 channels, or 4 with a zero-weight 4th) reduces over flattened rows, fewer groups."""
    sdot = int8.SDOT
    for hw, c in ((56, 64), (28, 128), (14, 256), (7, 512), (56, 48), (14, 192)):
        conv = int8.QConv(hw, hw, c, c, (3, 3), padding=(1, 1, 1, 1))
        assert int8.conv_block(conv, sdot) == 4
        t = int8.choose_tile(conv, sdot)
        assert t.tw * t.tc + 4 * t.tc + 1 <= sdot.budget and t.out_width == hw and t.k_blocks * 4 == c
    assert int8.conv_block(int8.QConv(14, 14, 24, 24, (3, 3)), sdot) == 1  # 24 channels: 6 groups
    stem = int8.QConv(224, 224, 4, 64, (7, 7), (2, 2), (3, 3, 3, 3), used_channels=3)
    assert int8.row_flat(stem, sdot) and not int8.row_flat(stem, int8.VNNI)
    assert not int8.row_flat(dataclasses.replace(stem, used_channels=0), sdot)  # 4 channels: nothing to save
    assert not int8.row_flat(int8.QConv(16, 16, 3, 16, (3, 3), (2, 2)), sdot)  # 3 * ceil(9/4) == 9 groups
    t = int8.choose_tile(stem, sdot)
    assert t.tw * t.tc + t.tc + t.tw <= sdot.budget  # every input broadcast of the tile stays live
    w = np.arange(64 * 4 * 7 * 7).reshape(64, 4, 7, 7).astype(np.int8)
    w[:, 3] = 0
    assert int8.used_channels(w) == 3
    flat = int8.flat_weight(w, 3)
    assert flat.shape == (64, 21, 7, 1) and flat[5, 2 * 3 + 1, 4, 0] == w[5, 1, 4, 2]
    assert int8.pack_conv_weight(w, stem, t).shape == (t.k_blocks, 7, 1, 6, 4, 4)


@pytest.mark.parametrize("conv", [int8.QConv(112, 112, 16, 96), int8.QConv(14, 14, 64, 256, (3, 3), padding=(1, 1, 1, 1)),
                                  int8.QConv(9, 9, 5, 21, (3, 3), strides=(2, 2), padding=(1, 0, 1, 2))],
                         ids=lambda c: f"{c.in_channels}to{c.out_channels}_k{c.kernel[0]}")
def test_kernel_allocates_no_workspace_per_tile(conv):
    """The accumulator tile and the intrinsic's operands are stack values (LLVM registers), not a
    ``TVMBackendAllocWorkspace`` call per tile of the parallel loop (which cost up to 2.5x on
    short reductions)."""
    import tvm

    tile = int8.choose_tile(conv)
    func = int8.conv_primfunc(conv, tile)
    llvm_ir = tvm.tirx.build(tvm.IRModule({"main": func}), target=_host()).inspect_source("ll")
    # workspace allocations: "%name = tail call ptr %fn(i32 1 (cpu), i32 %dev_id, i64 bytes, ...)"
    allocs = [ln.split("=")[0].strip() for ln in llvm_ir.splitlines() if "tail call ptr %" in ln and "(i32 1, i32 %dev_id, i64" in ln]
    assert allocs in ([], ["%pad"]), allocs  # at most the input copy, once per call (on the stack when small)
    assert allocs == [] or int8.needs_pad(conv, tile)


def test_pack_weight_layout():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (21, 6, 3, 3)).astype(np.int8)
    tile = int8.Tile(tw=4, tc=2, out_width=8, k_blocks=2, pixel_blocks=2)
    p = int8.pack_weight(w, tile)
    assert p.shape == (2, 3, 3, 2, 16, 4) and p.dtype == np.int8
    for o, c, i, j in [(0, 0, 0, 0), (20, 5, 2, 1), (17, 3, 1, 2)]:
        assert p[o // 16, i, j, c // 4, o % 16, c % 4] == w[o, c, i, j]
    assert not p[1, :, :, :, 5:].any()  # output channels 21..31 are zero
    assert not p[:, :, :, 1, :, 2:].any()  # input channels 6, 7 are zero
    # sdot: 4 lanes x 4 taps; the plain kernel: int16, 4 lanes x 1 tap
    p = int8.pack_weight(w, int8.Tile(4, 2, 8, 6, 0, int8.SDOT))
    assert p.shape == (6, 3, 3, 2, 4, 4) and p[20 // 4, 2, 1, 5 // 4, 20 % 4, 5 % 4] == w[20, 5, 2, 1] and not p[5, :, :, :, 1:].any()
    g = int8.generic_kernel(128, 32)
    p = int8.pack_weight(w, int8.Tile(4, 2, 8, 6, 0, g))
    assert p.shape == (6, 3, 3, 6, 4, 1) and p.dtype == np.int16 and p[20 // 4, 2, 1, 5, 0, 0] == w[20, 5, 2, 1]


def test_micro_kernel_chosen_from_target_features():
    import tvm

    from edgec.targets import get_target

    assert int8.micro_kernel(_host()) == int8.VNNI  # this host has AVX-512 VNNI
    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert int8.micro_kernel(tvm.target.Target({**x86, "mcpu": "cascadelake"})) == int8.VNNI
    for mcpu in ("haswell", "skylake-avx512"):  # no VNNI: the float path (the plain kernel measured slower there)
        assert int8.micro_kernel(tvm.target.Target({**x86, "mcpu": mcpu})) is None
        assert int8.int8_passes(tvm.target.Target({**x86, "mcpu": mcpu})) == []
    neon = int8.generic_kernel(128, 32, fixed_point=True, depthwise=True, integer_add=True)
    for name, want in (("cortex-a76", int8.SDOT), ("cortex-a72", neon), ("cortex-a53", neon), ("arm64", neon)):
        assert int8.micro_kernel(get_target(name).tvm_target()) == want, name
    assert int8.micro_kernel(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"})) == int8.SDOT
    assert int8.micro_kernel(tvm.target.Target({"kind": "cuda"})) is None
    assert int8.int8_passes(tvm.target.Target({"kind": "cuda"})) == []
    assert int8.has_vnni(_host()) and not int8.has_vnni(tvm.target.Target({**x86, "mcpu": "haswell"}))


def test_requant_shift():
    assert int8.requant_shift([0.3, 0.001]) == 31  # 0.3 < 2^-1: M(0.3) = 0.3 * 2^31 in [2^29, 2^30]
    assert 2**29 <= 0.3 * 2**31 <= 2**30
    assert int8.requant_shift([0.999]) == 30
    assert int8.requant_shift([1.0]) == 0 and int8.requant_shift([2.5]) == 0  # >= 1: float epilogue
    assert int8.requant_shift([1e-9]) == 0  # shift 59 > 50
    assert int8.requant_shift([0.0, 0.5]) == 0


def test_int8_activations_and_float_models_are_left_alone():
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(5)
    fp32, shape = _conv_model(8, 16, 3, 1, [1, 1, 1, 1], (8, 8), "relu", True, rng)
    cal = CalibrationSet("random", tuple(Sample(("x",), (rng.standard_normal(shape).astype(np.float32),)) for _ in range(4)))
    s8 = quantize_model(fp32, cal, QuantConfig(activations="int8", bias_correction=False)).model
    target = _host()
    for proto in (fp32, s8):
        mod = from_onnx(proto, keep_params_in_input=False)
        with target:
            out = tvm.transform.Sequential(int8.int8_passes(target))(mod)
        assert not [gv for gv, _ in out.functions_items() if gv.name_hint.startswith("edgec_int8")]


def test_edgec_compile_command_on_a_qdq_model(tmp_path, run_cli):
    """`edgec compile` builds a QDQ model with the integer kernels and its verification passes."""
    import json

    rng = np.random.default_rng(9)
    fp32, shape = _residual_model(rng)
    q = _quantize(fp32, shape, rng)
    path = tmp_path / "m.int8.onnx"
    onnx.save(q, str(path))
    code, out, err = run_cli("compile", str(path), "-t", "host", "-o", str(tmp_path / "build"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (tmp_path / "build").is_dir()
    assert report["manifest"]["verification"]["passed"] is True


@pytest.mark.slow
def test_zoo_mcunet_int8_end_to_end(zoo_onnx):
    """mcunet quantized on photos: every dense conv and the classifier on integer kernels; output
    within onnxruntime's own int8-vs-reference deviation (x2) on fixed inputs."""
    import onnxruntime as ort
    import tvm

    from edgec.calibration import BuiltinDataset
    from edgec.verify import input_specs, session

    fp32 = zoo_onnx("mcunet", fold_bn=True)
    specs = input_specs(fp32)
    q = quantize_model(fp32, BuiltinDataset("photos").load(specs, 8), QuantConfig(activations="uint8")).model
    vm, kernels = _compile(q)
    n_dense = sum(1 for n in q.graph.node if n.op_type == "Conv" and not any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert len(kernels) >= n_dense  # + the Gemm
    ref_sess = session(q)
    int8_sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.standard_normal(specs[0].shape).astype(np.float32)
        ref = ref_sess.run(None, {specs[0].name: x})[0]
        own = float(np.abs(int8_sess.run(None, {specs[0].name: x})[0] - ref).max())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert float(np.abs(got - ref).max()) <= 2 * own + 1e-3 * float(np.abs(ref).max())


def test_elementwise_uint8_vectors_do_not_straddle_channel_rows():
    """The QDQ residual adds the integer kernels leave in float (dequantize, add, quantize on uint8
    NHWC tensors with 48 channels): the vector width divides the channel count (64 uint8 lanes over
    48 channels turned every lane into a scalar access)."""
    from tvm import te, tirx

    from edgec.schedules import cpu

    a = te.placeholder((1, 5, 5, 48), "uint8", name="a")
    b = te.placeholder((1, 5, 5, 48), "uint8", name="b")
    y = te.compute(a.shape, lambda *i: tirx.max(a(*i).astype("float32") * 0.5 + b(*i).astype("float32") * 0.25, 0.0).astype("uint8"),
                   name="y")
    sch = cpu.schedule_injective(te.create_prim_func([a, b, y]), _host())
    loops = [l for l in sch.get_loops(sch.get_sblock("y")) if sch.get(l).kind == tirx.ForKind.VECTORIZED]
    assert len(loops) == 1
    width = int(sch.get(loops[0]).extent)
    assert width >= 4 and 48 % width == 0


def _repvgg_block(rng: np.random.Generator, pool: bool = False) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A RepVGG training-form block: 1x1 conv -> relu [-> 3x3 max pool] -> (3x3 conv + 1x1 conv +
    BatchNorm identity) -> relu -> 1x1 conv.  The three-way sum with the float batch norm is one
    integer element-wise kernel on the ARM micro-kernels (QSum), the pool a uint8 pool."""
    c, hw = 16, 10
    shape = (1, 8, hw, hw)
    inits = [tensor("w0", (rng.standard_normal((c, 8, 1, 1)) / 3).astype(np.float32)),
             tensor("wa", (rng.standard_normal((c, c, 3, 3)) / 12).astype(np.float32)),
             tensor("ba", (rng.standard_normal(c) * 0.2).astype(np.float32)),
             tensor("wb", (rng.standard_normal((c, c, 1, 1)) / 4).astype(np.float32)),
             tensor("w2", (rng.standard_normal((12, c, 1, 1)) / 5).astype(np.float32))]
    # gamma of both signs: negative per-channel multipliers
    for name, v in (("g", rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) % 3 == 0, -1, 1)), ("be", rng.standard_normal(c) * 0.3),
                    ("mu", rng.standard_normal(c) * 0.3), ("var", rng.uniform(0.5, 2.0, c))):
        inits.append(tensor(name, v.astype(np.float32)))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["ar"])]
    src = "ar"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["ar"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        src = "p"
        hw = (hw + 2 - 3) // 2 + 1
    nodes += [
        helper.make_node("Conv", [src, "wa", "ba"], ["da"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", [src, "wb"], ["db"]),
        helper.make_node("BatchNormalization", [src, "g", "be", "mu", "var"], ["bn"]),
        helper.make_node("Add", ["da", "db"], ["s1"]), helper.make_node("Add", ["s1", "bn"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["sr"]), helper.make_node("Conv", ["sr", "w2"], ["y"]),
    ]
    return make_model(nodes, [("x", shape)], [("y", (1, 12, hw, hw))], inits), shape


@pytest.mark.parametrize("pool", [False, True], ids=["sum", "pool_sum"])
def test_integer_sum_with_batchnorm_and_uint8_pool(pool, monkeypatch):
    """quantize(relu(DQ(a) + DQ(b) + BN(DQ(x)))) in int32 with per-channel multipliers, and
    quantize(max_pool(DQ(x))) as a uint8 pool (as on the ARM micro-kernels, forced here): within one
    output step of onnxruntime, no float op left between the integer kernels."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    orig = int8.micro_kernel
    monkeypatch.setattr(int8, "micro_kernel", lambda t: dataclasses.replace(orig(t), fixed_point=True, integer_add=True))
    rng = np.random.default_rng(31 + pool)
    fp32, shape = _repvgg_block(rng, pool)
    q = _quantize(fp32, shape, rng)
    assert "BatchNormalization" in [n.op_type for n in q.graph.node]
    target = _host()
    with target:
        rewritten = tvm.transform.Sequential(int8.int8_passes(target))(from_onnx(q, keep_params_in_input=False))
    lines = str(rewritten["main"]).splitlines()
    assert not [ln for ln in lines if "R.nn.batch_norm" in ln or "R.add(" in ln and 'dtype="float32"' in ln]
    assert len([ln for ln in lines if "R.right_shift" in ln]) == 1
    assert len([ln for ln in lines if "R.dequantize(" in ln]) == 1  # the model output only
    pools = [ln for ln in lines if "R.nn.max_pool2d" in ln]
    assert len(pools) == pool and all('dtype="uint8"' in ln and 'layout="NHWC"' in ln for ln in pools)
    assert _check(q, shape, rng, n_kernels=4) <= 1.0


def test_integer_sum_constants():
    """QSum's fixed-point numbers against the float sum, over every uint8 value of each term."""
    rng = np.random.default_rng(7)
    for sa, sx, sy in ((0.0213, 0.0377, 0.0419), (0.1031, 0.00117, 0.0097)):
        gain, bias = rng.uniform(-1.5, 1.5, 4), rng.standard_normal(4) * 0.3
        ra, rx = sa / sy, sx * np.abs(gain).max() / sy
        denom = 255.0 * (2.0 * (ra + rx) + 1.0) + float(np.abs(bias / sy).max()) + 1.0
        shift = int(np.floor(np.log2(2.0**31 / denom)))
        ma, mx = round(ra * 2**shift), np.round(sx * gain / sy * 2**shift).astype(np.int64)
        za, zx, zy = 3, 250, 17
        c = np.round(bias / sy * 2**shift).astype(np.int64) + (zy << shift) + (1 << (shift - 1)) - za * ma - zx * mx
        a, x = np.arange(256)[:, None, None], np.arange(256)[None, :, None]
        got = (a * ma + x * mx + c) >> shift
        assert np.abs(a * ma + x * mx + c).max() < 2**31
        ref = np.floor((sa * (a - za) + (sx * (x - zx)) * gain + bias) / sy + 0.5) + zy
        assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3
