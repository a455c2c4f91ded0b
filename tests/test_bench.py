"""The benchmark harness (bench/run.py) in its quickest mode against a real cluster.

It keeps `make bench` from rotting: the runner starts firehose-zmq on free ports,
drives the load generator, stops everything, and writes a JSON document whose shape
report.py and the issue's readers rely on. Nchan and Redis are not involved (they
may not be installed; the harness must then say so and go on); the numbers
themselves are not checked, only that nothing was lost.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURE_KEYS = {"ops_per_s", "cpu_us_per_op", "p50_ms", "p99_ms", "rss_kb", "bytes_per_conn",
               "lost", "dup", "errors"}


def run_bench(out_dir: Path, only: str, servers="firehose-zmq", durability="sync", env=None):
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("BENCH_")}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--servers", servers,
         "--durability", durability, "--duration", "1", "--repeats", "1", "--no-chart",
         "--only", only, "--out", str(out_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)


def bench_module(name):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_quick_bench_writes_every_figure_and_loses_nothing(tmp_path):
    """A quick run measures publish, long-poll fan-out and channels with 0 lost, 0 duplicated."""
    done = run_bench(tmp_path, "^(publish|fanout_lp_100|channels_200|fanout_ws_200|idle_1000"
                               "|isolation_alone|isolation_hot)$")
    assert done.returncode == 0, done.stdout + done.stderr
    [json_path] = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["meta"]["complete"] is True
    assert doc["meta"]["servers"] == ["firehose-zmq-sync"]
    rows = {row["key"]: row for row in doc["scenarios"]}
    assert set(rows) == {"publish", "fanout_lp_100", "channels_200", "fanout_ws_200", "idle_1000",
                         "isolation_alone", "isolation_hot"}
    for key in ("publish", "fanout_lp_100", "channels_200"):
        row = rows[key]
        assert row["status"] == {"firehose-zmq-sync": "ok"}
        [run] = row["runs"]["firehose-zmq-sync"]
        assert set(run["figures"]) >= FIGURE_KEYS
        assert run["figures"]["lost"] == 0 and run["figures"]["dup"] == 0
        assert run["figures"]["errors"] == 0
        assert run["figures"]["ops_per_s"] > 0 and run["figures"]["cpu_us_per_op"] > 0
        assert run["result"]["server_processes"] >= 3  # the edge and both workers
        median = row["median"]["firehose-zmq-sync"]
        assert median["runs"] == 1 and median["lost"] == 0
    [idle] = rows["idle_1000"]["runs"]["firehose-zmq-sync"]
    assert idle["figures"]["bytes_per_conn"] > 0 and idle["figures"]["lost"] == 0
    assert idle["result"]["connected"] == 1000
    [hot] = rows["isolation_hot"]["runs"]["firehose-zmq-sync"]
    assert hot["result"]["hot"]["requests_ok"] > 0  # the hot channel really ran alongside
    assert hot["figures"]["lost"] == 0 and hot["figures"]["p99_ms"] > 0
    assert rows["isolation_hot"]["p99_rise"]["firehose-zmq-sync"] > 0
    # the WebSocket row is measured when the server has the endpoint, else says why not
    ws = rows["fanout_ws_200"]
    status = ws["status"]["firehose-zmq-sync"]
    assert status == "ok" or status.startswith("not available:")
    assert "a) publish" in done.stdout and "ratio" in done.stdout


def test_modes_are_paired_with_their_peers_and_missing_peers_are_named(tmp_path):
    """With Nchan and Redis not found, a run of two modes says so, measures ours in each
    mode, and reports the publishes per commit of the mode that commits."""
    empty = tmp_path / "bin"
    empty.mkdir()
    done = run_bench(tmp_path / "out", "^publish$", servers="firehose-zmq,nchan,nchan-redis",
                     durability="sync,memory", env={**os.environ, "PATH": str(empty)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench: nchan not available" in done.stderr
    assert "bench: nchan-redis not available" in done.stderr
    [json_path] = (tmp_path / "out").glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["meta"]["servers"] == ["firehose-zmq-memory", "firehose-zmq-sync"]
    [row] = doc["scenarios"]
    assert row["modes"] == ["memory", "sync"]
    assert {m: p["peer"] for m, p in row["pairs"].items()} == {
        "memory": "nchan", "sync": "nchan-redis-always"}
    [sync] = row["runs"]["firehose-zmq-sync"]
    store = sync["result"]["store"]
    assert store["published"] > 0 and 1 <= store["commits"] <= store["published"]
    assert sync["figures"]["publishes_per_commit"] == pytest.approx(
        store["published"] / store["commits"], rel=0.01)
    [memory] = row["runs"]["firehose-zmq-memory"]
    assert memory["result"]["store"]["commits"] == 0
    assert memory["figures"]["publishes_per_commit"] is None
    lines = [line for line in done.stdout.splitlines() if " | " in line]
    assert any("memory |" in line and "in-memory" in line for line in lines)
    assert any("sync   |" in line and "redis always" in line and "/c" in line for line in lines)


def test_the_report_pairs_each_mode_with_its_peer_and_with_in_memory_nchan():
    """Ratios: memory against in-memory Nchan, async against Redis everysec, sync against
    Redis always and, beside it, against in-memory Nchan; targets are checked per pair."""
    report = bench_module("report")

    def runs(cpu):
        return [{"figures": {"ops_per_s": 1000.0, "cpu_us_per_op": cpu, "p50_ms": 1.0,
                             "p99_ms": 2.0, "rss_kb": 1024, "bytes_per_conn": None,
                             "lost": 0, "dup": 0, "errors": 0}}]
    cpu = {"firehose-zmq-memory": 30.0, "firehose-zmq-async": 40.0, "firehose-zmq-sync": 80.0,
           "nchan": 10.0, "nchan-redis-everysec": 50.0, "nchan-redis-always": 100.0}
    doc = {"meta": {"repeats": 1, "servers": list(cpu)}, "scenarios": [{
        "key": "publish", "title": "a) publish", "metric": "cpu", "modes": list(report.MODES),
        "targets": {"memory/nchan": 3.0, "async/nchan-redis-everysec": 0.5,
                    "sync/nchan-redis-always": 1.0},
        "runs": {s: runs(v) for s, v in cpu.items()}, "status": {s: "ok" for s in cpu}}]}
    pairs = report.summarise(doc)["scenarios"][0]["pairs"]
    assert {m: (p["peer"], p["ratio_peer"], p["meets_peer"], p["ratio_nchan"])
            for m, p in pairs.items()} == {
        "memory": ("nchan", 3.0, True, 3.0),
        "async": ("nchan-redis-everysec", 0.8, False, 4.0),
        "sync": ("nchan-redis-always", 0.8, True, 8.0)}
    text = report.table(doc)
    assert "0.80x (<=0.5 MISS)" in text and "0.80x (<=1 ok)" in text and "8.00x" in text


def _stream_server(answer_for):
    """A loopback server answering each request's head with ``answer_for(head)`` and
    then holding the connection open (as a working stream does); returns (port, stop)."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    held, stopping = [], threading.Event()

    def serve():
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            head = b""
            conn.settimeout(2)
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
            conn.sendall(answer_for(head))
            held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop():
        stopping.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    return listener.getsockname()[1], stop


def test_stream_probe_accepts_a_held_stream_and_refuses_a_long_poll(tmp_path):
    """The WS/SSE probe reads only the response head: an open stream counts as available."""
    FirehoseServer = bench_module("servers").FirehoseServer

    def streams(head):
        if head.startswith(b"PUT"):
            return b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        if b"Upgrade: websocket" in head:
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hello\n\n"

    def long_poll(head):
        if head.startswith(b"PUT"):
            return b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        body = b'{"message":"probe","last_sequence":1}'
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(body)) + body

    for answer, expected in ((streams, True), (long_poll, False)):
        port, stop = _stream_server(answer)
        try:
            server = FirehoseServer(tmp_path)
            server.port = port
            for transport in ("ws", "sse"):
                ok, why = server.supports(transport)
                assert ok is expected, (transport, why)
        finally:
            stop()


def test_scale_row_runs_one_shape_quickly(tmp_path):
    """bench/scale.py (make bench-scale) in its smallest form: one worker, one edge, both
    rows measured, a table and its JSON."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_SCALE_WORKERS": "1",
           "BENCH_SCALE_EDGES": "1", "BENCH_SCALE_OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(root / "bench" / "scale.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = json.loads((tmp_path / "scale.json").read_text())
    assert set(table["w1-e1"]) == {"publish", "fanout_lp_100"}  # the quick sizes
    assert "workers edges" in done.stdout
