"""edgec.analysis: MACs, params and shapes against values computed here by formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
from graphs import make_model, tensor
from onnx import helper

from edgec import analysis
from edgec.errors import InputError


def _out(size: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize(
    "cin,cout,groups,k,s,d,pads",
    [(3, 8, 1, 3, 1, 1, (1, 1, 1, 1)), (8, 8, 8, 3, 2, 1, (1, 1, 1, 1)), (6, 4, 2, 5, 2, 2, (2, 1, 3, 0)),
     (4, 6, 1, 1, 1, 1, (0, 0, 0, 0)), (4, 4, 4, 3, 1, 3, (3, 3, 3, 3))],
)
def test_conv_macs_exact(cin, cout, groups, k, s, d, pads):
    h, w = 13, 11
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=groups, strides=[s, s], dilations=[d, d], pads=list(pads))
    ho, wo = _out(h, k, s, d, pads[0], pads[2]), _out(w, k, s, d, pads[1], pads[3])
    m = make_model([node], [("x", (2, cin, h, w))], [("y", ("n", "c", "h", "w"))], [tensor("w", wt), tensor("b", b)])
    res = analysis.analyze(m)
    rec = res.nodes[0]
    assert rec.output_shapes[0] == (2, cout, ho, wo)
    assert rec.macs == 2 * cout * ho * wo * (cin // groups) * k * k
    assert rec.params == wt.size + b.size == res.params
    assert res.param_bytes == 4 * (wt.size + b.size)
    assert res.macs == rec.macs


def test_conv_transpose_gemm_matmul_pool_elementwise():
    rng = np.random.default_rng(1)
    f = np.float32
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["u"], strides=[2, 2], pads=[1, 1, 1, 1], group=2),
        helper.make_node("MaxPool", ["u"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["p"], ["q"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["q"], ["r"]),
        helper.make_node("Add", ["r", "q"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Flatten", ["g"], ["fl"]),
        helper.make_node("Gemm", ["fl", "gw", "gb"], ["z"], transB=1),
        helper.make_node("MatMul", ["z", "mw"], ["y"]),
    ]
    inits = [tensor("wt", rng.standard_normal((4, 3, 3, 3)).astype(f)),
             tensor("gw", rng.standard_normal((10, 6)).astype(f)), tensor("gb", np.zeros(10, f)),
             tensor("mw", rng.standard_normal((10, 7)).astype(f))]
    m = make_model(nodes, [("x", (1, 4, 8, 8))], [("y", ("n", "k"))], inits)
    res = analysis.analyze(m)
    by_op = {n.op_type: n for n in res.nodes}
    hu = (8 - 1) * 2 - 2 + 3  # ConvTranspose output size: (in-1)*s - pads + k
    assert by_op["ConvTranspose"].output_shapes[0] == (1, 6, hu, hu)
    assert by_op["ConvTranspose"].macs == (4 * 8 * 8) * (3 * 3 * 3)
    hp = _out(hu, 3, 2, 1, 1, 1)
    assert by_op["MaxPool"].macs == 6 * hp * hp * 9
    hq = _out(hp, 2, 2, 1, 0, 0)
    assert by_op["AveragePool"].macs == 6 * hq * hq * 4
    assert by_op["Relu"].macs == by_op["Add"].macs == 6 * hq * hq
    assert by_op["GlobalAveragePool"].macs == 6 * hq * hq
    assert by_op["Flatten"].macs == 0
    assert by_op["Gemm"].macs == 1 * 10 * 6
    assert by_op["MatMul"].macs == 1 * 7 * 10
    assert res.macs == sum(n.macs for n in res.nodes)
    assert dict(res.op_histogram)["Relu"] == 1 and sum(c for _, c in res.op_histogram) == len(nodes)
    assert res.params == 4 * 3 * 9 + 60 + 10 + 70
    act = {t.name: t.nbytes for t in res.activation_tensors}
    assert act["u"] == 4 * 6 * hu * hu and act["y"] == 4 * 7
    json.dumps(res.to_json())


def test_constant_subgraphs_are_weights_not_activations():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=tensor("cv", np.ones((1, 2, 1, 1), np.float32))),
        helper.make_node("Mul", ["c", "c"], ["c2"]),
        helper.make_node("Add", ["x", "c2"], ["y"]),
    ]
    m = make_model(nodes, [("x", (1, 2, 4, 4))], [("y", (1, 2, 4, 4))])
    res = analysis.analyze(m)
    assert [s.name for s in res.schedule.steps] == [res.nodes[2].name]
    assert res.memory_fp32.peak_bytes == 2 * 4 * 32
    assert res.nodes[1].constant and res.nodes[1].macs == 0
    assert res.params == 2


def test_dynamic_spatial_input_is_refused_but_batch_is_set_to_one():
    node = helper.make_node("Relu", ["x"], ["y"])
    m = make_model([node], [("x", ("N", 3, "H", 8))], [("y", ("N", 3, "H", 8))])
    with pytest.raises(InputError, match="dynamic dimension 2"):
        analysis.analyze(m)
    res = analysis.analyze(m, {"x": (1, 3, 5, 8)})
    assert res.macs == 3 * 5 * 8
    m2 = make_model([node], [("x", ("N", 3, 4, 8))], [("y", ("N", 3, 4, 8))])
    assert analysis.analyze(m2).tensor("y").shape == (1, 3, 4, 8)


def _cnn(tmp_path):
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1], group=8, name="dw"),
        helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap"),
    ]
    m = make_model(nodes, [("x", (1, 3, 32, 32))], [("y", (1, 8, 1, 1))],
                   [tensor("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
                    tensor("w2", rng.standard_normal((8, 1, 3, 3)).astype(np.float32))])
    path = tmp_path / "cnn.onnx"
    import onnx

    onnx.save(m, path)
    return m, path


def test_inspect_cli_table_json_and_memory_plot(tmp_path, run_cli):
    m, path = _cnn(tmp_path)
    code, out, err = run_cli("inspect", str(path))
    assert code == 0, err
    macs = 8 * 16 * 16 * 27 + 8 * 256 + 8 * 256 * 9 + 8 * 256
    assert f"{macs:,}" in out and "Conv" in out and "GlobalAveragePool" in out
    code, out, err = run_cli("inspect", str(path), "--json")
    data = json.loads(out)
    assert data["macs"] == macs and data["params"] == 8 * 27 + 8 * 9
    assert data["peak_activation_bytes"]["int8"] == analysis.analyze(m).memory_int8.peak_bytes
    plot = tmp_path / "mem.png"
    code, out, err = run_cli("inspect", str(path), "--memory", "--act-dtype", "int8", "--patches", "2x2",
                             "--plot", str(plot))
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Patch-based inference" in out and "<- peak" in out


def test_inspect_cli_errors_are_one_line(tmp_path, run_cli):
    code, _, err = run_cli("inspect", str(tmp_path / "missing.onnx"))
    assert code != 0 and "no such file" in err and "Traceback" not in err
    _, path = _cnn(tmp_path)
    code, _, err = run_cli("inspect", str(path), "--patches", "2x2", "--split", "y")
    assert code != 0 and "'gap'" in err and "Traceback" not in err
