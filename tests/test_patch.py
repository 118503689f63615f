"""patch-schedule: per-patch branches equal the original model; refusals name the blocking node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import make_model, tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from edgec import analysis, memory, verify
from edgec.errors import InputError
from edgec.passes.patch import Grid, PatchConfig, PatchSchedule, parse_bytes, patch_model

F = np.float32


def _conv_w(rng, cout, cin_g, k):
    return (rng.standard_normal((cout, cin_g, k, k)) / np.sqrt(cin_g * k * k)).astype(F)


@st.composite
def conv_stacks(draw):
    """A random small CNN: convs (k 1/3/5, stride, dilation, depthwise, asymmetric pads), pools,
    activations, residual adds and channel concats."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(6, 18)), draw(st.integers(6, 18))
    nodes, inits = [], []
    cur, cur_c, cur_h, cur_w = "x", c, h, w
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "dw", "pool", "relu", "res", "concat", "bn"]))
        out = f"t{i}"
        if kind in ("conv", "dw"):
            k = draw(st.sampled_from([1, 3, 5]))
            s = draw(st.sampled_from([1, 2]))
            d = draw(st.sampled_from([1, 2])) if k > 1 else 1
            pads = [draw(st.integers(0, (k - 1) * d // 2 + 1)) for _ in range(4)]
            span = (k - 1) * d + 1
            ho = (cur_h + pads[0] + pads[2] - span) // s + 1
            wo = (cur_w + pads[1] + pads[3] - span) // s + 1
            if ho < 1 or wo < 1:
                continue
            cout, g = (cur_c, cur_c) if kind == "dw" else (draw(st.integers(1, 5)), 1)
            inits += [tensor(f"w{i}", _conv_w(rng, cout, cur_c // g, k)), tensor(f"b{i}", rng.standard_normal(cout).astype(F))]
            nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [out], strides=[s, s], dilations=[d, d],
                                          pads=pads, group=g))
            cur_c, cur_h, cur_w = cout, ho, wo
        elif kind == "pool":
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            k, s = draw(st.sampled_from([2, 3])), draw(st.sampled_from([1, 2]))
            p = draw(st.integers(0, k // 2))
            ho, wo = (cur_h + 2 * p - k) // s + 1, (cur_w + 2 * p - k) // s + 1
            if ho < 1 or wo < 1:
                continue
            extra = {"count_include_pad": draw(st.sampled_from([0, 1]))} if op == "AveragePool" else {}
            nodes.append(helper.make_node(op, [cur], [out], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, **extra))
            cur_h, cur_w = ho, wo
        elif kind == "relu":
            nodes.append(helper.make_node(draw(st.sampled_from(["Relu", "Sigmoid"])), [cur], [out]))
        elif kind == "bn" and draw(st.booleans()):
            inits += [tensor(f"s{i}", rng.standard_normal((cur_c, 1, 1)).astype(F))]
            nodes.append(helper.make_node("Mul", [cur, f"s{i}"], [out]))
        elif kind == "bn":
            names = [f"{p}{i}" for p in ("g", "be", "mu", "var")]
            vals = [rng.standard_normal(cur_c), rng.standard_normal(cur_c), rng.standard_normal(cur_c),
                    rng.uniform(0.5, 2.0, cur_c)]
            inits += [tensor(n, v.astype(F)) for n, v in zip(names, vals)]
            nodes.append(helper.make_node("BatchNormalization", [cur, *names], [out]))
        elif kind == "res":
            k = draw(st.sampled_from([1, 3, 5]))
            inits.append(tensor(f"w{i}", _conv_w(rng, cur_c, 1, k)))
            nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"{out}_c"], pads=[k // 2] * 4, group=cur_c))
            nodes.append(helper.make_node("Add", [f"{out}_c", cur], [out]))
        else:  # concat of a 3x3 conv branch with the input
            inits.append(tensor(f"w{i}", _conv_w(rng, 2, cur_c, 3)))
            nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"{out}_c"], pads=[1] * 4))
            nodes.append(helper.make_node("Concat", [cur, f"{out}_c"], [out], axis=1))
            cur_c += 2
        cur = out
    if cur == "x":
        inits.append(tensor("w_last", _conv_w(rng, 2, c, 3)))
        nodes.append(helper.make_node("Conv", ["x", "w_last"], ["t_last"], pads=[1] * 4))
        cur, cur_c = "t_last", 2
    nodes.append(helper.make_node("Relu", [cur], ["y"]))
    model = make_model(nodes, [("x", (1, c, h, w))], [("y", (1, cur_c, cur_h, cur_w))], inits)
    rows = draw(st.integers(1, min(cur_h, 5)))
    cols = draw(st.integers(1, min(cur_w, 5)))
    return model, cur, Grid(rows, cols)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_stacks())
def test_patched_model_equals_original(case):
    model, split, grid = case
    patched, report = patch_model(model, PatchConfig(grid, split))
    onnx.checker.check_model(patched)
    cmp = verify.compare_models(model, patched, samples=2)
    assert cmp.max_abs <= 1e-5, cmp.summary()
    assert report.grid == grid and report.split == split
    assert report.macs_after == analysis.analyze(patched).macs  # fewer when the original computed unread rows
    # the execution order runs one patch to completion before the next
    names = [n.name for n in patched.graph.node if "__p" in n.name]
    tags = [n.split("__p")[1].split("__")[0] for n in names]
    assert tags == sorted(tags, key=lambda t: tuple(int(v) for v in t.split("_")))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_stacks())
def test_patched_model_equals_original_many(case):
    test_patched_model_equals_original.hypothesis.inner_test(case)


def test_peak_under_patch_order_matches_hand_computation():
    # x[1,1,8,8] -1x1 conv-> a[1,4,8,8] -relu-> -1x1 conv-> s[1,2,8,8] -relu-> y ; 2x2 patches of 4x4
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    m = make_model(nodes, [("x", (1, 1, 8, 8))], [("y", (1, 2, 8, 8))],
                   [tensor("w1", _conv_w(rng, 4, 1, 1)), tensor("w2", _conv_w(rng, 2, 4, 1))])
    patched, report = patch_model(m, PatchConfig(Grid(2, 2), "s", activation_bytes=1))
    X, S, A, xs, a = 64, 2 * 64, 4 * 64, 16, 4 * 16
    # 2nd patch's conv: the input (still sliced by later patches), the assembled s, the patch and its output
    assert report.peak_after == X + S + xs + a
    assert report.peak_before == max(X + A, A + S)  # the Relus run in place
    assert report.macs_after == report.macs_before  # 1x1 convs: no halo
    assert verify.compare_models(m, patched).max_abs <= 1e-6


def _tiny_cnn(extra_nodes, extra_inits=(), out_shape=(1, 4, 1, 1), in_shape=(1, 3, 16, 16), width=4):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0")] + list(extra_nodes)
    inits = [tensor("w0", _conv_w(rng, width, 3, 3))] + list(extra_inits)
    return make_model(nodes, [("x", in_shape)], [("y", out_shape)], inits)


def test_global_pool_before_split_is_refused_naming_it():
    m = _tiny_cnn([helper.make_node("GlobalAveragePool", ["r0"], ["g"], name="gap"),
                   helper.make_node("Relu", ["g"], ["y"], name="relu1")])
    with pytest.raises(InputError, match="'gap'.*global pooling"):
        patch_model(m, PatchConfig(Grid(2, 2), "y"))
    # AUTO stops before it
    _, report = patch_model(m, PatchConfig(Grid(2, 2), "AUTO"))
    assert report.split in ("c0", "r0")


def test_attention_before_any_split_is_refused_naming_it():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Reshape", ["x", "shp"], ["tok"], name="to_tokens"),
             helper.make_node("MatMul", ["tok", "wq"], ["q"], name="q"),
             helper.make_node("Softmax", ["q"], ["y"], name="attn")]
    m = make_model(nodes, [("x", (1, 3, 8, 8))], [("y", (3, 64))],
                   [tensor("shp", np.array([3, 64], np.int64)), tensor("wq", rng.standard_normal((64, 64)).astype(F))])
    with pytest.raises(InputError, match="'to_tokens'"):
        patch_model(m, PatchConfig(Grid(2, 2), "AUTO"))


def test_resize_with_computed_sizes_is_refused():
    nodes = [helper.make_node("Shape", ["r0"], ["shape"], name="shape"),
             helper.make_node("Mul", ["shape", "two"], ["sizes"], name="double"),
             helper.make_node("Resize", ["r0", "", "", "sizes"], ["up"], name="upsample", mode="nearest"),
             helper.make_node("Relu", ["up"], ["y"], name="relu1")]
    m = _tiny_cnn(nodes, [tensor("two", np.array([1, 1, 2, 2], np.int64))], out_shape=(1, 4, 32, 32))
    with pytest.raises(InputError, match="'(upsample|shape)'"):
        patch_model(m, PatchConfig(Grid(2, 2), "y"))


def test_dynamic_spatial_shape_is_refused_naming_the_reader():
    m = _tiny_cnn([helper.make_node("Relu", ["r0"], ["y"])], out_shape=("N", 4, "H", "W"), in_shape=("N", 3, "H", "W"))
    with pytest.raises(InputError, match="dynamic.*'conv0'"):
        patch_model(m, PatchConfig(Grid(2, 2), "AUTO"))


def test_grid_larger_than_feature_map_is_refused():
    m = _tiny_cnn([helper.make_node("MaxPool", ["r0"], ["y"], kernel_shape=[4, 4], strides=[4, 4], name="pool")],
                  out_shape=(1, 4, 4, 4))
    with pytest.raises(InputError, match="grid 5x5 does not fit.*'pool'.*4x4"):
        patch_model(m, PatchConfig(Grid(5, 5), "y"))


def test_residual_crossing_the_split_is_refused():
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Add", ["c1", "r0"], ["y"], name="add")]
    m = _tiny_cnn(nodes, [tensor("w1", _conv_w(rng, 4, 4, 3))], out_shape=(1, 4, 16, 16))
    with pytest.raises(InputError, match="read by node 'add'"):
        patch_model(m, PatchConfig(Grid(2, 2), "c1"))


def test_sram_budget_search_and_nothing_fits():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1] * 4, strides=[2, 2], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["y"])]
    m = _tiny_cnn(nodes, [tensor("w1", _conv_w(rng, 8, 16, 3)), tensor("w2", _conv_w(rng, 8, 8, 1))],
                  in_shape=(1, 3, 32, 32), out_shape=(1, 8, 1, 1), width=16)
    before = analysis.analyze(m).memory_int8.peak_bytes
    budget = before // 2
    patched, report = patch_model(m, PatchConfig(None, "AUTO", budget, activation_bytes=1))
    assert report.peak_after <= budget < report.peak_before
    plan = memory.plan_memory(analysis.analyze(patched).schedule, 1)
    assert plan.peak_bytes == report.peak_after
    assert verify.compare_models(m, patched).max_abs <= 1e-5
    same, fits = patch_model(m, PatchConfig(None, "AUTO", before, activation_bytes=1))
    assert not fits.patched and fits.peak_after == before and len(same.graph.node) == len(m.graph.node)
    with pytest.raises(InputError, match="nothing fits the SRAM budget of 100 bytes"):
        patch_model(m, PatchConfig(None, "AUTO", 100, activation_bytes=1))


def test_option_parsing_and_cli(tmp_path, run_cli):
    assert parse_bytes("256KB") == 256 * 1024 and parse_bytes("1.5MiB") == 1536 * 1024 and parse_bytes("1000") == 1000
    assert Grid.parse("3x4") == Grid(3, 4)
    with pytest.raises(ValueError):
        Grid.parse("4")
    m = _tiny_cnn([helper.make_node("MaxPool", ["r0"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                   helper.make_node("GlobalAveragePool", ["p"], ["y"])])
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(m, src)
    code, stdout, stderr = run_cli("optimize", str(src), "-o", str(out), "--passes", "patch-schedule",
                                   "--patches", "2x2", "--split", "AUTO")
    assert code == 0, stderr
    assert "lower; MACs +" in stderr and "equivalence vs input: ok" in stdout
    assert verify.compare_models(m, onnx.load(out)).max_abs <= 1e-5
    code, _, stderr = run_cli("optimize", str(src), "-o", str(tmp_path / "q.onnx"), "--passes", "patch-schedule",
                              "--split", "y")
    assert code != 0 and "GlobalAveragePool" in stderr and not (tmp_path / "q.onnx").exists()
    assert PatchSchedule.name == "patch-schedule"


@pytest.mark.slow
def test_patched_model_compiles_with_tvm_and_matches():
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1] * 4, strides=[2, 2], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[2] * 4, group=8, name="dw5"),
             helper.make_node("Add", ["c2", "r1"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["y"])]
    m = _tiny_cnn(nodes, [tensor("w1", _conv_w(rng, 8, 16, 3)), tensor("w2", _conv_w(rng, 8, 1, 5))],
                  in_shape=(1, 3, 32, 32), out_shape=(1, 8, 1, 1), width=16)
    patched, report = patch_model(m, PatchConfig(Grid(3, 3), "s"))
    ex = tvm.compile(from_onnx(patched, keep_params_in_input=False), tvm.target.Target({"kind": "llvm"}))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    x = rng.standard_normal((1, 3, 32, 32)).astype(F)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = verify.run(m, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("attrs", [
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID", "strides": [1, 2]},
    {"pads": [0, 0, 0, 0], "strides": [2, 2], "ceil_mode": 1, "pool": True},  # ceil that adds no window
])
def test_auto_pad_and_ceil_mode(attrs):
    rng = np.random.default_rng(9)
    attrs = dict(attrs)
    size = 16 if attrs.get("pool") else 15
    if attrs.pop("pool", False):
        node = helper.make_node("MaxPool", ["r0"], ["p"], kernel_shape=[2, 2], **attrs)
    else:
        node = helper.make_node("Conv", ["r0", "w1"], ["p"], **attrs)
    m = _tiny_cnn([node, helper.make_node("Relu", ["p"], ["y"])], [tensor("w1", _conv_w(rng, 4, 4, 3))],
                  in_shape=(1, 3, size, 16), out_shape=("a", "b", "c", "d"))
    patched, _ = patch_model(m, PatchConfig(Grid(3, 2), "p"))
    assert verify.compare_models(m, patched).max_abs <= 1e-5


def test_ceil_mode_with_partial_window_is_refused():
    node = helper.make_node("MaxPool", ["r0"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="ceilpool")
    m = _tiny_cnn([node, helper.make_node("Relu", ["p"], ["y"])], in_shape=(1, 3, 15, 15), out_shape=(1, 4, 8, 8))
    with pytest.raises(InputError, match="'ceilpool'.*ceil_mode"):
        patch_model(m, PatchConfig(Grid(2, 2), "p"))
