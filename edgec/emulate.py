"""An emulated ARM64 board: an arm64 Debian userland run by qemu user-mode, serving TVM RPC.

What a board is
---------------
- **rootfs**: Debian bookworm arm64 (``debootstrap --variant=minbase --include=python3``, so
  Python 3.11) with the aarch64 wheels of ``apache-tvm[rpc]``, ``onnxruntime`` and ``numpy`` in
  ``/opt/tvmpy``.  ``scripts/arm_board.sh`` builds it once (it needs root) and caches it as
  ``<cache>/arm64/rootfs.tar.zst``; it is unpacked to ``<cache>/arm64/root`` (a few seconds) when
  that is missing or older than the tarball.  ``<cache>`` is ``$EDGEC_CACHE`` or ``~/.cache/edgec``.
- **server**: ``chroot <root> python3 -m tvm.exec.rpc_server --host H --port P`` (with
  ``--tracker HOST:PORT --key K`` it registers with a tracker instead of waiting for direct
  clients).  The kernel runs every arm64 binary through ``qemu-aarch64`` (binfmt_misc), and
  ``QEMU_CPU`` selects the emulated core (``cortex-a72`` for a Raspberry Pi 4), so code built with
  features the core lacks (``+sve`` for a Cortex-A72) dies with SIGILL, as on the real board.
  When ``unshare`` works, the server runs in a private mount namespace with ``/proc`` mounted
  inside the root; the mount vanishes with it.  ``/sys`` is deliberately not mounted: qemu 7.2
  does not emulate ``/proc/cpuinfo`` for arm64, and onnxruntime's cpuinfo, given the host's CPU
  list in ``/sys`` plus the host's x86 ``/proc/cpuinfo``, crashes (SIGSEGV); without ``/sys`` it
  warns and falls back to the baseline arm64 (NEON) kernels.
- **lifetime**: :func:`start` waits until the server accepts connections (or is listed by the
  tracker), with a bounded wait, and writes ``<cache>/arm64/boards/<port>.json`` (pid, address,
  cpu, log file) so that :func:`stop` works from another process.  A board started with
  ``die_with_parent=True`` (the tests) gets ``SIGTERM`` when its parent dies, so it never
  outlives the process that started it.

Timing is emulation
-------------------
Latency measured on this board is the time qemu takes to translate and run arm64 code on this
host's CPU, not the time of a real Cortex-A72 (it was ~75x the host's native time here).  It is
good for comparing two builds of the same model *on the same emulated board*:
:func:`ort_latency` times onnxruntime's own aarch64 build inside the same userland, so
``edgec bench --rpc`` on the board vs :func:`ort_latency` is an emulated-vs-emulated comparison.
Results from here must be labelled "emulated" (:data:`EMULATED_LABEL`).

``ort_latency`` statistics: ``warmup`` untimed runs, then ``repeat`` samples, each the mean of
``number`` back-to-back ``InferenceSession.run`` calls timed with ``time.perf_counter`` inside the
emulated process, on fresh random inputs (normal(0, 1) for floats, zeros for integers); the
statistics are :class:`edgec.bench.LatencyStats` (mean, median, p90, p99, std, min, max).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgec.errors import EdgecError, InputError, ToolMissingError

#: Label for every latency measured on an emulated board.
EMULATED_LABEL = "emulated (qemu user-mode on this host)"
#: Debian packages the board needs on the host; ``scripts/arm_board.sh`` installs them.
DEBIAN_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap", "gcc-aarch64-linux-gnu",
                   "libc6-dev-arm64-cross", "debian-archive-keyring", "zstd")
#: Board kinds :func:`start` knows (only arm64 for now).
ARCHES = ("arm64",)
#: ``QEMU_CPU`` values accepted for ``--cpu`` (qemu 7.2's aarch64 cores).
CPUS = ("cortex-a35", "cortex-a53", "cortex-a55", "cortex-a57", "cortex-a72", "cortex-a76",
        "neoverse-n1", "a64fx", "max")
#: Where the TVM runtime, onnxruntime and numpy live inside the rootfs.
PYTHONPATH_IN_ROOT = "/opt/tvmpy"
PYTHON_IN_ROOT = "/usr/bin/python3"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "arm_board.sh"


class BoardError(EdgecError):
    """The emulated board could not be prepared, started or reached."""

    exit_code = 4


def cache_dir() -> Path:
    """``$EDGEC_CACHE`` or ``~/.cache/edgec`` (shared with ``scripts/arm_board.sh``)."""
    env = os.environ.get("EDGEC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgec"


@dataclasses.dataclass(frozen=True)
class BoardPaths:
    """The files of one board kind under the cache directory."""

    base: Path

    @classmethod
    def for_arch(cls, arch: str = "arm64", cache: Path | None = None) -> BoardPaths:
        return cls((cache or cache_dir()) / arch)

    @property
    def tarball(self) -> Path:
        return self.base / "rootfs.tar.zst"

    @property
    def stamp(self) -> Path:
        return self.base / "rootfs.stamp"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def boards(self) -> Path:
        return self.base / "boards"

    @property
    def lock(self) -> Path:
        return self.base / ".lock"


@dataclasses.dataclass(frozen=True)
class BoardConfig:
    """How to start a board.

    ``host``/``port``: where the RPC server listens (the chroot shares this host's network);
    ``tracker`` (``HOST:PORT``) and ``key``: register with that tracker instead;
    ``start_timeout_s``: longest wait for the server to come up; ``die_with_parent``: the board
    gets SIGTERM when the process that started it dies; ``threads``: TVM runtime threads on the
    board (``TVM_NUM_THREADS``; 0: TVM's default, one per core of this host).
    """

    arch: str = "arm64"
    cpu: str = "cortex-a72"
    host: str = "127.0.0.1"
    port: int = 9090
    tracker: str | None = None
    key: str | None = None
    start_timeout_s: float = 120.0
    die_with_parent: bool = False
    threads: int = 0
    cache: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise InputError(f"unknown board {self.arch!r}", f"emulated boards: {', '.join(ARCHES)}")
        if self.cpu not in CPUS:
            import difflib

            close = difflib.get_close_matches(self.cpu, CPUS, n=1)
            raise InputError(f"unknown emulated CPU {self.cpu!r}",
                             (f"did you mean {close[0]!r}? " if close else "") + f"choose one of {', '.join(CPUS)}")
        if not 0 < self.port < 65535:
            raise InputError(f"--port {self.port} is not a TCP port")
        if self.tracker is not None:
            from edgec.rpc import parse_address

            parse_address(self.tracker, "--tracker")
            if not self.key:
                raise InputError("--tracker needs --key, the device key the board registers under", "e.g. --key rpi4-emulated")
        elif self.key:
            raise InputError("--key only makes sense with --tracker HOST:PORT")
        if self.start_timeout_s <= 0:
            raise InputError("--timeout must be positive")
        if self.threads < 0:
            raise InputError("--threads must be >= 0")

    @property
    def paths(self) -> BoardPaths:
        return BoardPaths.for_arch(self.arch, self.cache)


@dataclasses.dataclass(frozen=True)
class Board:
    """A running (or recorded) emulated board; what the pid file holds."""

    arch: str
    cpu: str
    host: str
    port: int
    tracker: str | None
    key: str | None
    pid: int
    create_time: float
    root: str
    log: str
    started: float
    threads: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connect_host(self) -> str:
        """The address a client on this host uses (``0.0.0.0`` listens on all of them)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"alive": self.alive(), "emulated": True, "label": EMULATED_LABEL}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Board:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def alive(self) -> bool:
        """The recorded process still runs (same pid and start time, so not a reused pid)."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def connect_hint(self) -> str:
        if self.tracker:
            return f"edgec bench build/ --tracker {self.tracker} --key {self.key}"
        return f"edgec bench build/ --rpc {self.connect_host}:{self.port}"


#: Called with one line of progress ("building rootfs", "starting server", ...).
Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


# --- preparing the rootfs ------------------------------------------------------------------


def _binfmt_ready() -> bool:
    try:
        return "enabled" in Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").read_text()
    except OSError:
        return False


def _is_root() -> bool:
    return os.geteuid() == 0


def missing_tools() -> list[str]:
    """What the host lacks to run a board (empty when ready)."""
    missing = []
    for tool, pkg in (("qemu-aarch64-static", "qemu-user-static"), ("chroot", "coreutils"), ("zstd", "zstd")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} ({pkg})")
    if not _binfmt_ready():
        missing.append("qemu-aarch64 registered with binfmt_misc (binfmt-support)")
    return missing


def _install_hint() -> str:
    return f"run `sudo bash {SCRIPT}` (installs {' '.join(DEBIAN_PACKAGES)} and builds the arm64 userland once)"


def _tarball_fresh(paths: BoardPaths) -> bool:
    return paths.tarball.is_file() and paths.stamp.is_file()


def _root_fresh(paths: BoardPaths) -> bool:
    mark = paths.root / ".edgec-stamp"
    try:
        return mark.read_text() == paths.stamp.read_text() and (paths.root / PYTHON_IN_ROOT.lstrip("/")).exists()
    except OSError:
        return False


@contextlib.contextmanager
def _locked(paths: BoardPaths) -> Iterator[None]:
    paths.base.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_script(paths: BoardPaths, progress: Progress) -> None:
    if not SCRIPT.is_file():
        raise ToolMissingError(f"{SCRIPT} is missing (edgec installed without its scripts)",
                               f"install the Debian packages {' '.join(DEBIAN_PACKAGES)} and build the rootfs from an edgec checkout")
    env = dict(os.environ, EDGEC_CACHE=str(paths.base.parent), PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-15:]
        if line.startswith("arm_board: ") and not line.startswith("arm_board: rootfs cached"):
            progress(line.removeprefix("arm_board: "))
    if proc.wait() != 0:
        raise BoardError(f"{SCRIPT.name} failed: " + (tail[-1] if tail else f"exit {proc.returncode}"),
                         "its output: " + " | ".join(tail[-6:]))


def prepare(arch: str = "arm64", progress: Progress = _noop, cache: Path | None = None) -> Path:
    """Make sure the rootfs is built and unpacked and the host can run it; return the root.

    As root, runs ``scripts/arm_board.sh`` (quick when everything is in place: it installs what
    is missing, builds the tarball once); otherwise raises :class:`~edgec.errors.ToolMissingError`
    naming the packages and the script when something is missing.
    """
    paths = BoardPaths.for_arch(arch, cache)
    with _locked(paths):
        ready = _tarball_fresh(paths) and not missing_tools()
        if _is_root() and (SCRIPT.is_file() or not ready):
            # Idempotent and quick when all is in place; it also rebuilds an outdated tarball
            # and re-enables binfmt after a reboot.
            if not _tarball_fresh(paths):
                progress("building rootfs and installing the aarch64 runtime (once, a few minutes)")
            _run_script(paths, progress)
        if not _tarball_fresh(paths) or missing_tools():
            what = missing_tools() or [f"the arm64 userland {paths.tarball}"]
            raise ToolMissingError("the emulated board needs " + ", ".join(what), _install_hint())
        if not _root_fresh(paths):
            progress(f"unpacking rootfs into {paths.root}")
            _unpack(paths)
    return paths.root


def _unpack(paths: BoardPaths) -> None:
    new = Path(tempfile.mkdtemp(prefix="root.", dir=paths.base))
    try:
        r = subprocess.run(["tar", "-C", str(new), "--numeric-owner", "-I", "zstd -q -T0", "-xf", str(paths.tarball)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BoardError(f"cannot unpack {paths.tarball}: {r.stderr.strip()[-300:]}",
                             f"delete it and run `sudo bash {SCRIPT}` again")
        (new / ".edgec-stamp").write_text(paths.stamp.read_text())
        new.chmod(0o755)
        if paths.root.exists():
            if any(b.alive() for b in list_boards(paths)):
                raise BoardError(f"{paths.root} is outdated but a board still runs from it", "stop it first: edgec device stop --all")
            old = paths.base / f"root.old.{uuid.uuid4().hex[:8]}"
            paths.root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        new.rename(paths.root)
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)


# --- running things inside the rootfs --------------------------------------------------------

_MOUNT_AND_CHROOT = (
    'r="$1"; shift; '
    'mount -t proc proc "$r/proc" 2>/dev/null; '
    'exec chroot "$r" "$@"'
)
_unshare_ok: bool | None = None


def _can_unshare() -> bool:
    global _unshare_ok
    if _unshare_ok is None:
        try:
            _unshare_ok = shutil.which("unshare") is not None and subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _unshare_ok = False
    return _unshare_ok


# The board's leader: a host shell that runs the server and, on SIGTERM/SIGINT/SIGHUP (from
# stop() or, with die_with_parent, from the kernel), signals its whole process group.  TVM's
# rpc_server runs its server loop in a child (tvm.exec.popen_worker) that would otherwise outlive a
# killed parent.
_SUPERVISE = 'trap "trap - TERM INT HUP; kill -TERM 0 2>/dev/null; exit 143" TERM INT HUP; "$@" & wait $!'


def supervised_command(argv: Sequence[str]) -> list[str]:
    """``argv`` run under a host shell that ends its whole process group when it gets SIGTERM,
    SIGINT or SIGHUP (start it with ``start_new_session=True``).  For TVM's rpc_server and
    rpc_tracker, whose work happens in a ``popen_worker`` child that survives its parent."""
    return ["/bin/sh", "-c", _SUPERVISE, "sh", *argv]


def chroot_command(root: Path, argv: Sequence[str]) -> list[str]:
    """The host command that runs ``argv`` (a path inside the root) in the emulated userland."""
    inner = ["/usr/bin/env", f"PYTHONPATH={PYTHONPATH_IN_ROOT}", "HOME=/root", "LC_ALL=C.UTF-8", *argv]
    if _can_unshare():
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _MOUNT_AND_CHROOT, "sh", str(root), *inner]
    return ["chroot", str(root), *inner]


def _env(cpu: str, threads: int = 0) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": cpu, "LC_ALL": "C.UTF-8"}
    if threads:
        env["TVM_NUM_THREADS"] = str(threads)
    return env


def _check_can_run() -> None:
    if not _is_root():
        raise ToolMissingError("running the emulated board needs root (it chroots into the arm64 userland)",
                               "run edgec as root (e.g. sudo -E edgec device emulate arm64), or in a container as root")
    missing = missing_tools()
    if missing:
        raise ToolMissingError("the emulated board needs " + ", ".join(missing), _install_hint())


# --- board lifecycle --------------------------------------------------------------------------


def _pid_file(paths: BoardPaths, port: int) -> Path:
    return paths.boards / f"{port}.json"


def list_boards(paths: BoardPaths | None = None) -> list[Board]:
    """Boards recorded in the pid files (alive or not; see :meth:`Board.alive`)."""
    paths = paths or BoardPaths.for_arch()
    boards = []
    for f in sorted(paths.boards.glob("*.json")) if paths.boards.is_dir() else []:
        try:
            boards.append(Board.from_json(json.loads(f.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return boards


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and ``--port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _log_tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def start(config: BoardConfig = BoardConfig(), progress: Progress = _noop) -> Board:
    """Prepare the rootfs if needed, start the board's RPC server, wait until it serves.

    Raises :class:`BoardError` when the server does not come up within ``start_timeout_s`` (the
    process is killed, nothing is left running) and :class:`~edgec.errors.ToolMissingError`
    when the host lacks what it needs.
    """
    return start_boards([config], progress)[0]


def start_boards(configs: Sequence[BoardConfig], progress: Progress = _noop) -> list[Board]:
    """Start several boards at once (they boot concurrently), wait until all serve.

    The processes are started from the calling thread: with ``die_with_parent`` the kernel
    signals a board when the *thread* that started it exits, so call this from a long-lived one.
    On any failure every board started here is stopped.
    """
    started: list[tuple[Board, subprocess.Popen[bytes], BoardConfig, tuple[str, int] | None]] = []
    try:
        for config in configs:
            started.append(_spawn(config, progress))
        if started:
            progress("waiting for the server (importing TVM under emulation takes ~10-40 s)")
        for board, proc, config, tracker in started:
            _wait_ready(board, proc, config, tracker)
    except BaseException:
        for board, *_ in started:
            stop(board)
        raise
    return [b for b, *_ in started]


def _spawn(config: BoardConfig, progress: Progress) -> tuple[Board, subprocess.Popen[bytes], BoardConfig, tuple[str, int] | None]:
    import psutil

    port = config.port
    paths = config.paths
    # Cheap checks first: a busy port or a tracker that is down fail before any rootfs work.
    old = _pid_file(paths, port)
    if old.exists():
        prev = next((b for b in list_boards(paths) if b.port == port), None)
        if prev is not None and prev.alive():
            raise BoardError(f"an emulated board already runs on port {port} (pid {prev.pid})",
                             "use it, stop it with `edgec device stop --port %d`, or pick another --port" % port)
        old.unlink(missing_ok=True)
    if not _port_free(config.host, port):
        raise BoardError(f"port {port} on {config.host} is in use", "pick another with --port")
    tracker_addr = None
    if config.tracker:
        from edgec.rpc import parse_address, tracker_summary

        tracker_addr = parse_address(config.tracker, "--tracker")
        progress(f"checking the tracker at {config.tracker}")
        tracker_summary(*tracker_addr, timeout=10.0)  # raises RemoteError when it is not up
    root = prepare(config.arch, progress, config.cache)
    _check_can_run()

    argv = [PYTHON_IN_ROOT, "-m", "tvm.exec.rpc_server", "--host", config.host, "--port", str(port), "--port-end", str(port + 1)]
    if config.tracker:
        argv += ["--tracker", config.tracker, "--key", str(config.key)]
    paths.boards.mkdir(parents=True, exist_ok=True)
    log = paths.boards / f"{port}.log"
    progress(f"starting the TVM RPC server on an emulated {config.cpu} ({config.arch}), port {port}")
    with open(log, "w") as fh:
        proc = subprocess.Popen(supervised_command(chroot_command(root, argv)), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=_env(config.cpu, config.threads), start_new_session=True,
                                preexec_fn=_pdeathsig if config.die_with_parent else None)
    board = Board(config.arch, config.cpu, config.host, port, config.tracker, config.key, proc.pid,
                  psutil.Process(proc.pid).create_time(), str(root), str(log), time.time(), config.threads)
    tmp = _pid_file(paths, port).with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(board), indent=2))
    tmp.replace(_pid_file(paths, port))
    return board, proc, config, tracker_addr


def _wait_ready(board: Board, proc: subprocess.Popen[bytes], config: BoardConfig, tracker: tuple[str, int] | None) -> None:
    deadline = board.started + config.start_timeout_s
    while True:
        if proc.poll() is not None:
            raise BoardError(f"the emulated board's RPC server exited (code {proc.returncode}) before serving",
                             f"its log {board.log}: {_log_tail(Path(board.log))}")
        if tracker is None:
            try:
                with socket.create_connection((board.connect_host, board.port), timeout=2.0):
                    return
            except OSError:
                pass
        else:
            from edgec.rpc import tracker_summary

            # Registered servers are listed by key; a bare TCP connect to a registered server
            # would make it re-register, so only the tracker is asked.
            try:
                summary = tracker_summary(*tracker, timeout=5.0)
                if any(k == board.key and a.rpartition(":")[2] == str(board.port) for a, k in summary.servers):
                    return
            except EdgecError:
                pass
        if time.time() > deadline:
            raise BoardError(f"the emulated board did not {'register with the tracker' if tracker else 'accept connections'} "
                             f"within {config.start_timeout_s:g} s",
                             f"its log {board.log}: {_log_tail(Path(board.log))}; a slow host may need a longer --timeout")
        time.sleep(0.5)


def _local_addresses() -> set[str]:
    addrs = {"127.0.0.1", "localhost", "0.0.0.0", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        addrs.add(socket.gethostbyname(socket.gethostname()))
    return addrs


def find_board(host: str, port: int, key: str | None = None, tracker: bool = False, cache: Path | None = None) -> Board | None:
    """The running emulated board behind an RPC address, if it is one of this host's.

    Direct (``tracker=False``): a board listening on ``host:port``; through a tracker: a board
    registered at the tracker ``host:port`` under ``key``.  Never raises.
    """
    try:
        local = _local_addresses()
        for b in list_boards(BoardPaths.for_arch("arm64", cache)):
            if tracker:
                if b.tracker and b.key == key:
                    th, _, tp = b.tracker.rpartition(":")
                    if tp == str(port) and (th == host or {th, host} <= local) and b.alive():
                        return b
            elif b.port == port and not b.tracker and (b.host == host or (host in local and b.host in local)) and b.alive():
                return b
    except Exception:  # a label must never break a measurement
        return None
    return None


def emulated_label(remote: Any) -> str | None:
    """``"emulated arm64 cortex-a72"`` when ``remote`` (an :class:`edgec.rpc.Remote`) is a
    board emulated on this host, else None: latency measured there must say so."""
    b = find_board(remote.host, remote.port, getattr(remote, "key", None), bool(getattr(remote, "via_tracker", False)))
    return None if b is None else f"emulated {b.arch} {b.cpu}"


def _kill_orphans(pgid: int) -> None:
    """Kill what is left of a board whose leader died: its process group's TVM/qemu processes."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid and any("tvm.exec" in a for a in (p.info["cmdline"] or [])):
                p.kill()
        except (OSError, psutil.Error):
            continue


def stop(board: Board, timeout_s: float = 10.0) -> bool:
    """Stop a board (its whole process group) and remove its pid file; True if it was running."""
    import psutil

    was_alive = board.alive()
    if not was_alive:
        _kill_orphans(board.pid)
    if was_alive:
        procs = [psutil.Process(board.pid)]
        try:
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            pass
        with contextlib.suppress(OSError):
            os.killpg(board.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(OSError):
            os.killpg(board.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5.0)
    paths = BoardPaths(Path(board.root).parent)
    pid_file = _pid_file(paths, board.port)
    try:
        if Board.from_json(json.loads(pid_file.read_text())).pid == board.pid:
            pid_file.unlink()
    except (OSError, ValueError, TypeError):
        pass
    return was_alive


def stop_boards(port: int | None = None, arch: str = "arm64", cache: Path | None = None) -> list[Board]:
    """Stop the recorded boards (all, or the one on ``port``); returns those that were running."""
    stopped = []
    for b in list_boards(BoardPaths.for_arch(arch, cache)):
        if port is None or b.port == port:
            if stop(b):
                stopped.append(b)
    return stopped


@contextlib.contextmanager
def emulated_board(config: BoardConfig = BoardConfig(), progress: Progress = _noop) -> Iterator[Board]:
    """``with emulated_board(BoardConfig(port=free_port())) as board: ...`` starts and always stops it."""
    board = start(config, progress)
    try:
        yield board
    finally:
        stop(board)


# --- onnxruntime inside the emulated userland --------------------------------------------------

_ORT_SCRIPT = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

args = json.loads(sys.argv[1])
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
if args["threads"]:
    so.intra_op_num_threads = args["threads"]
so.log_severity_level = 3
sess = ort.InferenceSession(args["model"], so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(args["seed"])
types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
         "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
         "tensor(bool)": np.bool_}
feeds = {}
for i in sess.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
    dt = types[i.type]
    feeds[i.name] = (rng.standard_normal(shape).astype(dt) if np.issubdtype(dt, np.floating) else np.zeros(shape, dt))
for _ in range(args["warmup"]):
    sess.run(None, feeds)
samples = []
for _ in range(args["repeat"]):
    t0 = time.perf_counter()
    for _ in range(args["number"]):
        outs = sess.run(None, feeds)
    samples.append((time.perf_counter() - t0) / args["number"] * 1e3)
np.savez(args["out"], **{"in:" + k: v for k, v in feeds.items()}, **{"out:%d" % n: o for n, o in enumerate(outs)})
print("EDGEC-ORT " + json.dumps({"samples_ms": samples, "version": ort.__version__}))
"""


@dataclasses.dataclass(frozen=True)
class OrtRunConfig:
    """How :func:`ort_latency` measures (see the module docstring); ``threads`` 0: ORT's default."""

    cpu: str = "cortex-a72"
    warmup: int = 1
    number: int = 1
    repeat: int = 5
    threads: int = 0
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.cpu not in CPUS:
            raise InputError(f"unknown emulated CPU {self.cpu!r}", f"choose one of {', '.join(CPUS)}")
        if self.warmup < 0 or self.number < 1 or self.repeat < 1 or self.threads < 0:
            raise InputError("warmup must be >= 0, number and repeat >= 1, threads >= 0")


@dataclasses.dataclass(frozen=True)
class OrtEmulatedResult:
    """onnxruntime's aarch64 build timed inside the emulated userland (an emulated latency).

    ``inputs``/``outputs``: the random inputs used and the outputs the emulated onnxruntime
    computed for them (so a caller can compare them with this host's onnxruntime).
    """

    model: str
    cpu: str
    ort_version: str
    config: OrtRunConfig
    stats: Any  # edgec.bench.LatencyStats
    inputs: dict[str, Any]
    outputs: tuple[Any, ...]
    label: str = EMULATED_LABEL

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "cpu": self.cpu, "onnxruntime": self.ort_version, "label": self.label,
                "config": dataclasses.asdict(self.config), "stats": self.stats.to_json()}


def ort_latency(model_path: str | os.PathLike[str], config: OrtRunConfig = OrtRunConfig(), progress: Progress = _noop,
                cache: Path | None = None) -> OrtEmulatedResult:
    """Time ``model_path`` with onnxruntime's aarch64 build inside the emulated arm64 userland."""
    import numpy as np

    from edgec.bench import LatencyStats

    src = Path(model_path)
    if not src.is_file():
        raise InputError(f"{src} does not exist", "give the path of an ONNX model")
    root = prepare("arm64", progress, cache)
    _check_can_run()
    work_in_root = Path("/tmp") / f"edgec-ort-{uuid.uuid4().hex[:12]}"
    work = root / work_in_root.relative_to("/")
    work.mkdir(parents=True)
    try:
        shutil.copy2(src, work / "model.onnx")
        data = src.with_name(src.name + ".data")
        if data.exists():  # external weights saved next to the model
            shutil.copy2(data, work / data.name)
        args = {"model": str(work_in_root / "model.onnx"), "out": str(work_in_root / "io.npz"), "warmup": config.warmup,
                "number": config.number, "repeat": config.repeat, "threads": config.threads, "seed": config.seed}
        (work / "run.py").write_text(_ORT_SCRIPT)
        progress(f"timing onnxruntime (aarch64) on an emulated {config.cpu}")
        try:
            r = subprocess.run(chroot_command(root, [PYTHON_IN_ROOT, str(work_in_root / "run.py"), json.dumps(args)]),
                               capture_output=True, text=True, env=_env(config.cpu), timeout=config.timeout_s,
                               start_new_session=True)
        except subprocess.TimeoutExpired:
            raise BoardError(f"onnxruntime on the emulated board took longer than {config.timeout_s:g} s",
                             "use fewer --repeat/--number or a smaller model") from None
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("EDGEC-ORT ")), None)
        if r.returncode != 0 or line is None:
            err = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
            raise BoardError(f"onnxruntime failed on the emulated board (exit {r.returncode}): {err[-1] if err else ''}",
                             "check that the model runs with onnxruntime on this host first")
        res = json.loads(line.removeprefix("EDGEC-ORT "))
        with np.load(work / "io.npz") as z:
            inputs = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
            outputs = tuple(z[f"out:{i}"] for i in range(sum(1 for k in z.files if k.startswith("out:"))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return OrtEmulatedResult(str(src), config.cpu, str(res["version"]), config,
                             LatencyStats.from_samples(res["samples_ms"]), inputs, outputs)
