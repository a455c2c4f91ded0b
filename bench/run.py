#!/usr/bin/env python3
"""make bench: firehose-zmq beside Nchan, in memory and on Redis, in one run.

For every scenario (scenarios.py), for every repeat, for each server this starts a
fresh server on free loopback ports, drives lpbench.py against it in a subprocess,
and stops the server; then it prints a table of medians with the ratios, and writes
every figure to ``<out>/<timestamp>.json``, a chart to ``<out>/<timestamp>.png`` and
the logs to ``<out>/<timestamp>/``. Every run is bounded in time; every process it
started is stopped by pid (or by the process group it created) on success, error,
Ctrl-C or SIGTERM.

The servers: firehose-zmq in each durability mode of ``--durability`` (rows marked
``per_mode``; the others in the most durable mode listed), each beside the Nchan
that keeps messages as durably (report.peer_of: in-memory Nchan for ``memory``,
Nchan + Redis ``appendfsync everysec`` for ``async``, ``always`` for ``sync``), and
in-memory Nchan on every row. A peer whose software is missing is left out, and
the harness says so.

Exit code: 0 when every firehose-zmq run completed with nothing lost, duplicated or
failed; 1 otherwise; 2 when the harness could not run at all; 130 on Ctrl-C.
Environment defaults for the options: BENCH_QUICK=1, BENCH_REPEATS, BENCH_DURATION,
BENCH_ONLY, BENCH_SERVERS, BENCH_OUT, BENCH_PROFILE=1, BENCH_DURABILITY,
BENCH_COMMIT_WINDOW_MS, BENCH_EDGES.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lpbench
import report
import scenarios
from servers import FirehoseServer, NchanRedisServer, NchanServer, ServerError

HERE = Path(__file__).resolve().parent
LPBENCH = HERE / "lpbench.py"
SETUP_ALLOWANCE_S = 150.0  # connecting 10,000 clients on a busy 2-core box, drain, results
HOT_LEAD_S = 1.5  # isolation: the hot load runs this long before the quiet channels start


class Progress:
    """Progress lines on stderr: what runs now, then its headline figures."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.stream = stream

    def start(self, server: str, title: str, rep: int, repeats: int) -> None:
        self.done += 1
        elapsed = int(time.monotonic() - self.t0)
        self.stream.write(f"[{self.done:>3}/{self.total} {elapsed // 60:02d}:{elapsed % 60:02d}] "
                          f"{server:<20} {title} (run {rep + 1}/{repeats}) ...\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(f"               {text}\n")
        self.stream.flush()


def describe(figures: dict) -> str:
    """One line of a run's headline figures for the progress output."""
    parts = []
    if figures.get("ops_per_s") is not None:
        parts.append(f"{figures['ops_per_s']:,.0f}/s")
    if figures.get("cpu_us_per_op") is not None:
        parts.append(f"{figures['cpu_us_per_op']:.1f} us/op")
    if figures.get("p99_ms") is not None:
        parts.append(f"p50/p99 {figures['p50_ms']:.1f}/{figures['p99_ms']:.1f} ms")
    if figures.get("bytes_per_conn") is not None:
        parts.append(f"{figures['bytes_per_conn']:,.0f} B/conn")
    parts.append(f"lost {figures['lost']} dup {figures['dup']} errors {figures['errors']}")
    line = "-> " + ", ".join(parts)
    threads = figures.get("threads_us_per_op")
    if threads:
        line += "\n               us/op per thread: " + ", ".join(
            f"{name} {us:.1f}" for name, us in threads.items() if us >= 0.5)
    return line


class LpbenchRun:
    """One lpbench subprocess in a session of its own, stderr appended to ``log_path``.

    ``result()`` waits (bounded) and returns the JSON object it printed; ``kill()``
    ends its process group (lpbench and the client processes it forked)."""

    def __init__(self, argv: list, log_path: Path, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        with open(log_path, "a") as log:
            log.write(f"\n## {time.strftime('%H:%M:%S')} {' '.join(argv[1:])}\n")
            log.flush()
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                            stdin=subprocess.DEVNULL, text=True,
                                            start_new_session=True)

    def result(self) -> dict:
        try:
            out, _ = self.process.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"lpbench did not finish within {self.timeout_s:.0f} s")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if self.process.returncode != 0 or not lines:
            raise RuntimeError(f"lpbench exited with code {self.process.returncode} "
                               f"(see lpbench.log)")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group this run created
            except ProcessLookupError:
                pass
        try:
            self.process.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError):
            pass


class Profiler:
    """py-spy recording every firehose-zmq server process during one run (--profile).

    Writes per process ``profile-<name>.txt`` (collapsed stacks, one "frame;frame;... count"
    line per stack, readable by speedscope and flamegraph.pl) and ``profile-<name>-top.txt``
    (the functions with the most samples, self and inclusive) into ``out_dir``. Sampling
    is non-blocking, but it costs the machine CPU, so a profiled run's figures are a
    little worse."""

    def __init__(self, pids: list, names: dict, out_dir: Path, duration_s: float):
        self.runs = []
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(py_spy):
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.outputs = []
        for pid in pids:
            raw = out_dir / f"profile-{names.get(pid, pid)}.txt"
            self.outputs.append(raw)
            argv = [py_spy, "record", "--pid", str(pid), "--nonblocking", "--duration",
                    f"{duration_s:.0f}", "--format", "raw", "--output", str(raw)]
            log = open(out_dir / "py-spy.log", "a")
            self.runs.append(subprocess.Popen(argv, stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
            log.close()

    def stop(self) -> None:
        """Let py-spy write its output (SIGINT), bounded; then make sure it is gone."""
        for run in self.runs:
            if run.poll() is None:
                run.send_signal(signal.SIGINT)
        for run in self.runs:
            try:
                run.wait(15)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait(5)
        for raw in self.outputs:
            if raw.exists():
                raw.with_name(raw.stem + "-top.txt").write_text(top_functions(raw.read_text()))


def top_functions(collapsed: str, limit: int = 30) -> str:
    """The functions with the most samples in py-spy's collapsed stacks, self and inclusive."""
    own, inclusive, total = {}, {}, 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # "func (file.py:123)" -> "func (file.py)": a function's lines count together
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    lines = [f"{total} samples"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        lines.append(f"\n-- {title}: % of samples, function (file)")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:limit]:
            lines.append(f"{100 * n / max(1, total):6.1f}%  {frame}")
    return "\n".join(lines) + "\n"


def process_names(pids: list) -> dict:
    """pid -> a short name from its command line (edge, worker-w1, ...)."""
    names = {}
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        text = " ".join(argv)
        if "--id" in argv:
            names[pid] = f"worker-{argv[argv.index('--id') + 1]}"
        elif "edge" in text:
            names[pid] = f"edge-{pid}"
    return names


class Runner:
    """Runs the plan: every scenario x repeat x server, each on a fresh server."""

    def __init__(self, options, rows: list, kinds: list, log_dir: Path):
        self.options = options
        self.rows = rows
        self.kinds = kinds  # the kinds of server available and asked for (run.KINDS)
        self.log_dir = log_dir
        self.lpbench_log = log_dir / "lpbench.log"
        self.active: list = []  # lpbench runs in flight, killed on the way out

    def modes_for(self, row) -> list:
        """Our durability modes for ``row``: every one asked for, or the most durable."""
        if report.OURS not in self.kinds:
            return []
        modes = self.options.durability
        return list(modes) if row.per_mode else [modes[-1]]

    def servers_for(self, row) -> list:
        """The servers of ``row``, in column order: ours per mode, each mode's peer,
        in-memory Nchan on every row."""
        modes = self.modes_for(row)
        wanted = [report.ours(m) for m in modes]
        if report.PEER in self.kinds:
            wanted.append(report.PEER)
        for mode in modes:
            peer = report.peer_of(mode)
            if peer != report.PEER and report.REDIS_PEER in self.kinds:
                wanted.append(peer)
        return report.server_order(wanted)

    def make_server(self, label: str, run_dir: Path):
        if report.is_ours(label):
            return FirehoseServer(run_dir, workers=self.options.workers,
                                  durability=report.mode_of(label),
                                  commit_window_ms=self.options.commit_window_ms, label=label,
                                  edges=self.options.edges)
        if label == report.PEER:
            return NchanServer(run_dir, workers=self.options.nchan_workers)
        fsync = label[len(report.REDIS_PEER) + 1:]
        return NchanRedisServer(run_dir, fsync, workers=self.options.nchan_workers, label=label)

    def lpbench(self, row, kind: str, args: tuple, proto: str, server, timeout_s: float):
        argv = [sys.executable, str(LPBENCH), kind, *args, "--proto", proto, "--url", server.url,
                "--label", server.name, "--name", row.key, "--hard-timeout", f"{timeout_s:.0f}"]
        for pid in server.pids():
            argv += ["--server-pid", str(pid)]
        run = LpbenchRun(argv, self.lpbench_log, timeout_s + 30)
        self.active.append(run)
        return run

    def run_one(self, row, server_name: str, rep: int) -> dict:
        """Start a server, run the row once against it, stop it -> a run record."""
        run_dir = self.log_dir / f"{row.key}-{server_name}-{rep + 1}"
        run_dir.mkdir(parents=True, exist_ok=True)
        with self.make_server(server_name, run_dir) as server:
            proto = row.proto_for(server.proto)
            if row.transport != "long-poll" and server.proto != "nchan":
                ok, why = server.supports(row.transport)
                if not ok:
                    return {"not_available": why}
            timeout_s = row.duration_s + SETUP_ALLOWANCE_S
            hot = None
            profiler = None
            try:
                if self.options.profile and server.proto == "firehose":
                    pids = server.pids()
                    profiler = Profiler(pids, process_names(pids), run_dir, timeout_s)
                if row.hot_args:
                    hot = self.lpbench(row, "publish", row.hot_args, server.proto, server, timeout_s)
                    time.sleep(HOT_LEAD_S)
                quiet = self.lpbench(row, row.kind, row.args_for(server.proto), proto, server,
                                     timeout_s)
                result = quiet.result()
                if hot is not None:
                    result["hot"] = hot.result()
            finally:
                if profiler is not None:
                    profiler.stop()
                for run in self.active:
                    run.kill()
                self.active.clear()
            result["rss_kb_after"] = lpbench.mem_kb(server.pids())["rss_kb"]
            result["server_processes"] = len(server.pids())
        figures = scenarios.figures(row.kind, result, row.metric)
        if isinstance(server, FirehoseServer):
            result["store"] = server.store_counts()  # its workers log them as they stop
            figures["publishes_per_commit"] = result["store"]["publishes_per_commit"]
        return {"figures": figures, "result": result}

    def run(self, doc: dict, progress: Progress) -> None:
        """Fill ``doc["scenarios"]`` row by row (so a partial run is still reportable)."""
        repeats = self.options.repeats
        for row in self.rows:
            servers = self.servers_for(row)
            entry = {"key": row.key, "title": row.title, "kind": row.kind,
                     "transport": row.transport, "metric": row.metric,
                     "targets": dict(row.targets), "modes": self.modes_for(row),
                     "baseline": row.baseline, "counts": row.counts, "duration_s": row.duration_s,
                     "args": list(row.args),
                     "nchan_args": list(row.nchan_args) if row.nchan_args else None,
                     "hot_args": list(row.hot_args) if row.hot_args else None,
                     "runs": {s: [] for s in servers}, "status": {}}
            if row.transport != "long-poll":
                entry["note"] = "the nchan columns are Nchan's long-poll fan-out at the same size"
            doc["scenarios"].append(entry)
            for rep in range(repeats):
                for server_name in servers:
                    if entry["status"].get(server_name, "ok") != "ok":
                        progress.done += 1
                        continue
                    progress.start(server_name, row.title, rep, repeats)
                    try:
                        record = self.run_one(row, server_name, rep)
                    except (ServerError, RuntimeError, OSError, ValueError) as exc:
                        record = {"error": str(exc)}
                    if "not_available" in record:
                        entry["status"][server_name] = f"not available: {record['not_available']}"
                        progress.note(entry["status"][server_name])
                        continue
                    entry["status"][server_name] = "ok"
                    entry["runs"][server_name].append(record)
                    if "error" in record:
                        progress.note(f"FAILED: {record['error']}")
                    else:
                        progress.note(describe(record["figures"]))


def parse_args(argv):
    env = os.environ
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", default=env.get("BENCH_QUICK", "") not in ("", "0"),
                   help="a short smoke run: small counts, 2 s, one repeat (BENCH_QUICK=1)")
    p.add_argument("--repeats", type=int, default=int(env.get("BENCH_REPEATS", "0")) or None,
                   help="runs per scenario and server; the table shows medians (default 3, quick 1)")
    p.add_argument("--duration", type=float, default=float(env.get("BENCH_DURATION", "0")) or None,
                   help="seconds of measurement per run (default 10, quick 2)")
    p.add_argument("--only", default=env.get("BENCH_ONLY", ""),
                   help="regex on scenario keys, e.g. 'publish|fanout_lp_1000' (BENCH_ONLY)")
    p.add_argument("--servers", default=env.get("BENCH_SERVERS", ",".join(KINDS)),
                   help="comma-separated: firehose-zmq, nchan (in memory), nchan-redis "
                        "(BENCH_SERVERS)")
    p.add_argument("--out", default=env.get("BENCH_OUT", "bench-results"),
                   help="directory for the JSON, PNG and logs (BENCH_OUT)")
    p.add_argument("--workers", type=int, default=2, help="firehose-zmq workers (make run: 2)")
    p.add_argument("--durability", default=env.get("BENCH_DURABILITY", ",".join(report.MODES)),
                   help="firehose-zmq's [storage] durability modes, comma-separated: the "
                        "publish and channels rows run in each, the others in the most "
                        "durable (default memory,async,sync; BENCH_DURABILITY)")
    p.add_argument("--commit-window-ms", type=int,
                   default=int(env.get("BENCH_COMMIT_WINDOW_MS", "0")),
                   help="firehose-zmq's [storage] commit_window_ms (default 0; "
                        "BENCH_COMMIT_WINDOW_MS)")
    p.add_argument("--edges", type=int, default=int(env.get("BENCH_EDGES", "1")),
                   help="firehose-cluster --edges: edge processes sharing the HTTP port "
                        "(default 1; BENCH_EDGES)")
    p.add_argument("--nchan-workers", type=int, default=1, help="nginx worker processes")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument("--profile", action="store_true", default=env.get("BENCH_PROFILE", "") not in ("", "0"),
                   help="py-spy flame graphs of every firehose-zmq process per run, in the run's"
                        " log directory (BENCH_PROFILE=1; needs py-spy)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    options = p.parse_args(argv)
    if options.repeats is None:
        options.repeats = 1 if options.quick else 3
    if options.duration is None:
        options.duration = 2.0 if options.quick else 10.0
    if options.repeats < 1 or options.duration <= 0:
        p.error("--repeats must be >= 1 and --duration > 0")
    modes = {m.strip() for m in options.durability.split(",") if m.strip()}
    if not modes or modes - set(report.MODES):
        p.error(f"--durability takes {', '.join(report.MODES)}, not {options.durability!r}")
    options.durability = [m for m in report.MODES if m in modes]  # least to most durable
    if options.commit_window_ms < 0:
        p.error("--commit-window-ms must be >= 0")
    if options.edges < 1:
        p.error("--edges must be >= 1")
    return options


KINDS = (report.OURS, report.PEER, report.REDIS_PEER)


def choose_servers(options, say) -> list:
    """The kinds of server to run (KINDS order); a peer whose software is missing is
    dropped, and the harness says which and why."""
    wanted = [s.strip() for s in options.servers.split(",") if s.strip()]
    unknown = set(wanted) - set(KINDS)
    if unknown or not wanted:
        raise SystemExit(f"bench: unknown server(s) {sorted(unknown)}; use "
                         f"{', '.join(KINDS)}")
    for kind, server in ((report.PEER, NchanServer), (report.REDIS_PEER, NchanRedisServer)):
        if kind in wanted:
            ok, why = server.available()
            if not ok:
                say(f"bench: {kind} not available ({why}): running without it")
                wanted.remove(kind)
    return [s for s in KINDS if s in wanted]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def exit_code(doc: dict, say) -> int:
    """1 if any firehose-zmq run lost, duplicated or failed (Nchan's are reported only)."""
    bad = []
    for row in doc["scenarios"]:
        for server, runs in row["runs"].items():
            for run in runs:
                f = run.get("figures")
                if f is None:
                    problem = f"failed: {run.get('error')}"
                elif f["lost"] or f["dup"] or f["errors"]:
                    problem = f"lost {f['lost']}, dup {f['dup']}, errors {f['errors']}"
                else:
                    continue
                bad.append((server, row["key"], problem))
    for server, key, problem in bad:
        say(f"bench: {server} {key}: {problem}")
    return 1 if any(report.is_ours(server) for server, _, _ in bad) else 0


def main(argv=None) -> int:
    options = parse_args(argv)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    sizes = scenarios.Sizes.quick(options.duration) if options.quick else scenarios.Sizes.full(
        options.duration)
    rows = scenarios.build(sizes)
    if options.only:
        pattern = re.compile(options.only)
        rows = [r for r in rows if pattern.search(r.key)]
    if options.list or not rows:
        for r in scenarios.build(sizes):
            print(f"{r.key:<20} {r.title}")
        return 0 if options.list else 2
    kinds = choose_servers(options, say)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # servers inherit it
    if hard < 12000:
        say(f"bench: the open-file limit is {hard}; the idle scenario needs ~10,000 per process")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(options.out)
    log_dir = out_dir / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
                    "complete": False, "quick": options.quick, "repeats": options.repeats,
                    "duration_s": options.duration, "servers": None,
                    "firehose_workers": options.workers, "firehose_edges": options.edges,
                    "nchan_workers": options.nchan_workers,
                    "firehose_durability": options.durability,
                    "commit_window_ms": options.commit_window_ms,
                    "peers": {m: report.peer_of(m) for m in report.MODES},
                    "commit": git_commit(), "python": platform.python_version(),
                    "uvloop": lpbench.uvloop is not None, "cpus": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg(), "logs": str(log_dir)},
           "scenarios": []}
    runner = Runner(options, rows, kinds, log_dir)
    servers = report.server_order(s for row in rows for s in runner.servers_for(row))
    doc["meta"]["servers"] = servers
    progress = Progress(sum(len(runner.servers_for(row)) for row in rows) * options.repeats)
    say(f"bench: {len(rows)} scenarios x {options.repeats} run(s) x {', '.join(servers)}; "
        f"logs in {log_dir}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        runner.run(doc, progress)
        doc["meta"]["complete"] = True
    except KeyboardInterrupt:
        interrupted = True
        say("bench: interrupted; every process started was stopped; writing what was measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for run in runner.active:
            run.kill()

    doc["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    report.summarise(doc)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(report.table(doc))
    print(f"\nfigures: {json_path}")
    if not options.no_chart:
        try:
            print(f"chart:   {report.chart(doc, out_dir / f'{stamp}.png')}")
        except ImportError:
            say("bench: matplotlib is not installed (pip install -e '.[bench]'): no chart")
    if interrupted:
        return 130
    return exit_code(doc, say)


if __name__ == "__main__":
    sys.exit(main())
