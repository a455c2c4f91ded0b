"""Property tests of the ZeroMQ codec (wire/frames.py): any input is decoded or refused
with ProtocolError, never another exception."""

import msgpack
from hypothesis import example, given, settings, strategies as st

from firehose_zmq.wire import frames

MAX_BYTES = 4096

# Any msgpack value: the shapes a peer can send, nested.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30)

# Maps close to real requests, replies and messages, so that decoding gets past
# the first checks.
fields = st.sampled_from(["v", "id", "op", "channel", "data", "since", "limit", "after", "ttl",
                          "persist", "buffer_size", "publish_id", "deadline_ms", "ok", "error",
                          "reason", "messages", "seq", "epoch"])
near_values = st.one_of(st.just(1), st.sampled_from(["publish", "fetch", "delete", "ping"]),
                        st.sampled_from(["/a", "", "/x@firehose"]), msgpack_values)
near_maps = st.dictionaries(fields, near_values, max_size=8)


def _decodes_or_refuses(decode, *args) -> None:
    try:
        decode(*args)
    except frames.ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(frame):
    """Bytes of any kind: each decoder answers or raises ProtocolError."""
    _decodes_or_refuses(frames.decode_request, frame, MAX_BYTES)
    _decodes_or_refuses(frames.decode_reply, frame, MAX_BYTES)
    _decodes_or_refuses(frames.decode_message, [frame, frame], MAX_BYTES)
    _decodes_or_refuses(frames.decode_message, [b"/a\x00", frame], MAX_BYTES)
    _decodes_or_refuses(frames.decode_messages, [b"/a\x00", frame], MAX_BYTES)
    _decodes_or_refuses(frames.split_messages, [b"/a\x00", frame], MAX_BYTES)
    _decodes_or_refuses(frames.decode_subscription, frame)


@settings(max_examples=400, deadline=None)
@given(st.one_of(msgpack_values, near_maps))
@example({"v": 1, "id": [1], "ok": True})
def test_arbitrary_msgpack_values(value):
    """Any msgpack value, and maps with the protocol's field names: decoded or refused."""
    body = msgpack.packb(value, use_bin_type=True)
    _decodes_or_refuses(frames.decode_request, body, MAX_BYTES)
    _decodes_or_refuses(frames.decode_message, [b"/a\x00", body], MAX_BYTES)
    _decodes_or_refuses(frames.decode_messages, [b"/a\x00", body], MAX_BYTES)
    _decodes_or_refuses(frames.split_messages, [b"/a\x00", body], MAX_BYTES)
    try:
        reply = frames.decode_reply(body, MAX_BYTES)
    except frames.ProtocolError:
        return
    hash(reply["id"])  # the edge looks its pending request up by it


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=20), max_size=4))
def test_arbitrary_message_frame_counts(parts):
    """A message of any number of frames: decoded or refused."""
    _decodes_or_refuses(frames.decode_message, parts, MAX_BYTES)
    _decodes_or_refuses(frames.decode_messages, parts, MAX_BYTES)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_accepted_subscriptions_are_exact_topics(name):
    """decode_subscription accepts a topic only as channel + NUL, and gives the channel back."""
    topic = name.encode("utf-8", "surrogatepass")
    for frame in (b"\x01" + topic, b"\x01" + topic + b"\x00"):
        try:
            subscribe, channel = frames.decode_subscription(frame)
        except frames.ProtocolError:
            continue
        assert subscribe and frame == b"\x01" + frames.topic(channel)


def _items_or_refusal(decode, frame) -> None:
    """``decode`` returns a list of maps and ProtocolErrors, or raises ProtocolError."""
    try:
        items = decode(frame, MAX_BYTES)
    except frames.ProtocolError:
        return
    assert isinstance(items, list) and 0 < len(items) <= frames.MAX_BATCH
    for item in items:
        assert isinstance(item, (dict, frames.ProtocolError)), item
        if isinstance(item, dict):
            hash(item["id"])  # replies are looked up by it; requests echo it


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
@example(b"\x90")
@example(b"\xdc\x00\x01\xc0")
@example(b"\xdd\xff\xff\xff\xff")
def test_arbitrary_bytes_as_batches(frame):
    """Bytes of any kind, read as a request batch or as replies: items or ProtocolError."""
    _items_or_refusal(frames.decode_request_batch, frame)
    _items_or_refusal(frames.decode_replies, frame)
    _items_or_refusal(frames.decode_request_batch, b"\x91" + frame)
    _items_or_refusal(frames.decode_replies, b"\x92" + frame)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(st.one_of(msgpack_values, near_maps), max_size=8), msgpack_values))
@example([{"v": 1, "id": [1], "ok": True}, {"v": 1, "id": 1, "op": "ping"}])
@example([{"v": 1, "id": {}, "op": "ping"}])
def test_arbitrary_msgpack_arrays_as_batches(value):
    """Any msgpack value, mostly arrays of near-requests and near-replies: items or
    ProtocolError."""
    body = msgpack.packb(value, use_bin_type=True)
    _items_or_refusal(frames.decode_request_batch, body)
    _items_or_refusal(frames.decode_replies, body)
