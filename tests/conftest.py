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
