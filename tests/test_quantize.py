"""Post-training int8 quantization: placement, numbers vs onnxruntime float, calibration methods, bad input, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import make_model, tensor
from onnx import TensorProto, helper, numpy_helper

from edgec import ir as eir
from edgec import verify
from edgec.calibration import ArraySource, CalibrationSet, ImageFolder, NpyFiles, Preprocess, Sample
from edgec.errors import InputError
from edgec.passes._quant_ranges import Histograms, MinMax, entropy_range, mse_range, percentile_range, qdq_values
from edgec.passes.quantize import QuantConfig, Quantize, make_plan, quantize_model
from edgec.pipeline import Pipeline, PipelineConfig


def tiny_cnn(seed: int = 0, c: int = 8, hw: int = 16, classes: int = 10, cin: int = 3) -> onnx.ModelProto:
    """Stem conv + ReLU6, depthwise + ReLU, pointwise, residual Add, MaxPool, GAP, Reshape, Gemm."""
    r = np.random.default_rng(seed)

    def w(*s: int) -> np.ndarray:
        return (r.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)

    inits = [
        tensor("w1", w(c, cin, 3, 3)), tensor("b1", (r.standard_normal(c) * 0.1).astype(np.float32)),
        tensor("w2", w(c, 1, 3, 3)), tensor("b2", (r.standard_normal(c) * 0.1).astype(np.float32)),
        tensor("w3", w(c, c, 1, 1)), tensor("b3", (r.standard_normal(c) * 0.1).astype(np.float32)),
        tensor("wf", w(classes, c)), tensor("bf", (r.standard_normal(classes) * 0.1).astype(np.float32)),
        tensor("lo", np.array(0.0, np.float32)), tensor("hi", np.array(6.0, np.float32)),
        tensor("shape", np.array([1, -1], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=c, name="dw"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="pw"),
        helper.make_node("Add", ["c3", "a1"], ["res"], name="add"),
        helper.make_node("MaxPool", ["res"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="mp"),
        helper.make_node("GlobalAveragePool", ["mp"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [("x", (1, cin, hw, hw))], [("y", (1, classes))], inits)


def concat_model() -> onnx.ModelProto:
    r = np.random.default_rng(3)
    inits = [tensor("wa", r.standard_normal((4, 3, 1, 1)).astype(np.float32)),
             tensor("wb", (3 * r.standard_normal((4, 3, 3, 3))).astype(np.float32)),
             tensor("wc", r.standard_normal((2, 8, 1, 1)).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1], name="cb"),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "wc"], ["y"], name="cc"),
    ]
    return make_model(nodes, [("x", (1, 3, 6, 6))], [("y", (1, 2, 6, 6))], inits)


def gaussian_set(shape: tuple[int, ...], n: int, seed: int) -> ArraySource:
    r = np.random.default_rng(seed)
    return ArraySource(tuple(r.standard_normal(shape).astype(np.float32) for _ in range(n)))


def fresh_sqnr(float_model: onnx.ModelProto, quant: onnx.ModelProto, shape: tuple[int, ...], n: int = 16) -> float:
    """SQNR of the quantized model vs the float model on fresh inputs from the calibration distribution."""
    r = np.random.default_rng()
    feeds = [{"x": r.standard_normal(shape).astype(np.float32)} for _ in range(n)]
    fs, qs = verify.session(float_model), verify.session(quant)
    ref = [fs.run(None, f) for f in feeds]
    got = [qs.run(None, f) for f in feeds]
    return verify.compare_outputs(ref, got, ["y"], verify.Tolerance()).sqnr_db


def inits_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_quantized_matches_float_on_fresh_inputs(method: str, activations: str) -> None:
    model = tiny_cnn()
    report = quantize_model(model, gaussian_set((1, 3, 16, 16), 24, 1), QuantConfig(method=method, activations=activations))
    onnx.checker.check_model(report.model)
    assert len(report.layers_quantized) == 4 and not report.layers_float
    sqnr = fresh_sqnr(model, report.model, (1, 3, 16, 16))
    assert sqnr > 30.0, sqnr
    assert report.evaluation.sqnr_db > 30.0
    # no float weight is left for a quantized layer
    ops = [n.op_type for n in report.model.graph.node]
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 1
    for n in report.model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert n.input[1].endswith("_dq") and n.input[0].endswith("_dq")


def test_qdq_numbers_weights_biases_and_folding() -> None:
    model = tiny_cnn()
    report = quantize_model(model, gaussian_set((1, 3, 16, 16), 16, 2), QuantConfig(bias_correction=False, pad_channels=False))
    q = report.model
    inits = inits_of(q)
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    wq, ws = inits["stem_W_quantized"], inits["stem_W_scale"]
    assert wq.dtype == np.int8 and ws.shape == (8,) and np.abs(wq).max() <= 127
    np.testing.assert_allclose(ws, np.abs(w1).reshape(8, -1).max(1) / 127, rtol=1e-6)
    assert np.all(np.abs(wq * ws[:, None, None, None] - w1) <= ws[:, None, None, None] / 2 + 1e-7)
    # int32 bias with scale = input scale * weight scale (per channel)
    bq, bs = inits["stem_B_quantized"], inits["stem_B_scale"]
    assert bq.dtype == np.int32
    np.testing.assert_allclose(bs, inits["x_scale"] * ws, rtol=1e-6)
    # uint8 activations; the ReLU6 and ReLU are folded into Q (zero point 0, range inside [0, 6])
    assert inits["x_zp"].dtype == np.uint8
    assert inits["a1_zp"] == 0 and inits["a2_zp"] == 0
    assert inits["a1_scale"] * 255 <= 6.0 + 1e-6
    ops = [n.op_type for n in q.graph.node]
    assert "Relu" not in ops and "Clip" not in ops and report.activations_removed == 2
    # MaxPool and Reshape share their input's scale: DQ -> op -> Q stays int8
    assert inits["mp_scale"] == inits["res_scale"] and inits["flat_scale"] == inits["gap_scale"]
    # Gemm output is not quantized: nothing after it is int8, so the logits stay float
    assert q.graph.output[0].name == "y" and next(n for n in q.graph.node if "y" in n.output).op_type == "Gemm"


def dw_chain_model(c: int = 24, cin: int = 3, share: bool = False) -> onnx.ModelProto:
    """stem (cin -> c) -> Clip -> depthwise 5x5 -> Relu -> pointwise (c -> 8) -> GAP -> Gemm."""
    r = np.random.default_rng(5)
    inits = [
        tensor("w1", (r.standard_normal((c, cin, 3, 3)) * 0.5).astype(np.float32)), tensor("b1", r.standard_normal(c).astype(np.float32) * 0.1),
        tensor("w2", (r.standard_normal((c, 1, 5, 5)) * 0.3).astype(np.float32)), tensor("b2", r.standard_normal(c).astype(np.float32) * 0.1),
        tensor("w3", (r.standard_normal((8, c, 1, 1)) * 0.3).astype(np.float32)), tensor("b3", r.standard_normal(8).astype(np.float32) * 0.1),
        tensor("wf", (r.standard_normal((4, 8)) * 0.5).astype(np.float32)),
        tensor("lo", np.array(0.0, np.float32)), tensor("hi", np.array(6.0, np.float32)), tensor("shape", np.array([1, -1], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[2, 2, 2, 2], group=c, name="dw"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="pw"),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "wf"], ["y"], transB=1, name="fc"),
    ]
    if share:  # a second reader of the depthwise weight: padding it would change that reader
        nodes.append(helper.make_node("Conv", ["a1", "w2"], ["c2b"], pads=[2, 2, 2, 2], group=c, name="dw_twin"))
        nodes.append(helper.make_node("ReduceMean", ["c2b"], ["side"], keepdims=0, name="side_mean"))
        return make_model(nodes, [("x", (1, cin, 16, 16))], [("y", (1, 4)), ("side", (1,))], inits)
    return make_model(nodes, [("x", (1, cin, 16, 16))], [("y", (1, 4))], inits)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_pad_channels_is_exact_and_feeds_the_fast_int8_kernels(method: str) -> None:
    from edgec.passes._quant_layout import pad_channels

    model = dw_chain_model()
    padded, what = pad_channels(model)
    assert what.inputs == ("stem",) and what.depthwise == ("dw",) and len(what.aliases) == 1
    w = inits_of(padded)
    nodes = {n.name: n for n in padded.graph.node}
    stem_w, dw_w, pw_w = (w[nodes[n].input[1]] for n in ("stem", "dw", "pw"))
    assert stem_w.shape == (32, 4, 3, 3) and dw_w.shape == (32, 1, 5, 5) and pw_w.shape == (8, 32, 1, 1)
    assert not stem_w[:, 3:].any() and not stem_w[24:].any() and not dw_w[24:].any() and not pw_w[:, 24:].any()
    assert next(a.i for a in nodes["dw"].attribute if a.name == "group") == 32
    # the float models agree on fresh inputs (onnxruntime)
    r = np.random.default_rng()
    fs, ps = verify.session(model), verify.session(padded)
    for _ in range(4):
        x = r.standard_normal((1, 3, 16, 16)).astype(np.float32) * 3
        np.testing.assert_allclose(ps.run(None, {"x": x})[0], fs.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    # quantized with padding == quantized without (same ranges: calibrated on the unpadded model)
    data = gaussian_set((1, 3, 16, 16), 16, 4)
    cfg = QuantConfig(method=method, bias_correction=False)
    on = quantize_model(model, data, cfg)
    off = quantize_model(model, data, dataclasses.replace(cfg, pad_channels=False))
    assert on.channels_padded == ("stem", "dw") and off.channels_padded == ()
    # the zero pad of the input runs after its QuantizeLinear, in uint8, padding with the zero point
    pad = next(n for n in on.model.graph.node if n.op_type == "Pad")
    q_in = next(n for n in on.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert pad.input[0] == q_in.output[0] and pad.input[2] == q_in.input[2]
    feeds = [{"x": r.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    qon, qoff = verify.session(on.model), verify.session(off.model)
    for f in feeds:
        np.testing.assert_allclose(qon.run(None, f)[0], qoff.run(None, f)[0], rtol=1e-4, atol=1e-4)
    assert fresh_sqnr(model, on.model, (1, 3, 16, 16), n=64) > 20.0  # spread over fresh draws: 22-40 dB at n=16
    assert on.to_json()["channels_padded"] == ["stem", "dw"]


@pytest.mark.parametrize(("value", "zp_type", "moved"), [(0.0, TensorProto.UINT8, True), (0.0, TensorProto.INT8, True), (0.5, TensorProto.UINT8, False)])
def test_pad_after_quantize_is_exact(value: float, zp_type: int, moved: bool) -> None:
    from edgec.passes._quant_layout import pad_after_quantize

    zp = np.array(37 if zp_type == TensorProto.UINT8 else -5, np.uint8 if zp_type == TensorProto.UINT8 else np.int8)
    inits = [tensor("pads", np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64)), tensor("v", np.array(value, np.float32)),
             tensor("s", np.array(0.02, np.float32)), tensor("z", zp)]
    nodes = [helper.make_node("Pad", ["x", "pads", "v"], ["xp"], name="pad", mode="constant"),
             helper.make_node("QuantizeLinear", ["xp", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq")]
    model = make_model(nodes, [("x", (1, 3, 5, 5))], [("y", (1, 4, 5, 5))], inits, opset=18)
    out, n = pad_after_quantize(model)
    assert n == int(moved)
    if moved:
        assert [node.op_type for node in out.graph.node] == ["QuantizeLinear", "Pad", "DequantizeLinear"]
    x = (np.random.default_rng().standard_normal((1, 3, 5, 5)) * 3).astype(np.float32)  # some values saturate
    np.testing.assert_array_equal(verify.session(out).run(None, {"x": x})[0], verify.session(model).run(None, {"x": x})[0])


def test_pad_channels_leaves_non_matching_graphs_alone() -> None:
    from edgec.passes._quant_layout import pad_channels

    # channel counts already aligned: nothing to do
    _, what = pad_channels(dw_chain_model(c=32, cin=4))
    assert what.inputs == () and what.depthwise == ()
    # a shared depthwise weight: the stem input is padded, the depthwise block is not
    shared = dw_chain_model(share=True)
    padded, what = pad_channels(shared)
    assert what.inputs == ("stem",) and what.depthwise == ()
    x = np.random.default_rng().standard_normal((1, 3, 16, 16)).astype(np.float32)
    for a, b in zip(verify.session(shared).run(None, {"x": x}), verify.session(padded).run(None, {"x": x}), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # a graph input read by two convs is not padded (the other reader needs the original channels)
    model = tiny_cnn()
    model.graph.node.append(helper.make_node("Conv", ["x", "w1"], ["extra"], pads=[1, 1, 1, 1], strides=[2, 2], name="twin"))
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    _, what = pad_channels(model)
    assert what.inputs == ()


@pytest.mark.parametrize(("axes", "keepdims", "rewritten"), [([2, 3], 1, True), ([-1, -2], 1, True), ([2, 3], 0, False), ([1, 2], 1, False)])
def test_spatial_mean_becomes_a_quantized_global_pool(axes: list[int], keepdims: int, rewritten: bool) -> None:
    from edgec.passes._quant_layout import spatial_mean_to_gap

    r = np.random.default_rng(6)
    inits = [tensor("w", (r.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)), tensor("axes", np.array(axes, np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["a"], name="relu"),
             helper.make_node("ReduceMean", ["a", "axes"], ["y"], keepdims=keepdims, name="mean")]
    out_shape = {(True, 1): (1, 8, 1, 1), (False, 0): (1, 8), (False, 1): (1, 1, 1, 8)}[(rewritten or keepdims == 1 and axes == [1, 2], keepdims)]
    model = make_model(nodes, [("x", (1, 3, 8, 8))], [("y", out_shape)], inits, opset=18)
    gap, changed = spatial_mean_to_gap(model)
    assert bool(changed) == rewritten
    x = r.standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(verify.session(gap).run(None, {"x": x})[0], verify.session(model).run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)
    report = quantize_model(model, gaussian_set((1, 3, 8, 8), 8, 7), QuantConfig())
    ops = [n.op_type for n in report.model.graph.node]
    assert ("GlobalAveragePool" in ops) == rewritten and ("ReduceMean" in ops) != rewritten
    if rewritten:  # its input is dequantized int8 (with a Q after it, onnxruntime fuses QLinearGlobalAveragePool)
        pool = next(n for n in report.model.graph.node if n.op_type == "GlobalAveragePool")
        assert next(n for n in report.model.graph.node if pool.input[0] in n.output).op_type == "DequantizeLinear"
    assert fresh_sqnr_named(model, report.model, (1, 3, 8, 8), "y") > 30.0


def fresh_sqnr_named(float_model: onnx.ModelProto, quant: onnx.ModelProto, shape: tuple[int, ...], out: str, n: int = 8) -> float:
    r = np.random.default_rng()
    feeds = [{"x": r.standard_normal(shape).astype(np.float32)} for _ in range(n)]
    fs, qs = verify.session(float_model), verify.session(quant)
    return verify.compare_outputs([fs.run(None, f) for f in feeds], [qs.run(None, f) for f in feeds], [out], verify.Tolerance()).sqnr_db


def test_int8_symmetric_keeps_activations() -> None:
    report = quantize_model(tiny_cnn(), gaussian_set((1, 3, 16, 16), 8, 3), QuantConfig(activations="int8"))
    inits = inits_of(report.model)
    zps = [v for k, v in inits.items() if k.endswith("_zp") and not k.endswith("_W_zp") and not k.endswith("_B_zp")]
    assert zps and all(z.dtype == np.int8 and z == 0 for z in zps)
    ops = [n.op_type for n in report.model.graph.node]
    assert "Relu" in ops and "Clip" in ops  # an int8 Q does not clamp at 0, so the activations stay


def test_concat_inputs_share_the_output_scale() -> None:
    model = concat_model()
    report = quantize_model(model, gaussian_set((1, 3, 6, 6), 16, 4), QuantConfig(method="minmax"))
    inits = inits_of(report.model)
    assert inits["a_scale"] == inits["b_scale"] == inits["cat_scale"]
    assert inits["a_zp"] == inits["b_zp"] == inits["cat_zp"]
    plan = make_plan(model)
    assert ("a", "b", "cat") in plan.groups or any(set(g) == {"a", "b", "cat"} for g in plan.groups)
    # the shared scale covers the wider input (b is ~3x larger): a scale fitted to the narrower
    # input would clip most of b (a few dB). With 8-bit minmax ranges from 16 calibration samples
    # the SQNR on fresh inputs is ~33 dB with a tail to ~27 dB over 16-input draws, so measure on
    # 64 fresh inputs and require 25 dB.
    assert fresh_sqnr(model, report.model, (1, 3, 6, 6), n=64) > 25


def test_bias_correction_removes_mean_error() -> None:
    # a per-tensor quantized layer with one large-weight channel: the small channels' weights
    # round coarsely, which shifts their mean output; bias correction takes the shift out
    model = tiny_cnn(seed=5)
    data = gaussian_set((1, 3, 16, 16), 32, 6)
    cfg = QuantConfig(per_channel=False)
    plain = quantize_model(model, data, QuantConfig(per_channel=False, bias_correction=False))
    corrected = quantize_model(model, data, cfg)
    assert corrected.bias_corrected == 4

    def mean_err(q: onnx.ModelProto) -> float:
        r = np.random.default_rng(7)
        feeds = [{"x": r.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(32)]
        ref = np.stack([verify.run(model, f)[0] for f in feeds])
        got = np.stack([verify.run(q, f)[0] for f in feeds])
        return float(np.abs((got - ref).mean(axis=0)).mean())

    assert mean_err(corrected.model) < mean_err(plain.model)


def _edit(model: onnx.ModelProto, name: str, fn) -> None:
    for init in model.graph.initializer:
        if init.name == name:
            w = numpy_helper.to_array(init).copy()
            fn(w)
            init.CopyFrom(numpy_helper.from_array(w, name))


def test_sensitivity_and_max_drop_keep_the_worst_layers_float() -> None:
    # a pointwise weight with a huge outlier in a channel the classifier ignores: per-tensor int8
    # wipes out the pointwise layer's other weights and blows up the ranges after it
    model = tiny_cnn(seed=1, classes=3)
    _edit(model, "w3", lambda w: w.__setitem__((0, 0, 0, 0), 3000.0))
    _edit(model, "wf", lambda w: w.__setitem__((slice(None), 0), 0.0))
    r = np.random.default_rng(3)
    pool = [r.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(48)]
    sess = verify.session(model)
    labels = tuple(int(sess.run(None, {"x": x})[0].argmax()) for x in pool)
    held_out = ArraySource(tuple(pool), labels)  # labelled so that float top-1 is 100%
    data = gaussian_set((1, 3, 16, 16), 32, 8)
    cfg = QuantConfig(per_channel=False, bias_correction=False)
    report = quantize_model(model, data, cfg, evaluation=held_out, with_sensitivity=True)
    assert report.evaluation.float_top1 == 100.0 and report.evaluation.drop > 50  # the failure is real
    by_sqnr = sorted(report.sensitivity, key=lambda s: s.sqnr_db)
    assert {s.node for s in report.sensitivity} == {"stem", "dw", "pw", "fc"}
    assert {s.node for s in by_sqnr[:2]} == {"pw", "fc"}  # the outlier layer and the one reading its blown-up range
    assert by_sqnr[-1].sqnr_db > 40
    budget = quantize_model(model, data, dataclasses.replace(cfg, max_drop=0.0), evaluation=held_out)
    assert budget.evaluation.drop == 0.0
    assert set(budget.layers_float) <= {"pw", "fc"} and budget.layers_float
    assert set(budget.layers_quantized) >= {"stem", "dw"}


def test_target_sqnr_keeps_layers_float_until_met() -> None:
    model = tiny_cnn(seed=1, classes=3)
    _edit(model, "w3", lambda w: w.__setitem__((0, 0, 0, 0), 3000.0))
    data = gaussian_set((1, 3, 16, 16), 24, 8)
    held_out = gaussian_set((1, 3, 16, 16), 16, 9)
    cfg = QuantConfig(per_channel=False, bias_correction=False)
    plain = quantize_model(model, data, cfg, evaluation=held_out)
    assert plain.evaluation.sqnr_db < 30  # the outlier costs the all-int8 model
    met = quantize_model(model, data, dataclasses.replace(cfg, target_sqnr_db=38.0), evaluation=held_out)
    assert met.evaluation.sqnr_db >= 38.0
    assert met.layers_float and len(met.layers_float) < 4 and met.layers_quantized
    assert {s.node for s in met.sensitivity} == {"stem", "dw", "pw", "fc"}
    worst = min(met.sensitivity, key=lambda s: s.sqnr_db).node
    assert worst in met.layers_float
    # the float layers really are float: their weights stay initializers without a DequantizeLinear
    nodes = {n.name: n for n in met.model.graph.node}
    for name in met.layers_float:
        assert not nodes[name].input[1].endswith("_dq")
    assert fresh_sqnr(model, met.model, (1, 3, 16, 16)) > 30.0  # holds on fresh inputs, checked with onnxruntime
    # a target the all-int8 model already meets keeps every layer int8
    easy = quantize_model(model, data, dataclasses.replace(cfg, target_sqnr_db=plain.evaluation.sqnr_db - 1), evaluation=held_out)
    assert not easy.layers_float and easy.evaluation.sqnr_db == pytest.approx(plain.evaluation.sqnr_db)
    # an unreachable target stops with one int8 layer left, without raising
    never = quantize_model(model, data, dataclasses.replace(cfg, target_sqnr_db=300.0), evaluation=held_out)
    assert len(never.layers_quantized) == 1 and never.evaluation.sqnr_db < 300.0
    with pytest.raises(InputError):
        QuantConfig(target_sqnr_db=float("nan"))


def test_range_estimators() -> None:
    r = np.random.default_rng(0)
    for x in (r.standard_normal(100_000), np.maximum(r.standard_normal(100_000), 0), r.laplace(size=100_000)):
        x = x.astype(np.float32)
        x[:3] = [x.max() * 4, x.max() * 3, x.max() * 5]  # outliers
        mm = MinMax()
        mm.add("t", x)
        full = mm.ranges()["t"]
        h = Histograms({"t": full}, 2048)
        h.add("t", x)
        lo, hi = h.edges["t"]
        counts = h.counts["t"]

        def err(rng) -> float:
            return float(np.mean((qdq_values(x, rng.lo, rng.hi, 256) - x) ** 2))

        pct, ent, mse = percentile_range(counts, lo, hi, full, 99.99), entropy_range(counts, lo, hi, full), mse_range(counts, lo, hi, full)
        for rng in (pct, ent, mse):
            assert full.lo <= rng.lo <= 0 <= rng.hi <= full.hi
        assert pct.hi < full.hi / 3 and ent.hi < full.hi / 3  # the outliers are cut
        # mse minimises the squared error over its candidates: never worse than min-max, and
        # within a few percent of the other methods' ranges
        assert err(mse) <= err(full) and err(mse) <= 1.05 * min(err(pct), err(ent))


def test_bad_calibration_data() -> None:
    model = tiny_cnn()
    with pytest.raises(InputError, match="empty"):
        quantize_model(model, ArraySource(()))
    with pytest.raises(InputError, match=r"expects \[1, 3, 16, 16\]"):
        quantize_model(model, ArraySource((np.zeros((1, 3, 8, 8), np.float32),)))
    with pytest.raises(InputError, match="NaN"):
        quantize_model(model, ArraySource((np.full((1, 3, 16, 16), np.nan, np.float32),)))
    with pytest.raises(InputError, match="float64"):
        quantize_model(model, ArraySource((np.zeros((1, 3, 16, 16)),)))


def test_no_quantizable_op_and_already_quantized() -> None:
    relu_only = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", (1, 4))], [("y", (1, 4))])
    with pytest.raises(InputError, match="no quantizable layer"):
        quantize_model(relu_only, gaussian_set((1, 4), 4, 0))
    dyn_w = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", (1, 4)), ("w", (4, 2))], [("y", (1, 2))])
    with pytest.raises(InputError, match="not a constant initializer"):
        quantize_model(dyn_w, CalibrationSet("t", (Sample(("x", "w"), (np.ones((1, 4), np.float32), np.ones((4, 2), np.float32))),)))
    q = quantize_model(tiny_cnn(), gaussian_set((1, 3, 16, 16), 4, 0)).model
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(q, gaussian_set((1, 3, 16, 16), 4, 0))
    old = tiny_cnn()
    old.opset_import[0].version = 11
    with pytest.raises(InputError, match="opset 13"):
        quantize_model(old, gaussian_set((1, 3, 16, 16), 4, 0))


def test_matmul_and_graph_output_conv() -> None:
    r = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["hr"], name="r"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2")]
    model = make_model(nodes, [("x", (1, 16))], [("y", (1, 5))],
                       [tensor("w", r.standard_normal((16, 32)).astype(np.float32)), tensor("w2", r.standard_normal((32, 5)).astype(np.float32))])
    report = quantize_model(model, gaussian_set((1, 16), 512, 1), QuantConfig(method="mse"))
    inits = inits_of(report.model)
    assert inits["mm_W_scale"].shape == (32,)  # per output column: axis 1 of a MatMul weight
    # ~38 dB typical; fresh inputs past the calibrated range (clipped) give a tail to ~27 dB
    assert fresh_sqnr(model, report.model, (1, 16), n=64) > 22
    # a Conv writing a graph output: the DQ takes the output's name
    conv = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [("x", (1, 2, 4, 4))], [("y", (1, 3, 4, 4))],
                      [tensor("w", r.standard_normal((3, 2, 1, 1)).astype(np.float32))])
    out = quantize_model(conv, gaussian_set((1, 2, 4, 4), 128, 1)).model
    assert out.graph.output[0].name == "y" and next(n for n in out.graph.node if "y" in n.output).op_type == "DequantizeLinear"
    assert fresh_sqnr(conv, out, (1, 2, 4, 4)) > 20  # 48 outputs: a few fresh values fall outside the calibrated range


def test_npy_and_image_sources(tmp_path: Path) -> None:
    model = tiny_cnn()
    specs = verify.input_specs(model)
    r = np.random.default_rng(0)
    np.save(tmp_path / "one.npy", r.standard_normal((3, 16, 16)).astype(np.float32))  # no batch dim
    np.save(tmp_path / "stack.npy", r.standard_normal((5, 3, 16, 16)).astype(np.float32))  # a stack
    data = NpyFiles(tmp_path).load(specs)
    assert len(data) == 6
    data.validate(specs)
    from PIL import Image

    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for i in range(3):
        Image.fromarray(r.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    (img_dir / "notes.txt").write_text("not an image")
    imgs = ImageFolder(img_dir, Preprocess()).load(specs)
    assert len(imgs) == 3 and imgs.samples[0].arrays[0].shape == (1, 3, 16, 16)
    imgs.validate(specs)
    x = imgs.samples[0].arrays[0]
    assert -2.2 < x.min() and x.max() < 2.7  # ImageNet-normalized pixel values


def test_pass_in_pipeline() -> None:
    model = eir.from_proto(tiny_cnn())
    p = Quantize(gaussian_set((1, 3, 16, 16), 16, 0), QuantConfig(method="percentile"))
    report = Pipeline([p], PipelineConfig(seed=0)).run(model)
    assert report.steps[0].modified and report.final is not None and report.final.passed
    ops = [n.op_type for n in report.model.graph]
    assert "QuantizeLinear" in ops
    assert report.steps[0].stats.matched["layers quantized"] == 4
    with pytest.raises(InputError, match="needs calibration data"):
        Quantize()(eir.from_proto(tiny_cnn()))


def test_cli(tmp_path: Path, run_cli) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    r = np.random.default_rng(0)
    np.save(calib / "x.npy", r.standard_normal((12, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "m.int8.onnx"
    sens = tmp_path / "sens.json"
    code, stdout, stderr = run_cli("quantize", str(model_path), "-o", str(out), "--calib", str(calib), "--method", "entropy",
                                   "--sensitivity", str(sens))
    assert code == 0, stderr
    assert "SQNR" in stdout and "top-1 agreement" in stdout and "Sensitivity" in stdout
    assert out.exists() and any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    rows = json.loads(sens.read_text())
    assert {r["node"] for r in rows} == {"stem", "dw", "pw", "fc"}
    code, stdout, _ = run_cli("quantize", str(model_path), "-o", str(out), "--calib", str(calib), "--json")
    assert code == 0 and json.loads(stdout)["evaluation"]["sqnr_db"] > 30
    assert json.loads(stdout)["channels_padded"] == ["stem"]
    code, stdout, _ = run_cli("quantize", str(model_path), "-o", str(out), "--calib", str(calib), "--json", "--no-pad-channels",
                              "--target-sqnr", "1000", "--per-tensor")
    rep = json.loads(stdout)
    assert code == 0 and rep["channels_padded"] == [] and rep["config"]["target_sqnr_db"] == 1000
    assert len(rep["layers_quantized"]) == 1 and len(rep["layers_float"]) == 3  # unreachable: all but one layer float
    # bad input: a wrong-shaped set, an empty folder, no data at all -> one-line error, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    out2 = tmp_path / "never.onnx"
    code, _, stderr = run_cli("quantize", str(model_path), "-o", str(out2), "--calib", str(bad))
    assert code == 2 and "expects [1, 3, 16, 16]" in stderr and "Traceback" not in stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run_cli("quantize", str(model_path), "-o", str(out2), "--calib", str(empty))
    assert code == 2 and "empty" in stderr
    code, _, stderr = run_cli("quantize", str(model_path), "-o", str(out2))
    assert code == 2 and "--calib" in stderr
    code, _, stderr = run_cli("quantize", str(out), "-o", str(out2), "--calib", str(calib))
    assert code == 2 and "already quantized" in stderr
    code, _, stderr = run_cli("quantize", str(model_path), "-o", str(out2), "--calib-dataset", "digitz")
    assert code == 2 and "digits" in stderr
    assert not out2.exists()


def test_builtin_digits_dataset() -> None:
    from edgec.calibration import BuiltinDataset

    spec = verify.TensorSpec("x", (1, 1, 16, 16), np.dtype(np.float32))
    train = BuiltinDataset("digits").load([spec])
    test = BuiltinDataset("digits-test").load([spec])
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.labels is not None and set(train.labels.tolist()) == set(range(10))
    x = np.concatenate([s.arrays[0] for s in test.samples])
    assert x.shape == (450, 1, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0


@pytest.mark.slow
def test_tvm_builds_match_onnxruntime_int8(tmp_path: Path) -> None:
    """The QDQ model imports into TVM; the host build matches onnxruntime's int8 output and the
    arm64 library cross-compiles (running it needs the emulated board: bench/quant_tvm.py --rpc)."""
    import tvm

    from edgec.compile import import_onnx, run_local
    from edgec.targets import get_target

    model = tiny_cnn()
    quant = quantize_model(model, gaussian_set((1, 3, 16, 16), 16, 0)).model
    specs = verify.input_specs(quant)
    r = np.random.default_rng()
    feeds = [{"x": r.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    ref = [verify.run(quant, f)[0] for f in feeds]
    mod = import_onnx(quant, specs)
    host = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    got = [o[0] for o in run_local(host, "cpu", feeds, ["x"])]
    out_scale = float(np.ptp(np.stack(ref))) / 255
    for g, f in zip(got, ref, strict=True):
        assert np.abs(g - f).max() <= out_scale  # within one 8-bit output step (rounding ties differ at most)
    arm = get_target("cortex-a72")
    with arm.tvm_target(), tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(import_onnx(quant, specs), arm.tvm_target())
    ex.export_library(str(tmp_path / "model.so"), fcompile=arm.toolchain.fcompile())
    assert (tmp_path / "model.so").read_bytes()[:4] == b"\x7fELF"
