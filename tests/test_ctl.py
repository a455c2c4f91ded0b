"""firehose-ctl: status, channel and drain against a real cluster, with script-usable exit codes."""

import json
import subprocess

from firehose_zmq import ctl
from firehose_zmq.testing import free_port

from .cluster import BIN, Cluster, channel_on
from .http import request


def ctl_run(cluster, *argv, admin=None, timeout_s=60):
    result = subprocess.run([str(BIN / "firehose-ctl"), "--admin", admin or cluster.admin, *argv],
                            capture_output=True, text=True, timeout=timeout_s, env=cluster.env)
    return result.returncode, result.stdout, result.stderr


def test_status_shows_every_worker_and_the_edge(cluster):
    assert request(cluster.url("/ctl/status"), "PUT", b"x").status == 202
    code, out, err = ctl_run(cluster, "status")
    assert code == ctl.OK, err
    assert f"edge 127.0.0.1:{cluster.http_port}" in out and ": ready" in out
    for worker_id in cluster.worker_ids:
        line = next(line for line in out.splitlines() if line.strip().startswith(worker_id))
        assert line.split()[1] == "up"
    code, out, _ = ctl_run(cluster, "--json", "status")
    status = json.loads(out)
    assert code == ctl.OK and {w["id"] for w in status["workers"]} == set(cluster.worker_ids)
    assert sum(w["status"]["channels"] for w in status["workers"]) >= 1


def test_channel_details_and_their_exit_codes(cluster):
    name = "/ctl/channel"
    for i in range(3):
        assert request(cluster.url(name), "PUT", b"m", headers={"X-Firehose-Buffer-Size": "2"}
                       ).status == 202
    code, out, err = ctl_run(cluster, "channel", name)
    assert code == ctl.OK, err
    fields = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert fields["sequence"] == "3" and fields["buffered"] == "2 message(s)"
    assert fields["owner"].split()[0] in cluster.worker_ids and "(up)" in fields["owner"]
    assert fields["ttl"].endswith(" s")
    assert ctl_run(cluster, "channel", "/ctl/never-published")[0] == ctl.NO_CHANNEL
    code, _, err = ctl_run(cluster, "channel", "no-slash")
    assert code == ctl.USAGE and "must start with '/'" in err


def test_unreachable_and_degraded(fresh_cluster):
    cluster = fresh_cluster
    code, _, err = ctl_run(cluster, "status", admin=f"127.0.0.1:{free_port()}")
    assert code == ctl.UNREACHABLE and "did not answer" in err
    cluster.kill_worker("w2")
    cluster.edge.wait_for("worker w2 down")
    code, out, _ = ctl_run(cluster, "status")
    assert code == ctl.NOT_READY and "NOT READY" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("w2"))
    assert "DOWN" in line
    code, out, _ = ctl_run(cluster, "channel", channel_on("w2", cluster.worker_ids, "/ctl"))
    assert code == ctl.NOT_READY and "DOWN" in out


def test_drain_stops_the_edge_and_waits_for_it(tmp_path):
    with Cluster(tmp_path, worker_ids=("w1",)) as cluster:
        config = cluster.config_path.read_text().replace("[admin]", "[admin]\ndrain_grace_s = 0.5")
        cluster.config_path.write_text(config)
        cluster.restart_edge()
        code, out, err = ctl_run(cluster, "drain", cluster.admin)
        assert code == ctl.OK, err
        assert "is draining" in out and "has stopped" in out
        assert cluster.edge.popen.wait(10) == 0
