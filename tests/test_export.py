"""edgec export: the CLI and the Python API, numeric equivalence with PyTorch, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgec import verify
from edgec.export import export, export_zoo_model


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_cli_export_mobilenet_v2_matches_pytorch(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "mnv2.onnx"
    code, stdout, stderr = run_cli(
        "export", "mobilenet_v2", "-o", str(out), "--arg", "width_mult=0.35", "--arg", "resolution=96", "--json"
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["exporter"] == "dynamo" and report["fallback_reason"] is None
    assert report["equivalence"]["passed"] and report["equivalence"]["max_rel"] < 1e-4
    assert report["input_shape"] == [1, 3, 96, 96]
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    ops = _ops(proto)
    assert ops.count("BatchNormalization") == ops.count("Conv") > 50  # BN kept for edgec's fusion passes
    # independent re-check: the written file against the PyTorch model rebuilt from the same seed
    from edgec import models

    net = models.get("mobilenet_v2").build(width_mult=0.35, resolution=96)
    x = np.random.default_rng().standard_normal((1, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = verify.run(proto, {"input": x})[0]
    assert got.shape == (1, 1000)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert [p.name for p in tmp_path.iterdir()] == ["mnv2.onnx"]


def test_export_api_dynamic_batch_and_fold_bn() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    res = export(net, (1, 3, 16, 16), dynamic_batch=True)
    assert res.exporter == "dynamo" and res.equivalence is not None and res.equivalence.passed
    assert "BatchNormalization" in _ops(res.model)
    dim0 = res.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    x = np.random.default_rng().standard_normal((5, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(verify.run(res.model, {"input": x})[0], ref, rtol=1e-4, atol=1e-5)
    folded = export(net, (1, 3, 16, 16), fold_bn=True)
    assert "BatchNormalization" not in _ops(folded.model) and folded.equivalence.passed


def test_export_zoo_model_cache(tmp_path: Path) -> None:
    kwargs = {"deploy": True, "resolution": 32}
    a = export_zoo_model("repvgg_a0", cache_dir=tmp_path, **kwargs)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("repvgg_a0-") and files[0].suffix == ".onnx"
    mtime = files[0].stat().st_mtime_ns
    b = export_zoo_model("repvgg_a0", cache_dir=tmp_path, **kwargs)
    assert files[0].stat().st_mtime_ns == mtime  # served from the cache
    assert a.SerializeToString() == b.SerializeToString()
    assert verify.input_specs(a)[0].shape == (1, 3, 32, 32)
    files[0].write_bytes(b"garbage")  # a corrupt entry is rebuilt, not returned
    c = export_zoo_model("repvgg_a0", cache_dir=tmp_path, **kwargs)
    assert c.SerializeToString() == a.SerializeToString()


class _ConvMean(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))  # ReduceMean: onnx cannot convert opset 18 -> 17 here


def test_export_falls_back_to_torchscript_with_a_reason() -> None:
    res = export(_ConvMean(), (2, 3, 8, 8), opset=17)
    assert res.exporter == "torchscript" and "opset 17" in (res.fallback_reason or "")
    assert res.equivalence is not None and res.equivalence.passed and res.equivalence.samples == 2
    assert next(o.version for o in res.model.opset_import if o.domain == "") == 17


def test_cli_export_repvgg_training_and_deploy_forms(run_cli, tmp_path: Path) -> None:
    """Two more zoo models through the CLI: RepVGG-A0's training form and its deploy form."""
    outs = {}
    for form, extra in (("train", []), ("deploy", ["--arg", "deploy=true", "--dynamic-batch"])):
        out = tmp_path / f"repvgg_{form}.onnx"
        code, stdout, stderr = run_cli("export", "repvgg_a0", "-o", str(out), "--arg", "resolution=64", *extra)
        assert code == 0, stderr
        assert "ONNX vs PyTorch: ok" in stdout and "max rel" in stdout
        outs[form] = onnx.load(str(out))
    train, deploy = outs["train"], outs["deploy"]
    assert verify.output_specs(train)[0].shape == (1, 1000)
    assert verify.output_specs(deploy)[0].shape[1:] == (1000,)
    assert len(deploy.graph.node) < len(train.graph.node) // 2
    train_ops, deploy_ops = _ops(train), _ops(deploy)
    assert train_ops.count("BatchNormalization") == 22 + 22 + 17  # 3x3, 1x1 and identity branches
    assert "BatchNormalization" not in deploy_ops and deploy_ops.count("Conv") == deploy_ops.count("Relu") == 22
    x = np.random.default_rng().standard_normal((3, 3, 64, 64)).astype(np.float32)
    y = verify.run(deploy, {"input": x})[0]  # dynamic batch
    assert y.shape == (3, 1000) and np.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "extra"),
    [("mcunet", ["--arg", "resolution=64"]), ("resnet18", ["--input-shape", "1,3,64,64", "--dynamic-batch"])],
)
def test_cli_export_other_zoo_models(run_cli, tmp_path: Path, model: str, extra: list[str]) -> None:
    out = tmp_path / f"{model}.onnx"
    code, stdout, stderr = run_cli("export", model, "-o", str(out), *extra)
    assert code == 0, stderr
    assert "ONNX vs PyTorch: ok" in stdout and "max rel" in stdout
    proto = onnx.load(str(out))
    assert proto.graph.name == model
    spec = verify.input_specs(proto)[0]
    assert spec.shape[1:] == (3, 64, 64)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert bool(dim0.dim_param) == ("--dynamic-batch" in extra)


FACTORIES = '''
import torch

def good():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))

def boom():
    raise ValueError("boom in factory")

def not_a_module():
    return 42

value = 3
'''


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["mobilenet_v3"], "unknown model 'mobilenet_v3'", "did you mean 'mobilenet_v2'"),
        (["{d}/missing.py:good"], "no such file", "Python file"),
        (["{d}/factories.py:nope"], "defines no 'nope'", "check the model factory name"),
        (["{d}/factories.py:boom"], "raised ValueError: boom in factory", "fix the factory"),
        (["{d}/factories.py:not_a_module"], "returned int, not a torch.nn.Module", "nn.Module"),
        (["{d}/factories.py:value"], "not callable", "function"),
        (["no_such_package.nets:build"], "cannot import module 'no_such_package.nets'", None),
        (["{d}/factories.py:good", "--input-shape", "1,3,x,4"], "malformed input shape '1,3,x,4'", "positive integers"),
        (["{d}/factories.py:good", "--input-shape", "1,3,0,4"], "malformed input shape", "positive integers"),
        (["{d}/factories.py:good", "--input-shape", "1,3,5,5"], "input shape 1,3,5,5 is not supported by the model", "--input-shape"),
        (["{d}/factories.py:good"], "no default input shape", "--input-shape"),
        (["mobilenet_v2", "--arg", "widthmult=2"], "has no argument 'widthmult'", "width_mult"),
        (["mobilenet_v2", "--arg", "width_mult"], "is not KEY=VALUE", "width_mult=0.5"),
        (["mobilenet_v2", "--arg", "width_mult=wide"], "could not convert", None),
    ],
)
def test_cli_bad_input(run_cli, tmp_path: Path, args: list[str], message: str, hint: str | None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "factories.py").write_text(FACTORIES)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, stdout, stderr = run_cli("export", *[a.format(d=src) for a in args], "-o", str(out_dir / "m.onnx"))
    assert code != 0
    assert f"error: " in stderr and message in stderr, stderr
    assert "Traceback" not in stderr
    if hint:
        assert "hint:" in stderr and hint in stderr, stderr
    assert list(out_dir.iterdir()) == []


def test_cli_bad_output_path(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = run_cli("export", "mobilenet_v2", "-o", str(tmp_path / "no" / "dir" / "m.onnx"))
    assert code != 0 and "output directory does not exist" in stderr and "hint:" in stderr
    assert not (tmp_path / "no").exists()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, stderr = run_cli("export", "mobilenet_v2", "-o", str(blocker / "m.onnx"))
    assert code != 0 and "is not a directory" in stderr
    code, _, stderr = run_cli("export", "mobilenet_v2", "-o", str(tmp_path))
    assert code != 0 and "is a directory" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    import os

    real_access = os.access
    ro = tmp_path / "readonly"
    ro.mkdir(mode=0o555)
    # root ignores permission bits, so the check itself is exercised through os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    code, _, stderr = run_cli("export", "mobilenet_v2", "-o", str(ro / "m.onnx"))
    assert code != 0 and "not writable" in stderr and "hint:" in stderr
    assert list(ro.iterdir()) == []


def test_cli_models_table_and_json(run_cli) -> None:
    code, stdout, stderr = run_cli("models", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [r["name"] for r in rows] == models_names()
    mnv2 = next(r for r in rows if r["name"] == "mobilenet_v2")
    assert mnv2["input_shape"] == [1, 3, 224, 224] and 3.4e6 < mnv2["params"] < 3.6e6 and 2.9e8 < mnv2["macs"] < 3.1e8
    assert mnv2["arguments"]["width_mult"] == 1.0
    code, stdout, _ = run_cli("models", "--no-size")
    assert code == 0 and "repvgg_a0" in stdout and "mobileone_s0" in stdout


def models_names() -> list[str]:
    from edgec import models

    return models.names()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mcunet", "mobilenet_v2", "mobilenetv4_conv_small", "mobileone_s0", "repvgg_a0", "resnet18"])
def test_every_zoo_model_exports_at_its_default_shape(name: str, zoo_onnx) -> None:
    from edgec import models

    spec = models.get(name)
    proto = zoo_onnx(name)
    onnx.checker.check_model(proto)
    assert verify.input_specs(proto)[0].shape == spec.default_input_shape
    ops = _ops(proto)
    assert ops.count("BatchNormalization") > 10
    net = spec.build()
    x = np.random.default_rng().standard_normal(spec.default_input_shape).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = verify.run(proto, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
