"""The fan-out's re-sync after its SUB link to a worker drops and returns (fanout.py)."""

import asyncio

from firehose_zmq.edge import fanout as fanout_module
from firehose_zmq.edge.backend import WorkerUnavailable
from firehose_zmq.edge.fanout import Fanout, Listener

from .test_fanout_streams import FakeBackend, _settle


def _stream(calls, channel):
    return Listener(channel, lambda l, items: calls.append((l.channel, [i.seq for i in items])),
                    lambda l, exc: calls.append((l.channel, type(exc).__name__)), once=False)


async def _waiting(backend, fanout, calls, channels, seq=3):
    """A listener per channel, caught up at ``seq``."""
    for channel in channels:
        fanout.add(_stream(calls, channel), seq)
    for future in backend.fetches:
        future.set_result({"seq": seq, "epoch": 1, "messages": []})
    await _settle()
    backend.fetches.clear()
    backend.requests.clear()


def test_a_returning_stream_link_fetches_what_the_listeners_missed():
    """After the SUB link to a worker drops and comes back, each of its channels with
    listeners fetches after their floor, and the listeners get the missed messages in order."""
    async def go():
        backend, calls = FakeBackend(), []
        fanout = Fanout(backend, linger_s=5.0)
        await _waiting(backend, fanout, calls, ["/a", "/b"])
        fanout.stream_changed("w1", False)
        fanout.stream_changed("w1", True)
        requests = sorted(backend.requests)
        backend.fetches[0].set_result({"seq": 5, "epoch": 1, "messages": [[4, b"x"], [5, b"y"]]})
        backend.fetches[1].set_result({"seq": 3, "epoch": 1, "messages": []})
        await _settle()
        return requests, calls
    requests, calls = asyncio.run(go())
    assert requests == [("/a", {"since": 3, "after": True}), ("/b", {"since": 3, "after": True})]
    assert calls == [("/a", [4]), ("/a", [5])]


def test_a_resync_reply_that_stops_short_is_followed_by_the_listeners_own_fetch():
    """A re-sync reply cut short by its size makes the listener fetch the rest."""
    async def go():
        backend, calls = FakeBackend(), []
        fanout = Fanout(backend, linger_s=5.0)
        await _waiting(backend, fanout, calls, ["/a"])
        fanout.stream_changed("w1", True)
        backend.fetches[0].set_result({"seq": 9, "epoch": 1, "messages": [[4, b"x"]]})
        await _settle()
        return backend.requests, calls
    requests, calls = asyncio.run(go())
    assert calls == [("/a", [4])]
    assert requests[-1] == ("/a", {"since": 4, "after": True})


def test_resync_fetches_are_bounded_in_flight(monkeypatch):
    """No more than RESYNC_IN_FLIGHT re-sync fetches wait at once; the rest follow."""
    monkeypatch.setattr(fanout_module, "RESYNC_IN_FLIGHT", 2)

    async def go():
        backend, calls = FakeBackend(), []
        fanout = Fanout(backend, linger_s=5.0)
        await _waiting(backend, fanout, calls, [f"/c{i}" for i in range(5)])
        fanout.stream_changed("w1", True)
        in_flight = [len(backend.fetches)]
        while len(backend.fetches) < 5:
            for future in backend.fetches:
                if not future.done():
                    future.set_exception(WorkerUnavailable("down"))
            await _settle()
            in_flight.append(len(backend.fetches))
        return in_flight, calls
    in_flight, calls = asyncio.run(go())
    assert in_flight[0] == 2 and all(b - a <= 2 for a, b in zip(in_flight, in_flight[1:]))
    assert calls == []  # a failed re-sync leaves the listeners to OwnerDown
