"""Reparameterized zoo nets vs the same architecture built directly in single-branch form.

For each RepVGG-/MobileOne-like zoo model: export the training (multi-branch) form and the
``deploy=True`` form, run ``edgec``'s ``fuse`` pass on the training form (verified against
onnxruntime after every pass), then time all three with onnxruntime (graph optimizations on,
interleaved rounds, median).  Prints node/param counts and the latency ratio fused / deploy,
which should be 1.00 within noise, plus the speed-up over the unfused multi-branch model.

    python bench/reparam_latency.py                       # repvgg_a0, mobileone_s0 at 224x224
    python bench/reparam_latency.py --resolution 128 --rounds 30 --threads 2
    python bench/reparam_latency.py --models mobileone_s0 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _time_sessions(sessions: dict[str, object], feed: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median per-run milliseconds; sessions run interleaved so drift hits them equally."""
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feed)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            for _ in range(per_round):
                s.run(None, feed)
            samples[name].append((time.perf_counter() - t) * 1000 / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(name: str, resolution: int, rounds: int, per_round: int, threads: int) -> dict:
    import numpy as np

    from edgec import ir as eir
    from edgec import verify
    from edgec.export import export_zoo_model
    from edgec.passes_api import registry
    from edgec.pipeline import Pipeline

    train = export_zoo_model(name, resolution=resolution)
    deploy = export_zoo_model(name, resolution=resolution, deploy=True)
    start = time.perf_counter()
    report = Pipeline([registry.create("fuse")]).run(eir.from_proto(train))
    fuse_s = time.perf_counter() - start
    fused = eir.to_proto(report.model)
    stats = report.steps[0].stats
    sessions = {
        "multi-branch": verify.session(train, optimize=True, threads=threads),
        "fused": verify.session(fused, optimize=True, threads=threads),
        "deploy": verify.session(deploy, optimize=True, threads=threads),
    }
    spec = verify.input_specs(train)[0]
    feed = {spec.name: np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)}
    ms = _time_sessions(sessions, feed, rounds, per_round)
    return {
        "model": name,
        "resolution": resolution,
        "nodes": {"multi-branch": len(train.graph.node), "fused": len(fused.graph.node), "deploy": len(deploy.graph.node)},
        "params": {
            "multi-branch": eir.count_params(eir.from_proto(train)),
            "fused": eir.count_params(report.model),
            "deploy": eir.count_params(eir.from_proto(deploy)),
        },
        "ms": ms,
        "fused_over_deploy": ms["fused"] / ms["deploy"],
        "multi_over_fused": ms["multi-branch"] / ms["fused"],
        "equivalence": report.final.summary() if report.final else None,
        "fuse_seconds": fuse_s,
        "patterns": stats.notes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="repvgg_a0,mobileone_s0")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = [bench_model(m.strip(), args.resolution, args.rounds, args.per_round, args.threads)
               for m in args.models.split(",") if m.strip()]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"onnxruntime CPU, {args.threads} threads, median of {args.rounds} interleaved rounds x {args.per_round} runs")
    print(f"{'model':<14}{'res':>5}{'nodes multi/fused/deploy':>27}{'params fused=deploy':>21}"
          f"{'ms multi':>10}{'ms fused':>10}{'ms deploy':>11}{'fused/deploy':>14}{'multi/fused':>13}")
    for r in results:
        n, p, ms = r["nodes"], r["params"], r["ms"]
        print(f"{r['model']:<14}{r['resolution']:>5}{n['multi-branch']:>11}/{n['fused']}/{n['deploy']:<8}"
              f"{str(p['fused'] == p['deploy']):>14}{ms['multi-branch']:>14.2f}{ms['fused']:>10.2f}{ms['deploy']:>11.2f}"
              f"{r['fused_over_deploy']:>14.3f}{r['multi_over_fused']:>13.2f}")
    for r in results:
        print(f"\n{r['model']}: fuse took {r['fuse_seconds']:.1f} s; {r['equivalence']}")
        for line in r["patterns"]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
