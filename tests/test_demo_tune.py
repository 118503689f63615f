"""edgec demo end to end on a small zoo model; edgec tune configuration and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_compile import small_cnn

from edgec import verify as vfy
from edgec.compile import CompileConfig, compile_model, run_local
from edgec.targets import get_target


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
