from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("COLUMNS", "200")  # rich tables unwrapped in captured output
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def run_cli(tmp_path):
    """Run ``edgec`` in-process; returns (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    def _run(*args: str):
        from edgec.cli import main

        runner = CliRunner()
        with runner.isolation() as (out, err, _):
            code = main(list(args))
            return code, out.getvalue().decode(), err.getvalue().decode()

    return _run


@pytest.fixture(scope="session")
def zoo_onnx():
    """``name -> onnx.ModelProto``: a zoo model exported to verified ONNX (cached on disk).

    Extra arguments go to :func:`edgec.export.export_zoo_model`, e.g.
    ``zoo_onnx("mobilenet_v2", width_mult=0.35, resolution=96)``.  The cache lives in
    ``$EDGEC_CACHE_DIR`` if set, else ``~/.cache/edgec/zoo``.
    """
    from edgec.export import DEFAULT_CACHE_DIR, export_zoo_model

    cache_dir = Path(os.environ["EDGEC_CACHE_DIR"]) if os.environ.get("EDGEC_CACHE_DIR") else DEFAULT_CACHE_DIR

    def _get(name: str, **kwargs):
        return export_zoo_model(name, cache_dir=cache_dir, **kwargs)

    return _get
