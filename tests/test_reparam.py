"""reparam and collapse-linear: numeric equivalence vs onnxruntime, near-misses left alone, zoo nets."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest
from graphs import make_model, tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from edgec import ir as eir
from edgec import verify
from edgec.passes.reparam import REASSOCIATION_TOLERANCE
from edgec.passes_api import registry
from edgec.pipeline import Pipeline

TOL = verify.Tolerance(rtol=1e-4, atol=1e-5)
PROPERTY = settings(max_examples=int(os.environ.get("EDGEC_HYPOTHESIS_EXAMPLES", 80)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Builder:
    """Accumulates ONNX nodes and random initializers."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def init(self, kind: str, array: np.ndarray) -> str:
        name = self.name(kind)
        self.inits.append(tensor(name, array.astype(np.float32)))
        return name

    def conv(self, x: str, cin: int, cout: int, kernel, *, stride=1, groups=1, pads=None, dilation=1, bias=True) -> str:
        kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel, kernel)
        if pads is None:
            pads = [dilation * (k - 1) // 2 for k in kernel] * 2
        w = self.rng.standard_normal((cout, cin // groups, *kernel)) / np.sqrt(cin // groups * np.prod(kernel))
        inputs = [x, self.init("w", w)]
        if bias:
            inputs.append(self.init("b", self.rng.standard_normal(cout)))
        out = self.name("conv")
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=out, strides=[stride, stride], group=groups,
                                           pads=list(pads), dilations=[dilation, dilation]))
        return out

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        ins = [x, self.init("g", r.uniform(0.5, 1.5, c)), self.init("be", r.standard_normal(c)),
               self.init("m", r.standard_normal(c) * 0.5), self.init("v", r.uniform(0.5, 2.0, c))]
        out = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", ins, [out], name=out, epsilon=1e-3))
        return out

    def op(self, op_type: str, inputs, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def sum_tree(self, leaves: list[str], order: list[int]) -> str:
        """Sum ``leaves`` as a binary Add tree whose shape is decided by ``order``."""
        items = list(leaves)
        k = 0
        while len(items) > 1:
            i = order[k % len(order)] % (len(items) - 1)
            k += 1
            items[i:i + 2] = [self.op("Add", items[i:i + 2])]
        return items[0]

    def model(self, inputs, outputs) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits)


def run_pass(proto: onnx.ModelProto, name: str):
    result = registry.create(name)(eir.from_proto(proto))
    out = eir.to_proto(result.model)
    onnx.checker.check_model(out)
    return result, out


def ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def assert_equivalent(ref: onnx.ModelProto, got: onnx.ModelProto, tol: verify.Tolerance = TOL) -> None:
    report = verify.compare_models(ref, got, tolerance=tol, samples=2)
    assert report.passed, report.summary()


def repvgg_block(b: Builder, x: str, c: int) -> str:
    return b.sum_tree([b.bn(b.conv(x, c, c, 3, bias=False), c), b.bn(b.conv(x, c, c, 1, bias=False), c), b.bn(x, c)], [0])


# ------------------------------------------------------------------------------------------------
# reparam


def test_repvgg_block_merges_to_one_conv() -> None:
    b = Builder(np.random.default_rng(1))
    y = b.op("Relu", [repvgg_block(b, "x", 8)])
    proto = b.model([("x", (1, 8, 9, 9))], [(y, (1, 8, 9, 9))])
    result, out = run_pass(proto, "reparam")
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert result.stats.matched == {"reparam[1x1+bn + 3x3+bn + bn]": 1}
    assert "nodes 7 -> 1" in result.stats.notes[0]
    assert len(out.graph.initializer) == 2  # old weights are gone
    assert_equivalent(proto, out)


def test_acnet_asymmetric_kernels_and_graph_output_name() -> None:
    b = Builder(np.random.default_rng(2))
    c = 6
    leaves = [b.bn(b.conv("x", c, c, (3, 3)), c), b.bn(b.conv("x", c, c, (1, 3)), c), b.bn(b.conv("x", c, c, (3, 1)), c)]
    y = b.sum_tree(leaves, [1])
    proto = b.model([("x", (2, 6, 7, 5))], [(y, (2, 6, 7, 5))])
    result, out = run_pass(proto, "reparam")
    assert ops(out) == {"Conv": 1}
    assert out.graph.output[0].name == y
    assert_equivalent(proto, out)


def test_mobileone_depthwise_block_with_variadic_sum() -> None:
    b = Builder(np.random.default_rng(3))
    c = 8
    leaves = [b.bn(b.conv("x", c, c, 3, groups=c, stride=1), c) for _ in range(4)]
    leaves += [b.bn(b.conv("x", c, c, 1, groups=c), c), b.bn("x", c)]
    y = b.op("Relu", [b.op("Sum", leaves)])
    proto = b.model([("x", (1, c, 8, 8))], [(y, (1, c, 8, 8))])
    result, out = run_pass(proto, "reparam")
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert result.stats.matched == {"reparam[1x1dw+bn + 3x3dw+bn*4 + bn]": 1}
    assert_equivalent(proto, out)


def test_residual_from_elsewhere_stays_as_add() -> None:
    """conv3(x) + conv1(x) + r, where r is not a branch of x: merge the convs, keep + r."""
    b = Builder(np.random.default_rng(4))
    r = b.op("Relu", ["x"])
    y = b.sum_tree([b.conv("x", 4, 4, 3), r, b.conv("x", 4, 4, 1)], [0])
    proto = b.model([("x", (1, 4, 6, 6))], [(y, (1, 4, 6, 6))])
    result, out = run_pass(proto, "reparam")
    assert ops(out) == {"Conv": 1, "Add": 1, "Relu": 1}
    assert_equivalent(proto, out)


def _near_miss_nonlinearity(b: Builder):
    y = b.op("Add", [b.bn(b.conv("x", 4, 4, 3), 4), b.op("Relu", [b.bn(b.conv("x", 4, 4, 1), 4)])])
    return b.model([("x", (1, 4, 6, 6))], [(y, (1, 4, 6, 6))]), "Relu"


def _near_miss_strides(b: Builder):
    # 5x5 stride 1 no pad and 1x1 stride 2 both map 8x8 -> 4x4
    y = b.op("Add", [b.conv("x", 4, 4, 5, pads=[0, 0, 0, 0]), b.conv("x", 4, 4, 1, stride=2)])
    return b.model([("x", (1, 4, 8, 8))], [(y, (1, 4, 4, 4))]), "different strides"


def _near_miss_used_elsewhere(b: Builder):
    c1 = b.conv("x", 4, 4, 1)
    y = b.op("Add", [b.conv("x", 4, 4, 3), c1])
    return b.model([("x", (1, 4, 6, 6))], [(y, (1, 4, 6, 6)), (c1, (1, 4, 6, 6))]), "used elsewhere"


def _near_miss_groups(b: Builder):
    y = b.op("Add", [b.conv("x", 4, 4, 3, groups=4), b.conv("x", 4, 4, 1)])
    return b.model([("x", (1, 4, 6, 6))], [(y, (1, 4, 6, 6))]), "different groups"


def _near_miss_identity_with_stride(b: Builder):
    # 3x3 stride 2 pad 1 on 2x2 -> 1x1, broadcast against x: not a reparam block
    y = b.op("Add", [b.conv("x", 4, 4, 3, stride=2), "x"])
    return b.model([("x", (1, 4, 2, 2))], [(y, (1, 4, 2, 2))]), "stride-2"


def _near_miss_misaligned(b: Builder):
    # 3x3 pad 0 gives 1x1 on a 3x3 input; + x broadcasts. Kernels do not line up.
    y = b.op("Add", [b.conv("x", 4, 4, 3, pads=[0, 0, 0, 0]), "x"])
    return b.model([("x", (1, 4, 3, 3))], [(y, (1, 4, 3, 3))]), "output sizes"


@pytest.mark.parametrize("build", [_near_miss_nonlinearity, _near_miss_strides, _near_miss_used_elsewhere,
                                   _near_miss_groups, _near_miss_identity_with_stride, _near_miss_misaligned])
def test_near_misses_are_left_alone_with_a_reason(build) -> None:
    proto, why = build(Builder(np.random.default_rng(5)))
    result, out = run_pass(proto, "reparam")
    assert not result.modified
    assert ops(out) == ops(proto)
    assert [r.pattern for r in result.stats.rejected] == ["reparam"]
    assert why in result.stats.rejected[0].reason
    assert_equivalent(proto, out)


@st.composite
def branch_configs(draw):
    stride = draw(st.sampled_from([1, 2]))
    groups_kind = draw(st.sampled_from(["1", "dw", "other"]))
    cin = draw(st.sampled_from([4, 6, 8]))
    cout = cin if groups_kind == "dw" or draw(st.booleans()) else draw(st.sampled_from([4, 6, 8]))
    groups = {"1": 1, "dw": cin, "other": 2}[groups_kind]
    identity_ok = stride == 1 and cin == cout
    kinds = ["conv"] + (["bn", "id"] if identity_ok else [])
    n = draw(st.integers(1, 5))
    branches = []
    for i in range(n):
        kind = "conv" if i == 0 else draw(st.sampled_from(kinds))
        kernel = draw(st.sampled_from([1, 3, 5, (1, 3), (3, 1)]))
        branches.append((kind, kernel, draw(st.booleans()), draw(st.booleans())))  # bias, bn
    extra_pad = 0 if identity_ok and any(k != "conv" for k, *_ in branches) else draw(st.integers(0, 1))
    dilation = draw(st.sampled_from([1, 1, 2]))
    order = draw(st.lists(st.integers(0, 7), min_size=1, max_size=5))
    size = draw(st.sampled_from([5, 8, 9]))
    return stride, groups, cin, cout, branches, extra_pad, dilation, order, size


@PROPERTY
@given(cfg=branch_configs(), seed=st.integers(0, 2**31 - 1))
def test_reparam_property(cfg, seed) -> None:
    stride, groups, cin, cout, branches, extra_pad, dilation, order, size = cfg
    b = Builder(np.random.default_rng(seed))
    leaves = []
    for kind, kernel, bias, with_bn in branches:
        if kind == "conv":
            k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
            pads = [dilation * (kk - 1) // 2 + extra_pad for kk in k] * 2
            v = b.conv("x", cin, cout, k, stride=stride, groups=groups, pads=pads, dilation=dilation, bias=bias)
            leaves.append(b.bn(v, cout) if with_bn else v)
        elif kind == "bn":
            leaves.append(b.bn("x", cin))
        else:
            leaves.append("x")
    if len(leaves) == 1:
        leaves.append(b.conv("x", cin, cout, 1, stride=stride, groups=groups, pads=[extra_pad] * 4))
    y = b.op("Relu", [b.sum_tree(leaves, order)])
    out_size = (size + 2 * extra_pad - 1) // stride + 1  # every branch is centred
    proto = b.model([("x", (1, cin, size, size))], [(y, (1, cout, out_size, out_size))])
    result, out = run_pass(proto, "reparam")
    assert result.modified, result.stats.rejected
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert_equivalent(proto, out)


# ------------------------------------------------------------------------------------------------
# collapse-linear


def test_collapse_1x1_then_3x3_padded_without_bias() -> None:
    b = Builder(np.random.default_rng(6))
    y = b.conv(b.conv("x", 2, 8, 1, bias=False), 8, 2, 3)
    proto = b.model([("x", (1, 2, 7, 7))], [(y, (1, 2, 7, 7))])
    result, out = run_pass(proto, "collapse-linear")
    assert result.stats.matched == {"conv-conv": 1}
    assert ops(out) == {"Conv": 1}
    assert_equivalent(proto, out)


def test_collapse_rejects_biased_1x1_before_padded_conv() -> None:
    """Padding pads zeros after the bias: the merged conv would be wrong at the borders."""
    b = Builder(np.random.default_rng(7))
    y = b.conv(b.conv("x", 2, 8, 1, bias=True), 8, 2, 3)
    proto = b.model([("x", (1, 2, 7, 7))], [(y, (1, 2, 7, 7))])
    result, out = run_pass(proto, "collapse-linear")
    assert not result.modified
    assert "not exact at the borders" in result.stats.rejected[0].reason
    assert ops(out) == {"Conv": 2}


def test_collapse_conv_bn_conv_and_cost_rejection() -> None:
    b = Builder(np.random.default_rng(8))
    y = b.conv(b.bn(b.conv("x", 4, 16, 3, pads=[1, 1, 1, 1]), 16), 16, 4, 1)
    proto = b.model([("x", (1, 4, 6, 6))], [(y, (1, 4, 6, 6))])
    result, out = run_pass(proto, "collapse-linear")
    assert result.stats.matched == {"conv-bn-conv": 1}
    assert ops(out) == {"Conv": 1}
    assert_equivalent(proto, out)
    # a bottleneck 1x1 -> 3x3 (16 -> 4 -> 16 channels) would cost more MACs merged: left alone
    b = Builder(np.random.default_rng(9))
    y = b.conv(b.conv("x", 16, 4, 1, bias=False), 4, 16, 3)
    proto = b.model([("x", (1, 16, 6, 6))], [(y, (1, 16, 6, 6))])
    result, _ = run_pass(proto, "collapse-linear")
    assert not result.modified and "MACs" in result.stats.rejected[0].reason


def test_collapse_with_relu_between_is_not_matched() -> None:
    b = Builder(np.random.default_rng(10))
    y = b.conv(b.op("Relu", [b.conv("x", 4, 2, 1)]), 2, 4, 1)
    proto = b.model([("x", (1, 4, 6, 6))], [(y, (1, 4, 6, 6))])
    result, out = run_pass(proto, "collapse-linear")
    assert not result.modified and ops(out) == {"Conv": 2, "Relu": 1}


@PROPERTY
@given(
    k1=st.sampled_from([1, 3]), k2=st.sampled_from([1, 3, 5]), s1=st.sampled_from([1, 2]), s2=st.sampled_from([1, 2]),
    pad1=st.booleans(), pad2=st.booleans(), bias1=st.booleans(), bn=st.booleans(),
    groups=st.sampled_from(["1", "dw", "2"]), seed=st.integers(0, 2**31 - 1),
)
def test_collapse_property(k1, k2, s1, s2, pad1, pad2, bias1, bn, groups, seed) -> None:
    c_in, mid, c_out = (4, 4, 4) if groups == "dw" else (2, 16, 2) if groups == "1" else (4, 8, 4)
    g = {"1": 1, "dw": 4, "2": 2}[groups]
    b = Builder(np.random.default_rng(seed))
    z = b.conv("x", c_in, mid, k1, stride=s1, groups=g, pads=[(k1 // 2) * pad1] * 4, bias=bias1)
    if bn:
        z = b.bn(z, mid)
    y = b.conv(z, mid, c_out, k2, stride=s2, groups=g, pads=[(k2 // 2) * pad2] * 4)
    zs = (13 + 2 * (k1 // 2) * pad1 - k1) // s1 + 1
    ys = (zs + 2 * (k2 // 2) * pad2 - k2) // s2 + 1
    proto = b.model([("x", (1, c_in, 13, 13))], [(y, (1, c_out, ys, ys))])
    result, out = run_pass(proto, "collapse-linear")
    if result.modified:
        assert ops(out) == {"Conv": 1}
    else:
        assert result.stats.rejected and ops(out) == ops(proto)
    padded_after_bias = pad2 and k2 > 1 and (bias1 or bn)
    if padded_after_bias:
        assert not result.modified
    if not pad2 or k2 == 1:  # always exact; merged unless it would cost more
        assert result.modified or "MACs" in result.stats.rejected[0].reason
    assert_equivalent(proto, out)


# ------------------------------------------------------------------------------------------------
# torch-exported blocks and the zoo


def test_torch_exported_repvgg_and_acnet_blocks() -> None:
    import torch
    from torch import nn

    from edgec.export import export

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            self.k13 = nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(c))
            self.k31 = nn.Sequential(nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(c))
            self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
            self.id = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.k3(x) + (self.k13(x) + self.k31(x)) + self.k1(x) + self.id(x))

    torch.manual_seed(0)
    m = nn.Sequential(Block(8), Block(8))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_()
    proto = export(m, (1, 8, 10, 10)).model
    report = Pipeline([registry.create("fuse")]).run(eir.from_proto(proto))
    out = eir.to_proto(report.model)
    assert ops(out) == {"Conv": 2, "Relu": 2}
    assert report.final.passed
    assert_equivalent(proto, out)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [("repvgg_a0", {}), ("mobileone_s0", {}), ("mobileone_s0", {"branches": 1})])
def test_zoo_reparam_matches_deploy_form(zoo_onnx, name, kwargs) -> None:
    common = {"resolution": 64, "num_classes": 10, **kwargs}
    train = zoo_onnx(name, **common)
    deploy = zoo_onnx(name, deploy=True, **common)
    report = Pipeline([registry.create("fuse")]).run(eir.from_proto(train))
    out = eir.to_proto(report.model)
    assert len(out.graph.node) == len(deploy.graph.node)
    assert ops(out) == ops(deploy)
    assert eir.count_params(report.model) == eir.count_params(eir.from_proto(deploy))
    assert report.final.passed
    # deep random-weight nets with 4-5 summed branches per block: float rounding up to ~1.4e-4 of range
    assert_equivalent(train, out, REASSOCIATION_TOLERANCE)
    merged = sum(v for k, v in report.steps[0].stats.matched.items() if "reparam[" in k)
    assert merged > 0 and "Add" not in ops(out)


def test_repvit_token_mixer_then_bn() -> None:
    """RepViT's RepVGGDW: BN(dw3x3+BN(x) + dw1x1 with bias(x) + x): reparam, then fold-bn."""
    b = Builder(np.random.default_rng(23))
    c = 8
    s = b.sum_tree([b.bn(b.conv("x", c, c, 3, groups=c, bias=False), c), b.conv("x", c, c, 1, groups=c), "x"], [0])
    y = b.bn(s, c)
    proto = b.model([("x", (1, c, 7, 7))], [(y, (1, c, 7, 7))])
    result, out = run_pass(proto, "fuse")
    assert ops(out) == {"Conv": 1}, result.stats.matched
    assert result.stats.matched["reparam[1x1dw + 3x3dw+bn + id]"] == 1
    assert_equivalent(proto, out)
