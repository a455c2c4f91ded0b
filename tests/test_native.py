"""The native ZeroMQ endpoints of an edge (docs/protocol.md §10), spoken with plain pyzmq."""

import itertools

import msgpack
import pytest
import zmq

from .cluster import channel_on
from .http import request

_names = itertools.count()
TIMEOUT_MS = 5000


def fresh(prefix="/native"):
    return f"{prefix}/{next(_names)}"




def dealer(ctx, cluster):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    sock.connect(cluster.native_router)
    return sock


def call(sock, request: dict) -> dict:
    sock.send(msgpack.packb({"v": 1, **request}))
    return msgpack.unpackb(sock.recv())


def subscriber(ctx, cluster, *channels):
    """A SUB socket whose subscriptions have reached the workers (checked with a probe)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    sock.connect(cluster.native_pub)
    for channel in channels:
        sock.setsockopt(zmq.SUBSCRIBE, channel.encode() + b"\x00")
    return sock


def await_subscribed(sock, cluster, channel):
    """Publish markers until one arrives: the subscription has landed everywhere.

    Every wait is bounded by the socket's receive timeout; each marker has a
    larger sequence, so the loop ends as soon as the subscription is through.
    """
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    for attempt in range(50):
        assert request(cluster.url(channel), "PUT", b"marker").status == 202
        if poller.poll(100):
            topic, body = sock.recv_multipart()
            return msgpack.unpackb(body)["seq"]
    raise AssertionError(f"subscription to {channel} never landed")


def test_native_subscriber_gets_http_publishes_with_fields(cluster, ctx):
    """A SUB on the native endpoint gets [topic, map] with channel, seq, epoch, data, ttl."""
    channel = fresh()
    sub = subscriber(ctx, cluster, channel)
    marker = await_subscribed(sub, cluster, channel)
    assert request(cluster.url(channel), "PUT", b"\x00\xffbinary",
                   {"Cache-Control": "max-age=60"}).status == 202
    while True:
        topic, body = sub.recv_multipart()
        message = msgpack.unpackb(body)
        if message["seq"] > marker:
            break
    assert topic == channel.encode() + b"\x00"
    assert message["channel"] == channel
    assert message["seq"] == marker + 1
    assert message["data"] == b"\x00\xffbinary"
    assert isinstance(message["epoch"], int) and 0 < message["ttl"] <= 60


def test_topics_are_exact(cluster, ctx):
    """A subscriber of /a never gets /ab or /a/b."""
    base = fresh()
    sub = subscriber(ctx, cluster, base)
    await_subscribed(sub, cluster, base)
    for other in (base + "b", base + "/b", base + "/"):
        assert request(cluster.url(other), "PUT", b"other").status == 202
    assert request(cluster.url(base), "PUT", b"mine").status == 202
    seen = []
    while True:
        topic, body = sub.recv_multipart()
        message = msgpack.unpackb(body)
        seen.append(message["channel"])
        if message["data"] == b"mine":
            break
    assert set(seen) == {base}


def test_publish_and_fetch_over_the_request_endpoint(cluster, ctx):
    """publish answers seq and epoch; fetch follows docs/protocol.md §5 and 'after' gives all."""
    sock = dealer(ctx, cluster)
    channel = fresh()
    replies = [call(sock, {"id": i, "op": "publish", "channel": channel, "data": b"m%d" % i})
               for i in range(1, 4)]
    assert [r["seq"] for r in replies] == [1, 2, 3]
    assert all(r["ok"] and r["id"] == i for i, r in enumerate(replies, 1))
    assert len({r["epoch"] for r in replies}) == 1
    newest = call(sock, {"id": "f", "op": "fetch", "channel": channel, "since": 0})
    assert newest["messages"] == [[3, b"m3"]] and newest["seq"] == 3
    after = call(sock, {"id": b"g", "op": "fetch", "channel": channel, "since": 1, "after": True})
    assert after["id"] == b"g" and after["messages"] == [[2, b"m2"], [3, b"m3"]]
    # and HTTP sees the natively published message
    assert request(cluster.url(channel)).body == b'{"message":"m3","last_sequence":3}'


def test_request_endpoint_routes_to_every_owner(cluster, ctx):
    """Channels of both workers are published and fetched through one endpoint."""
    sock = dealer(ctx, cluster)
    for worker_id in cluster.worker_ids:
        channel = channel_on(worker_id, cluster.worker_ids, prefix=fresh())
        reply = call(sock, {"id": 1, "op": "publish", "channel": channel, "data": b"x"})
        assert reply["ok"] and reply["seq"] == 1


def test_req_socket_is_answered_too(cluster, ctx):
    """A REQ socket (empty delimiter frame) gets its reply."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    sock.connect(cluster.native_router)
    reply = call(sock, {"id": 7, "op": "ping"})
    assert reply["ok"] and reply["id"] == 7 and set(reply["workers"]) == {"w1", "w2"}
    sock.close()


@pytest.mark.parametrize("frames, code", [
    ([b"not msgpack \xc1"], "bad_request"),
    ([msgpack.packb([1, 2])], "bad_request"),
    ([msgpack.packb({"v": 1, "id": 1, "op": "publish", "channel": "/x", "data": "str"})],
     "bad_request"),
    ([msgpack.packb({"v": 1, "id": 1, "op": "fetch", "channel": "no-slash", "since": 0})],
     "bad_request"),
    ([msgpack.packb({"v": 1, "id": 1, "op": "publish", "channel": "/x@firehose", "data": b""})],
     "bad_request"),
    ([msgpack.packb({"v": 2, "id": 1, "op": "ping"})], "unsupported_version"),
    ([msgpack.packb({"v": 1, "id": 1, "op": "nope"})], "bad_request"),
    ([b"a", b"b", msgpack.packb({"v": 1, "id": 1, "op": "ping"})], "bad_request"),
    ([msgpack.packb({"v": 1, "id": 1, "op": "publish", "channel": "/x",
                     "data": b"x" * (5 * 1024 * 1024 + 1)})], "too_large"),
])
def test_bad_requests_get_error_replies_and_disturb_nobody(cluster, ctx, frames, code):
    """A malformed request gets an error reply; the endpoint keeps serving."""
    sock = dealer(ctx, cluster)
    sock.send_multipart(frames)
    reply = msgpack.unpackb(sock.recv())
    assert reply["ok"] is False and reply["error"] == code and reply["reason"]
    assert call(sock, {"id": 2, "op": "ping"})["ok"] is True


def test_garbage_on_the_subscribe_endpoint_is_dropped(cluster, ctx):
    """Data frames sent to the subscribe endpoint are dropped; subscribers keep receiving."""
    channel = fresh()
    rogue = ctx.socket(zmq.XSUB)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(cluster.native_pub)
    rogue.send_multipart([b"\x05junk", b"more"])
    rogue.send(b"")
    cluster.edge.wait_for("native: rejected frame .*not a subscription")
    sub = subscriber(ctx, cluster, channel)
    await_subscribed(sub, cluster, channel)
    rogue.close()


def test_the_documented_plain_pyzmq_example_runs(tmp_path):
    """The example of docs/native-zeromq.md, run as written against a fresh cluster."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from .cluster import Cluster

    doc = (Path(__file__).parent.parent / "docs" / "native-zeromq.md").read_text()
    example = re.search(r"## Example with plain pyzmq\n+```python\n(.*?)```", doc, re.S).group(1)
    assert len(example.splitlines()) <= 16
    with Cluster(tmp_path) as cluster:
        prelude = (f"PUB_ENDPOINT = {cluster.native_pub!r}\n"
                   f"ROUTER_ENDPOINT = {cluster.native_router!r}\n")
        # The example blocks on recv: run it in a child bounded by a timeout.
        done = subprocess.run([sys.executable, "-c", prelude + example], capture_output=True,
                              text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "'ok': True" in lines[0] and "'seq': 1" in lines[0]
    assert lines[1] == "[[1, b'hi']]"
    assert lines[2].startswith("b'/chat\\x00' {'channel': '/chat', 'seq': 1")
