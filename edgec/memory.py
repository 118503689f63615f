"""Activation memory planning: tensor lifetimes, peak memory and an arena allocator.

A :class:`Schedule` is an execution order of steps (ONNX nodes, in graph order) and the activation
tensors they read and write.  Weights (initializers, ``Constant`` outputs and anything computed
only from them) are not activations and are left out: they live in flash/ROM on the devices this
planner is for.

Lifetimes.  Step ``i`` runs node ``i``.  A tensor produced by step ``p`` is live over the closed
interval ``[p, u]`` where ``u`` is its last consumer's step; graph inputs are live from step 0, graph
outputs until the last step, and a tensor nothing reads is live only at ``p``.  During step ``i`` the
node's inputs and outputs are all live (no in-place execution), so

    live(i) = sum(bytes(t) for t with start(t) <= i <= end(t)),    peak = max_i live(i).

``peak`` is the lower bound for any allocator; MCUNet's "peak SRAM" is this number.

Element sizes.  ``bytes(t) = numel(t) * itemsize(t)``; with ``float_bytes`` set (1 for int8
activations, 4 for float32) every floating-point tensor uses that element size instead of its
ONNX type's, integer tensors keep theirs.

Concatenation in place (``concat_in_place``, on by default).  A ``Concat`` whose inputs are each
produced by a step, read only by that ``Concat`` and not graph outputs, is planned as one buffer:
its inputs are written directly into their slices of the output (as MCUNetV2's runtime writes each
patch's output into the assembled feature map).  The buffer lives from the first input's
producer to the output's last use; the inputs take no memory of their own.

Elementwise in place (``inplace_elementwise``, on by default).  A single-input elementwise node
(``Relu``, ``Clip``, ``BatchNormalization``, ``Add`` of a constant, ...) whose input is read by
nothing else writes its output over its input, as fused conv+activation kernels do (TVM, TFLite
Micro, MCUNet); the two tensors share one buffer.

In-place depthwise (``inplace_depthwise``, off by default; MCUNet's TinyEngine): a depthwise
convolution whose input is read by nothing else computes one channel at a time into a scratch
buffer of one output channel and copies it over the input's channel, so its output shares the
input's buffer and only ``bytes(Y) / C`` extra bytes are live during the step.

Arena allocator.  Buffers are placed in an arena at byte offsets, in execution order: at step ``i``
buffers whose lifetime ended before ``i`` are freed, then the buffers starting at ``i`` (largest
first) go into the smallest free gap between live buffers that holds them (best fit), else on top
of the highest live buffer.  ``arena = max(offset + size)`` is what a device must reserve;
``fragmentation = 1 - peak / arena`` is the fraction of the arena lost to gaps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class TensorSize:
    """An activation tensor: element count, element size in bytes, and whether it is floating point."""

    name: str
    numel: int
    itemsize: int
    is_float: bool = True

    def nbytes(self, float_bytes: int | None = None) -> int:
        if self.is_float and float_bytes is not None:
            return self.numel * float_bytes
        return self.numel * self.itemsize


@dataclasses.dataclass(frozen=True)
class Step:
    """One node of the execution order: its activation inputs and outputs (tensor names)."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    depthwise_channels: int = 0  # channels of a depthwise Conv (channel multiplier 1), else 0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An execution order over activation tensors (see the module docstring)."""

    steps: tuple[Step, ...]
    tensors: tuple[TensorSize, ...]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]

    def tensor(self, name: str) -> TensorSize:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    """Which buffer-sharing rules the planner applies (see the module docstring)."""

    concat_in_place: bool = True
    inplace_elementwise: bool = True
    inplace_depthwise: bool = False

    @classmethod
    def named(cls, name: str) -> PlannerOptions:
        """``fused`` (default: in-place activations and concat) or ``tinyengine`` (+ in-place depthwise)."""
        presets = {"fused": cls(), "tinyengine": cls(inplace_depthwise=True),
                   "plain": cls(concat_in_place=False, inplace_elementwise=False)}
        if name not in presets:
            raise ValueError(f"expected one of {', '.join(presets)}")
        return presets[name]


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A planned buffer: the tensors sharing it (more than one for a Concat in place), lifetime, place."""

    tensors: tuple[str, ...]
    size: int
    start: int
    end: int
    offset: int


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Memory while one step runs."""

    index: int
    name: str
    op_type: str
    live_bytes: int
    output_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The result of :func:`plan_memory`."""

    float_bytes: int | None
    steps: tuple[StepMemory, ...]
    buffers: tuple[Buffer, ...]
    peak_bytes: int
    peak_step: int
    arena_bytes: int

    @property
    def fragmentation(self) -> float:
        return 0.0 if self.arena_bytes == 0 else 1.0 - self.peak_bytes / self.arena_bytes

    @property
    def peak_step_name(self) -> str:
        return self.steps[self.peak_step].name if self.steps else ""

    def to_json(self) -> dict[str, object]:
        return {
            "float_bytes": self.float_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_step": self.peak_step_name,
            "arena_bytes": self.arena_bytes,
            "fragmentation": self.fragmentation,
            "steps": [dataclasses.asdict(s) for s in self.steps],
        }


#: ops that may write their output over their only activation input (same size, elementwise).
INPLACE_OPS = frozenset(
    """Relu Clip Sigmoid Tanh HardSigmoid HardSwish LeakyRelu PRelu Elu Selu Celu Gelu Mish Softplus Neg Abs Exp
    Log Sqrt Reciprocal Floor Ceil Round Sign Erf Add Sub Mul Div Pow Max Min BatchNormalization Identity Dropout
    QuantizeLinear DequantizeLinear Cast""".split()
)


def _aliases(schedule: Schedule, sizes: dict[str, int], opts: PlannerOptions) -> dict[str, str]:
    """Tensor -> the representative of the buffer it shares (union-find over sharing rules)."""
    producer: dict[str, int] = {}
    uses: dict[str, int] = {}
    for i, s in enumerate(schedule.steps):
        for t in s.outputs:
            producer[t] = i
        for t in s.inputs:
            uses[t] = uses.get(t, 0) + 1
    boundary = set(schedule.graph_outputs) | set(schedule.graph_inputs)
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while t in parent:
            t = parent[t]
        return t

    for s in schedule.steps:
        if len(s.outputs) != 1 or not s.inputs:
            continue
        out = s.outputs[0]
        if opts.concat_in_place and s.op_type == "Concat" and len(set(s.inputs)) == len(s.inputs):
            roots = [find(t) for t in s.inputs]
            if (out not in boundary and len(set(roots)) == len(roots)
                    and all(t in producer and uses.get(t) == 1 and t not in boundary for t in s.inputs)):
                for r in roots:
                    parent[r] = out
        elif (((opts.inplace_elementwise and s.op_type in INPLACE_OPS and sizes.get(s.inputs[0]) == sizes.get(out))
               or (opts.inplace_depthwise and s.depthwise_channels > 0))
              and len(s.inputs) == 1 and s.inputs[0] in producer
              and uses.get(s.inputs[0]) == 1 and s.inputs[0] not in boundary
              and out in sizes):
            parent[out] = find(s.inputs[0])
    return {t: find(t) for t in parent}


def plan_memory(schedule: Schedule, float_bytes: int | None = None,
                options: PlannerOptions = PlannerOptions()) -> MemoryPlan:
    """Lifetimes, per-step live bytes, peak and a best-fit arena for ``schedule``."""
    steps = schedule.steps
    n = len(steps)
    sizes = {t.name: t.nbytes(float_bytes) for t in schedule.tensors}
    alias = _aliases(schedule, sizes, options)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for name in schedule.graph_inputs:
        if name in sizes:
            start[name] = 0
            end[name] = 0
    for i, s in enumerate(steps):
        for t in s.outputs:
            if t in sizes:
                start.setdefault(t, i)
                end[t] = max(end.get(t, i), i)
        for t in s.inputs:
            if t in sizes:
                start.setdefault(t, i)
                end[t] = max(end.get(t, i), i)
    last = max(n - 1, 0)
    for name in schedule.graph_outputs:
        if name in start:
            end[name] = last
    # group aliased tensors into their root buffer
    members: dict[str, list[str]] = {}
    for t in start:
        members.setdefault(alias.get(t, t), []).append(t)
    buffers = []
    for root, ts in members.items():
        b_start = min(start[t] for t in ts)
        b_end = max(end[t] for t in ts)
        buffers.append((root, tuple(sorted(ts, key=lambda x: (x != root, x))), max(sizes[t] for t in ts), b_start, b_end))

    # an in-place depthwise conv needs one output channel of scratch while it runs
    for i, s in enumerate(steps):
        if s.depthwise_channels and len(s.outputs) == 1 and alias.get(s.outputs[0], s.outputs[0]) != s.outputs[0]:
            scratch = sizes.get(s.outputs[0], 0) // s.depthwise_channels
            buffers.append((f"{s.name}#scratch", (f"{s.name}#scratch",), scratch, i, i))
    live = [0] * n
    for _, _, size, b0, b1 in buffers:
        for i in range(b0, b1 + 1):
            live[i] += size
    profile = tuple(
        StepMemory(i, s.name, s.op_type, live[i], sum(sizes.get(t, 0) for t in s.outputs)) for i, s in enumerate(steps)
    )
    peak = max(live, default=0)
    peak_step = live.index(peak) if live else 0

    # best-fit arena, in order of start step, largest first within a step
    order = sorted(range(len(buffers)), key=lambda k: (buffers[k][3], -buffers[k][2], buffers[k][0]))
    active: list[tuple[int, int, int]] = []  # (offset, size, end)
    placed: list[Buffer] = []
    arena = 0
    for k in order:
        root, ts, size, b0, b1 = buffers[k]
        active = [a for a in active if a[2] >= b0]
        active.sort()
        best: int | None = None
        best_gap = -1
        cursor = 0
        for off, sz, _ in active:
            gap = off - cursor
            if gap >= size and (best is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, off + sz)
        offset = best if best is not None else cursor
        active.append((offset, size, b1))
        arena = max(arena, offset + size)
        placed.append(Buffer(ts, size, b0, b1, offset))
    placed.sort(key=lambda b: (b.start, b.offset))
    return MemoryPlan(float_bytes, profile, tuple(placed), peak, peak_step, arena)


def layer_profile(plan: MemoryPlan, origin: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """Per original layer, the highest live memory of the steps derived from it.

    ``origin[i]`` names the original layer step ``i`` came from (after patching, several steps
    share a layer); layers keep the order of their first step.
    """
    best: dict[str, int] = {}
    for s, o in zip(plan.steps, origin):
        best[o] = max(best.get(o, 0), s.live_bytes)
    return tuple(best.items())
