"""The wire codec: every frame round-trips, and malformed frames raise ProtocolError."""

import msgpack
import pytest

from firehose_zmq.wire import frames
from firehose_zmq.wire.frames import ProtocolError

MAX = 1024


def test_request_round_trip():
    body = frames.encode_request({"id": 7, "op": "publish", "channel": "/a", "data": b"\x00\xff",
                                    "ttl": 60, "buffer_size": 3})
    assert frames.decode_request(body, MAX) == {"v": 1, "id": 7, "op": "publish",
                                                  "channel": "/a", "data": b"\x00\xff",
                                                  "ttl": 60, "buffer_size": 3}


def test_reply_round_trip():
    body = frames.encode_reply(9, seq=3, epoch=5, messages=[[3, b"x"]])
    assert frames.decode_reply(body, MAX)["messages"] == [[3, b"x"]]
    error = frames.decode_reply(frames.encode_error(9, "bad_request", "why", "abcd"), MAX)
    assert (error["ok"], error["error"], error["reason"], error["ring"]) == \
        (False, "bad_request", "why", "abcd")


def test_message_round_trip_and_exact_topic():
    """A message is two frames; its topic is the channel and a zero byte."""
    message = frames.PubMessage("/a", 4, 99, b"data", None)
    parts = frames.encode_message(message)
    assert parts[0] == b"/a\x00"
    assert frames.decode_message(parts, MAX) == message


def packed(value):
    return msgpack.packb(value, use_bin_type=True)


@pytest.mark.parametrize("body, reason", [
    (b"\xc1", "not msgpack"),
    (packed([1, 2]), "must be a msgpack map"),
    (packed({"v": 1, "op": "ping"}), "'id'"),
    (packed({"v": 2, "id": 1, "op": "ping"}), "unsupported protocol version"),
    (packed({"v": 1, "id": 1, "op": "explode"}), "unknown op"),
    (packed({"v": 1, "id": 1, "op": "fetch", "channel": "/a"}), "needs 'since'"),
    (packed({"v": 1, "id": 1, "op": "fetch", "channel": "/a", "since": "3"}), "'since' must be"),
    (packed({"v": 1, "id": 1, "op": "publish", "channel": "/a", "data": "text"}), "'data' must"),
    (packed({"v": 1, "id": 1, "op": "publish", "channel": "/a", "data": b"", "ttl": -1}),
     "'ttl' must"),
    (packed({"v": 1, "id": 1, "op": "publish", "channel": "/a", "data": b"", "extra": 1}),
     "unknown field"),
    (packed({"v": 1, "id": 1, "op": "fetch", "channel": "/a", "since": 0, "limit": True}),
     "'limit' must"),
    (b"\x00" * (MAX + 70000), "over the limit"),
])
def test_malformed_requests_are_rejected(body, reason):
    """Each malformed request raises ProtocolError naming what is wrong."""
    with pytest.raises(ProtocolError, match=reason):
        frames.decode_request(body, MAX)


def test_rejection_keeps_request_id_when_known():
    """An error reply can name the request it answers."""
    with pytest.raises(ProtocolError) as caught:
        frames.decode_request(packed({"v": 1, "id": 42, "op": "nope"}), MAX)
    assert caught.value.request_id == 42


@pytest.mark.parametrize("parts", [
    [b"/a\x00"],
    [b"/a\x00", packed({"channel": "/a", "seq": 0, "epoch": 1, "data": b"", "ttl": None})],
    [b"/b\x00", packed({"channel": "/a", "seq": 1, "epoch": 1, "data": b"", "ttl": None})],
    [b"/a\x00", packed({"channel": "/a", "seq": 1, "epoch": 1, "data": "str", "ttl": None})],
    [b"/a\x00", b"junk\xc1"],
])
def test_malformed_messages_are_rejected(parts):
    with pytest.raises(ProtocolError):
        frames.decode_message(parts, MAX)


def test_oversized_binary_is_rejected():
    body = packed({"v": 1, "id": 1, "op": "publish", "channel": "/a", "data": b"x" * (MAX + 1)})
    with pytest.raises(ProtocolError):
        frames.decode_request(body, MAX)
