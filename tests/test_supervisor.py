"""firehose-cluster (``make run``): a drained stop and a restart that keeps the channels."""

import json
import signal

from .cluster import BIN, Cluster, Process
from .http import request


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
