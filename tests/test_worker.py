"""The worker's request handling, on inproc sockets (no network, no event loop)."""

import itertools

import msgpack
import pytest
import zmq

from firehose_zmq.wire import frames
from firehose_zmq.config import ClusterConfig, Limits, WorkerConfig
from firehose_zmq.worker.server import Worker

_ids = itertools.count()


@pytest.fixture
def worker():
    n = next(_ids)
    config = ClusterConfig(
        workers=(WorkerConfig("w1", f"inproc://r{n}", f"inproc://r{n}", f"inproc://p{n}",
                              f"inproc://p{n}"),),
        limits=Limits(max_message_bytes=1000, default_buffer_size=100, max_buffer_size=200))
    w = Worker(config, "w1", context=zmq.Context.instance())
    w.bind()
    yield w
    w.close()


def call(worker, **request):
    request.setdefault("id", next(_ids))
    return msgpack.unpackb(worker.handle_request(frames.encode_request(request)), raw=False)


def test_publish_then_fetch_since(worker):
    """Publishes are numbered and fetch applies the buffer rules."""
    for i in range(3):
        assert call(worker, op="publish", channel="/a", data=b"m%d" % i)["seq"] == i + 1
    reply = call(worker, op="fetch", channel="/a", since=1)
    assert reply["messages"] == [[2, b"m1"], [3, b"m2"]]
    assert reply["seq"] == 3
    assert call(worker, op="fetch", channel="/a", since=0)["messages"] == [[3, b"m2"]]
    assert call(worker, op="fetch", channel="/a", since=1, limit=1)["messages"] == [[2, b"m1"]]


def test_fetch_reply_is_capped_at_one_message_worth_of_bytes(worker):
    """Big messages come back a reply at a time; each reply holds at least one."""
    for _ in range(4):
        call(worker, op="publish", channel="/big", data=b"x" * 600)
    first = call(worker, op="fetch", channel="/big", since=0, after=True)
    assert [m[0] for m in first["messages"]] == [1]
    assert first["seq"] == 4
    rest = call(worker, op="fetch", channel="/big", since=1, after=True)
    assert [m[0] for m in rest["messages"]] == [2]


def test_publish_limits(worker):
    """Oversized messages and buffer sizes are refused with a reason."""
    too_big = call(worker, op="publish", channel="/a", data=b"x" * 1001)
    assert (too_big["ok"], too_big["error"]) == (False, "too_large")
    buffer = call(worker, op="publish", channel="/a", data=b"", buffer_size=201)
    assert (buffer["ok"], buffer["error"]) == (False, "bad_request")
    assert call(worker, op="fetch", channel="/a", since=0)["seq"] == 0
