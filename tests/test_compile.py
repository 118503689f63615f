"""edgec compile: the targets registry, artifact folders, host / ARM64 / CUDA builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import conv_relu_model, make_model, tensor
from onnx import helper

from edgec import ir as eir
from edgec import verify as vfy
from edgec.bench import library_arch
from edgec.compile import Artifact, CompileConfig, compile_model, run_local
from edgec.errors import EdgecError, InputError, ToolMissingError, UnknownNameError
from edgec.targets import Target, TargetOptions, get_target, host_arch, registry

REQUIRED = {"host", "arm64", "cortex-a53", "cortex-a72", "cortex-a76", "cuda", "jetson-orin-nano"}


def small_cnn(rng: np.random.Generator, batch: int | str = 1) -> onnx.ModelProto:
    """Conv-BN-Relu, strided Conv, GlobalAveragePool, Gemm, Softmax: the usual CNN ops, 2 outputs."""
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    scale, bias = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    mean, var = rng.standard_normal(8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    w2 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    fc = rng.standard_normal((16, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = [tensor("w1", w1), tensor("s", scale), tensor("b", bias), tensor("m", mean), tensor("v", var),
             tensor("w2", w2), tensor("fc", fc), tensor("lo", np.array(0, np.float32)), tensor("hi", np.array(6, np.float32))]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch, 10]),
         helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ensure_aarch64_gcc() -> None:
    """The arm64 tests need the cross compiler: install it when missing, fail if that fails."""
    if shutil.which("aarch64-linux-gnu-gcc"):
        return
    root = Path(__file__).resolve().parent.parent
    script = next((p for p in (root / "scripts").glob("arm*.sh")), None)
    cmds = ([["bash", str(script), "install-toolchain"]] if script else []) + [
        ["apt-get", "install", "-y", "-q", "gcc-aarch64-linux-gnu"],
        ["sudo", "-n", "apt-get", "install", "-y", "-q", "gcc-aarch64-linux-gnu"],
    ]
    for cmd in cmds:
        try:
            subprocess.run(cmd, check=False, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if shutil.which("aarch64-linux-gnu-gcc"):
            return
    pytest.fail("aarch64-linux-gnu-gcc is missing and could not be installed (apt-get install gcc-aarch64-linux-gnu)")


def test_registry_has_the_targets_and_refuses_unknown_names() -> None:
    assert REQUIRED <= set(registry.names())
    for name in REQUIRED:
        t = registry.get(name)
        assert isinstance(t, Target) and t.name == name
        t.tvm_target()  # TVM accepts the configuration
    assert registry.get("cortex-a72").config["mcpu"] == "cortex-a72"
    assert registry.get("cortex-a72").toolchain.debian_package == "gcc-aarch64-linux-gnu"
    assert registry.get("host").runs_on_host and not registry.get("arm64").runs_on_host
    assert registry.get("cuda", TargetOptions(arch="sm_87")).config["arch"] == "sm_87"
    assert registry.get("jetson-orin-nano").arch == "aarch64"
    with pytest.raises(UnknownNameError, match="did you mean .cortex-a"):
        registry.get("cortex-a27")
    with pytest.raises(InputError, match="sm_XX|compute capability"):
        registry.get("cuda", TargetOptions(arch="volta"))
    with pytest.raises(InputError, match="CUDA targets only"):
        registry.get("host", TargetOptions(arch="sm_80"))


def test_json_targets() -> None:
    t = registry.get('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}')
    assert t.arch == "aarch64" and t.toolchain.compiler == "aarch64-linux-gnu-gcc" and t.device == "cpu"
    g = registry.get('{"kind": "cuda", "arch": "sm_75"}')
    assert g.device == "cuda"
    with pytest.raises(InputError, match="does not parse"):
        registry.get('{"kind": llvm}')
    with pytest.raises(InputError, match="kind"):
        registry.get('{"mcpu": "x"}')
    with pytest.raises(InputError, match="TVM rejects"):
        registry.get('{"kind": "no-such-kind"}')


def test_third_party_target_through_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from edgec.targets import TargetRegistry
    from edgec.targets.host import CPUTarget

    def my_board(options: TargetOptions) -> Target:
        """My board (a host CPU under another name)."""
        return CPUTarget("my-board", "mine", {"kind": "llvm"}, host_arch())

    class EP:
        name = "my-board"

        def load(self):
            return my_board

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, **kw: [EP()] if group == "edgec.targets" else real(group=group, **kw))
    reg = TargetRegistry()
    assert "my-board" in reg.names() and REQUIRED <= set(reg.names())
    assert reg.get("my-board").name == "my-board"
    assert next(e for e in reg.entries() if e.name == "my-board").summary.startswith("My board")


def test_host_compile_writes_artifact_and_matches_onnxruntime(tmp_path: Path) -> None:
    rng = np.random.default_rng()
    proto = small_cnn(rng)
    src = tmp_path / "cnn.onnx"
    onnx.save(proto, src)
    result = compile_model(src, tmp_path / "build", CompileConfig(registry.get("host"), passes_applied=("dce",)))
    art = result.artifact
    assert sorted(p.name for p in art.path.iterdir()) == ["manifest.json", "model.onnx", "model.so", "specs.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["model_sha256"] == eir.model_hash(proto)
    assert m["target"] == "host" and m["passes_applied"] == ["dce"] and m["verification"]["passed"]
    import tvm

    assert m["tvm_version"] == tvm.__version__ and m["arch"] == host_arch()
    assert [s.name for s in art.inputs] == ["x"] and [s.shape for s in art.outputs] == [(1, 10), (1, 10)]
    assert library_arch(art.library) == host_arch()
    # fresh inputs, independent of the compile-time check; include large and all-zero inputs
    feeds = [vfy.random_inputs(art.inputs, rng) for _ in range(3)]
    feeds.append({"x": np.zeros((1, 3, 16, 16), np.float32)})
    feeds.append({"x": (rng.standard_normal((1, 3, 16, 16)) * 100).astype(np.float32)})
    got = run_local(art.library, "cpu", feeds, ["x"])
    sess = vfy.session(proto)
    ref = [sess.run(None, f) for f in feeds]
    report = vfy.compare_outputs(ref, got, ["logits", "probs"], vfy.Tolerance(rtol=1e-4, atol=1e-5))
    assert report.passed, report.summary()
    # rebuilding into the same folder replaces the artifact
    again = compile_model(src, tmp_path / "build", CompileConfig(registry.get("host"), verify=False))
    assert again.verification is None and Artifact.load(tmp_path / "build").manifest.verification is None


def test_dynamic_batch_takes_the_given_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng()
    proto = small_cnn(rng, batch="N")
    res = compile_model(proto, tmp_path / "b", CompileConfig(registry.get("host"), input_shapes={"x": (3, 3, 16, 16)}))
    assert res.artifact.inputs[0].shape == (3, 3, 16, 16) and res.artifact.outputs[0].shape == (3, 10)
    assert res.verification is not None and res.verification.passed


def test_compile_errors_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proto = conv_relu_model()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an edgec artifact"):
        compile_model(proto, other, CompileConfig(registry.get("host")))
    assert (other / "mine.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="database"):
        compile_model(proto, tmp_path / "b", CompileConfig(registry.get("host"), database=tmp_path / "nodb"))
    # an operator TVM's importer does not know
    bad = make_model([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                     [("x", (1, 1, 4, 4))], [("z", (1, 1, 4, 4))], [tensor("w", np.ones((1, 1, 1, 1), np.float32))])
    bad.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(EdgecError, match="rejected|TVM"):
        compile_model(bad, tmp_path / "b", CompileConfig(registry.get("host"), verify=False))
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # cross compiler missing: named, with the Debian package
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="aarch64-linux-gnu-gcc") as info:
        compile_model(proto, tmp_path / "arm", CompileConfig(registry.get("cortex-a72")))
    assert "gcc-aarch64-linux-gnu" in (info.value.hint or "")
    assert not (tmp_path / "arm").exists()


@pytest.mark.parametrize("name", ["arm64", "cortex-a76"])
def test_arm64_cross_compile(tmp_path: Path, name: str) -> None:
    ensure_aarch64_gcc()
    res = compile_model(small_cnn(np.random.default_rng()), tmp_path / name, CompileConfig(registry.get(name)))
    assert res.verification is None  # not runnable here: checked on the device by `edgec bench`
    assert library_arch(res.artifact.library) == "aarch64"
    assert res.artifact.manifest.arch == "aarch64" and res.artifact.manifest.tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert res.artifact.manifest.threads.cores == "big"  # the runtime runs it on the board's big cores


def test_cuda_builds_without_a_gpu(tmp_path: Path) -> None:
    if shutil.which("nvcc") is None:
        pytest.fail("nvcc is missing: CUDA builds need it (install the CUDA toolkit)")
    res = compile_model(small_cnn(np.random.default_rng()), tmp_path / "gpu", CompileConfig(registry.get("cuda", TargetOptions(arch="sm_80"))))
    m = res.artifact.manifest
    assert m.device == "cuda" and m.tvm_target["arch"] == "sm_80"
    assert library_arch(res.artifact.library) == host_arch()
    data = res.artifact.library.read_bytes()
    # TVM's CUDA C for every kernel is embedded (nvcc/NVRTC turn it into sm_80 code when loaded)
    assert data.count(b'extern "C" __global__') >= 3, "no CUDA kernels inside the library"


@pytest.mark.gpu
def test_cuda_runs_and_matches_onnxruntime(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import tvm

    if not tvm.cuda(0).exist:
        if "gpu" in (request.config.option.markexpr or ""):
            pytest.fail("-m gpu asked for GPU tests but there is no CUDA GPU here")
        pytest.skip("no CUDA GPU here")
    rng = np.random.default_rng()
    proto = small_cnn(rng)
    res = compile_model(proto, tmp_path / "gpu", CompileConfig(registry.get("cuda", TargetOptions(arch="sm_80"))))
    feeds = [vfy.random_inputs(res.artifact.inputs, rng) for _ in range(3)]
    got = run_local(res.artifact.library, "cuda", feeds, ["x"])
    sess = vfy.session(proto)
    report = vfy.compare_outputs([sess.run(None, f) for f in feeds], got, ["logits", "probs"], vfy.Tolerance(1e-3, 1e-4))
    assert report.passed, report.summary()


def test_cli_compile_and_targets(tmp_path: Path, run_cli) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(small_cnn(np.random.default_rng()), src)
    code, out, err = run_cli("targets", "--json")
    assert code == 0 and REQUIRED <= {t["name"] for t in json.loads(out)}
    code, out, err = run_cli("compile", str(src), "--target", "host", "-o", str(tmp_path / "b"),
                             "--passes", "remove-identity,dce", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["manifest"]["passes_applied"] == ["remove-identity", "dce"]
    assert [s["name"] for s in rep["stages"]] == ["import", "build", "export", "verify"]
    code, out, err = run_cli("compile", str(src), "--target", "nope", "-o", str(tmp_path / "c"))
    assert code != 0 and "unknown target" in err and "Traceback" not in err
    code, out, err = run_cli("compile", str(src), "--target", "host", "-o", str(tmp_path / "c"), "--input-shape", "x:1")
    assert code != 0 and "NAME=D1" in err


# --- edgec demo and edgec tune ---------------------------------------------------------------


@pytest.mark.slow  # exports and compiles a zoo model: minutes on a loaded 2-core machine
def test_demo_runs_the_whole_job(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("demo", "--model", "mcunet", "--resolution", "48", "--repeat", "3", "--number", "1",
                             "-o", str(tmp_path), "--json")
    assert code == 0, err
    rep = json.loads(out)
    steps = [s["step"] for s in rep["steps"]]
    for needed in ("export", "pass remove-identity", "pass dce", "pass constant-fold", "passes", "build", "verify", "compile", "measure"):
        assert needed in steps, steps
    b = rep["bench"]
    assert b["complete"] and b["equivalence"]["passed"] and len(b["edgec"]["samples_ms"]) == 3
    assert b["ratio_vs_onnxruntime"] == pytest.approx(b["edgec"]["mean"] / b["onnxruntime"]["mean"])
    if b["ratio_vs_onnxruntime"] > 1.5:  # slower than onnxruntime: the demo must say so
        assert rep["note"] and "slower than onnxruntime" in rep["note"]
    manifest = json.loads((tmp_path / "mcunet-host" / "manifest.json").read_text())
    assert manifest["passes_applied"][:3] == ["remove-identity", "dce", "constant-fold"]


def test_tune_configuration_and_refusals(tmp_path: Path, run_cli) -> None:
    from edgec.errors import InputError
    from edgec.rpc import Remote
    from edgec.tune import TuneConfig, tuning_config, tuning_module

    host = get_target("host")
    cfg = TuneConfig(host, trials=8, db=tmp_path / "db", num_cores=3)
    assert tuning_config(host, cfg)["num-cores"] == 3  # MetaSchedule needs the core count
    assert tuning_config(host, TuneConfig(host, trials=8, db=tmp_path))["num-cores"] >= 1
    with pytest.raises(InputError, match="trials"):
        TuneConfig(host, trials=0, db=tmp_path)
    with pytest.raises(InputError, match="tracker"):
        TuneConfig(host, trials=8, db=tmp_path, rpc=Remote.direct("127.0.0.1:9090"))
    # the tuned module is the compile pipeline's legalized, fused module: TIR functions to tune
    mod = tuning_module(small_cnn(np.random.default_rng()), host)
    assert any(type(f).__name__ == "PrimFunc" for f in mod.functions.values())
    # ARM code cannot be timed here: tuning for a board needs its tracker
    src = tmp_path / "m.onnx"
    onnx.save(small_cnn(np.random.default_rng()), src)
    code, out, err = run_cli("tune", str(src), "--target", "cortex-a72", "--trials", "4", "--db", str(tmp_path / "d"))
    assert code != 0 and "--tracker" in err and "Traceback" not in err


def test_tune_leaves_edgec_kernels_alone() -> None:
    """Functions edgec scheduled itself (the int8 VNNI kernels: tensorized, ``tirx.is_scheduled``)
    are not tuning tasks: MetaSchedule's design-space rules cannot take them apart."""
    import types

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgec.tune import TuneConfig, tunable_tasks, tuning_config, tuning_module

    host = get_target("host")
    mod = tuning_module(small_cnn(np.random.default_rng()), host)
    tasks = ms.relax_integration.extract_tasks(mod, tvm.target.Target(tuning_config(host, TuneConfig(host, 1, Path("."), num_cores=1))))
    assert len(tunable_tasks(tasks)) == len(tasks) > 1
    first = tasks[0].dispatched[0]
    done = tvm.IRModule({"main": first["main"].with_attr("tirx.is_scheduled", True)})
    fake = [types.SimpleNamespace(dispatched=[done], task_name="kernel")] + list(tasks[1:])
    assert [t.task_name for t in tunable_tasks(fake)] == [t.task_name for t in tasks[1:]]


@pytest.mark.slow  # MetaSchedule: minutes even for 4 trials (worker pools, builds)
def test_tune_then_compile_with_the_database(tmp_path: Path, run_cli) -> None:
    rng = np.random.default_rng()
    src = tmp_path / "cnn.onnx"
    proto = small_cnn(rng)
    onnx.save(proto, src)
    db = tmp_path / "db"
    code, out, err = run_cli("tune", str(src), "--target", "host", "--trials", "4", "--per-iter", "4", "--db", str(db), "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["trials_done"] >= 1 and rep["tasks"]
    assert any(t["best_ms"] is not None for t in rep["tasks"]), rep
    assert (db / "database_tuning_record.json").stat().st_size > 0
    # seeded with edgec's rules: every task has the rules' timing, and the best is never worse than it
    assert all(t["rules_ms"] is not None and 0 < t["best_ms"] <= t["rules_ms"] for t in rep["tasks"]), rep
    from edgec.compile import import_onnx
    from edgec.tune import database_coverage

    cov = database_coverage(import_onnx(proto, vfy.input_specs(proto)), get_target("host"), db)
    assert cov.found and not cov.missing, cov  # every function has a record, the rules' at least
    # reuse without re-tuning; the tuned build still computes the model
    res = compile_model(src, tmp_path / "build", CompileConfig(get_target("host"), database=db))
    assert res.artifact.manifest.database == str(db) and res.verification is not None and res.verification.passed
    feeds = [vfy.random_inputs(res.artifact.inputs, rng) for _ in range(2)]
    got = run_local(res.artifact.library, "cpu", feeds, ["x"])
    sess = vfy.session(proto)
    assert vfy.compare_outputs([sess.run(None, f) for f in feeds], got, ["logits", "probs"], vfy.Tolerance()).passed
