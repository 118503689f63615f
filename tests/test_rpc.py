"""edgec bench over TVM RPC: a direct server, a tracker, and the faults (bounded in time).

The fixtures start a real ``python -m tvm.exec.rpc_tracker`` and ``rpc_server`` processes (this
host's architecture) on free ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_compile import small_cnn

from edgec.bench import BenchConfig, BenchError, run_bench
from edgec.compile import Artifact, CompileConfig, compile_model
from edgec.errors import InputError
from edgec.rpc import Remote, RemoteError, tracker_summary
from edgec.targets import get_target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A TVM RPC process started by a test, ended with its children."""

    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        self.p = subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log.read_text():
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.p.args} did not start: {self.log.read_text()[-2000:]}")

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.p.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        for proc in self.tree():
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.p.wait(10)


def launch_server(tmp: Path, name: str, tracker: int | None = None, key: str = "") -> tuple[Proc, int]:
    port = free_port()
    args = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    if tracker:
        args += ["--tracker", f"127.0.0.1:{tracker}", "--key", key]
    return Proc(*args, log=tmp / f"{name}.log"), port


@pytest.fixture(scope="module")
def rpc_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("rpc")
    tport = free_port()
    tracker = Proc("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport), "--port-end", str(tport + 1),
                   log=tmp / "tracker.log")
    procs = [tracker]
    try:
        tracker.wait_for("bind to")
        direct, dport = launch_server(tmp, "direct")
        procs.append(direct)
        victims = {fault: launch_server(tmp, f"victim-{fault}") for fault in ("killed", "frozen")}
        procs += [v[0] for v in victims.values()]
        for i in range(2):
            board, _ = launch_server(tmp, f"board{i}", tracker=tport, key="board")
            procs.append(board)
        art = compile_model(small_cnn(np.random.default_rng()), tmp / "build", CompileConfig(get_target("host"))).artifact
        direct.wait_for("bind to")
        end = time.monotonic() + 90
        while time.monotonic() < end:
            q = {q.key: q for q in tracker_summary("127.0.0.1", tport).queues}
            if "board" in q and q["board"].free == 2:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("boards did not register with the tracker")
        yield {"tmp": tmp, "tracker": tport, "direct": dport, "artifact": art, "victims": victims}
    finally:
        for p in procs:
            p.stop()


def test_direct_server(rpc_env: dict) -> None:
    r = run_bench(rpc_env["artifact"], Remote.direct(f"127.0.0.1:{rpc_env['direct']}"), BenchConfig(warmup=1, number=2, repeat=5))
    assert r.complete and r.stats is not None and len(r.stats.samples_ms) == 5
    assert r.equivalence is not None and r.equivalence.passed  # outputs computed on the device
    assert "127.0.0.1" in r.where


def test_tracker_picks_a_free_board_and_devices_lists_them(rpc_env: dict, run_cli) -> None:
    tracker = f"127.0.0.1:{rpc_env['tracker']}"
    code, out, err = run_cli("devices", "--tracker", tracker, "--json")
    assert code == 0, err
    info = json.loads(out)
    board = next(q for q in info["queues"] if q["key"] == "board")
    assert board["total"] == 2 and board["free"] == 2
    # two runs at once: each gets its own board
    results: list = []

    def one() -> None:
        results.append(run_bench(rpc_env["artifact"], Remote.tracker(tracker, "board", wait_s=60), BenchConfig(warmup=1, number=2, repeat=3)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and all(r.complete and r.equivalence.passed for r in results)
    code, out, err = run_cli("bench", str(rpc_env["artifact"].path), "--tracker", tracker, "--key", "board",
                             "--repeat", "3", "--number", "1", "--json")
    assert code == 0, err
    assert len(json.loads(out)["edgec"]["samples_ms"]) == 3


def test_server_down_is_a_clear_error_fast(rpc_env: dict, run_cli) -> None:
    port = free_port()  # nothing listens there
    t = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach the RPC server"):
        run_bench(rpc_env["artifact"], Remote.direct(f"127.0.0.1:{port}"), BenchConfig(repeat=1))
    with pytest.raises(RemoteError, match="cannot reach the RPC tracker"):
        run_bench(rpc_env["artifact"], Remote.tracker(f"127.0.0.1:{port}", "board"), BenchConfig(repeat=1))
    code, out, err = run_cli("bench", str(rpc_env["artifact"].path), "--rpc", f"127.0.0.1:{port}")
    assert code != 0 and "cannot reach" in err and "Traceback" not in err
    assert time.monotonic() - t < 10


def test_tracker_without_a_free_device_gives_up_in_time(rpc_env: dict, run_cli) -> None:
    tracker = f"127.0.0.1:{rpc_env['tracker']}"
    t = time.monotonic()
    with pytest.raises(RemoteError, match="no free device with key 'rpi5'"):
        run_bench(rpc_env["artifact"], Remote.tracker(tracker, "rpi5", wait_s=2), BenchConfig(repeat=1))
    assert time.monotonic() - t < 8
    code, out, err = run_cli("bench", str(rpc_env["artifact"].path), "--tracker", tracker, "--key", "rpi5", "--wait", "1")
    assert code != 0 and "no free device" in err


def test_artifact_for_another_architecture_is_refused(rpc_env: dict, tmp_path: Path) -> None:
    from test_compile import ensure_aarch64_gcc

    ensure_aarch64_gcc()
    art = compile_model(small_cnn(np.random.default_rng()), tmp_path / "arm", CompileConfig(get_target("arm64"))).artifact
    t = time.monotonic()
    with pytest.raises(InputError, match="built for aarch64"):
        run_bench(art, Remote.direct(f"127.0.0.1:{rpc_env['direct']}"), BenchConfig(repeat=1))
    assert time.monotonic() - t < 30


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_session_that_dies_mid_run_keeps_samples(rpc_env: dict, fault: str) -> None:
    proc, port = rpc_env["victims"][fault]  # started with the others, for speed
    proc.wait_for("bind to")
    try:
        first = threading.Event()

        def on_event(ev) -> None:
            if ev.stage == "measure" and ev.done == 3:
                first.set()

        def fault_in() -> None:
            if first.wait(60):
                proc.signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)

        threading.Thread(target=fault_in, daemon=True).start()
        t = time.monotonic()
        with pytest.raises(BenchError) as info:
            run_bench(rpc_env["artifact"], Remote.direct(f"127.0.0.1:{port}"),
                      BenchConfig(warmup=1, number=5, repeat=100000, stall_timeout_s=3), on_event)
        elapsed = time.monotonic() - t
        partial = info.value.partial
        assert not partial.complete and partial.error
        assert partial.stats is not None and len(partial.stats.samples_ms) >= 3
        assert elapsed < 60
        assert ("no progress" in info.value.message) == (fault == "frozen")
        assert [t for t in threading.enumerate() if t.name == "edgec-bench"] == []  # no thread left hanging
    finally:
        proc.stop()
