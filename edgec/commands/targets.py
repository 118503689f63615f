"""``edgec targets``: list the compilation targets."""

from __future__ import annotations

import click

from edgec import console


def _threads(t) -> str:
    """The runtime's thread policy in a few words (CPU targets only)."""
    if t.device != "cpu":
        return "-"
    per = "big core" if t.threads.cores == "big" else "core"
    return f"{t.threads.threads} on {per}s" if t.threads.threads else f"one per {per}"


@click.command("targets", epilog="""\b
Examples:
  edgec targets
  edgec targets --json
  edgec compile model.onnx --target cortex-a72 -o build/
""")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """List the targets `edgec compile --target` accepts.

    Any TVM target given as JSON works too.  Third-party packages add targets through the
    `edgec.targets` entry-point group.
    """
    import shutil

    from edgec.targets import TargetOptions, registry

    rows = []
    for entry in registry.entries():
        t = entry.factory(TargetOptions())
        tool = t.toolchain.compiler
        ready = "yes" if not tool or shutil.which(tool) else f"no: apt-get install {t.toolchain.debian_package}"
        if t.device == "cuda" and not shutil.which("nvcc"):
            ready = "no: nvcc missing"
        rows.append((t, entry.summary, ready))
    if as_json:
        console.print_json([t.to_json() | {"summary": s, "ready": r} for t, s, r in rows])
        return
    table = console.table(
        "Targets",
        ["name", "what it is", "arch", "device", "threads", "TVM target", "can build here"],
        [(t.name, s, t.arch, t.device, _threads(t), t.describe(), r) for t, s, r in rows],
        numeric_from=99,
    )
    console.out.print(table)
