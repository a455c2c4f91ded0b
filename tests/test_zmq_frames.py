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


# -- batches -------------------------------------------------------------------------

def publish_body(i: int) -> bytes:
    return frames.encode_request({"id": i, "op": "publish", "channel": f"/b/{i % 7}",
                                  "data": b"m%d" % i})


@pytest.mark.parametrize("count, header", [
    (1, b"\x91"), (15, b"\x9f"), (16, b"\xdc\x00\x10"), (frames.MAX_BATCH, b"\xdc\x04\x00")])
def test_request_batch_round_trip(count, header):
    """A batch is a fixarray up to 15 bodies and an array 16 above; every request
    comes back checked, in order."""
    bodies = [publish_body(i) for i in range(count)]
    batch = frames.encode_batch(bodies)
    assert batch.startswith(header) and batch[len(header):] == b"".join(bodies)
    assert frames.is_batch(batch)
    assert frames.decode_request_batch(batch, MAX) == [
        {"v": 1, "id": i, "op": "publish", "channel": f"/b/{i % 7}", "data": b"m%d" % i}
        for i in range(count)]


def test_single_bodies_are_not_batches():
    """A request or reply map, and an empty frame, are not taken for a batch."""
    assert not frames.is_batch(publish_body(1))
    assert not frames.is_batch(frames.encode_reply(1, seq=1, epoch=1))
    assert not frames.is_batch(b"")


@pytest.mark.parametrize("body, reason", [
    (frames.encode_batch([publish_body(i) for i in range(frames.MAX_BATCH + 1)]),
     "a batch of 1025 bodies"),
    (packed([]), "a batch of 0 bodies"),
    (publish_body(1), "must be a msgpack array"),
    (b"\x93" + publish_body(1) + publish_body(2), "not msgpack"),        # one body short
    (b"\x91" + publish_body(1) + publish_body(2), "not msgpack"),        # one body over
    (packed([{"v": 1, "id": 1, "op": "publish", "channel": "/a", "data": b"x" * (MAX + 1)}]),
     "over the 1024-byte limit"),
])
def test_malformed_request_batches_are_refused_whole(body, reason):
    """A body that is not an array of 1 to MAX_BATCH items raises ProtocolError."""
    with pytest.raises(ProtocolError, match=reason):
        frames.decode_request_batch(body, MAX)


def test_bad_requests_in_a_batch_get_their_own_errors_in_order():
    """Each item is checked on its own: good ones come back as maps, bad ones as the
    ProtocolError to answer them with, carrying the request id when it was readable."""
    good = {"v": 1, "id": 1, "op": "ping"}
    batch = packed([good, 7, {"v": 1, "op": "ping"}, {"v": 2, "id": "b", "op": "ping"},
                    {"v": 1, "id": b"c", "op": "launch"},
                    {"v": 1, "id": 5, "op": "fetch", "channel": "/a"},
                    {"v": 1, "id": 6, "op": "publish", "channel": "/a", "data": b"",
                     "extra": 1}, [good], good])
    items = frames.decode_request_batch(batch, MAX)
    assert items[0] == good and items[-1] == good
    errors = items[1:-1]
    assert all(isinstance(e, ProtocolError) for e in errors)
    assert [(e.request_id, e.code) for e in errors] == [
        (None, "bad_request"), (None, "bad_request"), ("b", "unsupported_version"),
        (b"c", "bad_request"), (5, "bad_request"), (6, "bad_request"), (None, "bad_request")]
    assert [str(e) for e in errors] == [
        "body must be a msgpack map", "'id' must be an integer, string or bytes",
        "unsupported protocol version 2; this is 1", "unknown op 'launch'",
        "'fetch' needs 'since'", "unknown field 'extra' for op 'publish'",
        "body must be a msgpack map"]


def test_batches_cut_at_max_batch_and_keep_order():
    bodies = [b"%d" % i for i in range(2 * frames.MAX_BATCH + 5)]
    cut = list(frames.batches(bodies, 10 ** 9))
    assert [len(b) for b in cut] == [frames.MAX_BATCH, frames.MAX_BATCH, 5]
    assert [body for batch in cut for body in batch] == bodies


def test_batches_cut_at_max_bytes_and_a_large_body_goes_alone():
    """No batch passes max_bytes unless it is one body larger than that on its own."""
    bodies = [b"a" * 40, b"b" * 40, b"c" * 20, b"d" * 150, b"e" * 1, b"f" * 99, b"g" * 100]
    cut = list(frames.batches(bodies, 100))
    assert cut == [[b"a" * 40, b"b" * 40, b"c" * 20], [b"d" * 150], [b"e" * 1, b"f" * 99],
                   [b"g" * 100]]
    assert list(frames.batches([], 100)) == []
    assert list(frames.batches([b"x" * 500], 100)) == [[b"x" * 500]]


def test_batches_of_encoded_requests_decode_to_every_request():
    """What ``batches`` cuts and ``encode_batch`` joins is every request once, in order."""
    bodies = [publish_body(i) for i in range(3000)]
    decoded = [request["id"] for batch in frames.batches(bodies, 4000)
               for request in frames.decode_request_batch(frames.encode_batch(batch), 4000)]
    assert decoded == list(range(3000))


def test_decode_replies_of_a_single_reply_and_of_a_batch():
    single = frames.encode_reply(3, seq=1, epoch=2)
    assert frames.decode_replies(single, MAX) == [{"v": 1, "id": 3, "ok": True, "seq": 1,
                                                   "epoch": 2}]
    batch = frames.encode_batch([frames.encode_reply(1, seq=1, epoch=2),
                                 frames.encode_error(2, "not_owner", "ask w2", "ring", owner="w2"),
                                 packed({"v": 1, "ok": True}),
                                 frames.encode_reply(4, messages=[[1, "text"]]),
                                 frames.encode_reply(5, existed=True)])
    replies = frames.decode_replies(batch, MAX)
    assert [r["id"] if isinstance(r, dict) else type(r) for r in replies] == [
        1, 2, ProtocolError, ProtocolError, 5]
    assert replies[1]["owner"] == "w2"


@pytest.mark.parametrize("body", [
    b"\xc1", packed({"v": 1, "ok": True}), packed([]), packed(list(range(frames.MAX_BATCH + 1))),
    b"\x92" + frames.encode_reply(1)])
def test_decode_replies_refuses_a_bad_body_whole(body):
    with pytest.raises(ProtocolError):
        frames.decode_replies(body, MAX)


def test_a_channels_messages_in_one_batch_decode_in_order_and_split_for_native_subscribers():
    sent = [frames.PubMessage("/a", seq, 3, b"d%d" % seq, None) for seq in (7, 8, 9)]
    bodies = [frames.encode_message(m)[1] for m in sent]
    batch = [frames.topic("/a"), frames.encode_batch(bodies)]
    assert frames.decode_messages(batch, MAX) == sent
    assert frames.decode_messages(frames.encode_message(sent[0]), MAX) == [sent[0]]
    split = frames.split_messages(batch, MAX)
    assert [frames.decode_message(parts, MAX) for parts in split] == sent
    single = frames.encode_message(sent[1])
    assert frames.split_messages(single, MAX) == [single]


def test_a_message_batch_with_one_foreign_or_bad_message_is_refused_whole():
    good = frames.encode_message(frames.PubMessage("/a", 1, 1, b"x", None))[1]
    other = frames.encode_message(frames.PubMessage("/b", 2, 1, b"y", None))[1]
    for bodies in ([good, other], [good, msgpack.packb([1])], [good] * (frames.MAX_BATCH + 1)):
        with pytest.raises(frames.ProtocolError):
            frames.decode_messages([frames.topic("/a"), frames.encode_batch(bodies)], MAX)
        with pytest.raises(frames.ProtocolError):
            frames.split_messages([frames.topic("/a"), frames.encode_batch(bodies)], MAX)
