"""edgec bench on this host: statistics, output checks, faults, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_compile import small_cnn

from edgec.bench import BenchConfig, LatencyStats, host_cpus, library_arch, run_bench
from edgec.targets import ThreadPolicy
from edgec.compile import Artifact, CompileConfig, compile_model
from edgec.errors import EquivalenceError, InputError
from edgec.targets import get_target


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    out = tmp_path_factory.mktemp("bench") / "build"
    return compile_model(small_cnn(np.random.default_rng()), out, CompileConfig(get_target("host"))).artifact


def test_statistics_follow_their_definitions() -> None:
    rng = np.random.default_rng()
    x = rng.gamma(2.0, 1.0, size=int(rng.integers(5, 200)))
    s = LatencyStats.from_samples(list(x))
    srt = np.sort(x)
    n = len(x)

    def pct(q: float) -> float:  # linear interpolation between order statistics
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        return float(srt[lo] + (srt[hi] - srt[lo]) * (pos - lo))

    assert s.mean == pytest.approx(sum(x) / n)
    assert s.median == pytest.approx(pct(0.5))
    assert s.p90 == pytest.approx(pct(0.9)) and s.p99 == pytest.approx(pct(0.99))
    assert s.std == pytest.approx(math.sqrt(sum((v - sum(x) / n) ** 2 for v in x) / n))
    assert s.min == srt[0] and s.max == srt[-1] and len(s.samples_ms) == n
    one = LatencyStats.from_samples([2.5])
    assert one.row() == (2.5, 2.5, 2.5, 2.5, 0.0, 2.5, 2.5)
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])
    with pytest.raises(InputError):
        BenchConfig(repeat=0)


def test_local_bench_with_onnxruntime_ratio(host_artifact: Artifact) -> None:
    events = []
    r = run_bench(host_artifact, None, BenchConfig(warmup=1, number=3, repeat=7, compare_ort=True), events.append)
    n = ThreadPolicy().local_count(host_cpus())  # host policy: a worker per core here, for TVM and onnxruntime alike
    assert r.complete and r.error is None and r.where == f"this host, {n} thread{'s' if n > 1 else ''}"
    assert r.config.threads == n
    assert r.stats is not None and len(r.stats.samples_ms) == 7 and r.stats.min > 0
    assert r.stats.min <= r.stats.median <= r.stats.p90 <= r.stats.p99 <= r.stats.max
    assert r.ort is not None and len(r.ort.samples_ms) == 7
    assert r.ratio == pytest.approx(r.stats.mean / r.ort.mean)
    assert r.equivalence is not None and r.equivalence.passed
    assert [e.done for e in events if e.stage == "measure"] == list(range(1, 8))
    js = r.to_json()
    assert js["edgec"]["samples_ms"] == list(r.stats.samples_ms) and js["complete"]


def test_threads_configure_tvm_pool_and_onnxruntime(host_artifact: Artifact, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgec.bench as eb
    from edgec import verify as vfy

    pools: list[tuple[int, int, list[str]] | None] = []
    monkeypatch.setattr(eb, "configure_threads", lambda fn, policy, threads, cpus: pools.append(policy.pool_args(threads, cpus)))
    sessions: list[int] = []
    real_session = vfy.session

    def session(model, *, optimize=False, threads=0):
        if optimize:  # the timed onnxruntime session
            sessions.append(threads)
        return real_session(model, optimize=optimize, threads=threads)

    monkeypatch.setattr(eb.vfy, "session", session)
    r = run_bench(host_artifact, None, BenchConfig(warmup=0, number=1, repeat=2, compare_ort=True, threads=1))
    assert r.complete and r.where == "this host, 1 thread"
    assert pools == [(-3, 1, [str(c) for c in host_cpus()])] and sessions == [1]
    with pytest.raises(InputError):
        BenchConfig(threads=0)


def test_thread_policy_sets_the_pool_as_the_target_says(host_artifact: Artifact, tmp_path: Path) -> None:
    import edgec.bench as eb

    cpus = [0, 1, 2, 3]
    host, big = ThreadPolicy(), ThreadPolicy(cores="big")
    # host: one worker per physical core, free to move between the usable CPUs; a count overrides
    assert host.pool_args(None, cpus)[0] == -3 and host.pool_args(None, cpus)[2] == ["0", "1", "2", "3"]
    assert 1 <= host.pool_args(None, cpus)[1] <= 4 and host.pool_args(3, cpus) == (-3, 3, ["0", "1", "2", "3"])
    # a remote device: its CPUs are unknown, so "all" keeps its default unless a count is given
    assert host.pool_args(None, None) is None and host.pool_args(2, None) == (-3, 2, ["0", "1"])
    assert host.describe(None, None) == "the device's default threads" and host.describe(2, None) == "2 threads"
    # ARM boards: TVM's kBig mode, all big cores unless a count is given
    assert big.pool_args(None, None) == (1, 0, []) and big.pool_args(4, None) == (1, 4, [])
    assert big.describe(None, None) == "big cores" and big.describe(4, None) == "4 threads on big cores"
    with pytest.raises(ValueError):
        ThreadPolicy(cores="little")
    with pytest.raises(ValueError):
        ThreadPolicy(threads=0)
    # what the runtime is told: exactly the policy's arguments, and only two when no CPUs are named
    calls: list[tuple] = []
    eb.configure_threads(lambda *a: calls.append(a), big, None, None)
    eb.configure_threads(lambda *a: calls.append(a), host, 2, [0, 1])
    eb.configure_threads(lambda *a: calls.append(a), host, None, None)
    assert calls == [(1, 0), (-3, 2, ["0", "1"])]
    # the manifest carries the policy; artifacts from before it existed read as the default
    old = tmp_path / "old"
    shutil.copytree(host_artifact.path, old)
    m = json.loads((old / "manifest.json").read_text())
    assert m["threads"] == {"cores": "all", "threads": None}
    m["threads"] = {"cores": "big", "threads": 2}
    (old / "manifest.json").write_text(json.dumps(m))
    assert Artifact.load(old).manifest.threads == ThreadPolicy(cores="big", threads=2)
    del m["threads"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert Artifact.load(old).manifest.threads == ThreadPolicy()
    m["threads"] = {"cores": "middle"}
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="thread policy"):
        Artifact.load(old)


def test_wrong_outputs_are_caught(host_artifact: Artifact, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(host_artifact.path, broken)
    # a reference model with the same inputs and outputs but other weights
    onnx.save(small_cnn(np.random.default_rng(12345)), broken / "model.onnx")
    with pytest.raises(EquivalenceError, match="differ from onnxruntime"):
        run_bench(broken, None, BenchConfig(warmup=0, number=1, repeat=1))


def test_artifact_for_another_architecture(tmp_path: Path) -> None:
    from test_compile import ensure_aarch64_gcc

    ensure_aarch64_gcc()
    art = compile_model(small_cnn(np.random.default_rng()), tmp_path / "arm", CompileConfig(get_target("cortex-a72"))).artifact
    assert library_arch(art.library) == "aarch64"
    with pytest.raises(InputError, match="built for aarch64"):
        run_bench(art, None, BenchConfig(repeat=1))
    with pytest.raises(InputError, match="not an edgec artifact"):
        run_bench(tmp_path, None, BenchConfig(repeat=1))


def test_cli_bench_json_and_table(host_artifact: Artifact, run_cli) -> None:
    code, out, err = run_cli("bench", str(host_artifact.path), "--repeat", "4", "--number", "2", "--warmup", "1", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["edgec"]["samples_ms"]) == 4 and rep["equivalence"]["passed"] and rep["onnxruntime"] is None
    code, out, err = run_cli("bench", str(host_artifact.path), "--repeat", "3", "--number", "1", "--compare-ort")
    assert code == 0, err
    assert "p99 ms" in out and "onnxruntime" in out and "x (" in out
    code, out, err = run_cli("bench", str(host_artifact.path), "--key", "rpi4")
    assert code != 0 and "--tracker" in err
    code, out, err = run_cli("bench", str(host_artifact.path), "--rpc", "nohostport")
    assert code != 0 and "HOST:PORT" in err
