"""A worker killed and restarted; malformed ZeroMQ frames; all on real processes."""

import time

import msgpack
import zmq

from .cluster import channel_on
from .http import request


def test_killed_worker_answers_503_at_once_and_recovers(fresh_cluster):
    """Its channels get 503 quickly, the other worker's keep working, and after restart all serve."""
    cluster = fresh_cluster
    on_w1 = channel_on("w1", cluster.worker_ids, "/kill")
    on_w2 = channel_on("w2", cluster.worker_ids, "/kill")
    assert request(cluster.url(on_w1), "PUT", b"a").status == 202

    mark = len(cluster.edge.lines)
    cluster.kill_worker("w1")
    cluster.edge.wait_for("worker w1 down", start=mark)
    started = time.monotonic()
    r = request(cluster.url(on_w1), "PUT", b"b")
    assert r.status == 503
    assert b"w1" in r.body
    assert request(cluster.url(on_w1)).status == 503
    assert request(cluster.url(on_w1), "HEAD").status == 503
    # "At once": well inside the 3 s request deadline, not after it.
    assert time.monotonic() - started < 1.5
    assert request(cluster.url(on_w2), "PUT", b"c").status == 202
    assert request(cluster.url(on_w2)).status == 200

    mark = len(cluster.edge.lines)
    cluster.start_worker("w1")
    cluster.edge.wait_for("worker w1 up", start=mark)
    r = request(cluster.url(on_w1), "PUT", b"d")
    assert r.status == 202
    assert request(cluster.url(on_w1), "HEAD").status == 200


def test_worker_rejects_malformed_frames_and_keeps_serving(cluster):
    """Garbage on the worker's ROUTER gets error replies, is counted, and disturbs nothing."""
    router_endpoint = cluster.endpoints["w1"][0]
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(router_endpoint)
    try:
        bad_bodies = [
            b"\xc1not msgpack",
            msgpack.packb({"v": 99, "id": 1, "op": "ping"}),
            msgpack.packb({"v": 1, "id": 2, "op": "launch"}),
            msgpack.packb({"v": 1, "id": 3, "op": "publish", "channel": "no-slash", "data": b""}),
            msgpack.packb({"v": 1, "id": 4, "op": "fetch", "channel": "/a", "since": "x"}),
        ]
        for body in bad_bodies:
            dealer.send(body)
            reply = msgpack.unpackb(dealer.recv(), raw=False)
            assert reply["ok"] is False
            assert reply["error"] in ("bad_request", "unsupported_version", "not_owner")
            assert reply["reason"]
        # A batch of things that are not requests: each gets its own error, together.
        dealer.send(msgpack.packb([1, [2], {"v": 1, "id": 5, "op": "ping"}]))
        replies = msgpack.unpackb(dealer.recv(), raw=False)
        assert [(r["ok"], r.get("error")) for r in replies] == [
            (False, "bad_request"), (False, "bad_request"), (True, None)]
        assert replies[2]["id"] == 5
        dealer.send(msgpack.packb({"v": 1, "id": "ok", "op": "ping"}))
        assert msgpack.unpackb(dealer.recv(), raw=False)["ok"] is True
    finally:
        dealer.close(linger=0)
    cluster.workers["w1"].wait_for(r"rejected frame \(6 so far\)")
    channel = channel_on("w1", cluster.worker_ids, "/after-garbage")
    assert request(cluster.url(channel), "PUT", b"fine").status == 202


def test_worker_refuses_a_channel_it_does_not_own(cluster):
    """A request for another worker's channel names the ring version."""
    channel = channel_on("w2", cluster.worker_ids, "/not-mine")
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(cluster.endpoints["w1"][0])
    try:
        dealer.send(msgpack.packb({"v": 1, "id": 1, "op": "publish", "channel": channel,
                                   "data": b"x"}))
        reply = msgpack.unpackb(dealer.recv(), raw=False)
    finally:
        dealer.close(linger=0)
    assert (reply["ok"], reply["error"]) == (False, "not_owner")
    assert reply["ring"] in reply["reason"]


def test_multiplexed_poll_survives_one_dead_owner(fresh_cluster):
    """A multiplexed long-poll keeps waiting on live channels when another's owner is down."""
    import json
    import threading
    cluster = fresh_cluster
    on_w1 = channel_on("w1", cluster.worker_ids, "/mx-dead")
    on_w2 = channel_on("w2", cluster.worker_ids, "/mx-live")
    mark = len(cluster.edge.lines)
    cluster.kill_worker("w1")
    cluster.edge.wait_for("worker w1 down", start=mark)
    result = {}
    poll = threading.Thread(target=lambda: result.update(r=request(
        cluster.url(f"/channels@firehose?subscribe={on_w1}!0,{on_w2}!0"))))
    poll.start()
    # Publish until the poll (whatever moment it registered) has taken a message.
    for n in range(50):
        assert request(cluster.url(on_w2), "PUT", b"live %d" % n).status == 202
        poll.join(0.1)
        if not poll.is_alive():
            break
    poll.join(5)
    assert result["r"].status == 200
    assert json.loads(result["r"].body)["channel"] == on_w2
    # With every channel unavailable the answer is 503.
    assert request(cluster.url(f"/channels@firehose?subscribe={on_w1}!0")).status == 503


def test_event_stream_on_a_dead_owner_is_503(fresh_cluster):
    """An event stream that cannot start says so with 503, like a long-poll."""
    cluster = fresh_cluster
    on_w1 = channel_on("w1", cluster.worker_ids, "/sse-dead")
    mark = len(cluster.edge.lines)
    cluster.kill_worker("w1")
    cluster.edge.wait_for("worker w1 down", start=mark)
    r = request(cluster.url(on_w1), headers={"Accept": "text/event-stream"})
    assert r.status == 503
    assert b"w1" in r.body
