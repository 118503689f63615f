"""The ARM64 integer int8 kernels (edgec.schedules.int8) on emulated boards vs onnxruntime.

QDQ models compiled for ``cortex-a72`` (no dot product: the plain widening ``smlal`` kernel) and
``cortex-a76`` (``sdot`` on signed activations), both with the fixed-point requantization
epilogue, run on emulated boards (qemu user-mode, ``QEMU_CPU`` = the same core) through TVM RPC;
the outputs must match onnxruntime on this host running the same QDQ model to within one output
quantization step, and the compiled module must contain the integer kernels.  The boards are
started by the fixture (building the userland with ``scripts/arm_board.sh`` if needed, which needs
root as in CI) and stopped at the end; if they cannot start the tests fail, they never skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from test_int8_kernels import (
    CONV_CASES,
    DW_MODELS,
    _conv_model,
    _add_model,
    _dense_model,
    _depthwise_model,
    _output_scale,
    _quantize,
    _repvgg_block,
    _residual_model,
)

from edgec import emulate as em
from edgec.schedules import int8

CPUS = ("cortex-a72", "cortex-a76")


@pytest.fixture(scope="module")
def arm_boards() -> Iterator[dict]:
    """One RPC session per emulated board, one board per core of :data:`CPUS`.  A board's server
    serves one session at a time, so the tests share these (a second connection would wait for
    the first session to time out)."""
    from tvm import rpc

    em.prepare("arm64")
    configs = [em.BoardConfig(cpu=cpu, port=em.free_port(), die_with_parent=True, threads=1, start_timeout_s=300) for cpu in CPUS]
    boards = em.start_boards(configs)
    try:
        yield {cpu: rpc.connect(b.connect_host, b.port, session_timeout=1200) for cpu, b in zip(CPUS, boards)}
    finally:
        for b in boards:
            em.stop(b)


def _run_on_board(proto, cpu: str, remote, x: list[np.ndarray], tmp_path) -> tuple[list[np.ndarray], list[str]]:
    """``proto`` compiled by edgec's CPU pipeline for ``cpu``, run on ``board`` for each input."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.schedules import compile_module
    from edgec.targets import get_target

    target_def = get_target(cpu)
    target = target_def.tvm_target()
    mod = from_onnx(proto, keep_params_in_input=False)
    with target:
        rewritten = tvm.transform.Sequential(int8.int8_passes(target))(mod)
    kernels = [gv.name_hint for gv, _ in rewritten.functions_items() if gv.name_hint.startswith("edgec_int8")]
    ex = compile_module(mod, target)
    path = tmp_path / f"{cpu}-{tmp_path.name}.so"  # unique: the board dlopens each upload by name
    ex.export_library(str(path), fcompile=target_def.toolchain.fcompile())
    remote.upload(str(path))
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module(path.name), dev)
    return [vm["main"](tvm.runtime.tensor(xi, dev)).numpy() for xi in x], kernels


def _steps(proto, shape, rng, cpu, remote, tmp_path, n_kernels: int, step: float | None = None) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = [(rng.standard_normal(shape) * rng.uniform(0.5, 1.5)).astype(np.float32) for _ in range(2)]
    got, kernels = _run_on_board(proto, cpu, remote, xs, tmp_path)
    assert len(kernels) == n_kernels, kernels
    step = step if step is not None else _output_scale(proto)
    worst = 0.0
    for x, g in zip(xs, got):
        ref = sess.run(None, {"x": x})[0]
        assert g.shape == ref.shape
        err = float(np.abs(g.astype(np.float64) - ref).max())
        worst = max(worst, err / step if step is not None else err / max(1e-6, float(np.abs(ref).max())))
    return worst


# 1x1; 3x3 s2 asymmetric pads, 5 -> 21 ch (window rows flattened on the A76); 3 -> 16 clip; 5x5 12 -> 70;
# 3x3 64 -> 64 (sdot by element on the A76); a 7x7 s2 RGB stem (rows flattened)
ARM_CONV_CASES = [CONV_CASES[i] for i in (0, 2, 3, 5, 6)] + [(3, 16, 7, 2, [3, 3, 3, 3], (20, 20), "relu", True)]


@pytest.mark.arm
@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("case", ARM_CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}_k{c[2]}s{c[3]}_{c[6]}")
def test_conv_on_emulated_board_matches_onnxruntime(arm_boards, case, cpu, tmp_path):
    rng = np.random.default_rng(ARM_CONV_CASES.index(case))
    cin, cout, k, stride, pads, hw, act, bias = case
    fp32, shape = _conv_model(cin, cout, k, stride, pads, hw, act, bias, rng)
    q = _quantize(fp32, shape, rng)
    assert _steps(q, shape, rng, cpu, arm_boards[cpu], tmp_path, n_kernels=1) <= 1.0


@pytest.mark.arm
@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
def test_residual_block_and_gemm_on_emulated_board(arm_boards, cpu, tmp_path):
    """Integer 1x1 convs, depthwise conv and Gemm (float output), residual add / maxpool / GAP in NHWC."""
    rng = np.random.default_rng(3)
    fp32, shape = _residual_model(rng)
    q = _quantize(fp32, shape, rng)
    assert _steps(q, shape, rng, cpu, arm_boards[cpu], tmp_path, n_kernels=4) <= 1e-2


@pytest.mark.arm
@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("case", DW_MODELS, ids=lambda c: f"c{c[0]}_k{c[4]}s{c[2]}")
def test_depthwise_on_emulated_board_matches_onnxruntime(arm_boards, case, cpu, tmp_path):
    rng = np.random.default_rng(case[0])
    fp32, shape = _depthwise_model(rng, *case)
    q = _quantize(fp32, shape, rng)
    assert _steps(q, shape, rng, cpu, arm_boards[cpu], tmp_path, n_kernels=2) <= 1.0


@pytest.mark.arm
@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
def test_quantized_gemm_on_emulated_board(arm_boards, cpu, tmp_path):
    """A Gemm with a quantized (uint8) output read by a float Mul: one step is 2 * s_y."""
    import onnx

    rng = np.random.default_rng(15)
    fp32, shape = _dense_model(rng, False, "clip", 4)
    q = _quantize(fp32, shape, rng)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_q")]
    step = 2.0 * float(init[dq[-1].input[1]])
    assert _steps(q, shape, rng, cpu, arm_boards[cpu], tmp_path, n_kernels=1, step=step) <= 1.0001


@pytest.mark.arm
@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
def test_integer_residual_add_on_emulated_board(arm_boards, cpu, tmp_path):
    rng = np.random.default_rng(22)
    fp32, shape = _add_model(rng, True)
    q = _quantize(fp32, shape, rng)
    assert _steps(q, shape, rng, cpu, arm_boards[cpu], tmp_path, n_kernels=2) <= 1.0


@pytest.mark.arm
@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("pool", [False, True], ids=["sum", "pool_sum"])
def test_integer_sum_with_batchnorm_and_pool_on_emulated_board(arm_boards, cpu, pool, tmp_path):
    """RepVGG's three-way sum with the batch-norm identity branch in int32 (per-channel multipliers),
    the stem's max pool on uint8; the 3x3 conv over 16 channels uses ``sdot`` by element on the A76."""
    rng = np.random.default_rng(31 + pool)
    fp32, shape = _repvgg_block(rng, pool)
    q = _quantize(fp32, shape, rng)
    assert _steps(q, shape, rng, cpu, arm_boards[cpu], tmp_path, n_kernels=4) <= 1.0
