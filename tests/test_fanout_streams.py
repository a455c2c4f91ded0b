"""The fan-out's hooks for streams (fanout.py): on_ready and shared encodings."""

import asyncio

from firehose_zmq.edge.backend import WorkerUnavailable
from firehose_zmq.edge.fanout import Fanout, Item, Listener


class FakeBackend:
    """Records fetch requests; the test answers them."""

    def __init__(self):
        self.fetches: list = []
        self.requests: list = []  # (channel, fields) of every fetch
        self.stream_watchers: list = []

    def owner(self, channel):
        return "w1"

    def subscribe(self, channel):
        pass

    def unsubscribe(self, channel):
        pass

    def request(self, channel, op, **fields):
        future = asyncio.get_running_loop().create_future()
        self.fetches.append(future)
        self.requests.append((channel, fields))
        return future


def _listener(calls, channel="/c"):
    return Listener(channel, lambda l, items: calls.append(("items", [i.seq for i in items])),
                    lambda l, exc: calls.append(("error", type(exc).__name__)), once=False,
                    on_ready=lambda l: calls.append(("ready",)))


async def _settle():
    for _ in range(3):
        await asyncio.sleep(0)


def test_on_ready_follows_the_replay_once():
    """on_ready comes once, after the first fetch's messages were delivered."""
    async def go():
        backend, calls = FakeBackend(), []
        fanout = Fanout(backend, linger_s=5.0)
        fanout.add(_listener(calls), 1)
        backend.fetches[0].set_result({"seq": 3, "epoch": 1, "messages": [[2, b"b"], [3, b"c"]]})
        await _settle()
        return calls
    assert asyncio.run(go()) == [("items", [2, 3]), ("ready",)]


def test_on_ready_follows_an_empty_fetch_an_error_or_a_removal():
    """on_ready also comes when nothing was replayed, the fetch failed, or the listener left."""
    async def go():
        backend, calls = FakeBackend(), []
        fanout = Fanout(backend, linger_s=5.0)
        for _ in range(3):
            fanout.add(_listener(calls), 0)
        removed = _listener(calls, "/gone")
        fanout.add(removed, 0)
        fanout.remove(removed)
        backend.fetches[0].set_result({"seq": 0, "epoch": 0, "messages": []})
        backend.fetches[1].set_exception(WorkerUnavailable("down"))
        backend.fetches[2].set_result({"seq": 0, "epoch": 0, "messages": []})
        backend.fetches[3].set_result({"seq": 0, "epoch": 0, "messages": []})
        await _settle()
        return calls
    assert asyncio.run(go()) == [("ready",), ("error", "WorkerUnavailable"), ("ready",),
                                 ("ready",), ("ready",)]


def test_item_encodings_are_built_once():
    """json_with_channel and encoded() return the same bytes object every time."""
    built = []

    def encoder(item):
        built.append(item.seq)
        return b"%d:%s" % (item.seq, item.data)

    item = Item(4, b"x")
    assert item.json_with_channel("/a") is item.json_with_channel("/a")
    assert item.json_with_channel("/a") == b'{"channel":"/a","message":"x","last_sequence":4}'
    assert item.encoded(encoder) is item.encoded(encoder)
    assert item.encoded(encoder) == b"4:x" and built == [4]


class _Pub:
    def __init__(self, channel, seq, epoch, data):
        self.channel, self.seq, self.epoch, self.data = channel, seq, epoch, data


def test_on_ready_at_once_when_the_edge_knows_the_listener_is_caught_up():
    """A listener at the head of a synced feed is ready without a fetch."""
    async def go():
        backend, calls = FakeBackend(), []
        fanout = Fanout(backend, linger_s=5.0)
        fanout.add(_listener(calls), 0)
        backend.fetches[0].set_result({"seq": 0, "epoch": 1, "messages": []})
        await _settle()
        fanout.on_message(_Pub("/c", 1, 1, b"a"))
        fanout.add(_listener(calls), 1)
        return calls, len(backend.fetches)
    calls, fetches = asyncio.run(go())
    assert calls == [("ready",), ("items", [1]), ("ready",)]
    assert fetches == 1
