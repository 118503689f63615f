"""``edgec bench``: latency of a compiled artifact, locally or on a device over TVM RPC."""

from __future__ import annotations

from pathlib import Path

import click

from edgec import console


def print_result(result, as_json: bool) -> None:  # noqa: ANN001 - BenchResult, imported lazily
    from edgec.bench import STAT_COLUMNS

    if as_json:
        console.print_json(result.to_json())
        return
    rows = []
    if result.stats is not None:
        rows.append((f"edgec ({result.target}) on {result.where}", len(result.stats.samples_ms), *result.stats.row()))
    if result.ort is not None:
        rows.append(("onnxruntime on this host", len(result.ort.samples_ms), *result.ort.row()))
    c = result.config
    title = f"{result.artifact}: {c.repeat} samples x {c.number} runs, {c.warmup} warmup" + ("" if result.complete else " (INCOMPLETE)")
    if rows:
        console.out.print(console.table(title, ["what", "samples", *STAT_COLUMNS], rows))
    if result.ratio is not None:
        verdict = "faster" if result.ratio < 1 else "slower"
        console.out.print(f"edgec / onnxruntime mean latency: {result.ratio:.2f}x ({verdict} than onnxruntime)")
    if result.equivalence is not None:
        console.out.print(f"outputs vs onnxruntime: {result.equivalence.summary()}")


@click.command("bench", epilog="""\b
Examples:
  edgec bench build/                                    # on this host
  edgec bench build/ --compare-ort                      # plus onnxruntime, same run, as a ratio
  edgec bench build-rpi4/ --rpc 192.168.1.20:9090       # a board running tvm.exec.rpc_server
  edgec bench build-rpi4/ --tracker 192.168.1.2:9190 --key rpi4   # any free board of that key
  edgec bench build/ --repeat 50 --number 20 --json
""")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--rpc", "rpc_addr", default=None, metavar="HOST:PORT", help="A TVM RPC server (the device).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="A TVM RPC tracker in front of several devices.")
@click.option("--key", default=None, help="Device key at the tracker.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs first.")
@click.option("--number", type=int, default=10, show_default=True, help="Runs averaged into one sample.")
@click.option("--repeat", type=int, default=20, show_default=True, help="Samples.")
@click.option("--compare-ort", is_flag=True, help="Also time onnxruntime on this host, same run, and print the ratio.")
@click.option("--check/--no-check", default=True, show_default=True, help="Compare outputs with onnxruntime first.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Output check: error relative to the output's range.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Output check: absolute error.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Give up after this many seconds without progress.")
@click.option("--wait", type=float, default=60.0, show_default=True, help="Seconds to wait for a free device at the tracker.")
@click.option("--threads", type=int, default=None,
              help="TVM runtime threads (default: the target's thread policy: one per core here, also given to "
                   "onnxruntime; on an ARM board one per big core; other devices keep their runtime's default).")
@click.option("--seed", type=int, default=None, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (raw samples included).")
def command(artifact: Path, rpc_addr: str | None, tracker: str | None, key: str | None, warmup: int, number: int,
            repeat: int, compare_ort: bool, check: bool, rtol: float, atol: float, timeout: float, wait: float,
            threads: int | None, seed: int | None, as_json: bool) -> None:
    """Measure the latency of ARTIFACT (a folder from `edgec compile`).

    Prints mean, median, p90, p99, std, min and max over the samples.  Outputs are first compared
    with onnxruntime on this host.  A device that is down, busy or dies mid-run ends the command
    within --timeout / --wait seconds, with the samples gathered so far.
    """
    from edgec.bench import BenchConfig, BenchError, BenchEvent, run_bench
    from edgec.errors import InputError
    from edgec.rpc import Remote
    from edgec.verify import Tolerance

    if rpc_addr and tracker:
        raise InputError("give --rpc or --tracker, not both")
    if key and not tracker:
        raise InputError("--key goes with --tracker", "e.g. --tracker 192.168.1.2:9190 --key rpi4")
    remote = None
    if rpc_addr:
        remote = Remote.direct(rpc_addr, wait_s=wait, connect_timeout_s=min(timeout, 10.0))
    elif tracker:
        remote = Remote.tracker(tracker, key or "", wait_s=wait, connect_timeout_s=min(timeout, 10.0))
    config = BenchConfig(warmup=warmup, number=number, repeat=repeat, compare_ort=compare_ort, check_outputs=check,
                         tolerance=Tolerance(rtol=rtol, atol=atol), seed=seed, stall_timeout_s=timeout,
                         threads=threads)
    with console.progress() as prog:
        task = prog.add_task("connecting", total=None)

        def on_event(ev: BenchEvent) -> None:
            best = f" (last {ev.last_ms:.3f} ms)" if ev.last_ms is not None else ""
            prog.update(task, description=f"{ev.stage}{best}", completed=ev.done, total=ev.total or None)

        try:
            result = run_bench(artifact, remote, config, on_event)
        except BenchError as exc:
            prog.stop()
            print_result(exc.partial, as_json)
            raise
    print_result(result, as_json)
