"""Core: model I/O errors, the pass API, the registry, the pipeline and the cleanup passes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import conv_relu_model, make_model, tensor
from onnx import helper

from edgec import ir as eir
from edgec import verify
from edgec.errors import EquivalenceError, ModelLoadError, UnknownNameError
from edgec.passes_api import Pass, PassStats, registry
from edgec.pipeline import Pipeline, PipelineConfig


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        eir.load_model(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        eir.load_model(junk)
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:  # a sparse file: 2 GiB on paper, nothing on disk
        f.truncate(2**31 + 10)
    with pytest.raises(ModelLoadError, match="2 GB limit"):
        eir.load_model(big)


def test_save_is_atomic_and_roundtrips(tmp_path: Path) -> None:
    model = eir.from_proto(conv_relu_model())
    out = eir.save_model(model, tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    again = eir.load_model(out)
    assert eir.count_nodes(again) == eir.count_nodes(model)
    with pytest.raises(Exception):
        eir.save_model(model, tmp_path / "no" / "dir" / "m.onnx")
    assert not (tmp_path / "no").exists()


def test_cleanup_passes_keep_numbers_and_report() -> None:
    proto = conv_relu_model()
    model = eir.from_proto(proto)
    passes = registry.parse_list("remove-identity,dce")
    report = Pipeline(passes, PipelineConfig(seed=None)).run(model)
    ops = [n.op_type for n in report.model.graph]
    assert ops == ["Conv", "Relu"]
    assert report.steps[0].stats.matched == {"identity": 1, "dropout": 1}
    assert report.steps[1].stats.matched == {"nodes removed": 1}
    assert report.final is not None and report.final.passed and report.final.max_abs == 0.0
    assert report.model.graph.outputs[0].name == "y"
    cmp = verify.compare_models(proto, eir.to_proto(report.model))
    assert cmp.passed


def test_dropout_in_training_mode_is_kept() -> None:
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="d")]
    inits = [tensor("ratio", np.array(0.5, np.float32)), tensor("train", np.array(True))]
    model = eir.from_proto(make_model(nodes, [("x", (2, 3))], [("y", (2, 3))], inits))
    result = registry.create("remove-identity")(model)
    assert not result.modified
    assert result.stats.rejected[0].reason == "training_mode is true"


class _BreakingPass(Pass):
    name = "test-breaking"

    def call(self, model: ir.Model):
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
        stats = PassStats()
        stats.count("broken")
        return self.result(model, stats)


def test_pipeline_names_the_pass_that_breaks_equivalence() -> None:
    model = eir.from_proto(conv_relu_model())
    with pytest.raises(EquivalenceError, match="test-breaking"):
        Pipeline([registry.create("dce"), _BreakingPass()]).run(model)


def test_fixed_point_stops_when_nothing_changes() -> None:
    model = eir.from_proto(conv_relu_model())
    report = Pipeline(registry.parse_list("remove-identity,dce"), PipelineConfig(fixed_point=True)).run(model)
    assert len(report.steps) == 4  # round 1 changes, round 2 confirms nothing left
    assert not any(s.modified for s in report.steps[2:])


def test_unknown_pass_suggests_a_name() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'dce'"):
        registry.get("dcee")


def test_constant_fold() -> None:
    nodes = [
        helper.make_node("Add", ["a", "a"], ["a2"]),
        helper.make_node("Mul", ["x", "a2"], ["y"]),
    ]
    model = eir.from_proto(make_model(nodes, [("x", (2, 3))], [("y", (2, 3))], [tensor("a", np.ones((2, 3), np.float32))]))
    report = Pipeline(registry.parse_list("constant-fold")).run(model)
    assert [n.op_type for n in report.model.graph] == ["Mul"]
    assert report.final.passed


USER_PASS = textwrap.dedent(
    """
    import onnx_ir as ir
    from edgec.passes_api import Pass, PassStats

    class ReluToIdentity(Pass):
        name = "relu-on-positive"
        summary = "a user pass"

        def call(self, model: ir.Model):
            stats = PassStats()
            for node in model.graph:
                if node.op_type == "Sigmoid":
                    stats.reject("sigmoid", node.name, "not mine")
            return self.result(model, stats)
    """
)


def test_user_pass_through_cli(tmp_path: Path, run_cli) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(conv_relu_model(), src)
    (tmp_path / "my_passes.py").write_text(USER_PASS)
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(
        "optimize", str(src), "-o", str(out), "--passes", f"dce,{tmp_path / 'my_passes.py'}:ReluToIdentity"
    )
    assert code == 0, stderr
    assert "relu-on-positive" in stdout and "equivalence vs input: ok" in stdout
    assert eir.count_nodes(eir.load_model(out)) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["optimize", "MISSING.onnx", "-o", "OUT", "--passes", "dce"], "no such file"),
        (["optimize", "JUNK", "-o", "OUT", "--passes", "dce"], "not an ONNX model"),
        (["optimize", "MODEL", "-o", "OUT", "--passes", "nope"], "unknown pass 'nope'"),
        (["optimize", "MODEL", "-o", "OUT", "--passes", "missing_file.py:X"], "no such file"),
    ],
)
def test_cli_bad_input_one_line_no_output(tmp_path: Path, run_cli, args, message) -> None:
    onnx.save(conv_relu_model(), tmp_path / "model.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffgarbage" * 50)
    subst = {"MISSING.onnx": str(tmp_path / "missing.onnx"), "JUNK": str(tmp_path / "junk.onnx"),
             "MODEL": str(tmp_path / "model.onnx"), "OUT": str(tmp_path / "out.onnx")}
    code, stdout, stderr = run_cli(*[subst.get(a, a) for a in args])
    assert code != 0
    assert message in stderr
    assert "Traceback" not in stderr
    assert stderr.count("\n") <= 2
    assert not (tmp_path / "out.onnx").exists()


def test_readme_user_pass_example_runs(tmp_path: Path, run_cli) -> None:
    """The README's user-defined pass, run through the CLI exactly as the README says."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- user-pass-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    (tmp_path / "my_passes.py").write_text(block)
    nodes = [
        helper.make_node("Neg", ["x"], ["a"], name="n1"),
        helper.make_node("Neg", ["a"], ["b"], name="n2"),
        helper.make_node("Relu", ["b"], ["y"], name="r"),
    ]
    onnx.save(make_model(nodes, [("x", (2, 3))], [("y", (2, 3))]), tmp_path / "model.onnx")
    code, stdout, stderr = run_cli(
        "optimize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx"),
        "--passes", f"{tmp_path / 'my_passes.py'}:RemoveDoubleNeg,dce",
    )
    assert code == 0, stderr
    assert "neg-neg: 1" in stdout and "equivalence vs input: ok" in stdout
    assert [n.op_type for n in eir.load_model(tmp_path / "out.onnx").graph] == ["Relu"]


def test_table_cells_are_text_not_markup() -> None:
    from rich.console import Console

    from edgec import console

    c = Console(width=120, record=True)
    c.print(console.table(None, ["device", "ms"], [["cortex-a72 [emulated]", 1.5], ["[bold]x[/bold]", 2.0]]))
    text = c.export_text()
    assert "cortex-a72 [emulated]" in text
    assert "[bold]x[/bold]" in text
