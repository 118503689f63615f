"""edgec's CPU schedule library keeps the numbers of every operator form it schedules.

Each case builds a small ONNX graph (conv2d pointwise / dense / strided / depthwise / grouped,
narrow and odd channel counts, odd widths, fused BN + ReLU6 + residual epilogues, Gemm, pooling,
global mean), compiles it with :func:`edgec.schedules.compile_module` on the host CPU and compares
with onnxruntime on fresh random inputs.  It also checks the rules really fired (the reduction
functions carry a parallel loop and a vectorized loop), so a rule that silently stops applying
fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import make_model, tensor
from onnx import helper

RTOL = 1e-4


@pytest.fixture(autouse=True)
def direct_convs(monkeypatch):
    """The direct (register-tiled) kernels: every 3x3 conv here stays a direct conv.  3x3 stride-1
    convs from 8 channels are Winograd convs by default; tests/test_winograd.py covers those."""
    from edgec.schedules import winograd

    monkeypatch.setattr(winograd, "DEFAULT", winograd.WinogradConfig(min_channels=10**9))


def _host():
    from edgec.schedules.cpu import cpu_params  # noqa: F401 - import check
    from edgec.targets import get_target

    return get_target("host").tvm_target()


def _run_both(model, shape, seed):
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    ex = compile_module(from_onnx(model, keep_params_in_input=False), _host())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    y = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    return y, ref


def _scheduled_funcs(model):
    """The scheduled TIR functions (name -> script) the pipeline produces for ``model``."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    from edgec import schedules

    target = _host()
    mod = from_onnx(model, keep_params_in_input=False)
    with target:
        seq = schedules.layout_passes(target) + cpu.legalize_passes(target) + [schedules.default_schedule_pass(target)]
        mod = tvm.transform.Sequential(seq)(mod)
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _has_accumulator_tile(script):
    """The reduction accumulates into its own buffer (zeroed by a decomposed init block) that an
    epilogue or write-back block copies out per tile."""
    return "T.sblock_alloc_buffer" in script and '_init")' in script


def conv_block(cin, cout, k, stride, groups, hw, *, bn=True, clip=True, residual=False, seed=0, stem=False, bias=True):
    """Conv (+BN, +residual, +ReLU6).  ``stem``: the conv reads the model input itself (and gets
    the NCHW-reading stem conv); otherwise it reads ``Relu(x)``, a channels-last tensor.
    ``residual="sigmoid"``: the residual is ``Sigmoid`` of the conv's input (the input read twice,
    not an identity branch: a plain residual of the conv's own input merges into its kernel, see
    :mod:`edgec.schedules.branches`)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    pad = (k - 1) // 2
    src = "x" if stem else "xr"
    nodes = [] if stem else [helper.make_node("Relu", ["x"], ["xr"])]
    conv_in = [src, "w", "b"] if bias else [src, "w"]
    nodes.append(helper.make_node("Conv", conv_in, ["c"], strides=[stride] * 2, pads=[pad] * 4, group=groups))
    inits = [tensor("w", w), tensor("b", b)] if bias else [tensor("w", w)]
    last = "c"
    if bn:
        inits += [
            tensor("g", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
            tensor("be", rng.standard_normal(cout).astype(np.float32)),
            tensor("m", rng.standard_normal(cout).astype(np.float32) * 0.1),
            tensor("v", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [last, "g", "be", "m", "v"], ["bn"]))
        last = "bn"
    if residual == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [src], ["sig"]))
        nodes.append(helper.make_node("Add", [last, "sig"], ["res"]))
        last = "res"
    elif residual:
        nodes.append(helper.make_node("Add", [last, src], ["res"]))
        last = "res"
    if clip:
        inits += [tensor("lo", np.array(0.0, np.float32)), tensor("hi", np.array(6.0, np.float32))]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    ho = (hw + 2 * pad - k) // stride + 1
    return make_model(nodes, [("x", (1, cin, hw, hw))], [("y", (1, cout, ho, ho))], inits)


CONV_CASES = {
    # name: (cin, cout, k, stride, groups, hw, extra)
    "pointwise": (32, 48, 1, 1, 1, 14, {}),
    # residual epilogue of another tensor (sigmoid of the input), and of the conv's own input
    # (that one merges into the kernel: identity tap)
    "pointwise_residual": (24, 24, 1, 1, 1, 7, {"residual": "sigmoid"}),
    "pointwise_identity_residual_merged": (24, 24, 1, 1, 1, 7, {"residual": True}),
    "pointwise_narrow_out": (16, 24, 1, 1, 1, 9, {"clip": False}),
    "dense3x3_rgb_stride2": (3, 16, 3, 2, 1, 17, {}),
    "stem_rgb_3x3_stride2": (3, 16, 3, 2, 1, 17, {"stem": True}),
    "dense3x3": (16, 32, 3, 1, 1, 13, {"bn": False}),
    "depthwise3x3": (32, 32, 3, 1, 32, 15, {}),
    "depthwise3x3_stride2": (48, 48, 3, 2, 48, 16, {}),
    "depthwise5x5_odd_channels": (20, 20, 5, 1, 20, 11, {}),
    "grouped": (32, 32, 3, 1, 4, 8, {}),
    "odd_channels": (5, 7, 3, 1, 1, 6, {}),
    # weights larger than the activations (cpu.pixel_blocks): 7 rows and small weights: pixel
    # tiles outside; 8 rows: 4 row bands, channel tiles inside each; 7 rows and 1.3 MB of
    # weights: channel tiles outside
    "pointwise_weights_outer": (64, 320, 1, 1, 1, 7, {}),
    "pointwise_weights_row_bands": (64, 512, 1, 1, 1, 8, {"clip": False}),
    "pointwise_weights_outer_large": (512, 640, 1, 1, 1, 7, {"bn": False}),
    # materialized padding (long reduction) with channels not a multiple of the vector width
    "dense3x3_odd_wide": (40, 52, 3, 1, 1, 9, {"residual": False}),
    "dense5x5_stride2_no_bn": (24, 40, 5, 2, 1, 11, {"bn": False}),
    # narrow / odd channel counts: 40 = 5 vectors of 8 lanes, 200 = 25 (Tc = 5, not 1)
    "pointwise_five_vectors": (160, 40, 1, 1, 1, 9, {"clip": False}),
    "pointwise_narrow_to_wide": (40, 200, 1, 1, 1, 5, {}),
    "pointwise_48": (24, 48, 1, 1, 1, 6, {}),
    # large-kernel strided depthwise with padding (MCUNet), 24 channels = 3 vectors of 8
    "depthwise7x7_stride2_24": (24, 24, 7, 2, 24, 15, {}),
    # stems reading the NCHW model input directly (transpose folded into the conv)
    "stem_rgb_7x7_stride2": (3, 64, 7, 2, 1, 23, {"stem": True}),
    "stem_rgb_1x1_no_padding": (3, 8, 1, 1, 1, 6, {"bn": False, "stem": True}),
    "stem_rgb_residual_input_read_twice": (3, 3, 3, 1, 1, 8, {"residual": "sigmoid", "stem": True}),
    # residual of the conv's own input: merged into the kernel as an identity tap
    "stem_rgb_identity_residual_merged": (3, 3, 3, 1, 1, 8, {"residual": True, "stem": True}),
    "stem_16_channels_5x5": (16, 24, 5, 1, 1, 10, {"stem": True}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_forms_match_onnxruntime(case):
    cin, cout, k, stride, groups, hw, extra = CONV_CASES[case]
    model = conv_block(cin, cout, k, stride, groups, hw, **extra)
    for seed in (1, 2):
        y, ref = _run_both(model, (1, cin, hw, hw), seed)
        assert y.shape == ref.shape
        scale = max(float(np.abs(ref).max()), 1e-6)
        assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * scale, case


@pytest.mark.parametrize("case", ["pointwise_residual", "depthwise3x3_stride2", "stem_rgb_7x7_stride2", "dense3x3_odd_wide"])
def test_parallel_schedules_match_onnxruntime(case, parallel_always):
    """The same forms with their parallel loops (the default runs these small shapes serially)."""
    cin, cout, k, stride, groups, hw, extra = CONV_CASES[case]
    model = conv_block(cin, cout, k, stride, groups, hw, **extra)
    y, ref = _run_both(model, (1, cin, hw, hw), 3)
    assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * max(float(np.abs(ref).max()), 1e-6), case


def test_pixel_blocks_keep_row_bands_per_thread():
    """Weight-blocked reductions split their parallel loop into row bands (4, else 2) with the
    channel tiles inside each band; where the rows do not divide, pixel tiles outermost unless
    the weights exceed about one L2 cache; reductions whose weights are small keep pixel tiles
    outermost."""
    from edgec.schedules.cpu import PIXEL_OUTSIDE_MAX_WEIGHT, pixel_blocks

    data, weight = 16 * 1024, 128 * 1024  # 1x1 conv 64 -> 512 at 8x8
    assert pixel_blocks((data, weight), 8, 8) == 4
    assert pixel_blocks((data, weight), 6, 8) == 2
    assert pixel_blocks((data, weight), 7, 8) == 7
    big = PIXEL_OUTSIDE_MAX_WEIGHT + 4
    assert pixel_blocks((data, big), 7, 8) == 1
    assert pixel_blocks((data, big), 4, 8) == 4  # 4 tiles, 4 blocks: pixel tiles outermost
    # activations larger than the weights: pixel tiles outermost, whatever the counts
    assert pixel_blocks((10 * weight, weight), 8, 8) == 8
    assert pixel_blocks(None, 8, 8) == 8


@pytest.mark.parametrize(
    "shape,order",
    [
        ((64, 512, 8), "bands"),  # 8 rows: 4 bands, channel tiles inside each
        ((64, 320, 7), "pixels"),  # 7 rows, 80 KB of weights: pixel tiles outermost
        ((512, 640, 7), "channels"),  # 7 rows, 1.3 MB of weights: channel tiles outermost
    ],
)
def test_parallel_loop_order_of_weight_blocked_convs(shape, order, parallel_always):
    """The fused parallel loop's name lists the loops it fused, outermost first (legalized conv
    loops: ``bn, y, x`` pixels, ``f`` output channels; ``x_0`` / ``f_0`` their tile loops)."""
    cin, cout, hw = shape
    model = conv_block(cin, cout, 1, 1, 1, hw, clip=False)
    convs = [s for n, s in _scheduled_funcs(model).items() if "conv2d" in n]
    assert len(convs) == 1
    loops = [line.split()[1] for line in convs[0].splitlines() if "T.parallel" in line]
    assert len(loops) == 1
    expected = {
        "bands": "bn_y_x_0_fused_0_f_0_bn_y_x_0_fused_1_fused",
        "pixels": "bn_y_x_0_f_0_fused",
        "channels": "f_0_bn_y_x_0_fused",
    }[order]
    assert loops[0] == expected, (order, loops[0])


def test_small_reductions_run_serially():
    """Under ~2M multiply-adds no parallel loop (thread-pool launch costs more than it saves);
    above, one parallel loop over the tiles."""
    from edgec.schedules.cpu import PARALLEL_MIN_MACS, run_serially

    assert run_serially(PARALLEL_MIN_MACS - 1) and not run_serially(PARALLEL_MIN_MACS)
    small = conv_block(32, 48, 1, 1, 1, 14)  # 14*14*48*32 = 0.3M MACs
    big = conv_block(64, 64, 3, 1, 1, 28, bn=False)  # 28*28*64*576 = 28.9M MACs
    for model, parallel in ((small, False), (big, True)):
        convs = [s for n, s in _scheduled_funcs(model).items() if "conv2d" in n]
        assert convs and all(("T.parallel" in s) == parallel and "T.vectorized" in s for s in convs)


def head_model(cin=40, hw=7, classes=10, seed=0, pool="mean"):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((classes, cin)) / np.sqrt(cin)).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    if pool == "mean":
        p = helper.make_node("ReduceMean", ["x"], ["p"], axes=[2, 3], keepdims=1)
        extra = []
    else:
        p = helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        extra = []
    nodes = [p]
    src = "p"
    if pool != "mean":
        nodes.append(helper.make_node("ReduceMean", ["mp"], ["p"], axes=[2, 3], keepdims=1))
    nodes += [
        helper.make_node("Flatten", [src], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1),
    ]
    return make_model(nodes, [("x", (1, cin, hw, hw))], [("y", (1, classes))], [tensor("w", w), tensor("b", b), *extra])


@pytest.mark.parametrize("pool", ["mean", "maxpool"])
def test_pool_and_gemm_match_onnxruntime(pool):
    model = head_model(pool=pool)
    y, ref = _run_both(model, (1, 40, 7, 7), 3)
    assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max())


def test_classifier_with_1000_classes_matches_onnxruntime(parallel_always):
    """1000 outputs = 125 vectors of 8 lanes: a register tile 5 vectors wide (not 1); with large
    (cold, streamed) weights, parallel chunks of 25 vectors that read weight rows contiguously."""
    from edgec.schedules.cpu import stream_chunk, tile_shape

    assert tile_shape(125, 1, 32) == (1, 5)
    assert stream_chunk(125) == 25 and stream_chunk(80) == 20 and stream_chunk(32) == 8
    assert stream_chunk(6) == 6  # too few vectors to split
    for cin in (64, 320):  # 256 KB of weights: register tiles; 1.28 MB: streamed chunks
        model = head_model(cin=cin, hw=3, classes=1000)
        for seed in (1, 2):
            y, ref = _run_both(model, (1, cin, 3, 3), seed)
            assert y.shape == ref.shape == (1, 1000)
            assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max())
    streamed = [s for n, s in _scheduled_funcs(head_model(cin=320, hw=3, classes=1000)).items() if "matmul" in n]
    assert streamed and "T.parallel(T.int64(5))" in streamed[0], streamed


def test_input_transpose_folds_into_the_stem_conv(parallel_always):
    """The NCHW model input feeds the stem conv directly: no input transpose function is left,
    the conv function reads the NCHW input and is still register-tiled (parallel + vector)."""
    model = conv_block(3, 16, 3, 2, 1, 17, stem=True)
    script = _relax_ops_after_layout(model)
    assert script.count("R.permute_dims") == 1, script  # only the output's NHWC -> NCHW
    assert "conv2d_nchw_nhwc" in script
    funcs = _scheduled_funcs(model)
    stems = {n: s for n, s in funcs.items() if "conv2d_nchw_nhwc" in n}
    assert len(stems) == 1, list(funcs)
    (stem,) = stems.values()
    assert "T.parallel" in stem and "T.vectorized" in stem and _has_accumulator_tile(stem)
    assert "(T.int64(1), T.int64(3), T.int64(17), T.int64(17))" in stem  # NCHW input buffer
    # the input also read by another op (the residual's sigmoid): the conv still reads the NCHW
    # input (numerics: CONV_CASES["stem_rgb_residual_input_read_twice"])
    script = _relax_ops_after_layout(conv_block(3, 3, 3, 1, 1, 8, residual="sigmoid", stem=True))
    assert "R.call_tir(conv2d_nchw_nhwc, (x," in script and "R.nn.conv2d" not in script, script
    assert "R.sigmoid(x)" in script, script
    # a residual of the input itself is an identity tap of the merged kernel: no transpose left
    script = _relax_ops_after_layout(conv_block(3, 3, 3, 1, 1, 8, residual=True, stem=True))
    assert "conv2d_nchw_nhwc" in script and script.count("R.permute_dims(x") == 0, script


@pytest.fixture
def parallel_always(monkeypatch):
    """Parallel loops even for the small test shapes (they run serially by default)."""
    from edgec.schedules import cpu

    monkeypatch.setattr(cpu, "PARALLEL_MIN_MACS", 0)


def test_rules_fire_on_every_conv_form(parallel_always):
    """Every conv/pool/gemm function is scheduled by the register-tiled rule: parallel + vector."""
    for case in ("pointwise", "depthwise3x3_stride2", "dense3x3_rgb_stride2", "grouped"):
        cin, cout, k, stride, groups, hw, extra = CONV_CASES[case]
        funcs = _scheduled_funcs(conv_block(cin, cout, k, stride, groups, hw, **extra))
        convs = {n: s for n, s in funcs.items() if "conv2d" in n}
        assert convs, (case, list(funcs))
        for name, script in convs.items():
            assert "T.parallel" in script, (case, name)
            assert "T.vectorized" in script, (case, name)
            assert _has_accumulator_tile(script), (case, name)
            assert "transpose" not in name, (case, name)  # epilogue stayed channels-last
    funcs = _scheduled_funcs(head_model())
    gemm = [s for n, s in funcs.items() if "matmul" in n]
    assert gemm and all("T.parallel" in s and "T.vectorized" in s for s in gemm)


def test_clip_is_fused_into_conv():
    funcs = _scheduled_funcs(conv_block(16, 32, 1, 1, 1, 8))
    names = list(funcs)
    assert any("conv2d" in n and "minimum" in n for n in names), names
    assert not any("transpose" in n and "maximum" in n for n in names), names


def test_no_schedule_for_non_cpu_targets():
    import tvm

    from edgec import schedules

    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert schedules.default_schedule_pass(cuda) is None
    assert schedules.layout_passes(cuda) == []


def test_cpu_params_per_family():
    import tvm

    from edgec.schedules.cpu import cpu_params

    avx512 = cpu_params(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    avx2 = cpu_params(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    neon = cpu_params(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}))
    assert (avx512.lanes(32), avx512.registers) == (16, 32)
    assert (avx2.lanes(32), avx2.registers) == (8, 16)
    assert (neon.lanes(32), neon.registers) == (4, 32)


def test_mean_with_quantize_epilogue_matches_onnxruntime():
    """NCHW global mean whose epilogue (quantize/dequantize) has only extent-1 loops of its own.

    Regression: the epilogue's vectorization used to split the shared parallel loop that also
    holds the reduction, and the int8 model's outputs were wrong.
    """
    rng = np.random.default_rng(5)
    cin, classes = 8, 10
    w = (rng.standard_normal((classes, cin)) / np.sqrt(cin)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"]),
        helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["pd"]),
        helper.make_node("Flatten", ["pd"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    inits = [tensor("w", w), tensor("s", np.array(0.01, np.float32)), tensor("z", np.array(128, np.uint8))]
    model = make_model(nodes, [("x", (1, cin, 4, 4))], [("y", (1, classes))], inits)
    for seed in (1, 2):
        y, ref = _run_both(model, (1, cin, 4, 4), seed)
        # one quantization step of the pooled value may round differently: at most s * |w| per logit
        assert float(np.abs(y - ref).max()) <= 0.01 * float(np.abs(w).sum(axis=1).max()) + 1e-5


def test_model_whose_layout_cannot_be_converted_still_compiles():
    """TVM's ConvertLayout fails on Dropout (a tuple result); the model compiles in NCHW instead."""
    from graphs import conv_relu_model

    model = conv_relu_model()
    y, ref = _run_both(model, (1, 3, 8, 8), 4)
    assert y.shape == ref.shape
    assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max())


def _affine_model(chain, cout=24, groups=1, seed=0, extra_use=False):
    """Conv followed by a chain of per-channel (or scalar) Add/Sub/Mul/Div by constants."""
    rng = np.random.default_rng(seed)
    cin, hw = (32 if groups > 1 else 16), 9
    if groups > 1:
        cout = cin
    w = (rng.standard_normal((cout, cin // groups, 3, 3)) / 6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], pads=[1, 1, 1, 1], group=groups)]
    inits = [tensor("w", w)]
    for i, (op, shape) in enumerate(chain):
        c = rng.uniform(0.5, 1.5, shape).astype(np.float32) * rng.choice([-1, 1], shape).astype(np.float32)
        inits.append(tensor(f"c{i}", c))
        nodes.append(helper.make_node(op, [f"t{i}", f"c{i}"], [f"t{i + 1}"]))
    last = f"t{len(chain)}"
    if extra_use:  # the conv output is read twice: it must not be folded away
        nodes.append(helper.make_node("Add", [last, "t0"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    return make_model(nodes, [("x", (1, cin, hw, hw))], [("y", (1, cout, hw, hw))], inits), (1, cin, hw, hw)


AFFINE_CASES = {
    "bn_like": ([("Sub", (24, 1, 1)), ("Div", (24, 1, 1)), ("Mul", (24, 1, 1)), ("Add", (24, 1, 1))], {}),
    "scalar_and_4d": ([("Mul", ()), ("Add", (1, 24, 1, 1)), ("Div", (1, 1, 1, 1))], {}),
    "depthwise": ([("Div", (32, 1, 1)), ("Sub", ())], {"groups": 32}),
    "grouped": ([("Mul", (32, 1, 1)), ("Add", (32, 1, 1))], {"groups": 4}),
    "conv_output_read_twice": ([("Mul", (24, 1, 1)), ("Add", (24, 1, 1))], {"extra_use": True}),
    "not_per_channel": ([("Add", (1, 1, 9, 9)), ("Mul", (24, 1, 1))], {}),
}


@pytest.mark.parametrize("case", sorted(AFFINE_CASES))
def test_conv_affine_folding_matches_onnxruntime(case):
    chain, kw = AFFINE_CASES[case]
    model, shape = _affine_model(chain, **kw)
    for seed in (1, 2):
        y, ref = _run_both(model, shape, seed)
        assert y.shape == ref.shape
        assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max()), case


def _relax_ops_after_layout(model):
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from edgec import schedules

    target = _host()
    with target:
        mod = tvm.transform.Sequential(schedules.layout_passes(target))(from_onnx(model, keep_params_in_input=False))
    return mod["main"].script(show_meta=False)


def _n_convs(script):
    """Convs in a Relax script: ``R.nn.conv2d`` or the stem conv reading the NCHW input."""
    return script.count("R.nn.conv2d") + script.count("R.call_tir(conv2d_nchw_nhwc")


def test_batchnorm_folds_into_conv_weights():
    """Conv -> BN becomes one conv (scaled weights) + one bias add; no divide/subtract/multiply left."""
    script = _relax_ops_after_layout(conv_block(16, 32, 3, 1, 1, 8, clip=False))
    assert script.count("R.nn.conv2d") == 1
    for op in ("R.divide", "R.subtract", "R.multiply"):
        assert op not in script, op
    # a value read twice keeps its conv and chain: folding would duplicate the conv
    model, _ = _affine_model([("Mul", (24, 1, 1))], extra_use=True)
    script = _relax_ops_after_layout(model)
    assert _n_convs(script) == 1 and "R.multiply" in script
    # a constant that is not per output channel is not folded
    model, _ = _affine_model([("Add", (1, 1, 9, 9))])
    assert "R.add" in _relax_ops_after_layout(model)


def test_tile_shape_fits_registers_and_divides():
    from edgec.schedules.cpu import tile_shape

    for registers in (16, 32):
        for c_vectors in range(1, 41):
            for w_ext in (1, 2, 3, 5, 7, 9, 13, 14, 28, 56, 112):
                tw, tc = tile_shape(c_vectors, w_ext, registers)
                assert c_vectors % tc == 0 and w_ext % tw == 0, (c_vectors, w_ext)
                assert tw == tc == 1 or tc * (tw + 1) + 1 <= registers, (c_vectors, w_ext, tw, tc)
    # the spilling tile of the old heuristic (7 pixels x 4 vectors on 32 registers) is never chosen
    assert tile_shape(36, 14, 32) != (7, 4)
    # odd vector counts get a wide tile instead of one vector: 40 channels at 9x9, 200 at 5x5
    assert tile_shape(5, 9, 32) == (3, 5)
    assert tile_shape(25, 5, 32)[1] == 5
    # ... but where 2..4 vectors divide, the narrower tile stays (256 channels at 14x14: (7, 2))
    assert tile_shape(16, 14, 32) == (7, 2)


def test_padding_materialized_for_dense_inlined_for_strided_depthwise(parallel_always):
    dense = _scheduled_funcs(conv_block(16, 32, 3, 1, 1, 13, bn=False))
    assert any("conv2d" in n and 'sblock("pad_temp")' in s for n, s in dense.items()), list(dense)
    # the NCHW-reading stem pads its 3-channel input in one pass before the tiles' parallel loop
    (stem,) = [s for n, s in _scheduled_funcs(conv_block(3, 16, 7, 2, 1, 20, stem=True)).items() if "conv2d_nchw_nhwc" in n]
    assert stem.count("T.parallel") == 2 and 'sblock("pad_temp")' in stem
    cin, cout, k, stride, groups, hw, extra = CONV_CASES["depthwise3x3_stride2"]
    dw = _scheduled_funcs(conv_block(cin, cout, k, stride, groups, hw, **extra))
    assert not any("conv2d" in n and 'sblock("pad_temp")' in s for n, s in dw.items()), list(dw)


def test_batchnorm_on_a_non_conv_branch_becomes_one_multiply_add():
    """RepVGG's identity-branch BN: (x - m) / s * g + b on a ReLU output becomes x * a + c."""
    rng = np.random.default_rng(7)
    c = 12
    inits = [
        tensor("g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        tensor("be", rng.standard_normal(c).astype(np.float32)),
        tensor("m", rng.standard_normal(c).astype(np.float32)),
        tensor("v", rng.uniform(0.5, 1.5, c).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("BatchNormalization", ["r", "g", "be", "m", "v"], ["y"]),
    ]
    model = make_model(nodes, [("x", (1, c, 5, 5))], [("y", (1, c, 5, 5))], inits)
    script = _relax_ops_after_layout(model)
    assert "R.divide" not in script and "R.subtract" not in script
    assert script.count("R.multiply") == 1 and script.count("R.add") == 1
    for seed in (1, 2):
        y, ref = _run_both(model, (1, c, 5, 5), seed)
        assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max())


# packed weights: (cin, cout, k, stride, groups, hw, extra); every case has more than one
# channel block (K/B > 1) on AVX-512 and on NEON, so the packed path is the one exercised
PACKED_CASES = {
    "dense3x3_bias": (32, 128, 3, 1, 1, 14, {"bn": False}),
    "dense3x3_stride2_pad": (24, 96, 3, 2, 1, 15, {}),
    "dense5x5_stride2_no_bias": (16, 128, 5, 2, 1, 11, {"bn": False, "clip": False, "bias": False}),
    "pointwise_residual": (96, 96, 1, 1, 1, 7, {"residual": "sigmoid"}),
    "pointwise_odd_blocks": (40, 200, 1, 1, 1, 5, {}),
    "pointwise_wide_weights_outer": (320, 1280, 1, 1, 1, 3, {}),
    "depthwise3x3": (144, 144, 3, 1, 144, 14, {}),
    "depthwise3x3_stride2": (96, 96, 3, 2, 96, 16, {}),
    "depthwise7x7_stride2_odd_width": (96, 96, 7, 2, 96, 13, {}),
    "grouped3x3": (64, 128, 3, 1, 4, 9, {}),
    "grouped_stride2": (96, 96, 3, 2, 2, 10, {"bn": False}),
    # 1x1 to few output vectors, long rows: (Tw, Tc) = (28, 1) / (20, 1) (cpu.narrow_tile)
    "pointwise_narrow_long_rows": (96, 24, 1, 1, 1, 28, {}),
    "pointwise_narrow_long_rows_no_bn": (64, 32, 1, 1, 1, 20, {"bn": False}),
}


def _packed_names(model):
    return [n for n in _scheduled_funcs(model) if "conv2d_packed" in n or "matmul_packed" in n]


@pytest.mark.parametrize("case", sorted(PACKED_CASES))
def test_packed_weight_convs_match_onnxruntime(case):
    """Convs whose constant weights are packed per channel tile ([K/B, KH, KW, Cg, B]) give
    onnxruntime's outputs (dense, depthwise, grouped; stride 2 with padding; bias / none)."""
    cin, cout, k, stride, groups, hw, extra = PACKED_CASES[case]
    model = conv_block(cin, cout, k, stride, groups, hw, **extra)
    assert _packed_names(model), case  # the packed path is the one tested
    for seed in (1, 2):
        y, ref = _run_both(model, (1, cin, hw, hw), seed)
        assert y.shape == ref.shape
        assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * max(float(np.abs(ref).max()), 1e-6), case


def test_packed_weights_layout_and_block_follow_the_register_tile():
    """pack_hwio / pack_matrix put one channel block's weights contiguously, in reduction order,
    and the block is the schedule's channel tile (Tc * V) for that output shape."""
    from edgec.schedules.cpu import channel_tile
    from edgec.schedules.layout import pack_hwio, pack_matrix

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 5, 96)).astype(np.float32)  # HWIO
    p = pack_hwio(w, 32)
    assert p.shape == (3, 3, 3, 5, 32) and p.flags["C_CONTIGUOUS"]
    for kk in (0, 31, 32, 95):
        assert np.array_equal(p[kk // 32, :, :, :, kk % 32], w[..., kk])
    m = rng.standard_normal((7, 48)).astype(np.float32)
    pm = pack_matrix(m, 16)
    assert pm.shape == (3, 7, 16) and np.array_equal(pm[2, :, 5], m[:, 37])
    # AVX-512 (16 lanes, 32 registers): 128 channels at 14 wide -> 7 px x 2 vectors, B = 32
    t = channel_tile(128, 14, 196, 3 * 3 * 32 * 128 * 4, 16, 32)
    assert (t.pixels, t.vectors, t.lanes, t.block) == (7, 2, 16, 32)
    # a streamed matrix-vector product: the block is the parallel chunk (1000 = 125 x 8 lanes)
    t = channel_tile(1000, 1, 1, 1280 * 1000 * 4, 16, 32)
    assert t.streaming and t.block == 200


def test_packed_classifier_matches_onnxruntime():
    """Gemm with packed weights (register tile and streamed chunks) equals onnxruntime."""
    for cin, classes in ((64, 96), (320, 1000)):
        model = head_model(cin=cin, hw=3, classes=classes)
        funcs = _scheduled_funcs(model)
        assert any("matmul_packed" in n for n in funcs), list(funcs)
        y, ref = _run_both(model, (1, cin, 3, 3), 4)
        assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max())


def test_packed_convs_cross_compile_for_neon(tmp_path):
    """The NEON target (4 lanes) packs with its own tile and the module links for aarch64."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module

    neon = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
    model = conv_block(24, 96, 3, 2, 1, 15)
    ex = compile_module(from_onnx(model, keep_params_in_input=False), neon)
    path = tmp_path / "m.so"
    ex.export_library(str(path), cc="aarch64-linux-gnu-gcc")
    assert path.stat().st_size > 0
    with neon:
        seq = tvm.transform.Sequential(schedules_layout(neon))
        script = seq(from_onnx(model, keep_params_in_input=False))["main"].script(show_meta=False)
    assert "conv2d_packed" in script


def schedules_layout(target):
    from edgec import schedules

    return schedules.layout_passes(target)


def test_narrow_dense_reductions_get_long_rows():
    """1x1 convs to few output vectors get one-vector tiles of up to 28 pixels (weights streamed
    once per 28 pixels); depthwise (short reductions), 3x3 convs, wide outputs and short rows do not."""
    from edgec.schedules.cpu import channel_tile, narrow_tile

    assert narrow_tile(3, 56, 144, 32) == (28, 1)
    assert narrow_tile(1, 112, 64, 32) == (28, 1)
    assert narrow_tile(1, 112, 32, 32) is None  # reduction under 64
    assert narrow_tile(2, 20, 64, 32) == (20, 1)
    assert narrow_tile(2, 56, 288, 32, pointwise=False) is None  # 3x3 convs keep the register tile
    assert narrow_tile(2, 28, 192, 16) == (14, 1)  # AVX2: 16 registers, Tw + 2 <= 16
    assert narrow_tile(3, 56, 9, 32) is None  # depthwise
    assert narrow_tile(4, 56, 144, 32) is None  # 4 vectors: the register tile
    assert narrow_tile(2, 7, 144, 32) is None  # short rows
    t = channel_tile(24, 56, 56 * 56, 144 * 24 * 4, 16, 32, 144, pointwise=True)
    assert (t.lanes, t.vectors, t.pixels, t.block) == (8, 1, 28, 8)


@pytest.mark.parametrize("case", ["dense3x3_stride2_pad", "depthwise3x3_stride2", "pointwise_narrow_long_rows", "grouped3x3"])
def test_packed_convs_with_4_lane_vectors_match_onnxruntime(case):
    """The packing and tiles of a 128-bit target (4 lanes as on NEON, 16 registers: SSE x86-64),
    run on this host: blocks of 4..16 channels, numerics equal to onnxruntime."""
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module
    from edgec.schedules.cpu import cpu_params

    sse = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    assert (cpu_params(sse).lanes(32), cpu_params(sse).registers) == (4, 16)
    cin, cout, k, stride, groups, hw, extra = PACKED_CASES[case]
    model = conv_block(cin, cout, k, stride, groups, hw, **extra)
    with sse:
        script = tvm.transform.Sequential(schedules_layout(sse))(from_onnx(model, keep_params_in_input=False))["main"].script(
            show_meta=False
        )
    assert "conv2d_packed" in script, case
    x = np.random.default_rng(6).standard_normal((1, cin, hw, hw)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    vm = relax.VirtualMachine(compile_module(from_onnx(model, keep_params_in_input=False), sse), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max()), case


def test_strided_depthwise_unrolls_kernel_columns(parallel_always):
    """Inlined padding (stride-2 depthwise): kernel-column loop unrolled; materialized padding
    (stride 1) and dense convs keep it rolled.  Numerics: the depthwise cases above."""
    from edgec.schedules.cpu import unroll_kernel_columns

    assert unroll_kernel_columns(9, True) and not unroll_kernel_columns(9, False)
    assert not unroll_kernel_columns(144, True)
    cin, cout, k, stride, groups, hw, extra = PACKED_CASES["depthwise3x3_stride2"]
    (s2,) = [s for n, s in _scheduled_funcs(conv_block(cin, cout, k, stride, groups, hw, **extra)).items() if "conv2d" in n]
    assert "for rx in T.unroll(" in s2, s2
    cin, cout, k, stride, groups, hw, extra = PACKED_CASES["depthwise3x3"]
    (s1,) = [s for n, s in _scheduled_funcs(conv_block(cin, cout, k, stride, groups, hw, **extra)).items() if "conv2d" in n]
    assert "for rx in T.unroll(" not in s1


def test_long_rows_only_for_pointwise_convs():
    """The schedule and the packing agree on long rows: a 1x1 conv to 32 channels at 56 wide gets
    16-channel blocks (one vector, 28 pixels), a 3x3 conv of the same shape its 32-channel tile
    (unpacked: HWIO already is that layout)."""
    one = _scheduled_funcs(conv_block(64, 32, 1, 1, 1, 56, bn=False))
    three = _scheduled_funcs(conv_block(32, 32, 3, 1, 1, 56, bn=False))
    (p1,) = [s for n, s in one.items() if "conv2d" in n]
    assert "T.int64(2), T.int64(1), T.int64(1), T.int64(64), T.int64(16)" in p1  # [K/B, 1, 1, C, B]
    assert "T.unroll(T.int64(28))" in p1
    assert not any("conv2d_packed" in n for n in three), list(three)


def _branch_model(branches, c=16, cout=None, hw=9, groups=1, seed=0, relu=True, extra_use=None):
    """``y = relu(sum_b branch_b(x'))`` with ``x' = relu(x)`` (so the branches read a computed value).

    Branches: ``("conv", k, stride, pads, bias, bn)`` (pads: ONNX ``[top, left, bottom, right]``),
    ``("bn",)`` (BatchNormalization of ``x'``: the identity branch of RepVGG / MobileOne),
    ``("id",)`` (``x'`` itself).  ``extra_use``: index of a branch whose output is also a model output.
    """
    rng = np.random.default_rng(seed)
    cout = cout or c
    nodes = [helper.make_node("Relu", ["x"], ["xr"])]
    inits = []
    outs = []
    shape = None

    def bn(src, dst, n, i):
        inits.extend([
            tensor(f"g{i}", rng.uniform(0.5, 1.5, n).astype(np.float32)),
            tensor(f"be{i}", rng.standard_normal(n).astype(np.float32)),
            tensor(f"m{i}", rng.standard_normal(n).astype(np.float32) * 0.1),
            tensor(f"v{i}", rng.uniform(0.5, 1.5, n).astype(np.float32)),
        ])
        nodes.append(helper.make_node("BatchNormalization", [src, f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [dst]))

    for i, br in enumerate(branches):
        out = f"b{i}"
        if br[0] == "conv":
            _, k, stride, pads, bias, with_bn = br
            w = (rng.standard_normal((cout, c // groups, k, k)) / np.sqrt(c // groups * k * k)).astype(np.float32)
            ins = ["xr", f"w{i}"]
            inits.append(tensor(f"w{i}", w))
            if bias:
                inits.append(tensor(f"bias{i}", rng.standard_normal(cout).astype(np.float32)))
                ins.append(f"bias{i}")
            conv_out = f"c{i}" if with_bn else out
            nodes.append(helper.make_node("Conv", ins, [conv_out], strides=[stride] * 2, pads=list(pads), group=groups))
            if with_bn:
                bn(conv_out, out, cout, i)
            ho = (hw + pads[0] + pads[2] - k) // stride + 1
        elif br[0] == "bn":
            bn("xr", out, c, i)
            ho = hw
        else:
            nodes.append(helper.make_node("Identity", ["xr"], [out]))
            ho = hw
        shape = shape or (1, cout, ho, ho)
        outs.append(out)
    last = outs[0]
    for i, o in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [last, o], [f"s{i}"]))
        last = f"s{i}"
    nodes.append(helper.make_node("Relu" if relu else "Identity", [last], ["y"]))
    outputs = [("y", shape)]
    if extra_use is not None:
        nodes.append(helper.make_node("Identity", [outs[extra_use]], ["y2"]))
        outputs.append(("y2", shape))
    return make_model(nodes, [("x", (1, c, hw, hw))], outputs, inits), (1, c, hw, hw)


# name: (branches, model kwargs, convs left after the merge)
BRANCH_CASES = {
    # RepVGG block: 3x3 + 1x1 (+ BN each) + BN identity -> one 3x3 conv
    "repvgg_3x3_1x1_bn_identity": (
        [("conv", 3, 1, [1, 1, 1, 1], False, True), ("conv", 1, 1, [0, 0, 0, 0], False, True), ("bn",)], {}, 1),
    # MobileOne depthwise stage: several depthwise 3x3 + depthwise 1x1 + identity BN
    "mobileone_depthwise": (
        [("conv", 3, 1, [1, 1, 1, 1], False, True), ("conv", 3, 1, [1, 1, 1, 1], False, True),
         ("conv", 1, 1, [0, 0, 0, 0], False, True), ("bn",)], {"c": 24, "groups": 24}, 1),
    # grouped convs, biases and no BN, plain identity (x itself)
    "grouped_bias_identity": (
        [("conv", 3, 1, [1, 1, 1, 1], True, False), ("conv", 1, 1, [0, 0, 0, 0], True, False), ("id",)],
        {"c": 32, "groups": 4}, 1),
    # no bias at all (no BN, no conv bias): no add of a bias after the merged conv
    "no_bias": ([("conv", 3, 1, [1, 1, 1, 1], False, False), ("conv", 1, 1, [0, 0, 0, 0], False, False)], {"relu": False}, 1),
    # stride 2, 3x3 pad 1 + 1x1 pad 0 (MobileOne's stem and downsampling), channels change
    "stride2_3x3_1x1": (
        [("conv", 3, 2, [1, 1, 1, 1], False, True), ("conv", 1, 2, [0, 0, 0, 0], False, True)], {"cout": 40, "hw": 10}, 1),
    # 1x1 padded on top/left only, stride 2, odd input: its tap is the 3x3's corner, not its centre
    "stride2_1x1_corner_tap": (
        [("conv", 3, 2, [1, 1, 1, 1], True, False), ("conv", 1, 2, [1, 1, 0, 0], True, False)], {"hw": 9}, 1),
    # 5x5 pad 2 + 3x3 pad 1 + 1x1 pad 0: nested offsets 0, 1, 2
    "5x5_3x3_1x1": (
        [("conv", 5, 1, [2, 2, 2, 2], True, False), ("conv", 3, 1, [1, 1, 1, 1], False, True),
         ("conv", 1, 1, [0, 0, 0, 0], True, False)], {}, 1),
    # different strides with equal output sizes (3x3 stride 2 pad 1 and 5x5 stride 1 pad 0 on 8x8): NO merge
    "different_strides_stay_separate": (
        [("conv", 3, 2, [1, 1, 1, 1], True, False), ("conv", 5, 1, [0, 0, 0, 0], True, False)], {"hw": 8}, 2),
    # a branch whose output is read elsewhere too keeps its conv (the other two still merge)
    "branch_read_twice": (
        [("conv", 3, 1, [1, 1, 1, 1], False, True), ("conv", 1, 1, [0, 0, 0, 0], False, True), ("bn",)],
        {"extra_use": 1}, 2),
}


@pytest.mark.parametrize("case", sorted(BRANCH_CASES))
def test_parallel_conv_branches_merge_into_one_conv(case):
    """Sums of parallel conv / BN / identity branches of one input compile to one conv where they
    line up (same input, stride, groups) and give onnxruntime's outputs; others stay separate."""
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module

    branches, kw, n_convs = BRANCH_CASES[case]
    model, shape = _branch_model(branches, **kw)
    script = _relax_ops_after_layout(model)
    # plain, packed or NCHW-reading convs alike
    assert script.count("R.nn.conv2d(") + script.count("R.call_tir(conv2d_") == n_convs, case
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    vm = relax.VirtualMachine(compile_module(from_onnx(model, keep_params_in_input=False), _host()), tvm.cpu())
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        refs = sess.run(None, {"x": x})
        out = vm["main"](tvm.runtime.tensor(x))
        ys = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
        assert len(ys) == len(refs)
        for y, ref in zip(ys, refs):
            assert y.shape == ref.shape
            assert float(np.abs(y - ref).max()) <= 1e-5 + RTOL * float(np.abs(ref).max()), case


def test_branch_merge_weights():
    """The merged kernel: each branch's kernel at its offset, identity as ``s[c]`` at
    ``[c, c mod C/g]``, biases summed (numpy, no TVM build)."""
    from edgec.schedules.branches import _Branch, _identity_kernel, merge

    rng = np.random.default_rng(0)
    w3, w1 = rng.standard_normal((8, 2, 3, 3)), rng.standard_normal((8, 2, 1, 1))
    b3, b1 = rng.standard_normal(8), rng.standard_normal(8)
    s = rng.standard_normal(8)
    common = dict(x=None, strides=(1, 1), dilation=(1, 1), groups=4, identity=False)
    m = merge(
        [
            _Branch(weight=w3, bias=b3, padding=(1, 1, 1, 1), **common),
            _Branch(weight=w1, bias=b1, padding=(0, 0, 0, 0), **common),
            _Branch(weight=_identity_kernel(s, 8, 4), bias=np.zeros(8), padding=(0, 0, 0, 0), **common),
        ],
        (6, 6),
        (6, 6),
    )
    expect = w3.copy()
    expect[:, :, 1, 1] += w1[:, :, 0, 0]
    expect[np.arange(8), np.arange(8) % 2, 1, 1] += s
    assert m.padding == (1, 1, 1, 1) and m.weight.shape == (8, 2, 3, 3)
    np.testing.assert_array_equal(m.weight, expect)
    np.testing.assert_array_equal(m.bias, b3 + b1)
    # taps that cannot line up (dilation 2, pads 1 and 0: offset 1/2) do not merge
    d2 = dict(common, dilation=(2, 2))
    assert merge([_Branch(weight=w3, bias=b3, padding=(1, 1, 1, 1), **d2),
                  _Branch(weight=w1, bias=b1, padding=(0, 0, 0, 0), **d2)], (6, 6), (4, 4)) is None


def test_short_reductions_keep_their_accumulator_tile_on_the_stack():
    """Reductions under 256 taps get tiles of at most 15 vectors of 16 floats (under TVM's 1024-byte
    stack limit), in a "global"-scope buffer: no workspace allocation per tile.  The packing uses
    the same tile (its block), numerics: the depthwise / pointwise cases above."""
    from edgec.schedules.cpu import ACCUMULATOR_SCOPE, STACK_ALLOCA_BYTES, channel_tile, stack_tile_vectors

    assert ACCUMULATOR_SCOPE == "global"
    assert stack_tile_vectors(16) == 15 and stack_tile_vectors(8) == 31 and stack_tile_vectors(4) == 63
    # (c_out, width, taps, pointwise): depthwise 3x3 of MobileNetV2, 1x1 convs, a dense 3x3
    for c, w, taps, pw in ((144, 56, 9, False), (32, 112, 9, False), (576, 14, 9, False), (960, 7, 9, False),
                           (576, 14, 96, True), (384, 14, 64, True), (64, 56, 576, False)):
        t = channel_tile(c, w, w * w, taps * c * 4, 16, 32, taps, pw)
        assert c % t.block == 0 and w % t.pixels == 0, (c, w)
        if taps < 256:
            assert t.pixels * t.vectors * t.lanes * 4 < STACK_ALLOCA_BYTES, (c, w, taps, t)
    # dense convs keep the uncapped tile (many reduction steps per tile: the allocation is amortized)
    from edgec.schedules.cpu import tile_shape

    t = channel_tile(64, 56, 56 * 56, 576 * 64 * 4, 16, 32, 576, False)
    assert (t.pixels, t.vectors) == tile_shape(4, 56, 32) and t.pixels * t.vectors > 15
    cin, cout, k, stride, groups, hw, extra = PACKED_CASES["depthwise3x3"]
    (script,) = [s for n, s in _scheduled_funcs(conv_block(cin, cout, k, stride, groups, hw, **extra)).items() if "conv2d" in n]
    assert 'scope="local"' not in script and _has_accumulator_tile(script)
