"""``edgec device emulate|stop|status|ort``: an emulated ARM64 board on this host (qemu user-mode)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from edgec import console


@click.group("device", epilog="""\b
Examples:
  edgec device emulate arm64                      # RPC server on 127.0.0.1:9090 (Cortex-A72)
  edgec compile model.onnx --target cortex-a72 -o build/
  edgec bench build/ --rpc 127.0.0.1:9090
  edgec device status
  edgec device stop
\b
The board needs root and Debian packages; `sudo bash scripts/arm_board.sh` installs them and
builds the arm64 userland once (cached in ~/.cache/edgec/arm64, or $EDGEC_CACHE/arm64).
""")
def command() -> None:
    """Emulated devices: an arm64 Debian userland running TVM's RPC server under qemu.

    Latency measured on an emulated board is qemu's time on this host, not a real board's:
    compare builds on the same emulated board only.
    """


@command.command("emulate", epilog="""\b
Examples:
  edgec device emulate arm64
  edgec device emulate arm64 --cpu cortex-a76 --port 9091
  python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190 &
  edgec device emulate arm64 --tracker 127.0.0.1:9190 --key rpi4-emulated
  edgec device emulate arm64 --foreground        # stops on Ctrl-C
""")
@click.argument("arch", type=click.Choice(["arm64"]), default="arm64")
@click.option("--cpu", default="cortex-a72", show_default=True, help="Emulated core (QEMU_CPU): cortex-a53, cortex-a72, cortex-a76, max, ...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the RPC server listens on (0.0.0.0: all).")
@click.option("--port", type=int, default=9090, show_default=True, help="RPC server port (0: pick a free one).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="Register with this TVM RPC tracker (it must be running).")
@click.option("--key", default=None, help="Device key to register under at the tracker.")
@click.option("--threads", type=int, default=0, show_default=True, help="TVM runtime threads on the board (0: one per host core).")
@click.option("--timeout", type=float, default=180.0, show_default=True, help="Seconds to wait for the server to come up.")
@click.option("--foreground", is_flag=True, help="Stay attached and stop the board on Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print the board as JSON.")
def emulate(arch: str, cpu: str, host: str, port: int, tracker: str | None, key: str | None, threads: int, timeout: float,
            foreground: bool, as_json: bool) -> None:
    """Start an emulated ARCH board (building its userland once) serving TVM RPC."""
    from edgec import emulate as em

    if port == 0:
        port = em.free_port(host if host not in ("0.0.0.0", "") else "127.0.0.1")
    config = em.BoardConfig(arch=arch, cpu=cpu, host=host, port=port, tracker=tracker, key=key, threads=threads,
                            start_timeout_s=timeout)
    t0 = time.monotonic()
    board = em.start(config, progress=lambda line: console.info(f"[bold]{line}[/bold]"))
    if as_json:
        console.print_json(board.to_json())
    else:
        where = f"registered at tracker {board.tracker} as {board.key!r}" if board.tracker else f"serving on {board.address}"
        console.out.print(f"emulated {board.arch} board ({board.cpu}) {where}, pid {board.pid}, "
                          f"up in {time.monotonic() - t0:.0f} s")
        console.out.print(f"connect:  {board.connect_hint()}")
        console.out.print(f"stop:     edgec device stop --port {board.port}")
        console.out.print(f"log:      {board.log}")
        console.out.print("latency measured on it is emulated (qemu on this host), not a real board's")
    if foreground:
        try:
            while board.alive():
                time.sleep(1.0)
            console.warn(f"the board exited; its log: {board.log}")
        except KeyboardInterrupt:
            pass
        finally:
            em.stop(board)


@command.command("stop", epilog="""\b
Examples:
  edgec device stop              # every emulated board
  edgec device stop --port 9091
""")
@click.option("--port", type=int, default=None, help="Only the board on this port.")
def stop(port: int | None) -> None:
    """Stop emulated boards started by `edgec device emulate` (from any shell)."""
    from edgec import emulate as em

    recorded = [b for b in em.list_boards() if port is None or b.port == port]
    stopped = em.stop_boards(port)
    for b in stopped:
        console.out.print(f"stopped the emulated {b.arch} board on {b.address} (pid {b.pid})")
    if not stopped:
        stale = len(recorded)
        console.out.print("no emulated board running" + (f" on port {port}" if port is not None else "")
                          + (f" ({stale} stale record(s) removed)" if stale else ""))


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """List the emulated boards and whether they still run."""
    from edgec import emulate as em

    boards = em.list_boards()
    paths = em.BoardPaths.for_arch()
    if as_json:
        console.print_json({"rootfs": str(paths.tarball), "rootfs_built": paths.tarball.is_file(),
                            "missing": em.missing_tools(), "boards": [b.to_json() for b in boards]})
        return
    console.out.print(f"rootfs: {paths.tarball} ({'built' if paths.tarball.is_file() else 'not built yet'})")
    missing = em.missing_tools()
    if missing:
        console.out.print("host lacks: " + ", ".join(missing) + " (sudo bash scripts/arm_board.sh)")
    if not boards:
        console.out.print("no emulated board running")
        return
    rows = [(b.arch, b.cpu, b.address, b.tracker or "-", b.key or "-", str(b.pid), b.alive(), time.strftime("%H:%M:%S", time.localtime(b.started)))
            for b in boards]
    console.out.print(console.table("Emulated boards", ["board", "cpu", "address", "tracker", "key", "pid", "running", "started"],
                                    rows, numeric_from=99))


@command.command("ort", epilog="""\b
Examples:
  edgec device ort model.onnx
  edgec device ort model.onnx --cpu cortex-a76 --repeat 10 --json
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--cpu", default="cortex-a72", show_default=True, help="Emulated core (QEMU_CPU).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--number", type=int, default=1, show_default=True, help="Runs per sample.")
@click.option("--repeat", type=int, default=5, show_default=True, help="Samples.")
@click.option("--threads", type=int, default=0, show_default=True, help="onnxruntime intra-op threads (0: its default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ort(model: Path, cpu: str, warmup: int, number: int, repeat: int, threads: int, as_json: bool) -> None:
    """Time MODEL with onnxruntime's aarch64 build inside the emulated arm64 userland."""
    from edgec import emulate as em
    from edgec.bench import STAT_COLUMNS

    cfg = em.OrtRunConfig(cpu=cpu, warmup=warmup, number=number, repeat=repeat, threads=threads)
    res = em.ort_latency(model, cfg, progress=lambda line: console.info(line))
    if as_json:
        console.print_json(res.to_json())
        return
    console.out.print(console.table(f"onnxruntime {res.ort_version} aarch64, {res.label}", ["model", "cpu", *STAT_COLUMNS],
                                    [(str(model), cpu, *res.stats.row())], numeric_from=2))
