"""The stream transports' wire rules (events.py), without sockets."""

import pytest

from firehose_zmq.wire import events as sw
from firehose_zmq.wire import http
from firehose_zmq.wire.http import HttpError, Subscription


@pytest.mark.parametrize("text, expected", [
    ('{"ping":"PING"}', sw.PING),
    ('{"last_message_sequence": 3}', sw.Subscribe((Subscription("/c", 3, {"u": "1"}),))),
    ('{"message_sequence": "4"}', sw.Subscribe((Subscription("/c", 4, {"u": "1"}),))),
    ('{"message_sequence": 1, "params": {"u": "2", "f": "x"}}',
     sw.Subscribe((Subscription("/c", 1, {"u": "2", "f": "x"}),))),
    ('{"params": {}}', sw.Subscribe((Subscription("/c", 0, {"u": "1"}),))),
])
def test_channel_frames(text, expected):
    """Pings and subscribes of a channel socket; frame params win over URL params."""
    assert sw.parse_channel_frame(text, "/c", {"u": "1"}, 32) == expected


@pytest.mark.parametrize("text, kind", [
    ("nope", sw.Ignored), ("[1]", sw.Ignored), ("null", sw.Ignored), ("{}", sw.Ignored),
    ('{"ping":"pong"}', sw.Ignored), ('{"hello":1}', sw.Ignored),
    ('{"last_message_sequence": -1}', sw.Rejected), ('{"message_sequence": 1.5}', sw.Rejected),
    ('{"message_sequence": true}', sw.Rejected), ('{"message_sequence": 1, "x": 2}', sw.Rejected),
    ('{"params": [1]}', sw.Rejected),
])
def test_bad_channel_frames(text, kind):
    """Junk is ignored; a subscribe that cannot be honoured is rejected with a reason."""
    result = sw.parse_channel_frame(text, "/c", {}, 32)
    assert isinstance(result, kind)
    assert result.reason


def test_multiplex_subscribe_one_or_many_first_wins():
    """multiplex_subscribe takes an object or a list; a repeated channel keeps the first."""
    assert sw.parse_multiplex_frame('{"multiplex_subscribe": {"channel": "/a"}}', 1000, 32) == \
        sw.Subscribe((Subscription("/a", 0, {}),))
    frame = ('{"multiplex_subscribe": [{"channel": "/a", "message_sequence": 2},'
             ' {"channel": "/b", "last_message_sequence": 1, "params": {"k": 1}},'
             ' {"channel": "/a", "message_sequence": 9}]}')
    assert sw.parse_multiplex_frame(frame, 1000, 32) == sw.Subscribe(
        (Subscription("/a", 2, {}), Subscription("/b", 1, {"k": 1})))


@pytest.mark.parametrize("text", [
    '{"multiplex_subscribe": []}', '{"multiplex_subscribe": 3}',
    '{"multiplex_subscribe": {"message_sequence": 1}}',
    '{"multiplex_subscribe": {"channel": "a"}}',
    '{"multiplex_subscribe": {"channel": "/x@firehose"}}',
    '{"multiplex_subscribe": {"channel": "/a", "what": 1}}',
    '{"multiplex_subscribe": {"channel": "/a"}, "extra": 1}',
])
def test_rejected_multiplex_subscriptions(text):
    """Bad channel names, sequences or keys reject the whole frame."""
    assert isinstance(sw.parse_multiplex_frame(text, 1000, 32), sw.Rejected)


def test_multiplex_unsubscribe():
    """multiplex_unsubscribe takes a name or a list of names; anything else is ignored."""
    assert sw.parse_multiplex_frame('{"multiplex_unsubscribe": "/a"}', 1000, 32) == sw.Unsubscribe(("/a",))
    assert sw.parse_multiplex_frame('{"multiplex_unsubscribe": ["/a", "/b", "/a"]}', 1000, 32) == \
        sw.Unsubscribe(("/a", "/b"))
    assert isinstance(sw.parse_multiplex_frame('{"multiplex_unsubscribe": [1]}', 1000, 32), sw.Ignored)
    assert isinstance(sw.parse_multiplex_frame('{"other": 1}', 1000, 32), sw.Ignored)


def test_channel_event_splits_every_kind_of_line_break():
    """id: <seq>, then one data: line per payload line (LF, CRLF and CR all split)."""
    assert sw.channel_event(7, b"a\nb\r\nc\rd") == \
        b"id: 7\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert sw.channel_event(1, b"") == b"id: 1\ndata: \n\n"
    assert sw.channel_event(2, b"\xff") == "id: 2\ndata: \ufffd\n\n".encode()


def test_multiplex_event_ids_round_trip():
    """A multiplexed event id holds every channel's position and reads back the same."""
    positions = {"/a": 3, "/b/100%": 0, "/ü": 12}
    event_id = sw.multiplex_event_id(positions)
    assert event_id == "/a!3,/b/100%25!0,/%C3%BC!12"
    assert http.parse_multiplex_event_id(event_id) == positions
    assert http.parse_multiplex_event_id(None) == {}
    with pytest.raises(HttpError):
        http.parse_multiplex_event_id("/a!x")


def test_last_event_id():
    """A missing or empty Last-Event-ID is None; junk is a 400."""
    assert http.parse_last_event_id(None) is None
    assert http.parse_last_event_id(" ") is None
    assert http.parse_last_event_id("42") == 42
    for bad in ("x", "-1"):
        with pytest.raises(HttpError):
            http.parse_last_event_id(bad)
