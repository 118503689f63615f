"""Fusion passes: numeric equivalence vs onnxruntime, rejections with reasons, the fuse pass and CLI."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import make_model, tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from test_reparam import Builder, assert_equivalent, ops, repvgg_block, run_pass

from edgec import ir as eir

PROPERTY = settings(max_examples=int(os.environ.get("EDGEC_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


# ------------------------------------------------------------------------------------------------
# fold-bn


@PROPERTY
@given(
    k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), groups=st.sampled_from(["1", "dw", "2"]),
    bias=st.booleans(), pad=st.booleans(), transpose=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_fold_bn_into_conv_and_conv_transpose(k, stride, groups, bias, pad, transpose, seed) -> None:
    cin, cout = (6, 6) if groups == "dw" else (4, 6)
    g = {"1": 1, "dw": 6, "2": 2}[groups]
    b = Builder(np.random.default_rng(seed))
    p = (k // 2) * pad
    size = 7
    if transpose:
        w = b.init("w", b.rng.standard_normal((cin, cout // g, k, k)))
        ins = ["x", w] + ([b.init("b", b.rng.standard_normal(cout))] if bias else [])
        c = b.op("ConvTranspose", ins, strides=[stride] * 2, pads=[p] * 4, group=g)
        out = (size - 1) * stride - 2 * p + k
    else:
        c = b.conv("x", cin, cout, k, stride=stride, groups=g, pads=[p] * 4, bias=bias)
        out = conv_out(size, k, stride, p)
    y = b.bn(c, cout)
    proto = b.model([("x", (2, cin, size, size))], [(y, (2, cout, out, out))])
    result, got = run_pass(proto, "fold-bn")
    assert ops(got) == {"ConvTranspose" if transpose else "Conv": 1}
    assert result.stats.matched == {("convtranspose" if transpose else "conv") + "-bn": 1}
    assert_equivalent(proto, got)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_fold_bn_into_gemm(trans_b: int, with_c: bool) -> None:
    b = Builder(np.random.default_rng(trans_b + 2 * with_c))
    w = b.rng.standard_normal((5, 3) if trans_b else (3, 5))
    ins = ["x", b.init("B", w)] + ([b.init("C", b.rng.standard_normal(5))] if with_c else [])
    y = b.bn(b.op("Gemm", ins, transB=trans_b, alpha=0.7, beta=1.3), 5)
    proto = b.model([("x", (4, 3))], [(y, (4, 5))])
    result, got = run_pass(proto, "fold-bn")
    assert ops(got) == {"Gemm": 1} and result.stats.matched == {"gemm-bn": 1}
    assert_equivalent(proto, got)


def test_fold_bn_before_conv_only_without_padding() -> None:
    b = Builder(np.random.default_rng(11))
    y = b.conv(b.bn("x", 4), 4, 6, 3, pads=[0, 0, 0, 0], groups=2)
    proto = b.model([("x", (1, 4, 8, 8))], [(y, (1, 6, 6, 6))])
    result, got = run_pass(proto, "fold-bn")
    assert ops(got) == {"Conv": 1} and result.stats.matched == {"bn-conv": 1}
    assert_equivalent(proto, got)
    b = Builder(np.random.default_rng(12))
    y = b.conv(b.bn("x", 4), 4, 6, 3)  # padded: the shift would be wrong at the borders
    proto = b.model([("x", (1, 4, 8, 8))], [(y, (1, 6, 8, 8))])
    result, got = run_pass(proto, "fold-bn")
    assert not result.modified and ops(got) == ops(proto)
    assert "not exact at the borders" in result.stats.rejected[0].reason


def test_fold_bn_rejects_conv_used_elsewhere() -> None:
    b = Builder(np.random.default_rng(13))
    c = b.conv("x", 3, 4, 3)
    y = b.bn(c, 4)
    z = b.op("Relu", [c])
    proto = b.model([("x", (1, 3, 5, 5))], [(y, (1, 4, 5, 5)), (z, (1, 4, 5, 5))])
    result, got = run_pass(proto, "fold-bn")
    assert not result.modified and ops(got) == ops(proto)
    assert "used elsewhere" in result.stats.rejected[0].reason


# ------------------------------------------------------------------------------------------------
# fold-scale


@pytest.mark.parametrize(
    "op, const_first, shape",
    [("Mul", False, (4, 1, 1)), ("Mul", True, ()), ("Add", False, (1, 4, 1, 1)), ("Sub", False, (4, 1, 1)),
     ("Sub", True, (4, 1, 1)), ("Div", False, (4, 1, 1))],
)
def test_fold_scale_after_conv(op: str, const_first: bool, shape) -> None:
    b = Builder(np.random.default_rng(14))
    c = b.conv("x", 3, 4, 3, stride=2)
    k = b.init("k", b.rng.uniform(0.5, 2.0, shape))
    y = b.op(op, [k, c] if const_first else [c, k])
    proto = b.model([("x", (1, 3, 9, 9))], [(y, (1, 4, 5, 5))])
    result, got = run_pass(proto, "fold-scale")
    assert ops(got) == {"Conv": 1}, result.stats.rejected
    assert_equivalent(proto, got)


def test_fold_scale_before_conv_and_rejections() -> None:
    b = Builder(np.random.default_rng(15))
    m = b.op("Mul", ["x", b.init("k", b.rng.uniform(0.5, 2.0, (3, 1, 1)))])
    y = b.conv(m, 3, 4, 3)  # padded: a scale keeps zero padding zero, so this is exact
    proto = b.model([("x", (1, 3, 6, 6))], [(y, (1, 4, 6, 6))])
    result, got = run_pass(proto, "fold-scale")
    assert result.stats.matched == {"mul-conv": 1} and ops(got) == {"Conv": 1}
    assert_equivalent(proto, got)
    # a constant that varies over space is not a per-channel scale
    b = Builder(np.random.default_rng(16))
    c = b.conv("x", 3, 4, 3)
    y = b.op("Mul", [c, b.init("k", b.rng.standard_normal((1, 1, 6, 6)))])
    proto = b.model([("x", (1, 3, 6, 6))], [(y, (1, 4, 6, 6))])
    result, got = run_pass(proto, "fold-scale")
    assert not result.modified and "not per-channel" in result.stats.rejected[0].reason


# ------------------------------------------------------------------------------------------------
# matmul-add-to-gemm, fold-pad, cancel-transpose-reshape, fuse-activation


def test_matmul_add_to_gemm() -> None:
    b = Builder(np.random.default_rng(17))
    y = b.op("Add", [b.op("MatMul", ["x", b.init("B", b.rng.standard_normal((6, 3)))]), b.init("C", b.rng.standard_normal(3))])
    proto = b.model([("x", (5, 6))], [(y, (5, 3))])
    result, got = run_pass(proto, "matmul-add-to-gemm")
    assert ops(got) == {"Gemm": 1}
    assert_equivalent(proto, got)
    b = Builder(np.random.default_rng(18))
    y = b.op("Add", [b.op("MatMul", ["x", b.init("B", b.rng.standard_normal((6, 3)))]), b.init("C", b.rng.standard_normal(3))])
    proto = b.model([("x", (2, 5, 6))], [(y, (2, 5, 3))])
    result, got = run_pass(proto, "matmul-add-to-gemm")
    assert not result.modified and "rank 3" in result.stats.rejected[0].reason


@pytest.mark.parametrize(
    "consumer, value, mode, folds",
    [("Conv", 0.0, "constant", True), ("AveragePool", 0.0, "constant", True), ("MaxPool", -np.inf, "constant", True),
     ("MaxPool", 0.0, "constant", False), ("Conv", 0.0, "reflect", False), ("Conv", 1.0, "constant", False)],
)
def test_fold_pad(consumer: str, value: float, mode: str, folds: bool) -> None:
    b = Builder(np.random.default_rng(19))
    pads = b.nodes.append  # noqa: F841 - keep the builder API in view
    b.inits.append(tensor("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)))
    b.inits.append(tensor("val", np.array(value, np.float32)))
    p = b.op("Pad", ["x", "pads", "val"], mode=mode)
    if consumer == "Conv":
        y = b.conv(p, 3, 4, 3, pads=[1, 0, 0, 1])
        shape = (1, 4, 9, 10)
    else:
        y = b.op(consumer, [p], kernel_shape=[3, 3], strides=[1, 1])
        shape = (1, 3, 7, 8)
    proto = b.model([("x", (1, 3, 6, 6))], [(y, shape)])
    result, got = run_pass(proto, "fold-pad")
    assert result.modified == folds, result.stats.rejected
    assert ("Pad" in ops(got)) != folds
    if not folds:
        assert result.stats.rejected
    assert_equivalent(proto, got)


def test_cancel_transpose_reshape() -> None:
    b = Builder(np.random.default_rng(20))
    t = b.op("Transpose", [b.op("Transpose", ["x"], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])  # cancels
    u = b.op("Transpose", [b.op("Transpose", [t], perm=[0, 2, 1, 3])], perm=[0, 1, 3, 2])  # merges
    b.inits.append(tensor("s1", np.array([1, 12, 5], np.int64)))
    b.inits.append(tensor("s2", np.array([1, -1], np.int64)))
    r = b.op("Reshape", [b.op("Reshape", [u, "s1"]), "s2"])
    b.inits.append(tensor("s3", np.array([1, 60], np.int64)))
    y = b.op("Reshape", [r, "s3"])
    proto = b.model([("x", (1, 3, 4, 5))], [(y, (1, 60))])
    result, got = run_pass(proto, "cancel-transpose-reshape")
    assert ops(got) == {"Transpose": 1, "Reshape": 1}, result.stats.matched
    assert result.stats.matched == {"transpose-transpose cancelled": 1, "transpose-transpose merged": 1,
                                    "reshape-reshape": 2}
    assert got.graph.output[0].name == y
    assert_equivalent(proto, got)
    # a Reshape to the shape its input already has goes away; one whose target copies a dim stays
    b = Builder(np.random.default_rng(21))
    b.inits += [tensor("same", np.array([2, 12], np.int64)), tensor("zero", np.array([0, 3, 4], np.int64)),
                tensor("flat", np.array([2, 12], np.int64))]
    h = b.op("Relu", [b.op("Reshape", ["x", "same"])])
    y = b.op("Reshape", [b.op("Reshape", [h, "zero"]), "flat"])
    z = b.op("Reshape", [b.op("Flatten", [h]), "zero"])
    proto = b.model([("x", (2, 12))], [(y, (2, 12)), (z, (2, 3, 4))])
    result, got = run_pass(proto, "cancel-transpose-reshape")
    assert result.stats.matched == {"identity reshape": 2, "reshape-reshape": 1}  # x->h and h->y
    assert "copies a dimension" in result.stats.rejected[0].reason
    assert_equivalent(proto, got)


def test_fuse_activation_hard_swish_and_relu() -> None:
    b = Builder(np.random.default_rng(21))
    b.inits += [tensor("three", np.array(3.0, np.float32)), tensor("zero", np.array(0.0, np.float32)),
                tensor("six", np.array(6.0, np.float32)), tensor("inf", np.array(np.inf, np.float32))]
    hs = b.op("Div", [b.op("Clip", [b.op("Add", ["x", "three"]), "zero", "six"]), "six"])
    y = b.op("Clip", [b.op("Mul", ["x", hs]), "zero", "inf"])
    z = b.op("Div", [b.op("Mul", ["x", b.op("Clip", [b.op("Add", ["x", "three"]), "zero", "six"])]), "six"])  # torch's form
    proto = b.model([("x", (2, 3, 4, 4))], [(y, (2, 3, 4, 4)), (z, (2, 3, 4, 4))])
    result, got = run_pass(proto, "fuse-activation")
    assert ops(got) == {"HardSwish": 2, "Relu": 1}, result.stats.matched
    # inputs around the kinks (-3, 0, 3) are exercised by the standard normal * several sigma
    assert_equivalent(proto, got)


# ------------------------------------------------------------------------------------------------
# fuse + CLI


def _mixed_model() -> onnx.ModelProto:
    b = Builder(np.random.default_rng(22))
    b.inits.append(tensor("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    x = b.op("Identity", ["x"])
    p = b.op("Pad", [x, "pads"])
    c = b.bn(b.conv(p, 3, 8, 3, pads=[0, 0, 0, 0]), 8)
    r = b.op("Relu", [c])
    blk = b.op("Relu", [b.sum_tree([b.bn(b.conv(r, 8, 8, 3, bias=False), 8), b.bn(b.conv(r, 8, 8, 1), 8), b.bn(r, 8)], [1])])
    s = b.op("Mul", [b.conv(blk, 8, 8, 1), b.init("k", b.rng.uniform(0.5, 2, (8, 1, 1)))])
    g = b.op("GlobalAveragePool", [s])
    b.inits.append(tensor("flat", np.array([1, 8], np.int64)))
    f = b.op("Reshape", [g, "flat"])
    y = b.op("Add", [b.op("MatMul", [f, b.init("W", b.rng.standard_normal((8, 5)))]), b.init("bias", b.rng.standard_normal(5))])
    return b.model([("x", (1, 3, 8, 8))], [(y, (1, 5))])


def test_fuse_runs_everything_in_order() -> None:
    proto = _mixed_model()
    result, got = run_pass(proto, "fuse")
    assert ops(got) == {"Conv": 3, "Relu": 2, "GlobalAveragePool": 1, "Reshape": 1, "Gemm": 1}, result.stats.matched
    assert_equivalent(proto, got)
    assert result.stats.notes  # per-pattern node/param counts from reparam


def test_cli_optimize_fuse(tmp_path: Path, run_cli) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_mixed_model(), src)
    code, stdout, stderr = run_cli("optimize", str(src), "-o", str(out), "--passes", "fuse")
    assert code == 0, stderr
    assert "equivalence vs input: ok" in stdout
    assert eir.count_nodes(eir.load_model(out)) == 8


@st.composite
def layer_chains(draw):
    """A random chain of conv-net layers: convs of every kind, BN, scales, pads, pools, RepVGG blocks."""
    layers = []
    c, size = 4, 12
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "bn", "mul", "add", "pad", "relu", "avgpool", "repvgg"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3, 5]))
            if k > size:
                continue
            g = draw(st.sampled_from(["1", "dw", "2"]))
            cout = c if g == "dw" else draw(st.sampled_from([4, 8]))
            groups = {"1": 1, "dw": c, "2": 2}[g]
            stride = draw(st.sampled_from([1, 2]))
            pad = draw(st.sampled_from([0, k // 2]))
            layers.append(("conv", k, stride, groups, cout, draw(st.booleans()), pad))
            size, c = conv_out(size, k, stride, pad), cout
        elif kind == "pad":
            p = draw(st.integers(1, 2))
            layers.append(("pad", p))
            size += 2 * p
        elif kind == "avgpool":
            if size < 2:
                continue
            layers.append(("avgpool",))
            size -= 1
        else:
            layers.append((kind,))
    return layers, size, c


@PROPERTY
@given(chain=layer_chains(), seed=st.integers(0, 2**31 - 1))
def test_fuse_property_random_chains(chain, seed) -> None:
    layers, size, c_out = chain
    b = Builder(np.random.default_rng(seed))
    x, c = "x", 4
    for layer in layers:
        kind = layer[0]
        if kind == "conv":
            _, k, stride, groups, cout, bias, pad = layer
            x = b.conv(x, c, cout, k, stride=stride, groups=groups, pads=[pad] * 4, bias=bias)
            c = cout
        elif kind == "bn":
            x = b.bn(x, c)
        elif kind in ("mul", "add"):
            shape = (c, 1, 1) if b.rng.random() < 0.7 else ()
            x = b.op(kind.capitalize(), [x, b.init("k", b.rng.uniform(0.5, 2.0, shape))])
        elif kind == "pad":
            pads = b.init("pads", np.array([0, 0, layer[1], layer[1]] * 2))
            b.inits[-1] = tensor(pads, np.array([0, 0, layer[1], layer[1]] * 2, np.int64))
            x = b.op("Pad", [x, pads])
        elif kind == "relu":
            x = b.op("Relu", [x])
        elif kind == "avgpool":
            x = b.op("AveragePool", [x], kernel_shape=[2, 2])
        else:
            x = repvgg_block(b, x, c)
    proto = b.model([("x", (1, 4, 12, 12))], [(x, (1, c_out, size, size))])
    result, got = run_pass(proto, "fuse")
    assert len(got.graph.node) <= len(proto.graph.node)
    assert "BatchNormalization" not in ops(got) or result.stats.rejected
    assert_equivalent(proto, got)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "mcunet", "mobilenetv4_conv_small", "repvgg_a0", "mobileone_s0"])
def test_fuse_keeps_every_zoo_model_numbers(zoo_onnx, name: str) -> None:
    """Every fusion pass on its own, then `fuse`, on each zoo model: numbers kept, BN gone."""
    from edgec.pipeline import Pipeline

    from edgec.passes.fusion import FUSE_ORDER
    from edgec.passes_api import registry

    proto = zoo_onnx(name)
    report = Pipeline(registry.parse_list(list(FUSE_ORDER) + ["fuse"])).run(eir.from_proto(proto))
    assert report.final.passed, report.final.summary()
    assert report.final.max_rel <= 1e-4
    out = eir.to_proto(report.model)
    assert "BatchNormalization" not in ops(out)
    assert len(out.graph.node) < len(proto.graph.node)
    assert_equivalent(proto, out)


def test_initializers_that_are_graph_inputs_are_not_folded() -> None:
    """Old-IR models list weights as graph inputs: they can be overridden at run time, so no fold."""
    b = Builder(np.random.default_rng(24))
    y = b.bn(b.conv("x", 3, 4, 3), 4)
    proto = b.model([("x", (1, 3, 5, 5))], [(y, (1, 4, 5, 5))])
    proto.graph.input.extend([helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in proto.graph.initializer])
    result, got = run_pass(proto, "fuse")
    assert not result.stats.matched and ops(got) == ops(proto)
    assert "also graph inputs" in result.stats.notes[0]


def test_bias_built_from_shape_ops_counts_as_constant() -> None:
    """Unoptimized exports write a zero bias as Expand(CastLike(0, x), [C]); it is still constant."""
    b = Builder(np.random.default_rng(25))
    b.inits += [tensor("zero", np.array(0.0, np.float32)), tensor("cshape", np.array([4], np.int64))]
    bias = b.op("Expand", [b.op("CastLike", ["zero", "x"]), "cshape"])
    w = b.init("w", b.rng.standard_normal((4, 3, 3, 3)))
    y = b.bn(b.op("Conv", ["x", w, bias], pads=[1, 1, 1, 1]), 4)
    proto = b.model([("x", (1, 3, 6, 6))], [(y, (1, 4, 6, 6))])
    result, got = run_pass(proto, "fuse")
    assert ops(got) == {"Conv": 1}, result.stats.rejected
    assert_equivalent(proto, got)
