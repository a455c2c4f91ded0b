"""The HTTP contract's parsing and formatting, without a server."""

import pytest

from firehose_zmq.wire import http
from firehose_zmq.wire.http import HttpError


def headers(**values):
    return {k.replace("_", "-"): v for k, v in values.items()}


def parse(h, max_buffer=10000):
    fields = {name.lower(): value for name, value in h.items()}
    return http.parse_publish_headers(fields, 86400, 100, max_buffer)


def test_publish_defaults():
    assert parse({}) == (86400, 100)


@pytest.mark.parametrize("given, ttl", [
    ({"Cache-Control": "max-age=60"}, 60),
    ({"Cache-Control": "public, MAX-AGE=30, must-revalidate"}, 30),
    ({"Cache-Control": "no-cache"}, 86400),
    ({"Cache-Control": "max-age=60", "X-Firehose-TTL": "5"}, 5),
    ({"X-Firehose-Persist": "true", "Cache-Control": "max-age=1"}, None),
    ({"X-Firehose-Persist": "false"}, 86400),
])
def test_ttl_sources(given, ttl):
    assert parse(given).ttl_s == ttl


@pytest.mark.parametrize("given", [
    {"Cache-Control": "max-age=-1"}, {"Cache-Control": "max-age="}, {"X-Firehose-TTL": "x"},
    {"X-Firehose-Buffer-Size": "-1"}, {"X-Firehose-Buffer-Size": "10001"},
    {"X-Firehose-Buffer-Size": "1e3"}, {"X-Firehose-Persist": "yes"},
])
def test_bad_publish_headers(given):
    with pytest.raises(HttpError) as caught:
        parse(given)
    assert caught.value.status == 400


def test_buffer_size_bounds():
    assert parse({"X-Firehose-Buffer-Size": "0"}).buffer_size == 0
    assert parse({"X-Firehose-Buffer-Size": "10000"}).buffer_size == 10000


@pytest.mark.parametrize("value, expected", [(None, 0), ("", 0), ("0", 0), ("17", 17),
                                             (" 3 ", 3), ("+4", 4), (5, 5)])
def test_sequences(value, expected):
    assert http.parse_sequence(value) == expected


@pytest.mark.parametrize("value", ["-1", "x", "1.0", "+-1", "--1", str(2**64), True, 2.5])
def test_bad_sequences(value):
    with pytest.raises(HttpError):
        http.parse_sequence(value)


def test_negative_sequence_reason_is_firehose_text():
    with pytest.raises(HttpError, match="may not be less than zero"):
        http.parse_sequence("-3")


@pytest.mark.parametrize("path", ["a", "/a!", "/a,b", "/a\x01", "/a\x7f", "/" + "x" * 1024])
def test_bad_channel_paths(path):
    with pytest.raises(HttpError):
        http.channel_from_path(path)


def test_channel_path_limits():
    assert http.channel_from_path("/" + "x" * 1023) == "/" + "x" * 1023
    assert http.channel_from_path("/caf%C3%A9") == "/caf%C3%A9"
    # Raw UTF-8 bytes arrive from Tornado as latin-1 characters.
    assert http.channel_from_path("/café".encode().decode("latin-1")) == "/café"


def test_subscribe_query():
    subs = http.parse_subscribe_query("/a!3,/b!0,/c,/a!9", 1000)
    assert [(s.channel, s.last_sequence) for s in subs] == [("/a", 3), ("/b", 0), ("/c", 0)]


@pytest.mark.parametrize("value", [None, "", "/a!-1", "/a!x", "a", "/a!1!2", "/m@firehose",
                                   "/a,,/b"])
def test_bad_subscribe_query(value):
    with pytest.raises(HttpError):
        http.parse_subscribe_query(value, 1000)


def test_subscribe_body_forms():
    body = b'{"/a": 3, "/b": "4", "/c": {"message_sequence": 5, "params": {"k": "v"}}, "/d": null}'
    subs = http.parse_subscribe_body(body, max_channels=1000, max_depth=32)
    assert [(s.channel, s.last_sequence, s.params) for s in subs] == [
        ("/a", 3, {}), ("/b", 4, {}), ("/c", 5, {"k": "v"}), ("/d", 0, {})]


def test_message_json_is_compact_and_ordered():
    assert http.message_json(b'a"b\n', 3) == b'{"message":"a\\"b\\n","last_sequence":3}'
    assert http.message_json("é".encode(), 1, "/c") == \
        '{"channel":"/c","message":"é","last_sequence":1}'.encode()
    assert http.message_json(b"\xff", 1) == '{"message":"\ufffd","last_sequence":1}'.encode()
