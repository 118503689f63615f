"""Memory planner: lifetimes and peaks against hand-computed values, arena invariants."""

from __future__ import annotations

import numpy as np
from graphs import make_model, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from edgec import analysis, memory


def _sched(steps, sizes, inputs=(), outputs=()):
    return memory.Schedule(
        tuple(memory.Step(f"s{i}", op, tuple(a), tuple(b)) for i, (op, a, b) in enumerate(steps)),
        tuple(memory.TensorSize(n, s, 4) for n, s in sizes.items()),
        tuple(inputs),
        tuple(outputs),
    )


def test_chain_peak_from_onnx_graph():
    # x[1,3,8,8] -conv3x3 p1-> a[1,4,8,8] -relu-> b -conv1x1-> y[1,2,8,8]
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["y"]),
    ]
    m = make_model(nodes, [("x", (1, 3, 8, 8))], [("y", (1, 2, 8, 8))],
                   [tensor("w1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                    tensor("w2", rng.standard_normal((2, 4, 1, 1)).astype(np.float32))])
    res = analysis.analyze(m)
    x, a, b, y = 3 * 64, 4 * 64, 4 * 64, 2 * 64
    live = [x + a, a, b + y]  # the Relu writes over its input (a and b share a buffer)
    assert [s.live_bytes for s in res.memory_fp32.steps] == [4 * v for v in live]
    assert res.memory_fp32.peak_bytes == 4 * max(live)
    assert res.memory_int8.peak_bytes == max(live)
    assert res.memory_fp32.peak_step == 0
    assert res.memory_fp32.arena_bytes >= res.memory_fp32.peak_bytes
    plain = memory.plan_memory(res.schedule, 1, memory.PlannerOptions(inplace_elementwise=False))
    assert [s.live_bytes for s in plain.steps] == [x + a, a + b, b + y]


def test_residual_keeps_input_alive():
    # x -> conv a -> relu b -> add(b, x) y : x is live through the add
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["b", "x"], ["y"]),
    ]
    m = make_model(nodes, [("x", (1, 4, 6, 6))], [("y", (1, 4, 6, 6))],
                   [tensor("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))])
    t = 4 * 36
    res = analysis.analyze(m)
    assert [s.live_bytes for s in res.memory_int8.steps] == [2 * t, 2 * t, 3 * t]
    assert res.memory_int8.peak_bytes == 3 * t
    plain = memory.plan_memory(res.schedule, 1, memory.PlannerOptions(inplace_elementwise=False))
    assert [s.live_bytes for s in plain.steps] == [2 * t, 3 * t, 3 * t]


def test_concat_in_place_shares_the_output_buffer():
    sizes = {"x": 10, "p": 4, "q": 6, "c": 10, "y": 2}
    steps = [("Slice", ["x"], ["p"]), ("Slice", ["x"], ["q"]), ("Concat", ["p", "q"], ["c"]), ("Relu", ["c"], ["y"])]
    s = _sched(steps, sizes, ["x"], ["y"])
    aliased = memory.plan_memory(s, None)
    # c's buffer exists from p's producer on; p and q take no memory of their own
    assert [st.live_bytes for st in aliased.steps] == [4 * v for v in (10 + 10, 10 + 10, 10, 10 + 2)]
    plain = memory.plan_memory(s, None, memory.PlannerOptions(concat_in_place=False))
    assert [st.live_bytes for st in plain.steps] == [4 * v for v in (10 + 4, 10 + 4 + 6, 4 + 6 + 10, 10 + 2)]


def test_best_fit_picks_the_smallest_gap():
    sizes = {"A": 40, "B": 10, "C": 30, "F": 10, "G": 1, "E": 8}
    steps = [("Op", [], ["A", "B", "C", "F"]), ("Op", ["A", "B"], ["G"]), ("Op", ["C", "F", "G"], ["E"])]
    plan = memory.plan_memory(_sched(steps, sizes, [], ["E"]), 1)
    off = {b.tensors[0]: b.offset for b in plan.buffers}
    assert off["A"] == 0 and off["C"] == 40 and off["B"] == 70 and off["F"] == 80 and off["G"] == 90
    assert off["E"] == 70  # the 10-byte gap left by B, not the 40-byte one left by A
    assert plan.peak_bytes == 91 and plan.arena_bytes == 91 and plan.fragmentation == 0.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_arena_never_overlaps_live_buffers(data):
    n_steps = data.draw(st.integers(1, 8))
    sizes: dict[str, int] = {"in": data.draw(st.integers(1, 50))}
    steps = []
    names = ["in"]
    for i in range(n_steps):
        k = data.draw(st.integers(1, min(3, len(names))))
        ins = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=k, unique=True))
        outs = [f"t{i}_{j}" for j in range(data.draw(st.integers(1, 2)))]
        for o in outs:
            sizes[o] = data.draw(st.integers(1, 50))
        names += outs
        steps.append(("Op", ins, outs))
    sched = _sched(steps, sizes, ["in"], [names[-1]])
    plan = memory.plan_memory(sched, 1)
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            if a.start <= b.end and b.start <= a.end:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
    # peak by brute force over steps
    live = []
    for i in range(n_steps):
        live.append(sum(b.size for b in bufs if b.start <= i <= b.end))
    assert plan.peak_bytes == max(live)
    assert plan.arena_bytes >= plan.peak_bytes
    assert 0.0 <= plan.fragmentation < 1.0


def test_inplace_depthwise_shares_input_and_needs_one_channel_of_scratch():
    # x -> pointwise a[1,8,10,10] -> depthwise stride 2 (pad 1) b[1,8,5,5] -> pointwise y[1,4,5,5]
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Conv", ["a", "w2"], ["b"], group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w3"], ["y"]),
    ]
    m = make_model(nodes, [("x", (1, 2, 10, 10))], [("y", (1, 4, 5, 5))],
                   [tensor("w1", rng.standard_normal((8, 2, 1, 1)).astype(np.float32)),
                    tensor("w2", rng.standard_normal((8, 1, 3, 3)).astype(np.float32)),
                    tensor("w3", rng.standard_normal((4, 8, 1, 1)).astype(np.float32))])
    res = analysis.analyze(m)
    x, a, b, y = 200, 800, 200, 100
    assert [s.live_bytes for s in res.memory_int8.steps] == [x + a, a + b, b + y]
    te = memory.plan_memory(res.schedule, 1, memory.PlannerOptions.named("tinyengine"))
    # b is written over a (one buffer of max(a, b) bytes) plus one channel of b as scratch
    assert [s.live_bytes for s in te.steps] == [x + a, a + b // 8, a + y]
    assert te.peak_bytes == x + a
