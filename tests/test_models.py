"""The model zoo: every model builds, runs, is deterministic and has realistic BatchNorm statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgec import models
from edgec import verify
from edgec.errors import InputError, UnknownNameError
from edgec.models._reparam import reparameterize

ZOO = ["mcunet", "mobilenet_v2", "mobilenetv4_conv_small", "mobileone_s0", "repvgg_a0", "resnet18"]
SMALL = 64  # build-and-run tests use a small resolution: the architectures are fully convolutional


def test_registry_lists_the_zoo() -> None:
    assert models.names() == ZOO
    spec = models.get("mobilenet_v2")
    assert spec.default_input_shape == (1, 3, 224, 224)
    assert spec.input_shape(resolution=160) == (1, 3, 160, 160)
    assert models.get("mcunet").default_input_shape[-1] in range(96, 161)
    with pytest.raises(UnknownNameError, match="unknown model 'mobilenet_v3'") as exc:
        models.get("mobilenet_v3")
    assert "mobilenet_v2" in (exc.value.hint or "")
    with pytest.raises(InputError, match="no argument 'width'"):
        spec.build(width=0.5)
    with pytest.raises(dataclasses_error()):
        spec.name = "x"  # frozen


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    "name",
    # mobileone_s0's training form is the heaviest to calibrate; test_reparameterize_keeps_outputs
    # builds and runs it in the default suite (at 32 px)
    [pytest.param(n, marks=pytest.mark.slow) if n == "mobileone_s0" else n for n in ZOO],
)
def test_model_builds_and_runs(name: str) -> None:
    spec = models.get(name)
    net = spec.build(resolution=SMALL)
    assert not net.training
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        y = net(x)
        y_other = net(torch.randn(2, 3, SMALL, SMALL))
    assert y.shape == (2, 1000)
    assert torch.isfinite(y).all()
    assert 0.5 < float(y.std()) < 50 and float(y.abs().max()) < 500  # O(1)-O(10) logits
    assert float((y - y_other).abs().max()) > 0.1  # the output depends on the input
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 10
    mean = torch.cat([b.running_mean for b in bns])
    var = torch.cat([b.running_var for b in bns])
    gamma = torch.cat([b.weight.detach() for b in bns])
    beta = torch.cat([b.bias.detach() for b in bns])
    # calibrated statistics, far from the (0, 1) defaults, and non-trivial affine parameters
    assert float(mean.abs().mean()) > 0.05 and float((var - 1).abs().mean()) > 0.1
    assert torch.all(var > 0) and float(gamma.std()) > 0.1 and float(beta.abs().mean()) > 0.02


def test_deterministic_for_a_seed() -> None:
    spec = models.get("mcunet")
    a, b = spec.build(resolution=32), spec.build(resolution=32)
    c = spec.build(resolution=32, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_width_mult_scales_mobilenet_v2() -> None:
    spec = models.get("mobilenet_v2")
    with torch.device("meta"):
        small = models.model_info(spec.builder(width_mult=0.5), (1, 3, 96, 96))
        full = models.model_info(spec.builder(), (1, 3, 96, 96))
    assert small.params < 0.6 * full.params and small.macs < 0.5 * full.macs


def test_model_info_counts_macs() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, groups=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    info = models.model_info(net, (1, 3, 4, 4))
    assert info.macs == 16 * 8 * 3 * 9 + 16 * 8 * 9 + 128 * 10
    assert info.params == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_reparameterize_keeps_outputs(name: str) -> None:
    """The folded single-branch model computes the same function as the training form."""
    net = models.get(name).build(resolution=32)
    fused = reparameterize(net)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in net.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, got = net(x), fused(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.slow  # repvgg_a0's forms are compared through the CLI in test_export.py
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_deploy_form_has_fewer_nodes(name: str, zoo_onnx) -> None:
    train = zoo_onnx(name, resolution=SMALL)
    deploy = zoo_onnx(name, resolution=SMALL, deploy=True)
    assert verify.output_specs(train)[0].shape == verify.output_specs(deploy)[0].shape == (1, 1000)
    assert len(deploy.graph.node) < len(train.graph.node) // 2
    ops = [n.op_type for n in deploy.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == ops.count("Relu")
    x = np.random.default_rng().standard_normal((1, 3, SMALL, SMALL)).astype(np.float32)
    y = verify.run(deploy, {"input": x})[0]
    assert np.isfinite(y).all() and 0.3 < y.std() < 30
    onnx.checker.check_model(deploy)
