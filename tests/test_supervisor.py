"""firehose-cluster (what `make run` runs): starts a cluster, restarts the dead, leaves nothing."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path


from .cluster import BIN, Cluster, Process
from .http import request
from .ports import free_port_block
from firehose_zmq.testing import free_port


def pids_started(process: Process) -> dict:
    """name -> newest pid, from the supervisor's log."""
    found = {}
    for line in process.lines:
        match = re.search(r"started (worker \w+|edge(?: \d+)?) \(pid (\d+)\)", line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_cluster_restarts_a_dead_worker_and_stops_everything(tmp_path):
    """A SIGKILLed worker is restarted and logged; SIGTERM stops every child."""
    layout = Cluster(tmp_path)  # only for its config file on free ports
    supervisor = Process("cluster", [str(BIN / "firehose-cluster"), "--config",
                                     str(layout.config_path)], layout.env)
    try:
        supervisor.wait_for("worker w1 up")
        supervisor.wait_for("worker w2 up")
        assert request(layout.url("/sup"), "PUT", b"x").status == 202
        children = pids_started(supervisor)
        assert set(children) == {"worker w1", "worker w2", "edge"}

        mark = len(supervisor.lines)
        os.kill(children["worker w1"], signal.SIGKILL)
        supervisor.wait_for(r"worker w1 \(pid \d+\) exited .* restarting", start=mark)
        supervisor.wait_for(r"started worker w1", start=mark)
        supervisor.wait_for(r"worker w1 up", start=mark)
        restarted = pids_started(supervisor)
        assert restarted["worker w1"] != children["worker w1"]

        supervisor.signal(signal.SIGTERM)
        assert supervisor.popen.wait(20) == 0
        assert not any(alive(pid) for pid in restarted.values())
    finally:
        supervisor.stop()


def test_embedded_default_needs_no_config(tmp_path):
    """With no config file the cluster runs two workers and an edge; FIREHOSE_PORT_BASE
    moves every port, PORT the HTTP one."""
    base = free_port_block()
    port = free_port()
    env = dict(os.environ, FIREHOSE_PORT_BASE=str(base), PORT=str(port),
               FIREHOSE_LONG_POLL_TIMEOUT="1", FIREHOSE_DATA_DIR=str(tmp_path / "var"))
    supervisor = Process("cluster", [str(BIN / "firehose-cluster")], env)
    try:
        supervisor.wait_for("worker w1 up")
        supervisor.wait_for("worker w2 up")
        supervisor.wait_for("long-poll timeout 1 s")
        url = f"http://127.0.0.1:{port}/default"
        assert request(url, "PUT", b"x").status == 202
        assert request(url + "?last_message_sequence=1").status == 204
        assert request(f"http://127.0.0.1:{base + 3}/readyz").status == 200
        assert request(f"http://127.0.0.1:{base + 4}/healthz").status == 200  # w1's admin
        supervisor.wait_for(f"native ZeroMQ: subscribe on tcp://127.0.0.1:{base + 1}")

        second = subprocess.run([str(BIN / "firehose-cluster")], env=env, capture_output=True,
                                text=True, timeout=30)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already in use" in lines[0], second.stderr
        assert "FIREHOSE_PORT_BASE" in lines[0]
    finally:
        supervisor.signal(signal.SIGINT)
        assert supervisor.popen.wait(20) == 0
        supervisor.stop()


def test_a_config_whose_workers_bind_the_same_address_is_refused():
    """The example config (two hosts, same ports) cannot run as one local cluster."""
    result = subprocess.run([str(BIN / "firehose-cluster"), "--config",
                             "conf/cluster.example.toml"], capture_output=True, text=True,
                            timeout=30, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "worker w2 router_bind and worker w1 router_bind would both bind port 7481" in lines[0]


def test_a_child_that_cannot_start_stops_the_cluster(tmp_path):
    """A worker whose store cannot be opened fails at its first start: the cluster stops
    with status 1 instead of restarting it forever."""
    layout = Cluster(tmp_path)
    layout.data_dir.mkdir(parents=True)
    (layout.data_dir / "w1.sqlite3").write_bytes(b"this is not a database" * 100)
    supervisor = Process("cluster", [str(BIN / "firehose-cluster"), "--config",
                                     str(layout.config_path)], layout.env)
    try:
        assert supervisor.popen.wait(30) == 1
        supervisor.wait_for("worker w1 exited with status 1 while starting; stopping the cluster")
        assert "restarting it" not in supervisor.log_text()
    finally:
        supervisor.stop()


def start_supervised(cluster) -> Process:
    process = Process("cluster", [str(BIN / "firehose-cluster"), "--config",
                                  str(cluster.config_path)], cluster.env)
    process.wait_for("edge listening")
    for worker_id in cluster.worker_ids:
        process.wait_for(f"worker {worker_id} up")
    return process


def test_sigterm_drains_edge_then_workers_and_restart_keeps_channels(tmp_path):
    """SIGTERM stops the edge, then the workers (stores marked clean); a new cluster
    on the same data directory serves the same channels and continues their sequences."""
    cluster = Cluster(tmp_path)  # only its config and data directory are used
    supervisor = start_supervised(cluster)
    try:
        for i in (1, 2):
            assert request(cluster.url("/kept"), "PUT", f"m{i}".encode()).status == 202
        supervisor.signal(signal.SIGTERM)
        assert supervisor.popen.wait(30) == 0
        log = supervisor.log_text()
        assert log.index("edge stopped (status 0)") < log.index("worker w1 stopped (status 0)")
    finally:
        supervisor.stop()
    supervisor = start_supervised(cluster)
    try:
        supervisor.wait_for("previous stop clean")
        assert json.loads(request(cluster.url("/kept?last_message_sequence=1")).body) == \
            {"message": "m2", "last_sequence": 2}
        assert request(cluster.url("/kept"), "PUT", b"m3").header("X-Firehose-Sequence") == "3"
    finally:
        supervisor.stop()


def test_two_edges_share_the_port(tmp_path):
    """--edges 2 runs two edges on one HTTP port; both serve, and SIGTERM stops all."""
    layout = Cluster(tmp_path)
    supervisor = Process("cluster", [str(BIN / "firehose-cluster"), "--config",
                                     str(layout.config_path), "--edges", "2"], layout.env)
    try:
        for line in ("edge listening", "worker w1 up", "worker w2 up"):
            first = supervisor.wait_for(line)
            supervisor.wait_for(line, start=first + 1)  # from the second edge too
        children = pids_started(supervisor)
        assert {"edge 1", "edge 2"} <= set(children)
        for n in range(20):
            assert request(layout.url(f"/two/{n}"), "PUT", b"x").status == 202
        supervisor.signal(signal.SIGTERM)
        assert supervisor.popen.wait(30) == 0
        assert not any(alive(pid) for pid in children.values())
    finally:
        supervisor.stop()
