"""The admin listeners (admin.py): Prometheus metrics, health and readiness, drain."""

import json
import signal
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from firehose_zmq.admin import CounterTotals
from firehose_zmq.metrics import TimeSeries

from .cluster import Cluster, channel_on
from .http import request

READY_WITHIN_S = 2.0


def scrape(url: str) -> dict:
    """``{(sample name, frozenset(labels)): value}`` parsed by prometheus_client's parser."""
    response = request(url)
    assert response.status == 200
    assert response.header("Content-Type").startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_status(url: str, status: int, within_s: float) -> float:
    """Seconds until ``url`` answers ``status``; fails after ``within_s``."""
    started = time.monotonic()
    while True:
        got = request(url, timeout_s=1.0).status
        elapsed = time.monotonic() - started
        if got == status:
            return elapsed
        assert elapsed < within_s, f"{url} still answers {got} after {elapsed:.2f} s"
        threading.Event().wait(0.05)


def test_totals_survive_the_buckets_that_are_dropped():
    """CounterTotals keeps counting after TimeSeries dropped the buckets it read."""
    series = TimeSeries(bucket_s=1, keep=2)
    totals = CounterTotals(series)
    for second in range(10):
        series.incr(1000.0 + second, "published", by=2)
        assert totals.read(1000.0 + second + 0.5)["published"] == 2 * (second + 1)
    assert len(series.report(1009.5)) == 2


def test_metrics_of_the_edge_and_the_workers(cluster):
    """Publishes to one worker's channel are counted by the edge and that worker; a
    waiting long-poll is a long_poll subscriber; every worker is up."""
    channel = channel_on("w1", cluster.worker_ids, "/admin-metrics")
    before_edge = scrape(cluster.admin_url("/metrics"))
    before_w1 = scrape(cluster.admin_url("/metrics", "w1"))
    for i in range(3):
        assert request(cluster.url(channel), "PUT", f"m{i}".encode()).status == 202
    waiting = threading.Thread(target=request, args=(cluster.url(channel + "?last_message_sequence=3"),),
                               kwargs={"timeout_s": 10})
    waiting.start()
    try:
        deadline = time.monotonic() + 5
        while True:
            edge = scrape(cluster.admin_url("/metrics"))
            if value(edge, "firehose_subscribers", transport="long_poll") >= 1:
                break
            assert time.monotonic() < deadline, "the long-poll never showed as a subscriber"
            threading.Event().wait(0.05)
    finally:
        request(cluster.url(channel), "PUT", b"wake")
        waiting.join(10)
    assert (value(edge, "firehose_publishes_total")
            - before_edge[("firehose_publishes_total", frozenset())]) == 3
    assert value(edge, "firehose_worker_up", worker="w1") == 1
    assert value(edge, "firehose_worker_up", worker="w2") == 1
    assert value(edge, "firehose_ready") == 1
    assert value(edge, "firehose_subscribers", transport="websocket") == 0
    assert ("firehose_rejections_total", frozenset({("reason", "websocket_bad_frame")})) in edge
    after = scrape(cluster.admin_url("/metrics"))
    delivered = value(after, "firehose_deliveries_total", transport="long_poll") - \
        before_edge[("firehose_deliveries_total", frozenset({("transport", "long_poll")}))]
    assert delivered == 1  # the waiting long-poll got "wake"
    assert value(after, "firehose_publish_seconds_count") - \
        before_edge[("firehose_publish_seconds_count", frozenset())] == 4
    assert value(after, "firehose_fanout_seconds_count") >= 1

    w1 = scrape(cluster.admin_url("/metrics", "w1"))
    published = value(w1, "firehose_worker_publishes_total", worker="w1")
    assert published - value(before_w1, "firehose_worker_publishes_total", worker="w1") == 4
    assert value(w1, "firehose_channels", worker="w1") >= 1
    assert value(w1, "firehose_store_commits_total", worker="w1") >= 1
    assert value(w1, "firehose_store_commit_seconds_count", worker="w1") >= 1
    assert value(w1, "firehose_store_bytes", worker="w1") > 0
    assert value(w1, "firehose_ready", worker="w1") == 1
    assert not any("channel" in dict(labels) for _, labels in [*edge, *w1])


def test_health_readiness_and_channel_details(cluster):
    channel = "/admin-channel"
    assert request(cluster.url(channel), "PUT", b"x", headers={"X-Firehose-TTL": "60"}).status \
        == 202
    for worker_id in (None, *cluster.worker_ids):
        health = request(cluster.admin_url("/healthz", worker_id))
        assert (health.status, health.body) == (200, b"ok\n")
        ready = request(cluster.admin_url("/readyz", worker_id))
        assert (ready.status, ready.body) == (200, b"ready\n")
    details = json.loads(request(cluster.admin_url("/channel?name=" + channel)).body)
    assert details["owner"] in cluster.worker_ids and details["owner_up"] is True
    assert details["worker"]["seq"] == 1 and details["worker"]["buffered"] == 1
    assert 0 < details["worker"]["ttl_s"] <= 60
    bad = request(cluster.admin_url("/channel?name=nope"))
    assert bad.status == 400 and b"must start with '/'" in bad.body
    assert request(cluster.admin_url("/nothing", "w1")).status == 404


def test_readyz_follows_a_stopped_worker(fresh_cluster):
    """/readyz answers 503 within 2 s of a worker's SIGSTOP and 200 again after SIGCONT."""
    cluster = fresh_cluster
    url = cluster.admin_url("/readyz")
    assert request(url).status == 200
    worker = cluster.workers["w2"]
    worker.signal(signal.SIGSTOP)
    try:
        down_after_s = wait_status(url, 503, READY_WITHIN_S)
        assert b"w2" in request(url).body
    finally:
        worker.signal(signal.SIGCONT)
    up_after_s = wait_status(url, 200, 10.0)
    print(f"/readyz 503 after {down_after_s:.2f} s, 200 again {up_after_s:.2f} s after SIGCONT")


def test_drain_turns_unready_then_stops_the_edge(tmp_path):
    with Cluster(tmp_path, extra_config="", worker_ids=("w1",)) as cluster:
        config = cluster.config_path.read_text().replace("[admin]", "[admin]\ndrain_grace_s = 1")
        cluster.config_path.write_text(config)
        cluster.restart_edge()
        answer = request(cluster.admin_url("/drain"), "POST", b"")
        assert answer.status == 202 and json.loads(answer.body)["stops_in_s"] == 1
        assert request(cluster.admin_url("/readyz")).status == 503
        assert request(cluster.url("/during-drain"), "PUT", b"x").status == 202
        assert cluster.edge.popen.wait(15) == 0
        cluster.edge.wait_for("edge stopping")
