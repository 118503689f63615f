"""Console output for the CLI: rich tables on stdout, progress and messages on stderr.

Library code never prints; it returns reports and accepts progress callbacks.  Commands turn
those into output with the helpers here.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric_from: int = 1) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i >= numeric_from else "left")
    for r in rows:
        t.add_row(*[escape(fmt(v)) for v in r])  # cell text is data, never markup
    return t


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()  # a buffered wrapper (click's CliRunner) would otherwise drop it


def info(msg: str) -> None:
    err.print(msg, highlight=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


@contextlib.contextmanager
def progress(transient: bool = True) -> Iterator[Progress]:
    """A progress bar on stderr (hidden when stderr is not a terminal, e.g. in CI logs)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=transient,
        disable=not err.is_terminal,
    ) as p:
        yield p
