"""Event streams and WebSockets on a fast-path connection (``fastpath.FastConnection``).

The protocol of both lives in ``streams`` (``EventStream``, ``SocketSession``);
here is only what a bare asyncio transport needs: the bytes of each message are
built once (``Item.encoded``) and the same object is written to every stream of
the channel, and the write buffer of the transport is the slow-reader measure.

``conn`` is the ``FastConnection``: ``stream_write(data)``,
``stream_buffered()``, ``stream_ended(last_bytes)`` (write them and close),
``abort()`` and ``peer``. The connection gives a stream the client's bytes
(``feed``) and tells it when it is closed (``gone``).
"""

import asyncio
import logging
import time
from collections import deque

from ..wire import websocket
from .streams import EventStream, SocketSession, channel_event_of

log = logging.getLogger("firehose.streams")

_CLOSE_GRACE_S = 5.0  # a closing handshake the client does not finish is cut after this


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunked_channel_event(item) -> bytes:
    return _chunk(item.encoded(channel_event_of))


class FastEventStream(EventStream):
    """A single-channel event stream on a fast connection (chunked, like Tornado's)."""

    def __init__(self, conn, edge, subscriptions, head: bytes, error_answer):
        super().__init__(edge, subscriptions, multiplexed=False)
        self.conn = conn
        self.peer = conn.peer
        self._head = head
        self._error_answer = error_answer
        self._limit = edge.config.edge.stream_queue_limit_bytes
        self._queued: list = []
        self._task = asyncio.ensure_future(self.run())  # referenced: the loop keeps tasks weakly
        self._task.add_done_callback(self._ran)

    def _ran(self, task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A stream that failed must not leave its client waiting on an open connection.
            log.error("event stream to %s failed", self.peer, exc_info=task.exception())
            self.conn.abort()

    def begin(self) -> None:
        self._queued.append(self._head)

    def write(self, chunk: bytes) -> None:
        self._queued.append(_chunk(chunk))

    def write_item(self, item) -> None:
        self._queued.append(item.encoded(_chunked_channel_event))

    def flush(self) -> None:
        queued = self._queued
        if queued:
            self._queued = []
            self.conn.stream_write(queued[0] if len(queued) == 1 else b"".join(queued))

    def behind(self) -> bool:
        return self.conn.stream_buffered() > self._limit

    def drop(self) -> None:
        self.conn.abort()

    def feed(self, data: bytes) -> None:
        """Bytes from the client: an event stream has nothing more to read."""

    def gone(self) -> None:
        """The connection is closed."""
        self.cut = True  # nothing more to write
        self.cancel()

    def conclude(self) -> None:
        if self.cut:
            return
        if self.failed is not None and not self.started:
            # Nothing was sent yet: say why, as a long-poll would.
            status, reason = self.edge.backend_error_status(self.failed)
            self.conn.stream_ended(self._error_answer(status, reason))
            return
        # Whatever is still queued first: the head, when the edge stopped before the
        # replay was done and the stream never started.
        self._queued.append(b"0\r\n\r\n")
        queued, self._queued = self._queued, []
        self.conn.stream_ended(b"".join(queued))


def _text_frame_of_json(item) -> bytes:
    return websocket.encode_text(item.json())


class FastWebSocket:
    """A single-channel WebSocket on a fast connection: the link of its ``SocketSession``.

    Client frames are handled one at a time, in order: a subscribe frame's
    replay is written before anything a later frame asks for (``_inbox``).
    Protocol pings go out every ``ws_ping_interval_s``; a client silent for
    that long plus ``ws_ping_timeout_s`` is dropped.
    """

    def __init__(self, conn, edge, channel: str):
        config = edge.config.edge
        self.conn = conn
        self.peer = conn.peer
        self.session = SocketSession(edge, self, channel)
        self._reader = websocket.FrameReader(config.ws_max_frame_bytes)
        self._limit = config.stream_queue_limit_bytes
        self._ping_interval_s = config.ws_ping_interval_s
        self._silence_limit_s = config.ws_ping_interval_s + config.ws_ping_timeout_s
        self._inbox: deque = deque()
        self._worker = None
        self._closing = False
        self._grace = None  # cuts a closing handshake the client does not finish
        self._heard = time.monotonic()
        loop = asyncio.get_running_loop()
        self._pinger = loop.call_later(self._ping_interval_s, self._ping) \
            if self._ping_interval_s > 0 else None
        self._start(self.session.open())

    # -- frames in ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._heard = time.monotonic()
        for event in self._reader.feed(data):
            kind = type(event)
            if kind is websocket.Text or kind is websocket.Binary:
                if not self._closing:
                    self._inbox.append(event[0])
            elif kind is websocket.Ping:
                self.conn.stream_write(websocket.encode_pong(event.payload))
            elif kind is websocket.Close:
                if self._closing:  # the answer to our close: the handshake is done
                    self.gone()
                    self.conn.stream_ended(b"")
                else:
                    self._finish(websocket.close_reply(event))
            elif kind is websocket.ProtocolError:
                self.session.count_bad_frame(event.reason)
                if self._closing:  # no close frame will come now: end without waiting
                    self.gone()
                    self.conn.stream_ended(b"")
                else:
                    self._finish(websocket.encode_close(event.code, event.reason))
        if self._inbox and self._worker is None:
            self._start(self._work())

    def _start(self, coro) -> None:
        self._worker = asyncio.ensure_future(coro)
        self._worker.add_done_callback(self._worked)

    def _worked(self, task) -> None:
        self._worker = None
        if not task.cancelled() and task.exception() is not None:
            log.error("WebSocket from %s failed", self.peer, exc_info=task.exception())
            self.drop()
        elif self._inbox:
            self._start(self._work())

    async def _work(self) -> None:
        inbox = self._inbox
        while inbox and not self._closing:
            await self.session.on_message(inbox.popleft())

    # -- the link ------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if not self._closing:
            self.conn.stream_write(websocket.encode_text(payload))

    def send_item(self, channel: str, item) -> None:
        if not self._closing:
            self.conn.stream_write(item.encoded(_text_frame_of_json))

    def behind(self) -> bool:
        return self.conn.stream_buffered() > self._limit

    def close(self, code: int, reason: str) -> None:
        """Start a closing handshake: the client's close frame ends the connection,
        or ``_CLOSE_GRACE_S`` without one does."""
        if self._closing:
            return
        self._stop()
        self.conn.stream_write(websocket.encode_close(code, reason))
        self._grace = asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, self.conn.abort)

    def drop(self) -> None:
        self._stop()
        self.conn.abort()

    # -- the end -------------------------------------------------------------------

    def _finish(self, close_frame: bytes) -> None:
        """Write the last frame (a close reply, or the close of a protocol error) and close."""
        if self._closing:
            return
        self._stop()
        self.conn.stream_ended(close_frame)

    def _stop(self) -> None:
        self._closing = True
        self._inbox.clear()
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        self.session.closed()

    def gone(self) -> None:
        """The connection is closed."""
        self._stop()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _ping(self) -> None:
        if time.monotonic() - self._heard > self._silence_limit_s:
            log.info("WebSocket from %s stopped answering pings; closing it", self.peer)
            return self.close(websocket.CLOSE_NORMAL, "")
        self.conn.stream_write(websocket.encode_ping())
        self._pinger = asyncio.get_running_loop().call_later(self._ping_interval_s, self._ping)
