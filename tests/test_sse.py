"""Server-Sent Events (docs/protocol.md §7), against real processes."""

import http.client
import itertools
import json

import pytest

from .cluster import Cluster, SERVING_PATHS
from .http import request
from .streamclient import EventStreamReader, global_counter

_names = itertools.count()


def fresh():
    return f"/sse/{next(_names)}"


@pytest.fixture(scope="module", params=sorted(SERVING_PATHS))
def sse_cluster(request, tmp_path_factory):
    """A cluster whose event streams send keep-alive comments every 0.2 s, its edge
    reading requests on the fast path or through Tornado."""
    with Cluster(tmp_path_factory.mktemp("sse"), extra_config="sse_keepalive_s = 0.2",
                 edge_args=SERVING_PATHS[request.param]) as c:
        yield c


def publish(cluster, channel, body):
    assert request(cluster.url(channel), "PUT", body.encode()).status == 202


def test_event_stream_replays_multiline_payloads_then_streams(sse_cluster):
    """Events carry id: <seq> and one data: line per payload line; live events follow."""
    channel = fresh()
    publish(sse_cluster, channel, "m1")
    publish(sse_cluster, channel, "line one\nline two\r\nline three")
    stream = EventStreamReader(sse_cluster.url(channel + "?last_message_sequence=1"))
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.read_block() == ["retry: 2000"]
        assert stream.read_block() == ["id: 2", "data: line one", "data: line two",
                                       "data: line three"]
        publish(sse_cluster, channel, "m3")
        assert stream.read_event() == {"id": "3", "data": "m3"}
    finally:
        stream.close()


def test_new_subscriber_gets_newest_only(sse_cluster):
    """Without a sequence the stream starts with the newest message."""
    channel = fresh()
    for i in range(1, 4):
        publish(sse_cluster, channel, f"m{i}")
    stream = EventStreamReader(sse_cluster.url(channel))
    try:
        assert stream.read_event() == {"id": "3", "data": "m3"}
    finally:
        stream.close()


def test_last_event_id_wins_over_last_message_sequence(sse_cluster):
    """A browser reconnects with its original URL and Last-Event-ID: the header wins."""
    channel = fresh()
    for i in range(1, 5):
        publish(sse_cluster, channel, f"m{i}")
    stream = EventStreamReader(sse_cluster.url(channel + "?last_message_sequence=0"),
                               {"Last-Event-ID": "2"})
    try:
        assert stream.read_event() == {"id": "3", "data": "m3"}
        assert stream.read_event() == {"id": "4", "data": "m4"}
    finally:
        stream.close()


def test_bad_sequences_are_400(sse_cluster):
    """A bad last_message_sequence or Last-Event-ID gets 400 with a reason."""
    for path, headers in ((fresh() + "?last_message_sequence=-1", {}),
                          (fresh(), {"Last-Event-ID": "abc"}),
                          ("/channels@firehose?subscribe=/a!0", {"Last-Event-ID": "/a!x"})):
        r = request(sse_cluster.url(path), headers={"Accept": "text/event-stream", **headers})
        assert r.status == 400, path
        assert r.body


def test_keep_alive_comments_and_cors(sse_cluster):
    """An idle stream gets comment lines; a request with Origin gets CORS headers."""
    stream = EventStreamReader(sse_cluster.url(fresh()), {"Origin": "http://page.example"})
    try:
        assert stream.headers["access-control-allow-origin"] == "http://page.example"
        assert stream.read_block() == ["retry: 2000"]
        assert stream.read_block() == [": keep-alive"]
        assert stream.read_block() == [": keep-alive"]
    finally:
        stream.close()


def test_multiplexed_event_stream_and_resume(sse_cluster):
    """/channels@firehose?subscribe= streams every channel; the event id resumes them all."""
    a, b = fresh(), fresh() + "/100%25"  # b's name holds a literal "%25"
    in_query = b.replace("%", "%25")
    publish(sse_cluster, a, "a1")
    url = sse_cluster.url(f"/channels@firehose?subscribe={a}!0,{in_query}!0")
    stream = EventStreamReader(url)
    try:
        first = stream.read_event()
        assert json.loads(first["data"]) == {"channel": a, "message": "a1", "last_sequence": 1}
        assert first["id"] == f"{a}!1,{in_query}!0"
        publish(sse_cluster, b, "b1")
        second = stream.read_event()
        assert json.loads(second["data"]) == {"channel": b, "message": "b1",
                                              "last_sequence": 1}
        last_id = second["id"]
        assert last_id == f"{a}!1,{in_query}!1"
    finally:
        stream.close()
    publish(sse_cluster, a, "a2")
    publish(sse_cluster, b, "b2")
    resumed = EventStreamReader(url, {"Last-Event-ID": last_id})
    try:
        got = {}
        for _ in range(2):
            event = json.loads(resumed.read_event()["data"])
            got[event["channel"]] = (event["message"], event["last_sequence"])
        assert got == {a: ("a2", 2), b: ("b2", 2)}
    finally:
        resumed.close()


def test_long_poll_is_unchanged_without_the_accept_header(sse_cluster):
    """Without Accept: text/event-stream a GET is still a long-poll."""
    channel = fresh()
    publish(sse_cluster, channel, "m1")
    r = request(sse_cluster.url(channel))
    assert r.body == b'{"message":"m1","last_sequence":1}'


def test_slow_event_stream_reader_is_cut_and_counted(tmp_path):
    """An event-stream client that stops reading is disconnected and counted."""
    config = "stream_queue_limit_bytes = 65536"
    with Cluster(tmp_path, extra_config=config) as cluster:
        channel = fresh()
        stream = EventStreamReader(cluster.url(channel))
        assert stream.read_block() == ["retry: 2000"]
        payload = "y" * (64 * 1024)
        for n in range(1, 1001):
            publish(cluster, channel, payload)
            if n % 10 == 0 and global_counter(cluster, "slow_readers_closed") >= 1:
                break
        assert global_counter(cluster, "slow_readers_closed") == 1
        with pytest.raises((EOFError, ConnectionError, http.client.IncompleteRead)):
            for _ in range(n + 1):
                stream.read_event()
        stream.close()
