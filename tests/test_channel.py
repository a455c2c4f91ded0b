"""The channel buffer rules (docs/protocol.md §5), row by row, and expiry."""

import pytest

import gc

from firehose_zmq.worker.channel import Channel, ChannelTable, PublishIds, select_since


def buffered(first, last):
    return [(seq, f"m{seq}".encode()) for seq in range(first, last + 1)]


# (case, S, buffered (first, last) or None, c, expected sequences) — docs/protocol.md §5
RULES = [
    ("nothing buffered", 0, None, 0, []),
    ("nothing buffered, sequence moved on (buffer 0)", 7, None, 3, []),
    ("c <= 0: newest only", 5, (1, 5), 0, [5]),
    ("c <= 0 with a trimmed buffer: newest only", 9, (7, 9), 0, [9]),
    ("c >= S: caught up", 5, (1, 5), 5, []),
    ("c >= S: ahead after a reset", 3, (1, 3), 50, []),
    ("0 < S - c <= L: everything after c", 5, (1, 5), 2, [3, 4, 5]),
    ("0 < S - c < L: the tail of the buffer", 5, (1, 5), 1, [2, 3, 4, 5]),
    ("0 < S - c = L", 9, (7, 9), 6, [7, 8, 9]),
    ("S - c = 1", 9, (7, 9), 8, [9]),
    ("S - c > L: fell out, newest only", 9, (7, 9), 1, [9]),
    ("S - c > L by one", 9, (7, 9), 5, [9]),
]


@pytest.mark.parametrize("case, seq, span, last_seq, expected", RULES, ids=[r[0] for r in RULES])
def test_buffer_rules_table(case, seq, span, last_seq, expected):
    """Each row of docs/protocol.md §5 delivers exactly the listed messages, oldest first."""
    messages = buffered(*span) if span else []
    assert [seq for seq, _ in select_since(seq, messages, last_seq)] == expected


def test_publish_numbers_messages_and_trims_buffer():
    """Sequences count 1, 2, 3 and the buffer keeps only the newest K."""
    channel = Channel("/a", epoch=1)
    for i in range(1, 6):
        assert channel.publish(f"m{i}".encode(), buffer_size=3, expires_at=None) == (i, f"m{i}".encode())
    assert [seq for seq, _ in channel.buffer] == [3, 4, 5]
    channel.publish(b"m6", buffer_size=1, expires_at=None)
    assert [seq for seq, _ in channel.buffer] == [6]


def test_buffer_size_zero_keeps_no_history_but_remembers_last():
    """K = 0 keeps nothing to replay; the newest message stays known for the subscribe race."""
    channel = Channel("/a", epoch=1)
    channel.publish(b"x", buffer_size=0, expires_at=None)
    assert channel.since(0) == []
    assert channel.last == (1, b"x")


def test_after_returns_every_buffered_message_above():
    """after(seq) fills gaps: every buffered message with a larger sequence."""
    channel = Channel("/a", epoch=1)
    for i in range(5):
        channel.publish(b"m", buffer_size=3, expires_at=None)
    assert [seq for seq, _ in channel.after(0)] == [3, 4, 5]
    assert [seq for seq, _ in channel.after(4)] == [5]


def make_table():
    epochs = iter(range(1, 1000))
    return ChannelTable(lambda: next(epochs))


def test_expired_channel_starts_again_at_one_with_a_newer_epoch():
    """After its TTL a channel is gone; the next publish is sequence 1 of a larger epoch."""
    table = make_table()
    first, message = table.publish("/a", b"x", now=100.0, ttl_s=10, buffer_size=5)
    assert message == (1, b"x")
    table.publish("/a", b"y", now=105.0, ttl_s=10, buffer_size=5)
    assert table.get("/a", now=114.9) is not None
    assert table.get("/a", now=115.0) is None
    second, message = table.publish("/a", b"z", now=116.0, ttl_s=10, buffer_size=5)
    assert message == (1, b"z")
    assert second.epoch > first.epoch


def test_expire_frees_channels_and_skips_refreshed_ones():
    """expire(now) drops only channels whose latest expiry passed."""
    table = make_table()
    table.publish("/old", b"x", now=0.0, ttl_s=5, buffer_size=5)
    table.publish("/fresh", b"x", now=0.0, ttl_s=5, buffer_size=5)
    table.publish("/fresh", b"x", now=4.0, ttl_s=5, buffer_size=5)
    table.publish("/forever", b"x", now=0.0, ttl_s=None, buffer_size=5)
    assert table.expire(6.0) == ["/old"]
    assert len(table) == 2
    assert table.expire(10.0) == ["/fresh"]
    assert table.get("/forever", now=1e12) is not None


def test_expiry_heap_does_not_grow_without_bound():
    """Many publishes to one channel do not pile up expiry entries."""
    table = make_table()
    for i in range(20000):
        table.publish("/hot", b"x", now=float(i), ttl_s=10**6, buffer_size=1)
        table.expire(float(i))
    assert len(table._expiry_heap) < 2000


def test_delete_forgets_channel():
    table = make_table()
    table.publish("/a", b"x", now=0.0, ttl_s=None, buffer_size=5)
    assert table.delete("/a") is True
    assert table.delete("/a") is False
    assert table.get("/a", now=0.0) is None


def test_publish_ids_answer_retries_for_at_least_the_window():
    ids = PublishIds(window_s=10, max_ids=1000, now=100.0)
    ids.add("e-1", "/a:b", 7, 123, now=100.0)
    assert ids.get("e-1") == ("/a:b", 7, 123)
    assert ids.get("e-2") is None
    assert ids.rotate(109.9) is None
    assert ids.rotate(110.0) is None  # e-1 moves to the older half; nothing is forgotten
    ids.add(b"e-2", "/c", 1, 5, now=110.0)  # a native client's id may be bytes
    assert ids.get("e-1") == ("/a:b", 7, 123) and ids.get(b"e-2") == ("/c", 1, 5)
    assert ids.rotate(120.0) == 110.0  # 20 s after e-1, 10 s after e-2
    assert ids.get("e-1") is None and ids.get(b"e-2") == ("/c", 1, 5)
    assert (len(ids), ids.kept_since, ids.forgotten_early) == (1, 110.0, 0)


def test_buffered_messages_are_not_tracked_by_the_garbage_collector():
    """Plain (seq, data) tuples: CPython untracks them at the first collection they
    survive, so full collections do not walk every buffered message."""
    channel = Channel("/a", epoch=1)
    for i in range(10):
        channel.publish(b"m", buffer_size=5, expires_at=None)
    gc.collect()
    assert not any(gc.is_tracked(m) for m in channel.buffer)


def test_publish_ids_stay_bounded_and_untracked_by_the_garbage_collector():
    ids = PublishIds(window_s=10, max_ids=100, now=0.0)
    for i in range(250):
        ids.add(f"e-{i}", "/hot", i + 1, 9, now=i / 100)
    assert len(ids) <= 100
    assert ids.get("e-249") == ("/hot", 250, 9) and ids.get("e-0") is None
    assert ids.take_forgotten_early() == 150 and ids.take_forgotten_early() == 0
    assert not any(gc.is_tracked(half) for half in (ids._newer, ids._older))


def test_a_rotation_by_size_restarts_the_window():
    """Ids moved to the older half by the size bound still get a whole window."""
    ids = PublishIds(window_s=10, max_ids=100, now=0.0)
    for i in range(51):  # e-0..e-49 over 0-9.8 s; e-50 at 9.9 s finds the newer half full
        ids.add(f"e-{i}", "/hot", i + 1, 9, now=i * 0.198)
    assert ids.rotate(10.0) is None
    assert ids.get("e-49") == ("/hot", 50, 9) and ids.kept_since == 0.0
    assert ids.rotate(20.0) is not None
    assert ids.get("e-49") is None and ids.get("e-50") == ("/hot", 51, 9)
