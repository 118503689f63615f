"""``edgec passes``: list the registered passes."""

from __future__ import annotations

import click

from edgec import console


def _numerics(tolerance) -> str:
    """How a pass treats the model's numbers: exact, float rounding (reassociated sums), approximate."""
    if tolerance is None:
        return "exact"
    kind = "float rounding" if tolerance.rtol <= 1e-3 else "approximate"
    return f"{kind} (rtol {tolerance.rtol:g})"


@click.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """List the graph passes that `edgec optimize --passes` accepts.

    \b
    A pass of your own: --passes path/to/my_passes.py:MyPass
    """
    from edgec.passes_api import Pass, registry

    rows = []
    for cls in registry.classes():
        is_edgec = issubclass(cls, Pass)
        rows.append(
            (
                cls.name if is_edgec and cls.name else cls.__name__,
                cls.summary if is_edgec else next(iter((cls.__doc__ or "").strip().splitlines()), ""),
                _numerics(cls.tolerance if is_edgec else None),
                " ".join(o.flag for o in cls.options) if is_edgec else "",
            )
        )
    if as_json:
        console.print_json([{"name": r[0], "summary": r[1], "numerics": r[2], "options": r[3].split()} for r in rows])
        return
    console.out.print(console.table("Passes", ["name", "what it does", "numerics", "options"], rows, numeric_from=99))
