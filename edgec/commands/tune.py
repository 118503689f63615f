"""``edgec tune``: MetaSchedule tuning into a database that `edgec compile --db` reuses."""

from __future__ import annotations

from pathlib import Path

import click

from edgec import console


@click.command("tune", epilog="""\b
Examples:
  edgec tune mnv2.onnx --target host --trials 2000 --db tuning/
  edgec compile mnv2.onnx --target host --db tuning/ -o build/      # no re-tuning
  edgec tune mnv2.onnx --target cortex-a72 --trials 1000 --db tuning-rpi4/ \\
      --tracker 192.168.1.2:9190 --key rpi4                         # candidates timed on the Pi
\b
Cost: about 35 s per tuning task on a 2-core host whatever the trials (MobileNetV2 has 32).
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_name", required=True, help="Target name (`edgec targets`) or TVM target JSON.")
@click.option("--arch", default=None, help="CUDA compute capability for CUDA targets.")
@click.option("--trials", type=int, required=True, help="Measured candidates in all (spread over the tasks).")
@click.option("--db", type=click.Path(path_type=Path), required=True, help="Database folder (created; reused if present).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="Time candidates on the device through this RPC tracker.")
@click.option("--key", default=None, help="Device key at the tracker.")
@click.option("--cores", type=int, default=None, help="Cores the schedules plan for (default: this host's, or 4 on a board).")
@click.option("--per-iter", type=int, default=16, show_default=True, help="Candidates measured per batch.")
@click.option("--builder-timeout", type=float, default=600.0, show_default=True, help="Seconds allowed to build one candidate.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,..", help="Static shape of a dynamic input.")
@click.option("--seed", type=int, default=None, help="Search seed.")
@click.option("--seed-rules/--no-seed-rules", default=True, show_default=True,
              help="Time edgec's own schedules first and store them, so the search starts from them and the "
                   "database is never slower than an untuned build (CPU targets).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(model: Path, target_name: str, arch: str | None, trials: int, db: Path, tracker: str | None, key: str | None,
            cores: int | None, per_iter: int, builder_timeout: float, input_shapes: tuple[str, ...], seed: int | None,
            seed_rules: bool, as_json: bool) -> None:
    """Search schedules for MODEL's operators with MetaSchedule and store them in --db.

    edgec's own rule-based schedules are timed first and stored with the search's results, so
    `edgec compile --db` uses whichever is faster for each operator.  A progress bar shows the
    trials done and the best estimated model latency so far.  Operators the database lacks get
    edgec's rules when compiling with --db.
    """
    from edgec import ir as eir
    from edgec.commands.compile import parse_shapes
    from edgec.rpc import Remote
    from edgec.targets import TargetOptions, get_target
    from edgec.tune import TuneConfig, TuneEvent, tune_model

    target = get_target(target_name, TargetOptions(arch=arch))
    remote = Remote.tracker(tracker, key or "") if tracker else None
    config = TuneConfig(target, trials, db, trials_per_iter=per_iter, rpc=remote, builder_timeout_s=builder_timeout,
                        input_shapes=parse_shapes(input_shapes), seed=seed, num_cores=cores, seed_with_rules=seed_rules)
    proto = eir.load_proto(model)
    with console.progress(transient=False) as prog:
        task = prog.add_task("extracting tasks", total=trials)

        def on_event(ev: TuneEvent) -> None:
            best = f"{ev.estimated_model_ms:.3f} ms" if ev.estimated_model_ms is not None else "-"
            prog.update(task, completed=min(ev.trials_done, trials),
                        description=f"tuning {ev.tasks_measured}/{ev.tasks_total} tasks, best model estimate {best}")

        import contextlib
        import sys

        with contextlib.redirect_stdout(sys.stderr):  # MetaSchedule logs to stdout; keep it for tables/JSON
            result = tune_model(proto, config, on_event)
    if as_json:
        console.print_json(result.to_json())
        return
    rows = [(t.name, t.weight, t.trials, t.rules_ms if t.rules_ms is not None else "-", t.best_ms if t.best_ms is not None else "-")
            for t in result.tasks]
    console.out.print(console.table(f"{model}: {result.trials_done} trials in {result.seconds:.0f} s -> {db}",
                                    ["task", "calls", "trials", "edgec rules ms", "best ms"], rows))
    est = result.estimated_model_ms
    missing = sum(1 for t in result.tasks if t.best_ms is None)
    console.out.print(f"estimated model latency from the best schedules: {est:.3f} ms" if est is not None else
                      "no candidate ran successfully")
    seeded = [t for t in result.tasks if t.rules_ms is not None and t.best_ms is not None]
    if seeded:
        rules = sum(t.weight * t.rules_ms for t in seeded)
        tuned = sum(t.weight * t.best_ms for t in seeded)
        better = sum(1 for t in seeded if t.best_ms < t.rules_ms)
        console.out.print(f"search beat edgec's rules on {better}/{len(seeded)} tasks: {rules:.3f} -> {tuned:.3f} ms over them")
    if missing:
        console.out.print(f"{missing} task(s) got no working schedule and stay unscheduled; give more --trials")
    console.out.print(f"use it: edgec compile {model} --target {target_name} --db {db} -o build/")
