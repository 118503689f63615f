"""MetaSchedule tuning (placeholder until the tuning section below is filled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_database(path: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=str(path), allow_missing=False)
