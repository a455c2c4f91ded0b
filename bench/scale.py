#!/usr/bin/env python3
"""The scale row of ``make bench-scale``: publish and long-poll fan-out with 1, 2 and 4
workers and 1 and 2 edges on this machine, one ``bench/run.py`` per shape.

Each shape runs ``publish`` (row a) and ``fanout_lp_1000`` (row b) against
firehose-zmq alone; the table gives throughput and server CPU per operation (the
edges and workers together). On a 2-core machine more processes share the same two
cores, so throughput cannot grow with them; CPU per operation shows what each shape
costs, which is what a machine with a core per process would turn into throughput.

Environment: BENCH_SCALE_WORKERS (default "1,2,4"), BENCH_SCALE_EDGES ("1,2"),
BENCH_REPEATS (1), BENCH_DURATION, BENCH_DURABILITY ("sync"), BENCH_QUICK, and
BENCH_SCALE_OUT (default bench-results/scale).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = "^publish$|^fanout_lp_1000$"
QUICK_ROWS = "^publish$|^fanout_lp_100$"  # BENCH_QUICK's sizes have no 1,000


def shapes(env) -> list:
    workers = [int(w) for w in env.get("BENCH_SCALE_WORKERS", "1,2,4").split(",")]
    edges = [int(e) for e in env.get("BENCH_SCALE_EDGES", "1,2").split(",")]
    return [(w, e) for w in workers for e in edges]


def run_shape(workers: int, edges: int, out_dir: Path, env) -> dict:
    """``{row key: median figures}`` of one shape."""
    out = out_dir / f"w{workers}-e{edges}"
    argv = [sys.executable, str(HERE / "run.py"), "--workers", str(workers), "--edges",
            str(edges), "--only", QUICK_ROWS if env.get("BENCH_QUICK") else ROWS, "--servers", "firehose-zmq", "--out", str(out)]
    run_env = {**env, "BENCH_REPEATS": env.get("BENCH_REPEATS", "1"),
               "BENCH_DURABILITY": env.get("BENCH_DURABILITY", "sync")}
    print(f"bench-scale: {workers} worker(s), {edges} edge(s) ...", flush=True)
    done = subprocess.run(argv, env=run_env, timeout=1800)
    results = sorted(out.glob("*.json"))
    if done.returncode != 0 or not results:
        return {}
    figures = {}
    for scenario in json.loads(results[-1].read_text())["scenarios"]:
        for runs in scenario["runs"].values():
            values = sorted(run["figures"]["cpu_us_per_op"] for run in runs)
            rates = sorted(run["figures"]["ops_per_s"] for run in runs)
            figures[scenario["key"]] = (values[len(values) // 2], rates[len(rates) // 2])
    return figures


def main() -> int:
    env = dict(os.environ)
    out_dir = Path(env.get("BENCH_SCALE_OUT", HERE.parent / "bench-results" / "scale"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {shape: run_shape(*shape, out_dir, env) for shape in shapes(env)}
    print("\nworkers edges | a) publish µs/op  publishes/s | b) fan-out 1,000 µs/op  deliveries/s")
    for (workers, edges), figures in table.items():
        a = figures.get("publish", (None, None))
        b = figures.get("fanout_lp_1000", figures.get("fanout_lp_100", (None, None)))
        print(f"{workers:7d} {edges:5d} | {a[0] or '-':>16} {a[1] or '-':>12} | "
              f"{b[0] or '-':>21} {b[1] or '-':>13}")
    (out_dir / "scale.json").write_text(json.dumps(
        {f"w{w}-e{e}": figures for (w, e), figures in table.items()}, indent=1))
    return 0 if all(table.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
