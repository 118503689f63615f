"""``edgec devices``: what an RPC tracker has registered and queued."""

from __future__ import annotations

import click

from edgec import console


@click.command("devices", epilog="""\b
Examples:
  edgec devices --tracker 192.168.1.2:9190
  edgec devices --tracker 127.0.0.1:9190 --json
\b
Boards register with:  python -m tvm.exec.rpc_server --tracker HOST:9190 --key rpi4
The tracker runs as:   python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
""")
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The TVM RPC tracker.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the tracker.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def command(tracker: str, timeout: float, as_json: bool) -> None:
    """List the devices registered at a TVM RPC tracker and the requests waiting for them."""
    from edgec.rpc import parse_address, tracker_summary

    host, port = parse_address(tracker, "--tracker")
    summary = tracker_summary(host, port, timeout)
    if as_json:
        console.print_json(summary.to_json())
        return
    console.out.print(console.table(f"Devices at {host}:{port}", ["key", "registered", "free", "requests waiting"],
                                    [(q.key, q.total, q.free, q.pending) for q in summary.queues]))
    console.out.print(console.table("Servers", ["address", "key"], list(summary.servers), numeric_from=99))
    if not summary.servers:
        console.out.print("no device registered")
