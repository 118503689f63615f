"""Winograd convs (edgec.schedules.winograd) keep the numbers of the direct conv.

Each case compiles a small ONNX graph ``Relu(x) -> Conv 3x3 stride 1 [-> Add residual] [-> Relu]``
with :func:`edgec.schedules.compile_module` on the host CPU and compares with onnxruntime on fresh
random inputs at the schedule library's tolerance: both tiles (F(2x2, 3x3), F(4x4, 3x3)), odd
spatial sizes where the last tiles overhang the output, padding 1 / 0 / asymmetric, bias or not,
ReLU or not, a residual add epilogue, channel counts that are not a multiple of the vector width.
It also checks the rewrite and its schedules fired (a Winograd conv that silently falls back to
the direct conv, or to unscheduled loops, fails here).
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import make_model, tensor
from onnx import helper

RTOL = 1e-4


def _host():
    from edgec.targets import get_target

    return get_target("host").tvm_target()


def wino_block(cin, cout, hw, *, pads=(1, 1, 1, 1), bias=True, relu=True, residual=False, seed=0, batch=1):
    """``Relu(x) -> Conv 3x3 (pads) [+ Sigmoid(x) residual] [-> Relu]``; ``hw``: (H, W)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    wt = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
    inits = [tensor("w", wt)]
    conv_in = ["xr", "w"]
    if bias:
        inits.append(tensor("b", rng.standard_normal(cout).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Relu", ["x"], ["xr"]), helper.make_node("Conv", conv_in, ["c"], pads=list(pads))]
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    last = "c"
    if residual:
        assert (oh, ow, cin) == (h, w, cout)
        nodes.append(helper.make_node("Sigmoid", ["x"], ["sig"]))
        nodes.append(helper.make_node("Add", [last, "sig"], ["res"]))
        last = "res"
    nodes.append(helper.make_node("Relu" if relu else "Identity", [last], ["y"]))
    return make_model(nodes, [("x", (batch, cin, h, w))], [("y", (batch, cout, oh, ow))], inits)


@pytest.fixture
def tile(monkeypatch, request):
    """Winograd with output tile ``request.param`` for every 3x3 conv from 8 channels."""
    from edgec.schedules import winograd

    monkeypatch.setattr(winograd, "DEFAULT", winograd.WinogradConfig(tile=request.param, min_channels=8))
    return request.param


def _compile_and_compare(model, shape, seeds, target=None):
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    vm = relax.VirtualMachine(compile_module(from_onnx(model, keep_params_in_input=False), target or _host()), tvm.cpu())
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert y.shape == ref.shape
        scale = max(float(np.abs(ref).max()), 1e-6)
        err = float(np.abs(y - ref).max())
        assert err <= 1e-5 + RTOL * scale, (seed, err, scale)


def _scheduled(model, target=None):
    """name -> TVMScript of the scheduled TIR functions of ``model``."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from edgec import schedules
    from edgec.targets.host import legalize_passes

    target = target or _host()
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(legalize_passes(target) + [schedules.default_schedule_pass(target)])(
            from_onnx(model, keep_params_in_input=False)
        )
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


CASES = {
    # name: (cin, cout, (H, W), extra)
    "exact_tiles": (16, 32, (8, 8), {}),
    "overhang_odd": (16, 16, (13, 11), {}),
    "pad0": (24, 16, (11, 10), {"pads": (0, 0, 0, 0), "relu": False}),
    "pad_asymmetric": (16, 16, (9, 9), {"pads": (0, 1, 1, 0)}),
    "no_bias_no_relu": (16, 24, (7, 7), {"bias": False, "relu": False}),
    "residual": (32, 32, (10, 10), {"residual": True}),
    # channels not a multiple of 16 (AVX-512) or 8 lanes: 8-, 4-lane and 1-lane vectors
    "channels_40_to_36": (40, 36, (9, 9), {}),
    "channels_12_to_20": (12, 20, (6, 6), {}),
    "channels_9_to_10": (9, 10, (5, 7), {}),
    "batch2_overhang": (16, 16, (6, 7), {"batch": 2}),
}


@pytest.mark.parametrize("tile", [2, 4], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_winograd_convs_match_onnxruntime(case, tile):
    cin, cout, hw, extra = CASES[case]
    model = wino_block(cin, cout, hw, **extra)
    funcs = _scheduled(model)
    assert any(n.startswith("winograd_gemm") for n in funcs), (case, sorted(funcs))
    assert not any("conv2d" in n for n in funcs), (case, sorted(funcs))
    _compile_and_compare(model, (extra.get("batch", 1), cin, *hw), (1, 2))


@pytest.mark.parametrize("tile", [4], indirect=True)
def test_winograd_stages_are_scheduled(tile, monkeypatch):
    """The input transform is parallel over tiles with its points unrolled, the GEMM gets the
    register-tiled reduction rule, the output transform (with its fused bias/ReLU/residual
    epilogue) writes vectors."""
    from edgec.schedules import cpu

    monkeypatch.setattr(cpu, "PARALLEL_MIN_MACS", 0)  # parallel loops even at this small size
    funcs = _scheduled(wino_block(32, 32, (28, 28), residual=True))
    inp = next(s for n, s in funcs.items() if n.startswith("winograd_input"))
    gemm = next(s for n, s in funcs.items() if n.startswith("winograd_gemm"))
    out = next(s for n, s in funcs.items() if n.startswith("fused_winograd_output"))
    for script in (inp, gemm, out):
        assert "T.parallel" in script and "T.vectorized" in script
    assert inp.count("T.unroll(T.int64(6))") >= 2  # both point axes
    assert '_init")' in gemm  # accumulator tile of the reduction rule
    assert out.count("T.unroll(T.int64(4))") >= 2  # both output axes of a tile
    # the epilogue (bias, residual add, relu) is fused into the output transform
    out_name = next(n for n in funcs if n.startswith("fused_winograd_output"))
    assert "add" in out_name and "relu" in out_name, out_name


def test_winograd_matrices_compute_the_3x3_correlation():
    """``A^T [(G g G^T) (.) (B^T d B)] A`` is the valid 3x3 correlation of each ``a x a`` patch."""
    from edgec.schedules.winograd import matrices

    rng = np.random.default_rng(0)
    for m in (2, 4):
        A, B, G = matrices(m)
        a = m + 2
        d = rng.standard_normal((a, a))
        g = rng.standard_normal((3, 3))
        y = A.T @ ((G @ g @ G.T) * (B.T @ d @ B)) @ A
        ref = np.array([[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(m)] for i in range(m)])
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_winograd_rule():
    from edgec.schedules.winograd import WinogradConfig, winograd_tile

    assert winograd_tile((3, 3, 64, 64), (1, 1), (1, 1), 1) == 4
    assert winograd_tile((3, 3, 64, 64), (2, 2), (1, 1), 1) is None  # strided
    assert winograd_tile((3, 3, 64, 64), (1, 1), (2, 2), 1) is None  # dilated
    assert winograd_tile((3, 3, 64, 64), (1, 1), (1, 1), 2) is None  # grouped
    assert winograd_tile((1, 1, 64, 64), (1, 1), (1, 1), 1) is None
    assert winograd_tile((5, 5, 64, 64), (1, 1), (1, 1), 1) is None
    assert winograd_tile((3, 3, 3, 64), (1, 1), (1, 1), 1) is None  # RGB: too few channels
    assert winograd_tile((3, 3, 8, 8), (1, 1), (1, 1), 1) == 4
    assert winograd_tile((3, 3, 512, 512), (1, 1), (1, 1), 1) is None  # 9.4 MB of weights -> 37.7 MB
    assert winograd_tile((3, 3, 64, 64), (1, 1), (1, 1), 1, WinogradConfig(tile=2)) == 2
    # F(2x2) on maps with few F(4x4) tiles, when asked for (off by default: measured no faster)
    small = WinogradConfig(min_tiles=32)
    assert winograd_tile((3, 3, 256, 256), (1, 1), (1, 1), 1, small, out_hw=(14, 14)) == 2  # 16 tiles
    assert winograd_tile((3, 3, 64, 64), (1, 1), (1, 1), 1, small, out_hw=(56, 56)) == 4
    assert winograd_tile((3, 3, 256, 256), (1, 1), (1, 1), 1, out_hw=(14, 14)) == 4


def test_direct_conv_kept_where_the_rule_says_no():
    """A 3x3 conv with few channels stays the direct (packed, register-tiled) conv."""
    funcs = _scheduled(wino_block(4, 16, (8, 8)))
    assert not any(n.startswith("winograd") for n in funcs)
    assert any("conv2d" in n for n in funcs)


def test_winograd_weights_are_transformed_in_float64():
    from edgec.schedules.winograd import matrices, transform_weights

    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    for m in (2, 4):
        _, _, G = matrices(m)
        u = transform_weights(w, m)
        a = m + 2
        assert u.shape == (a * a, 5, 7) and u.dtype == np.float32
        ref = np.stack([G @ w[:, :, c, k].astype(np.float64) @ G.T for c in range(5) for k in range(7)])
        np.testing.assert_allclose(u.reshape(a, a, 5, 7).transpose(2, 3, 0, 1).reshape(35, a, a), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tile", [4], indirect=True)
def test_winograd_with_4_lane_vectors_matches_onnxruntime(tile):
    """A 128-bit target (4 lanes, 16 registers: NEON's vector width) run on this host."""
    import tvm

    sse = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    model = wino_block(20, 24, (9, 9), residual=False)
    assert any(n.startswith("winograd_gemm") for n in _scheduled(model, sse))
    _compile_and_compare(model, (1, 20, 9, 9), (3,), sse)


@pytest.mark.parametrize("tile", [4], indirect=True)
def test_winograd_cross_compiles_for_neon(tile, tmp_path):
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module

    neon = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
    model = wino_block(32, 32, (14, 14), residual=True)
    assert any(n.startswith("winograd_gemm") for n in _scheduled(model, neon))
    ex = compile_module(from_onnx(model, keep_params_in_input=False), neon)
    path = tmp_path / "m.so"
    ex.export_library(str(path), cc="aarch64-linux-gnu-gcc")
    assert path.stat().st_size > 0

