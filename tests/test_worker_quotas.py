"""A worker's quotas (channels, bytes buffered, store size) at their bounds."""

import itertools
import os

import msgpack
import pytest
import zmq

from firehose_zmq.config import ClusterConfig, Limits, WorkerConfig
from firehose_zmq.wire import frames
from firehose_zmq.worker.channel import MESSAGE_OVERHEAD_BYTES
from firehose_zmq.worker.server import Worker

from .cluster import Cluster, channel_on
from .http import request

_ids = itertools.count()


def _worker(**limits):
    n = next(_ids)
    config = ClusterConfig(
        workers=(WorkerConfig("w1", f"inproc://q{n}", f"inproc://q{n}", f"inproc://qp{n}",
                              f"inproc://qp{n}"),),
        limits=Limits(max_message_bytes=1000, default_buffer_size=10, max_buffer_size=100,
                      **limits))
    worker = Worker(config, "w1", context=zmq.Context.instance())
    worker.bind()
    return worker


@pytest.fixture
def make_worker():
    made = []

    def make(**limits):
        made.append(_worker(**limits))
        return made[-1]
    yield make
    for worker in made:
        worker.close()


def publish(worker, channel, data=b"x", **fields):
    body = worker.handle_request(frames.encode_request(
        {"id": next(_ids), "op": "publish", "channel": channel, "data": data, **fields}))
    return msgpack.unpackb(body, raw=False)


def test_a_new_channel_past_max_channels_is_refused_with_quota(make_worker):
    """At max_channels_per_worker a publish to a new channel gets 'quota'; existing ones go on."""
    worker = make_worker(max_channels_per_worker=3)
    for i in range(3):
        assert publish(worker, f"/c{i}")["ok"]
    refused = publish(worker, "/c3")
    assert refused["error"] == frames.QUOTA and "max_channels_per_worker" in refused["reason"]
    assert publish(worker, "/c0")["ok"]
    assert len(worker.channels) == 3 and worker.counters.over_quota == 1


def test_buffered_bytes_stop_at_the_quota_and_a_full_buffer_still_turns_over(make_worker):
    """Past max_buffered_bytes_per_worker a growing publish is refused; one that replaces
    the oldest message of a full buffer is not, and the total never passes the bound."""
    cost = 500 + MESSAGE_OVERHEAD_BYTES
    worker = make_worker(max_buffered_bytes_per_worker=5 * cost)
    results = [publish(worker, "/big", b"a" * 500, buffer_size=100) for _ in range(8)]
    assert [r["ok"] for r in results] == [True] * 5 + [False] * 3
    assert results[-1]["error"] == frames.QUOTA
    assert worker.channels.buffered_bytes == 5 * cost
    # Buffer of 5: each publish drops the oldest message, so the total does not grow.
    for _ in range(20):
        assert publish(worker, "/big", b"b" * 500, buffer_size=5)["ok"]
    assert worker.channels.buffered_bytes == 5 * cost


def test_buffered_bytes_follow_deletes_expiry_and_restores(make_worker):
    """Deleting or expiring a channel gives its bytes back to the quota."""
    worker = make_worker()
    publish(worker, "/d", b"x" * 100)
    publish(worker, "/t", b"y" * 100, ttl=1)
    assert worker.channels.buffered_bytes == 2 * (100 + MESSAGE_OVERHEAD_BYTES)
    worker.handle_request(frames.encode_request({"id": 1, "op": "delete", "channel": "/d"}))
    assert worker.channels.buffered_bytes == 100 + MESSAGE_OVERHEAD_BYTES
    worker.channels.expire(worker._clock() + 2)
    assert worker.channels.buffered_bytes == 0


def test_http_publish_past_a_quota_is_answered_507(tmp_path):
    """The edge answers a publish the worker refuses by quota with 507 and the reason."""
    limits = "\n[limits]\nmax_channels_per_worker = 2\n"
    with Cluster(tmp_path, extra_config=limits) as cluster:
        names = [channel_on("w1", cluster.worker_ids, f"/quota{i}") for i in range(3)]
        assert [request(cluster.url(n), "PUT", b"m").status for n in names[:2]] == [202, 202]
        refused = request(cluster.url(names[2]), "PUT", b"m")
        assert refused.status == 507 and b"max_channels_per_worker" in refused.body
        assert request(cluster.url(names[0]), "PUT", b"m").status == 202


def test_the_store_stops_growing_at_its_quota(tmp_path):
    """With max_store_bytes_per_worker set, publishes are refused once the store's pages
    in use reach it: what the worker stored is bounded by the quota."""
    quota = 256 * 1024
    limits = f"\n[limits]\nmax_store_bytes_per_worker = {quota}\n"
    with Cluster(tmp_path, worker_ids=("w1",), extra_config=limits) as cluster:
        body = os.urandom(16 * 1024)
        statuses = []
        for _ in range(100):
            statuses.append(request(cluster.url("/store-quota"), "PUT", body,
                                    {"X-Firehose-Buffer-Size": "1000"}).status)
            if statuses[-1] != 202:
                break
        accepted = statuses.count(202)
        assert statuses[-1] == 507
        # Every accepted message is in the store: at most the quota and one message more.
        assert accepted * len(body) <= quota + len(body)
        files = [p for p in cluster.data_dir.iterdir() if p.name.startswith("w1.sqlite3")]
        print(f"\nstore quota {quota}: {accepted} x 16 KiB accepted; files "
              f"{sum(p.stat().st_size for p in files)} bytes")
