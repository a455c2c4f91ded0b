"""Many long-poll clients on raw keep-alive connections, and a fast native publisher.

A ``Poller`` behaves like a Firehose client: it long-polls one channel from its
last sequence, re-polls at once after a message or a 204, and backs off after a
503 or a connection error. Thousands of them fit in one test process.
"""

import asyncio
import itertools
import json
import random
import time

import zmq
import zmq.asyncio

from firehose_zmq.ring import Ring
from firehose_zmq.wire import frames

from .storm import Http


def channels_on(worker_id: str, worker_ids, count: int, prefix: str = "/scale") -> list:
    """``count`` channel names that the ring gives to ``worker_id``."""
    ring = Ring(list(worker_ids))
    names = (f"{prefix}-{i}" for i in itertools.count())
    return list(itertools.islice((n for n in names if ring.owner(n) == worker_id), count))


class Poller:
    """Long-polls ``channel`` on ``port``; ``wait`` until it has sequence ``want``.

    ``connecting`` (shared) bounds the connections being opened at once, so that
    thousands of pollers do not overflow the server's listen backlog (the kernel
    then drops SYNs and the client waits seconds to retry)."""

    def __init__(self, port: int, channel: str, backoff_s: float, connecting=None):
        self.port = port
        self.channel = channel
        self.backoff_s = backoff_s
        self.last = 0
        self.received: dict = {}  # seq -> (monotonic time, body)
        self.polled_at = 0.0  # when the request now in flight was sent
        self.errors = 0
        self._want = 0
        self._got = asyncio.Event()
        self._http = Http("127.0.0.1", port, connecting)

    def want(self, seq: int) -> None:
        self._want = seq
        if self.last >= seq:
            self._got.set()
        else:
            self._got.clear()

    async def wait(self) -> None:
        await self._got.wait()

    async def run(self) -> None:
        try:
            while True:
                try:
                    status, body = await self._poll()
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    self.errors += 1
                    await self._close()
                    await asyncio.sleep(self.backoff_s * (1 + random.random()))  # client back-off
                    continue
                if status == 200:
                    message = json.loads(body)
                    self.last = message["last_sequence"]
                    self.received[self.last] = (time.monotonic(), message["message"])
                    if self.last >= self._want:
                        self._got.set()
                elif status != 204:
                    self.errors += 1
                    await asyncio.sleep(self.backoff_s * (1 + random.random()))  # client back-off
        finally:
            await self._close()

    async def _poll(self) -> tuple:
        self.polled_at = time.monotonic()
        status, _, body = await self._http.request(
            "GET", f"{self.channel}?last_message_sequence={self.last}")
        return status, body

    async def _close(self) -> None:
        await self._http.close()


class NativePublisher:
    """Publishes through an edge's native ROUTER, many requests in flight at once."""

    def __init__(self, endpoint: str, context):
        self._sock = context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    async def publish_all(self, items, timeout_s: float = 30.0, window: int = 1000) -> dict:
        """Publish ``[(channel, data)]``, up to ``window`` at a time; returns
        {channel: (reply, monotonic time of the reply)}; raises AssertionError on an
        error reply or the timeout."""
        pending = {}
        replies = {}
        todo = list(enumerate(items))
        todo.reverse()
        deadline = time.monotonic() + timeout_s
        while todo or pending:
            while todo and len(pending) < window:
                i, (channel, data) = todo.pop()
                pending[i] = channel
                await self._sock.send(frames.encode_request(
                    {"id": i, "op": "publish", "channel": channel, "data": data}))
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(pending) + len(todo)} publishes not answered in time"
            if not await self._sock.poll(remaining * 1000):
                continue
            reply = frames.decode_reply(await self._sock.recv(), 1 << 20)
            assert reply["ok"], reply
            replies[pending.pop(reply["id"])] = (reply, time.monotonic())
        return replies

    def close(self) -> None:
        self._sock.close(linger=0)


def async_context():
    return zmq.asyncio.Context()
