"""Reaching devices over TVM's RPC protocol, with bounded waits everywhere.

Two ways to reach a board, both the standard TVM protocol (a Raspberry Pi or Jetson running
``python -m tvm.exec.rpc_server`` works unchanged):

- **direct**: ``Remote.direct("10.0.0.7:9090")``: connect to one RPC server;
- **tracker**: ``Remote.tracker("10.0.0.2:9190", key="rpi4")``: ask a ``tvm.exec.rpc_tracker``
  for a free board registered under ``key``; the tracker queues the request until one is free.

TVM's own client waits without limit in several places (a tracker with no free device answers
only when one frees up; a TCP connect to an unreachable host takes the OS's timeout).  This
module speaks the tracker's JSON protocol itself with socket timeouts, probes servers with a
bounded TCP connect before handing over to TVM, and turns every failure into an
:class:`~edgec.errors.EdgecError` that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from typing import Any

from edgec.errors import EdgecError, InputError

# The TVM RPC tracker protocol (tvm/rpc/base.py): magic handshake, then length-prefixed JSON.
RPC_TRACKER_MAGIC = 0x2F271
CODE_SUCCESS = 0
CODE_REQUEST = 4
CODE_SUMMARY = 6


class RemoteError(EdgecError):
    """A device or tracker could not be reached or did not answer in time."""

    exit_code = 4


def parse_address(text: str, what: str = "--rpc") -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{what} {text!r} is not HOST:PORT", f"e.g. {what} 192.168.1.20:9090")
    return host.strip("[]"), int(port)


@dataclasses.dataclass(frozen=True)
class Remote:
    """Where a device is and how long to wait for it.

    ``connect_timeout_s`` bounds each TCP connect and tracker answer, ``wait_s`` how long a
    tracker request may stay queued waiting for a free device, ``session_timeout_s`` (0: none)
    is passed to the server, which ends the session after that long.
    """

    host: str
    port: int
    key: str | None = None
    via_tracker: bool = False
    connect_timeout_s: float = 10.0
    wait_s: float = 30.0
    session_timeout_s: float = 0.0

    @classmethod
    def direct(cls, address: str, **kw: Any) -> Remote:
        host, port = parse_address(address, "--rpc")
        return cls(host, port, **kw)

    @classmethod
    def tracker(cls, address: str, key: str, **kw: Any) -> Remote:
        host, port = parse_address(address, "--tracker")
        if not key:
            raise InputError("--tracker needs --key, the device key the boards registered with", "see `edgec devices --tracker ...`")
        return cls(host, port, key=key, via_tracker=True, **kw)

    def describe(self) -> str:
        if self.via_tracker:
            return f"tracker {self.host}:{self.port} key {self.key!r}"
        return f"RPC server {self.host}:{self.port}"


def probe(host: str, port: int, timeout: float, what: str) -> None:
    """A bounded TCP connect: raise :class:`RemoteError` if nothing listens at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise RemoteError(
            f"cannot reach {what} at {host}:{port}: {reason}",
            "check that it runs (python -m tvm.exec.rpc_server / rpc_tracker) and the address",
        ) from None


class _TrackerConnection:
    """A connection to a TVM RPC tracker with a timeout on every exchange."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.addr = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise RemoteError(
                f"cannot reach the RPC tracker at {self.addr}: {reason}",
                "start it with `python -m tvm.exec.rpc_tracker --port PORT` or check the address",
            ) from None
        try:
            self.sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", self._recv(4))[0]
        except (OSError, EdgecError):
            self.close()
            raise RemoteError(f"{self.addr} did not answer as a TVM RPC tracker", "is it an RPC server? use --rpc for those") from None
        if magic != RPC_TRACKER_MAGIC:
            self.close()
            raise RemoteError(f"{self.addr} is not a TVM RPC tracker", "is it an RPC server? use --rpc for those")

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RemoteError(f"the tracker at {self.addr} closed the connection")
            buf += chunk
        return buf

    def exchange(self, message: list[Any], timeout: float) -> Any:
        data = json.dumps(message).encode()
        self.sock.settimeout(timeout)
        self.sock.sendall(struct.pack("<i", len(data)) + data)
        size = struct.unpack("<i", self._recv(4))[0]
        return json.loads(self._recv(size).decode())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclasses.dataclass(frozen=True)
class DeviceQueue:
    """Boards registered under one key, and requests waiting for them."""

    key: str
    total: int
    free: int
    pending: int


@dataclasses.dataclass(frozen=True)
class TrackerSummary:
    servers: tuple[tuple[str, str], ...]  # (address, key) per registered server
    queues: tuple[DeviceQueue, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "servers": [{"address": a, "key": k} for a, k in self.servers],
            "queues": [dataclasses.asdict(q) for q in self.queues],
        }


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> TrackerSummary:
    """What a tracker knows: registered servers and per-key free/pending counts."""
    conn = _TrackerConnection(host, port, timeout)
    try:
        value = conn.exchange([CODE_SUMMARY], timeout)
    except (OSError, TimeoutError):
        raise RemoteError(f"the tracker at {host}:{port} did not answer within {timeout:g} s") from None
    finally:
        conn.close()
    if not isinstance(value, list) or value[0] != CODE_SUCCESS:
        raise RemoteError(f"the tracker at {host}:{port} answered {value!r}")
    data = value[1]
    servers = []
    counts: dict[str, int] = {}
    for item in data.get("server_info", []):
        addr = ":".join(map(str, item.get("addr", [])))
        key = str(item.get("key", ""))
        key = key.split(":", 1)[1] if key.startswith("server:") else key
        servers.append((addr, key))
        counts[key] = counts.get(key, 0) + 1
    queues = []
    for key, q in sorted(data.get("queue_info", {}).items()):
        queues.append(DeviceQueue(key, counts.get(key, 0), int(q.get("free", 0)), int(q.get("pending", 0))))
    for key in sorted(set(counts) - {q.key for q in queues}):
        queues.append(DeviceQueue(key, counts[key], 0, 0))
    return TrackerSummary(tuple(sorted(servers, key=lambda s: s[1])), tuple(queues))


def _connect_server(host: str, port: int, key: str, remote: Remote, *, check: bool = True) -> Any:
    from tvm import rpc

    if check:
        # Not for servers handed out by a tracker: a bare TCP connect makes such a server drop
        # its registration and re-register under a new match key.
        probe(host, port, remote.connect_timeout_s, "the RPC server")
    try:
        return rpc.connect(host, port, key=key, session_timeout=remote.session_timeout_s)
    except Exception as exc:
        raise RemoteError.wrapping(
            f"RPC connection to {host}:{port} failed", exc,
            "check that a TVM RPC server runs there (python -m tvm.exec.rpc_server) and the key matches",
        ) from None


@dataclasses.dataclass(frozen=True)
class Connection:
    """An open ``tvm.rpc.RPCSession`` and the server address it talks to."""

    session: Any
    host: str
    port: int

    def abort(self) -> None:
        """Shut down this process's TCP connections to the server, so that a call blocked on a
        server that stopped answering returns with an error instead of waiting forever."""
        import os

        import psutil

        try:
            peers = {socket.gethostbyname(self.host), self.host}
        except OSError:
            peers = {self.host}
        for c in psutil.Process().net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == self.port and c.raddr.ip in peers | {"127.0.0.1", "::1"} and c.fd >= 0:
                try:
                    s = socket.socket(fileno=os.dup(c.fd))
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass


def open_session(remote: Remote) -> Connection:
    """A session to the device described by ``remote``, or :class:`RemoteError`."""
    if not remote.via_tracker:
        return Connection(_connect_server(remote.host, remote.port, "", remote), remote.host, remote.port)
    conn = _TrackerConnection(remote.host, remote.port, remote.connect_timeout_s)
    try:
        try:
            value = conn.exchange([CODE_REQUEST, remote.key, "", 1], remote.wait_s)
        except (TimeoutError, socket.timeout):
            summary = None
            try:
                summary = tracker_summary(remote.host, remote.port, remote.connect_timeout_s)
            except EdgecError:
                pass
            q = next((q for q in summary.queues if q.key == remote.key), None) if summary else None
            state = f" ({q.total} registered, {q.free} free, {q.pending} waiting)" if q else " (none registered)"
            raise RemoteError(
                f"no free device with key {remote.key!r} at the tracker {remote.host}:{remote.port} within {remote.wait_s:g} s{state}",
                "`edgec devices --tracker HOST:PORT` shows what is registered; wait longer with --wait or free a board",
            ) from None
        except OSError as exc:
            raise RemoteError(f"the tracker at {remote.host}:{remote.port} failed: {exc}") from None
    finally:
        conn.close()  # the tracker drops the request if we stopped waiting
    if not isinstance(value, list) or value[0] != CODE_SUCCESS:
        raise RemoteError(f"the tracker refused the request for {remote.key!r}: {value!r}")
    url, port, matchkey = value[1]
    return Connection(_connect_server(str(url), int(port), str(matchkey), remote, check=False), str(url), int(port))


def remote_triple(session: Any) -> str | None:
    """The device's LLVM target triple when its TVM has the compiler library, else None."""
    try:
        f = session.get_function("target.llvm_get_system_triple")
        return str(f())
    except Exception:
        return None
