"""Small ONNX graphs built by hand for tests (import as ``from graphs import ...``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int]]],
    outputs: Sequence[tuple[str, Sequence[int] | None]],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = OPSET,
    elem_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, elem_type, list(s)) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem_type, None if s is None else list(s)) for n, s in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_relu_model(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(3->4, 3x3, pad 1) -> Identity -> Relu -> Dropout -> y, plus a dead branch."""
    rng = rng or np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Identity", ["c"], ["c2"], name="id"),
        helper.make_node("Relu", ["c2"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["y"], name="drop"),
        helper.make_node("Sigmoid", ["c"], ["dead"], name="dead"),
    ]
    return make_model(nodes, [("x", (1, 3, 8, 8))], [("y", (1, 4, 8, 8))], [tensor("w", w), tensor("b", b)])
