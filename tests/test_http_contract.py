"""The HTTP contract (docs/protocol.md §1-5, §9) as a client sees it, against real processes."""

import itertools
import json

import pytest

from .cluster import channel_on
from .http import request


@pytest.fixture(scope="module")
def cluster(cluster_on_both_paths):
    """This module's tests run on both serving paths."""
    return cluster_on_both_paths

_names = itertools.count()


def fresh(prefix="/t"):
    """A channel name no other test uses."""
    return f"{prefix}/{next(_names)}"


def publish(cluster, channel, body=b"x", headers=None):
    return request(cluster.url(channel), "PUT", body, headers)


def test_publish_answers_202_with_empty_body_and_sequence(cluster):
    """A publish gets 202, an empty body and X-Firehose-Sequence 1, 2, 3."""
    channel = fresh()
    for expected in (1, 2, 3):
        r = publish(cluster, channel, b"hello")
        assert r.status == 202
        assert r.body == b""
        assert r.header("Content-Length") == "0"
        assert r.header("X-Firehose-Sequence") == str(expected)


def test_long_poll_returns_newest_then_resumes_in_order(cluster):
    """A new subscriber gets the newest message; one that resumes gets the next in order."""
    channel = fresh()
    for i in range(1, 4):
        publish(cluster, channel, f"m{i}".encode())
    r = request(cluster.url(channel))
    assert r.status == 200
    assert r.body == b'{"message":"m3","last_sequence":3}'
    assert r.header("Content-Type").startswith("application/json")
    r = request(cluster.url(channel + "?last_message_sequence=1"))
    assert json.loads(r.body) == {"message": "m2", "last_sequence": 2}


def test_reply_keys_are_compact_and_ordered(cluster):
    """The body is compact JSON with message before last_sequence, payload as a string."""
    channel = fresh()
    publish(cluster, channel, b'{"a": [1, 2]}')
    assert request(cluster.url(channel)).body == \
        b'{"message":"{\\"a\\": [1, 2]}","last_sequence":1}'


def test_invalid_utf8_payload_is_replaced_in_json(cluster):
    """Bytes that are not UTF-8 reach JSON clients as U+FFFD."""
    channel = fresh()
    publish(cluster, channel, b"ok\xff")
    assert json.loads(request(cluster.url(channel)).body)["message"] == "ok\ufffd"


def test_caught_up_subscriber_waits_then_gets_204(cluster):
    """Nothing new within the long-poll timeout (3 s here) answers 204 with no body."""
    channel = fresh()
    publish(cluster, channel)
    r = request(cluster.url(channel + "?last_message_sequence=1"))
    assert r.status == 204
    assert r.body == b""


def test_ahead_after_reset_gets_next_publish(cluster):
    """A client ahead of the channel (after a reset) gets the next publish whatever its sequence."""
    import threading
    channel = fresh()
    publish(cluster, channel, b"one")
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        r=request(cluster.url(channel + "?last_message_sequence=50"))))
    waiter.start()
    # The waiter is registered once the edge counts its subscription.
    wait_for_metric(cluster, channel, "subscribed", 1)
    publish(cluster, channel, b"two")
    waiter.join(10)
    assert json.loads(result["r"].body) == {"message": "two", "last_sequence": 2}


def wait_for_metric(cluster, channel, name, at_least, timeout_s=5.0):
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = json.loads(request(cluster.url("/metrics@firehose")).body)
        total = sum(b["channels"].get(channel, {}).get(name, 0) for b in report)
        if total >= at_least:
            return
    raise AssertionError(f"metric {name} of {channel} never reached {at_least}")


@pytest.mark.parametrize("query, reason", [
    ("last_message_sequence=-1", None),
    ("last_message_sequence=abc", b"must be an integer"),
    ("last_message_sequence=1.5", b"must be an integer"),
])
def test_bad_sequence_is_400(cluster, query, reason):
    """A negative or non-integer last_message_sequence is a 400 with a reason."""
    r = request(cluster.url(f"{fresh()}?{query}"))
    assert r.status == 400
    if reason is None:  # Firehose's exact text
        assert r.body == b"The last_message_sequence parameter may not be less than zero"
    else:
        assert reason in r.body


def test_empty_sequence_means_zero(cluster):
    """An empty last_message_sequence is 0: the newest message."""
    channel = fresh()
    publish(cluster, channel, b"a")
    publish(cluster, channel, b"b")
    assert json.loads(request(cluster.url(channel + "?last_message_sequence=")).body)[
        "last_sequence"] == 2


@pytest.mark.parametrize("path, reason", [
    ("/a!b", b"'!'"),
    ("/a,b", b"','"),
    ("/" + "x" * 1024, b"longer than 1024"),
    ("/a%00", None),
])
def test_bad_channel_names(cluster, path, reason):
    """Names with ! or , or over 1024 bytes are refused with 400 and store nothing."""
    r = publish(cluster, path)
    if reason is None:  # percent-encoded bytes are just characters of the raw path
        assert r.status == 202
        return
    assert r.status == 400
    assert reason in r.body
    assert request(cluster.url(path)).status == 400


def test_channel_name_is_raw_path(cluster):
    """/a and /a/ are different channels, and %41 is not A."""
    base = fresh()
    publish(cluster, base, b"plain")
    publish(cluster, base + "/", b"slash")
    publish(cluster, base + "%41", b"encoded")
    assert json.loads(request(cluster.url(base)).body)["message"] == "plain"
    assert json.loads(request(cluster.url(base + "/")).body)["message"] == "slash"
    assert json.loads(request(cluster.url(base + "%41")).body)["message"] == "encoded"
    assert request(cluster.url(base + "A?last_message_sequence=0")).status == 204


def test_query_string_is_not_part_of_channel(cluster):
    """A publish with a query string goes to the path's channel."""
    channel = fresh()
    publish(cluster, channel + "?foo=bar", b"q")
    assert json.loads(request(cluster.url(channel)).body)["message"] == "q"


@pytest.mark.parametrize("headers", [
    {"X-Firehose-Buffer-Size": "-1"},
    {"X-Firehose-Buffer-Size": "abc"},
    {"X-Firehose-Buffer-Size": "10001"},
    {"Cache-Control": "max-age=abc"},
    {"Cache-Control": "max-age=-5"},
    {"X-Firehose-TTL": "1.5"},
])
def test_bad_publish_headers_are_400_and_store_nothing(cluster, headers):
    """Bad buffer sizes and TTLs get 400, and nothing is published."""
    channel = fresh()
    r = publish(cluster, channel, b"no", headers)
    assert r.status == 400
    assert r.body.strip()
    assert b"\n" not in r.body.strip()
    assert publish(cluster, channel, b"yes").header("X-Firehose-Sequence") == "1"


def test_buffer_size_trims_history(cluster):
    """With X-Firehose-Buffer-Size 2, a subscriber 3 behind gets only the newest."""
    channel = fresh()
    for i in range(1, 4):
        publish(cluster, channel, f"m{i}".encode(), {"X-Firehose-Buffer-Size": "2"})
    assert json.loads(request(cluster.url(channel + "?last_message_sequence=1")).body) == \
        {"message": "m2", "last_sequence": 2}
    assert json.loads(request(cluster.url(channel + "?last_message_sequence=0")).body)[
        "last_sequence"] == 3
    publish(cluster, channel, b"m4", {"X-Firehose-Buffer-Size": "1"})
    assert json.loads(request(cluster.url(channel + "?last_message_sequence=2")).body) == \
        {"message": "m4", "last_sequence": 4}


def test_ttl_expiry_restarts_sequence(cluster):
    """A channel whose TTL passed is gone; the next publish starts at 1."""
    channel = fresh()
    publish(cluster, channel, b"old", {"Cache-Control": "public, Max-Age=0"})
    assert request(cluster.url(channel + "?last_message_sequence=0")).status == 204
    assert publish(cluster, channel, b"new").header("X-Firehose-Sequence") == "1"


def test_x_firehose_ttl_wins_over_max_age(cluster):
    """X-Firehose-TTL overrides Cache-Control max-age."""
    channel = fresh()
    publish(cluster, channel, b"kept", {"Cache-Control": "max-age=0", "X-Firehose-TTL": "60"})
    assert request(cluster.url(channel)).status == 200


def test_persist_keeps_channel(cluster):
    """X-Firehose-Persist: true means no expiry, even with max-age=0."""
    channel = fresh()
    publish(cluster, channel, b"kept", {"Cache-Control": "max-age=0", "X-Firehose-Persist": "true"})
    assert request(cluster.url(channel)).status == 200


def test_body_over_limit_is_413(cluster):
    """A body over 5 MiB gets 413."""
    r = publish(cluster, fresh(), b"x" * (5 * 1024 * 1024 + 1))
    assert r.status == 413


def test_body_at_limit_is_accepted(cluster):
    """A body of exactly 5 MiB is published and delivered whole."""
    channel = fresh()
    assert publish(cluster, channel, b"y" * (5 * 1024 * 1024)).status == 202
    assert len(json.loads(request(cluster.url(channel)).body)["message"]) == 5 * 1024 * 1024


def test_empty_body_is_a_message(cluster):
    """An empty body is a message like any other."""
    channel = fresh()
    assert publish(cluster, channel, b"").status == 202
    assert json.loads(request(cluster.url(channel)).body) == {"message": "", "last_sequence": 1}


@pytest.mark.parametrize("method", ["POST", "PATCH", "FOO"])
def test_other_methods_are_405_with_allow(cluster, method):
    """Methods other than GET/PUT/HEAD/OPTIONS/DELETE on a channel: 405 with Allow: GET."""
    r = request(cluster.url(fresh()), method, b"")
    assert r.status == 405
    assert r.header("Allow") == "GET"


def test_cors_origin_is_echoed(cluster):
    """A request with Origin gets Access-Control-Allow-Origin with that origin."""
    channel = fresh()
    r = publish(cluster, channel, b"c", {"Origin": "http://example.test"})
    assert r.header("Access-Control-Allow-Origin") == "http://example.test"
    r = request(cluster.url(channel), headers={"Origin": "http://other.test"})
    assert r.header("Access-Control-Allow-Origin") == "http://other.test"
    assert request(cluster.url(channel)).header("Access-Control-Allow-Origin") is None


def test_options_answers_preflight_for_reading_only_without_an_allow_list(cluster):
    """Without a CORS allow-list, the preflight lets other origins read, not write."""
    r = request(cluster.url(fresh()), "OPTIONS", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "x-firehose-ttl"})
    assert r.status == 204
    assert r.header("Access-Control-Allow-Origin") == "http://example.test"
    methods = {m.strip() for m in r.header("Access-Control-Allow-Methods").split(",")}
    assert "GET" in methods and "HEAD" in methods
    assert not methods & {"PUT", "DELETE", "POST"}
    assert r.header("Access-Control-Allow-Headers") == "x-firehose-ttl"


def test_delete_removes_channel(cluster):
    """DELETE answers 204 and the channel starts again at 1."""
    channel = fresh()
    publish(cluster, channel)
    publish(cluster, channel)
    assert request(cluster.url(channel), "DELETE").status == 204
    assert publish(cluster, channel).header("X-Firehose-Sequence") == "1"


def test_head_is_health(cluster):
    """HEAD on any path is 200 when its owner is reachable, 400 for a bad name."""
    assert request(cluster.url(fresh()), "HEAD").status == 200
    assert request(cluster.url("/metrics@firehose"), "HEAD").status == 200
    assert request(cluster.url("/a!b"), "HEAD").status == 400


def test_reserved_paths(cluster):
    """Unknown @firehose paths are 404; publishing to one is 400."""
    assert request(cluster.url("/nope@firehose")).status == 404
    assert publish(cluster, "/nope@firehose").status == 400
    assert publish(cluster, "/metrics@firehose").status == 400
    assert publish(cluster, "/channels@firehose").status == 400


def test_channels_land_on_both_workers(cluster):
    """Channels are spread over both workers and each serves its own."""
    for worker_id in cluster.worker_ids:
        channel = channel_on(worker_id, cluster.worker_ids, fresh())
        assert publish(cluster, channel, worker_id.encode()).status == 202
        assert json.loads(request(cluster.url(channel)).body)["message"] == worker_id


def test_metrics_report_time_buckets(cluster):
    """/metrics@firehose is a JSON array of buckets with global and per-channel counters."""
    channel = fresh()
    publish(cluster, channel)
    request(cluster.url(channel))
    report = json.loads(request(cluster.url("/metrics@firehose")).body)
    assert isinstance(report, list) and report
    assert [b["time"] for b in report] == sorted(b["time"] for b in report)
    newest = report[-1]
    assert set(newest) == {"time", "global", "channels"}
    published = sum(b["channels"].get(channel, {}).get("published", 0) for b in report)
    subscribed = sum(b["channels"].get(channel, {}).get("subscribed", 0) for b in report)
    assert (published, subscribed) == (1, 1)
    assert newest["global"]["connections"] >= 1
    assert request(cluster.url("/metrics@firehose"), "POST", b"").status == 200


def raw_exchange(cluster, head: bytes, body_chunks=(), timeout_s=10.0) -> bytes:
    """Send a hand-made request and return everything the server answers until it
    has sent one whole response (or closes)."""
    import socket
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=timeout_s) as s:
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                return data
            data += more
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head_part.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            more = s.recv(65536)
            if not more:
                break
            rest += more
        return head_part + b"\r\n\r\n" + rest


def test_chunked_body_over_limit_is_413(cluster):
    """A chunked PUT over 5 MiB gets 413 (after its body), not a reset."""
    chunk = b"x" * (1024 * 1024)
    framed = [b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(6)] + [b"0\r\n\r\n"]
    answer = raw_exchange(cluster, f"PUT {fresh()} HTTP/1.1\r\nHost: x\r\n"
                                   "Transfer-Encoding: chunked\r\n\r\n".encode(), framed)
    assert answer.startswith(b"HTTP/1.1 413")


def test_chunked_body_within_limit_is_published(cluster):
    channel = fresh()
    framed = [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]
    answer = raw_exchange(cluster, f"PUT {channel} HTTP/1.1\r\nHost: x\r\n"
                                   "Transfer-Encoding: chunked\r\n\r\n".encode(), framed)
    assert answer.startswith(b"HTTP/1.1 202")
    assert json.loads(request(cluster.url(channel)).body)["message"] == "hello world"


def test_get_with_a_body_is_still_a_long_poll(cluster):
    """A long-poll that (oddly) carries a body is answered like any other."""
    channel = fresh()
    publish(cluster, channel, b"m")
    answer = raw_exchange(cluster, f"GET {channel} HTTP/1.1\r\nHost: x\r\n"
                                   "Content-Length: 5\r\n\r\nhello".encode())
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b'{"message":"m","last_sequence":1}')


@pytest.mark.parametrize("head", [
    "GET /t/x?last_message_sequence=\xb2 HTTP/1.1\r\nHost: x\r\n\r\n",
    "PUT /t/x HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",
])
def test_non_ascii_digits_are_a_400_not_a_crash(cluster, head):
    """Latin-1 digits like '²' are not numbers."""
    answer = raw_exchange(cluster, head.encode("latin-1"))
    assert answer.startswith(b"HTTP/1.1 400")


def test_204_has_no_content_length(cluster):
    """A timed-out long-poll's 204 carries no body and no Content-Length."""
    channel = fresh()
    publish(cluster, channel, b"m")
    r = request(cluster.url(channel + "?last_message_sequence=1"))
    assert r.status == 204
    assert r.header("Content-Length") is None
