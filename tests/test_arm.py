"""The emulated ARM64 board (``edgec.emulate``, ``edgec device``) and models run on it.

The ``arm`` tests set everything up themselves: the session fixture runs ``scripts/arm_board.sh``
when the host lacks the Debian packages or the cached arm64 userland (that needs root, as in CI),
starts a TVM RPC tracker on this host and two emulated Cortex-A72 boards (one for direct
connections, one registered with the tracker), and stops them all at the end.  A board is started
with ``die_with_parent`` so it cannot outlive the test process.  If the board cannot be set up the
tests fail (fixture error); they never skip.

The fast tests at the bottom (no marker) check configuration errors and the pid-file handling
without starting qemu.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from edgec import emulate as em
from edgec.errors import InputError, ToolMissingError

TRACKER_KEY = "edgec-test-cortex-a72"


def _pdeathsig() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)


@pytest.fixture(scope="session")
def boards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tracker and two emulated cortex-a72 boards (direct, and registered with the tracker)."""
    from edgec.rpc import tracker_summary

    tmp = tmp_path_factory.mktemp("arm")
    em.prepare("arm64")  # builds the rootfs (scripts/arm_board.sh) the first time; raises if it cannot
    tport = em.free_port()
    tracker = subprocess.Popen(em.supervised_command([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                                      "--port", str(tport), "--port-end", str(tport + 1)]), stdout=open(tmp / "tracker.log", "w"),
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pdeathsig)
    started: list[em.Board] = []
    try:
        end = time.monotonic() + 60
        while True:
            try:
                tracker_summary("127.0.0.1", tport, timeout=2.0)
                break
            except Exception:
                if time.monotonic() > end or tracker.poll() is not None:
                    raise AssertionError(f"tracker did not start: {(tmp / 'tracker.log').read_text()[-1000:]}") from None
                time.sleep(0.3)
        configs = [
            em.BoardConfig(cpu="cortex-a72", port=em.free_port(), die_with_parent=True, threads=1, start_timeout_s=300),
            em.BoardConfig(cpu="cortex-a72", port=em.free_port(), tracker=f"127.0.0.1:{tport}", key=TRACKER_KEY,
                           die_with_parent=True, threads=1, start_timeout_s=300),
        ]
        # Both boards boot at once (each imports TVM under emulation for ~10-40 s); started from
        # this (main) thread, so that die_with_parent ties them to the test process.
        started += em.start_boards(configs)
        direct, tracked = started
        yield {"direct": direct, "tracked": tracked, "tracker": tport, "tmp": tmp}
    finally:
        for b in started:
            em.stop(b)
        # The tracker serves from a child process (tvm.exec.popen_worker): end its whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tracker.pid, signal.SIGTERM)
        tracker.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tracker.pid, signal.SIGKILL)
    for b in started:
        assert not b.alive(), f"board pid {b.pid} outlived its stop()"


@pytest.fixture(scope="session")
def a72_artifact(zoo_onnx, tmp_path_factory: pytest.TempPathFactory):
    """MobileNetV2 (width 0.35, 96x96) cross-compiled for cortex-a72 (not runnable on this host)."""
    from edgec.compile import CompileConfig, compile_model
    from edgec.targets import get_target

    model = zoo_onnx("mobilenet_v2", width_mult=0.35, resolution=96)
    out = tmp_path_factory.mktemp("a72") / "build"
    result = compile_model(model, out, CompileConfig(target=get_target("cortex-a72")))
    assert not result.artifact.runs_here()  # an aarch64 library: only the board can run it
    return result.artifact


@pytest.mark.arm
@pytest.mark.slow
def test_zoo_model_on_emulated_board_direct(boards: dict, a72_artifact, run_cli) -> None:
    board: em.Board = boards["direct"]
    code, out, err = run_cli("bench", str(a72_artifact.path), "--rpc", f"127.0.0.1:{board.port}", "--warmup", "1",
                             "--number", "1", "--repeat", "3", "--timeout", "300", "--json")
    assert code == 0, err
    r = json.loads(out)
    stats = r["edgec"]
    assert stats and len(stats["samples_ms"]) == 3 and all(s > 0 for s in stats["samples_ms"])
    assert r["where"].endswith("(emulated arm64 cortex-a72)"), r["where"]  # emulated latency says so
    eq = r["equivalence"]
    assert eq["passed"], eq
    # Outputs computed on the emulated board equal onnxruntime's on this host within 1e-4.
    assert eq["max_rel"] <= 1e-4, eq


@pytest.mark.arm
@pytest.mark.slow
def test_zoo_model_on_emulated_board_through_tracker(boards: dict, a72_artifact, run_cli) -> None:
    code, out, err = run_cli("bench", str(a72_artifact.path), "--tracker", f"127.0.0.1:{boards['tracker']}", "--key",
                             TRACKER_KEY, "--warmup", "1", "--number", "1", "--repeat", "2", "--timeout", "300",
                             "--wait", "120")
    assert code == 0, err
    # The latency report: a table row for the emulated board, the statistics, the output check.
    assert "mean ms" in out and "p99 ms" in out
    assert "(emulated arm64" in out, out  # the row of the emulated board is labelled
    assert "outputs vs onnxruntime: ok" in out, out


def _tiny_cnn(path: Path) -> Path:
    """conv3x3 -> relu -> depthwise 3x3 -> relu -> global pool -> linear: six TIR tasks, small enough
    that a handful of candidates build and run under emulation in about a minute."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    return path


@pytest.mark.arm
@pytest.mark.slow
def test_tune_on_the_board_through_tracker_then_compile_with_db(boards: dict, tmp_path: Path, run_cli) -> None:
    """MetaSchedule's RPC runner: candidates cross-compiled here, timed on the emulated board; the
    database then drives `edgec compile --db` and the tuned build runs on the board."""
    import onnx

    from edgec.targets import get_target
    from edgec.tune import database_coverage

    model = _tiny_cnn(tmp_path / "tiny.onnx")
    tracker = f"127.0.0.1:{boards['tracker']}"
    db = tmp_path / "db"
    code, out, err = run_cli("tune", str(model), "--target", "cortex-a72", "--trials", "8", "--per-iter", "8", "--db",
                             str(db), "--tracker", tracker, "--key", TRACKER_KEY, "--seed", "0", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["trials_done"] >= 8
    measured = [t for t in r["tasks"] if t["best_ms"] is not None]
    # aarch64 candidates cannot run on this x86 host: a latency means the board ran them.
    assert measured and all(t["best_ms"] > 0 for t in measured), r
    assert (db / "database_tuning_record.json").stat().st_size > 0

    from edgec.compile import import_onnx
    from edgec import verify as vfy

    proto = onnx.load(str(model))
    cov = database_coverage(import_onnx(proto, vfy.input_specs(proto)), get_target("cortex-a72"), db)
    assert {t["name"] for t in measured} <= set(cov.found), (measured, cov)  # compile will find what tune stored

    build = tmp_path / "build"
    code, out, err = run_cli("compile", str(model), "--target", "cortex-a72", "--db", str(db), "-o", str(build))
    assert code == 0, err
    assert f"{len(cov.found)}/{len(cov.found) + len(cov.missing)} functions scheduled from it" in " ".join(out.split()), out
    assert json.loads((build / "manifest.json").read_text())["database"] == str(db)
    code, out, err = run_cli("bench", str(build), "--tracker", tracker, "--key", TRACKER_KEY, "--warmup", "1", "--number",
                             "1", "--repeat", "2", "--timeout", "300", "--wait", "120", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["equivalence"]["passed"] and res["equivalence"]["max_rel"] <= 1e-4, res["equivalence"]
    assert len(res["edgec"]["samples_ms"]) == 2


@pytest.mark.arm
@pytest.mark.slow
def test_onnxruntime_aarch64_inside_the_emulated_userland(boards: dict, a72_artifact) -> None:
    import onnxruntime as ort

    res = em.ort_latency(a72_artifact.model, em.OrtRunConfig(cpu="cortex-a72", warmup=0, number=1, repeat=2, threads=1,
                                                              seed=int(np.random.default_rng().integers(1 << 30))))
    assert res.label == em.EMULATED_LABEL and "emulated" in res.label
    assert len(res.stats.samples_ms) == 2 and res.stats.min > 0
    assert res.ort_version == ort.__version__
    # The emulated aarch64 onnxruntime computes what this host's onnxruntime computes.
    host = ort.InferenceSession(str(a72_artifact.model), providers=["CPUExecutionProvider"]).run(None, res.inputs)
    assert len(host) == len(res.outputs)
    for h, e in zip(host, res.outputs):
        assert h.shape == e.shape
        assert np.abs(h - e).max() <= 1e-4 * max(1.0, float(np.abs(h).max()))


def _group(pgid: int) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except (OSError, psutil.Error):
            pass
    return left


@pytest.mark.arm
@pytest.mark.slow
def test_board_dies_with_the_process_that_started_it(boards: dict) -> None:
    """A process that started a board with die_with_parent is SIGKILLed: nothing of it survives."""
    port = em.free_port()
    code = ("import os; from edgec import emulate as em; "
            f"b = em.start(em.BoardConfig(port={port}, die_with_parent=True, start_timeout_s=300)); "
            "print(b.pid, flush=True); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=420)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    pgid = int(r.stdout.split()[0])  # the board leads its own process group
    end = time.monotonic() + 30
    while _group(pgid) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _group(pgid), [p.cmdline() for p in _group(pgid)]
    record = next(b for b in em.list_boards() if b.port == port)
    assert not record.alive()
    assert em.stop(record) is False and port not in {b.port for b in em.list_boards()}


@pytest.mark.arm
@pytest.mark.slow
def test_board_status_and_stop_from_another_process(boards: dict) -> None:
    """Runs last in this file: stops the direct board with `edgec device stop` in a new process."""
    board: em.Board = boards["direct"]
    status = subprocess.run([sys.executable, "-m", "edgec.cli", "device", "status", "--json"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    listed = {b["port"]: b for b in json.loads(status.stdout)["boards"]}
    assert listed[board.port]["alive"] and listed[board.port]["emulated"]
    assert listed[boards["tracked"].port]["tracker"] == f"127.0.0.1:{boards['tracker']}"
    stop = subprocess.run([sys.executable, "-m", "edgec.cli", "device", "stop", "--port", str(board.port)],
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert f"pid {board.pid}" in stop.stdout
    assert not psutil.pid_exists(board.pid) or psutil.Process(board.pid).status() == psutil.STATUS_ZOMBIE
    assert board.port not in {b.port for b in em.list_boards()}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", board.port), timeout=2).close()
    assert boards["tracked"].alive()  # only the named board stopped


# --- fast checks, no board -------------------------------------------------------------------


def test_board_config_rejects_bad_options() -> None:
    with pytest.raises(InputError, match="cortex-a76"):
        em.BoardConfig(cpu="cortex-a77")
    with pytest.raises(InputError, match="--key"):
        em.BoardConfig(tracker="127.0.0.1:9190")
    with pytest.raises(InputError, match="--tracker"):
        em.BoardConfig(key="rpi4")
    with pytest.raises(InputError, match="HOST:PORT"):
        em.BoardConfig(tracker="nowhere", key="k")
    with pytest.raises(InputError):
        em.BoardConfig(port=70000)
    with pytest.raises(InputError):
        em.OrtRunConfig(repeat=0)


def test_missing_tools_without_root_name_packages_and_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))  # no rootfs built there
    monkeypatch.setattr(em, "_is_root", lambda: False)
    with pytest.raises(ToolMissingError) as info:
        em.prepare("arm64")
    assert "arm_board.sh" in (info.value.hint or "") and "qemu-user-static" in (info.value.hint or "")
    code, _, err = run_cli("device", "emulate", "arm64", "--port", str(em.free_port()))
    assert code != 0 and "error:" in err and "arm_board.sh" in err and "Traceback" not in err
    assert not (tmp_path / "arm64" / "boards").exists() or not list((tmp_path / "arm64" / "boards").iterdir())


def test_status_and_stop_handle_stale_pid_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    paths = em.BoardPaths.for_arch("arm64")
    paths.boards.mkdir(parents=True)
    # A process that is not a board's: a pid file naming it with another start time is stale.
    dead = em.Board("arm64", "cortex-a72", "127.0.0.1", 9999, None, None, 1, 0.0, str(paths.root), "x.log", time.time())
    (paths.boards / "9999.json").write_text(json.dumps(dead.to_json()))
    assert [b.port for b in em.list_boards()] == [9999] and not em.list_boards()[0].alive()
    code, out, _ = run_cli("device", "status")
    assert code == 0 and "9999" in out
    code, out, _ = run_cli("device", "stop")
    assert code == 0 and "no emulated board running" in out and "stale" in out
    assert not (paths.boards / "9999.json").exists()
    assert em.stop_boards() == []


def test_emulated_label_only_for_local_boards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgec.rpc import Remote

    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    paths = em.BoardPaths.for_arch("arm64")
    paths.boards.mkdir(parents=True)
    me = psutil.Process()
    port = em.free_port()
    # This test process stands in for a running board (alive() checks pid and start time).
    live = em.Board("arm64", "cortex-a76", "127.0.0.1", port, "127.0.0.1:9190", "k", me.pid, me.create_time(),
                    str(paths.root), "x.log", time.time())
    (paths.boards / f"{port}.json").write_text(json.dumps(live.to_json()))
    assert "emulated arm64 cortex-a76" in (em.emulated_label(Remote.tracker("127.0.0.1:9190", key="k")) or "")
    assert em.emulated_label(Remote.tracker("127.0.0.1:9190", key="other")) is None
    assert em.emulated_label(Remote.direct(f"127.0.0.1:{port}")) is None  # registered at a tracker, not direct
    assert em.emulated_label(Remote.direct(f"10.1.2.3:{port}")) is None


def test_emulate_fails_fast_when_tracker_is_down_or_port_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    monkeypatch.setattr(em, "prepare", lambda *a, **k: pytest.fail("prepare() reached before the cheap checks"))
    t = time.monotonic()
    code, _, err = run_cli("device", "emulate", "arm64", "--port", str(em.free_port()), "--tracker",
                           f"127.0.0.1:{em.free_port()}", "--key", "k")
    assert code != 0 and "tracker" in err and "Traceback" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, _, err = run_cli("device", "emulate", "arm64", "--port", str(busy.getsockname()[1]))
    assert code != 0 and "in use" in err
    assert time.monotonic() - t < 30
    code, _, err = run_cli("device", "emulate", "arm64", "--key", "k")
    assert code != 0 and "--tracker" in err
    assert not list(tmp_path.rglob("*.json"))  # no pid file left behind
