"""edgec's schedule library: rules that schedule TVM TIR functions for edge CPUs and GPUs.

:func:`default_schedule_pass` is the hook the compile pipeline calls (after legalization and
fusion, before lowering) for every target; it returns a module pass applying edgec's schedules
for that target, or ``None`` where edgec has none yet.
"""

from __future__ import annotations

from typing import Any


def default_schedule_pass(target: Any) -> Any | None:
    """A ``tvm.ir.transform.Pass`` scheduling the module's TIR functions for ``target``, or None."""
    del target
    return None
