"""WebSocket and Server-Sent Events sessions (docs/protocol.md §6-7), single and multiplexed.

Theory of operation
-------------------
A stream is what a client ``Connection`` becomes after a 101 (``WebSocket``) or
the head of an event stream (``EventStream``). It holds one ``fanout.Listener``
(``once=False``) per channel: the subscribe-then-fetch mechanism of long-poll, so
the replay and the live messages reach ``on_items`` in order, without
duplicates. Each message's bytes (the chunked event, the text frame) are built
once per item (``Item.encoded``) and the same object is written to every stream.

The connection is the stream's ``conn``: ``stream_write(data)``,
``stream_buffered()`` (bytes written but not yet taken by the kernel),
``stream_ended(last_bytes)`` (write them, then close), ``abort()`` and ``peer``.
It hands the stream the client's bytes (``feed``) and tells it when the socket
is gone (``gone``); while the client does not read, the connection stops
reading from it.

Bounds: a reader with more than ``stream_queue_limit_bytes`` waiting for it is
cut when anything more is written to it: a message, a keep-alive, and also the
answers it provoked itself (pongs, ping replies, subscribe replays); it is
counted as ``slow_readers_closed``. A WebSocket's frames not yet handled wait in
``_inbox``, at most ``_INBOX_FRAMES`` of them: past that the connection stops
reading. A replay (one batch) is always written whole.

Ordering: a WebSocket's frames are handled one at a time; a subscribe returns
once its first fetch is delivered (``on_ready``), so a pong written after it
follows the replayed messages.

Ends: a single-channel socket whose channel cannot be served, and every socket
when the edge stops, is dropped without a closing handshake (the Firehose
JavaScript client reconnects after an unclean close only). An event stream that
fails before it sent anything is answered like a long-poll (503 and a reason).
"""

import asyncio
from collections import deque
import logging
import time

from ..wire import events, http, websocket
from .fanout import Listener

log = logging.getLogger("firehose.streams")

_CLOSE_GRACE_S = 5.0  # a closing handshake the client does not finish is cut after this
_INBOX_FRAMES = 64    # frames waiting to be handled before the connection stops reading


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


def _ready_callback(listener) -> None:
    _resolve(listener.context)


def _subscription_lost(listener) -> bool:
    """After ``on_error``: True when the listener will get nothing more (its first
    fetch failed, or the fan-out removed it because its owner went down). A failed
    gap fetch is retried by the fan-out on the channel's next message."""
    return listener.closed or not listener.context.done()


def _channel_event(item) -> bytes:
    return http.chunk(events.channel_event(item.seq, item.data))


def _text_frame_of_json(item) -> bytes:
    return websocket.encode_text(item.json())


class _Session:
    """What both stream kinds share: their listeners, subscribing, slow readers."""

    kind = ""  # the metric of a stream opened

    def __init__(self, conn, edge, multiplexed: bool):
        self.conn = conn
        self.edge = edge
        self.peer = conn.peer
        self.multiplexed = multiplexed
        self.listeners: dict = {}  # channel -> Listener
        self.ended = False
        config = edge.config.edge
        self._limit = config.stream_queue_limit_bytes
        self._max_channels = config.stream_max_channels
        edge.streams.add(self)
        edge.metrics.incr(time.time(), self.kind)

    def subscribe(self, subscriptions) -> list:
        """Subscribe to the channels not subscribed yet; returns the futures that
        resolve when each has replayed (none once the stream has ended)."""
        if self.ended:
            return []
        loop = asyncio.get_running_loop()
        now = time.time()
        metric = "subscribed_multiplexed" if self.multiplexed else "subscribed"
        waits = []
        for sub in subscriptions:
            if sub.channel in self.listeners:
                continue
            ready = loop.create_future()
            listener = Listener(sub.channel, self.on_items, self.on_error, once=False,
                                context=ready, on_ready=_ready_callback)
            self.listeners[sub.channel] = listener
            self.edge.metrics.incr(now, metric, sub.channel)
            self.edge.fanout.add(listener, sub.last_sequence)
            waits.append(ready)
        return waits

    def unsubscribe(self, channels) -> None:
        for channel in channels:
            listener = self.listeners.pop(channel, None)
            if listener is not None:
                self.edge.fanout.remove(listener)

    def end(self) -> None:
        """Stop every subscription; nothing more is written."""
        if self.ended:
            return
        self.ended = True
        self.edge.streams.discard(self)
        listeners, self.listeners = self.listeners, {}
        for listener in listeners.values():
            self.edge.fanout.remove(listener)

    def behind(self) -> bool:
        """True when the reader has more than the queue limit waiting for it."""
        return self.conn.stream_buffered() > self._limit

    def cut_slow(self) -> None:
        self.edge.metrics.incr(time.time(), "slow_readers_closed")
        log.info("cutting an event stream to %s: its reader is too far behind", self.peer)
        self.end()
        self.conn.abort()

    def on_error(self, listener, exc) -> None:
        """A fetch of ``listener`` failed: a gap fetch is retried by the fan-out; a lost
        subscription is the stream's to handle (``subscription_lost``)."""
        if self.ended:
            return
        if not _subscription_lost(listener):
            log.debug("filling a gap on %r failed: %s", listener.channel, exc)
            return
        self.subscription_lost(listener, exc)

    def subscription_lost(self, listener, exc) -> None:
        raise NotImplementedError

    def on_items(self, listener, items) -> None:
        raise NotImplementedError


class EventStream(_Session):
    """One ``text/event-stream`` answer over one or more channels (chunked).

    The head goes out once every channel has replayed, so an open EventSource is
    a subscribed one. Keep-alive comments every ``sse_keepalive_s``.
    """

    kind = "event_stream_opened"

    def __init__(self, conn, edge, subscriptions, multiplexed: bool, extra: bytes):
        super().__init__(conn, edge, multiplexed)
        self.positions = {sub.channel: sub.last_sequence for sub in subscriptions}
        self.started = False
        self._extra = extra
        self._queued = [http.event_stream_head(extra),
                        http.chunk(events.retry_field(edge.config.edge.sse_retry_ms))]
        self._keepalive = None
        self._failed = None
        self._task = asyncio.ensure_future(self._run(subscriptions))  # the loop holds tasks weakly
        self._task.add_done_callback(self._ran)

    async def _run(self, subscriptions) -> None:
        waits = self.subscribe(subscriptions)
        if waits:
            await asyncio.gather(*waits)
        if self.ended:
            return self._conclude()
        self.started = True
        self._flush()
        self._schedule_keepalive()

    def _ran(self, task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A stream that failed must not leave its client waiting on an open connection.
            log.error("event stream to %s failed", self.peer, exc_info=task.exception())
            self.end()
            self.conn.abort()

    def _flush(self) -> None:
        queued = self._queued
        if queued:
            self._queued = []
            self.conn.stream_write(queued[0] if len(queued) == 1 else b"".join(queued))

    def on_items(self, listener, items) -> None:
        if self.ended:
            return
        if self.started and self.behind():
            return self.cut_slow()
        if not self.started and sum(map(len, self._queued)) > self._limit:
            return self.cut_slow()  # a replay bigger than a reader may have waiting
        self.edge.deliveries["sse"] += len(items)
        queued = self._queued
        if self.multiplexed:
            for item in items:
                self.positions[listener.channel] = item.seq
                event_id = events.multiplex_event_id(self.positions)
                queued.append(http.chunk(events.multiplex_event(
                    event_id, item.json_with_channel(listener.channel))))
        else:
            for item in items:
                queued.append(item.encoded(_channel_event))
        if self.started:
            self._flush()

    def subscription_lost(self, listener, exc) -> None:
        # End the answer: the browser reconnects after ``retry`` and resumes.
        log.info("event stream on %r: %s; ending it", listener.channel, exc)
        self._failed = exc
        self.end()
        if self.started:
            self._conclude()

    def _schedule_keepalive(self) -> None:
        delay = self.edge.config.edge.sse_keepalive_s
        self._keepalive = asyncio.get_running_loop().call_later(delay, self._keep_alive)

    def _keep_alive(self) -> None:
        if self.ended:
            return
        if self.behind():
            return self.cut_slow()
        self.conn.stream_write(http.chunk(events.KEEPALIVE_COMMENT))
        self._schedule_keepalive()

    def end(self) -> None:
        super().end()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def shutdown(self) -> None:
        """The edge is stopping: end the answer; browsers reconnect."""
        if not self.ended:
            self.end()
            if self.started:
                self._conclude()

    def gone(self) -> None:
        """The connection is closed."""
        self.end()

    def feed(self, data: bytes) -> None:
        """Bytes from the client: an event stream has nothing more to read."""

    def _conclude(self) -> None:
        if self._failed is not None and not self.started:
            # Nothing was sent yet: say why, as a long-poll would.
            status, reason = self.edge.backend_error_status(self._failed)
            self.conn.stream_ended(http.error_answer(http.HttpError(status, reason),
                                                     self._extra))
            return
        # Whatever is still queued first: the head, when the edge stopped before the
        # replay was done and the stream never started.
        self._queued.append(http.LAST_CHUNK)
        queued, self._queued = self._queued, []
        self.conn.stream_ended(b"".join(queued))


class WebSocket(_Session):
    """A Firehose WebSocket (docs/protocol.md §6) on one channel (``channel``) or
    multiplexed (``channel`` None: ``?subscribe=`` and multiplex frames).

    Protocol pings go out every ``ws_ping_interval_s``; a client silent for that
    long plus ``ws_ping_timeout_s`` is closed.
    """

    kind = "websocket_opened"

    def __init__(self, conn, edge, channel, subscriptions=(), url_params=None,
                 credential=None):
        super().__init__(conn, edge, channel is None)
        config = edge.config.edge
        self.channel = channel
        self.credential = credential  # from the upgrade request: checks subscribe frames
        self.url_params = url_params or {}
        self._max_depth = config.max_json_depth
        self._reader = websocket.FrameReader(config.ws_max_frame_bytes)
        self._ping_interval_s = config.ws_ping_interval_s
        self._silence_limit_s = config.ws_ping_interval_s + config.ws_ping_timeout_s
        self._inbox: deque = deque()
        self._worker = None
        self._closing = False
        self._drain_budget = None  # after a protocol error: what may still be read
        self._grace = None  # cuts a closing handshake the client does not finish
        self._heard = time.monotonic()
        # A token bucket of client frames: ws_max_frames_per_s, bursts of ten seconds' worth.
        self._frame_rate = config.ws_max_frames_per_s
        self._frame_burst = 10 * config.ws_max_frames_per_s
        self._frame_tokens = float(self._frame_burst)
        self._pinger = asyncio.get_running_loop().call_later(
            self._ping_interval_s, self._ping) if self._ping_interval_s > 0 else None
        if subscriptions:
            self._start(self._subscribe(subscriptions))

    # -- frames in ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._drain_budget is not None:  # after a protocol error: bytes read and dropped
            self._drain_budget -= len(data)
            if self._drain_budget < 0:
                return self.drop()
        now = time.monotonic()
        self._frame_tokens = min(self._frame_burst, self._frame_tokens
                                 + (now - self._heard) * self._frame_rate)
        self._heard = now
        for event in self._reader.feed(data):
            if not self._closing:
                self._frame_tokens -= 1
                if self._frame_tokens < 0:
                    self._too_many_frames()  # what follows waits for its closing frame
            kind = type(event)
            if kind is websocket.Text or kind is websocket.Binary:
                if not self._closing:
                    self._inbox.append(event[0])
            elif kind is websocket.Ping:
                self._send_raw(websocket.encode_pong(event.payload))  # not once closing
            elif kind is websocket.Close:
                if self._closing:  # the answer to our close: the handshake is done
                    self.gone()
                    self.conn.stream_ended(b"")
                else:
                    self._finish(websocket.close_reply(event))
            elif kind is websocket.ProtocolError:
                self.count_bad_frame(event.reason)
                if self._closing:  # no close frame will come now: end without waiting
                    self.gone()
                    self.conn.stream_ended(b"")
                else:
                    # Close, and let the client finish sending what it was sending
                    # (read and dropped) until its own close or the grace period: a
                    # connection closed under a sender resets, and its client never
                    # sees the close code.
                    self.close(event.code, event.reason)
                    self._drain_budget = self._reader.max_message_bytes + 65536
        if self._inbox and self._worker is None:
            self._start(self._work())
        if len(self._inbox) > _INBOX_FRAMES:
            self.conn.pause_reading_for_stream()

    def _start(self, coro) -> None:
        self._worker = asyncio.ensure_future(coro)
        self._worker.add_done_callback(self._worked)

    def _worked(self, task) -> None:
        self._worker = None
        if not task.cancelled() and task.exception() is not None:
            log.error("WebSocket from %s failed", self.peer, exc_info=task.exception())
            self.drop()
        elif self._inbox and not self._closing:
            self._start(self._work())
        elif not self._closing:  # a closing socket reads nothing more but its close
            self.conn.resume_reading_for_stream()

    async def _work(self) -> None:
        inbox = self._inbox
        while inbox and not self._closing:
            if len(inbox) <= _INBOX_FRAMES // 2 and self._frame_tokens > 0:
                self.conn.resume_reading_for_stream()
            await self._on_frame(inbox.popleft())

    async def _on_frame(self, text) -> None:
        if isinstance(text, bytes):
            result = events.Ignored("binary frames are not part of the protocol")
        elif self.multiplexed:
            result = events.parse_multiplex_frame(text, self._max_channels, self._max_depth)
        else:
            result = events.parse_channel_frame(text, self.channel, self.url_params,
                                                self._max_depth)
        if result is events.PING:
            self.send(events.PONG_FRAME)
        elif isinstance(result, events.Subscribe):
            await self._subscribe(result.subscriptions)
        elif isinstance(result, events.Unsubscribe):
            self.unsubscribe(result.channels)
        elif isinstance(result, events.Rejected):
            self.count_bad_frame(result.reason)
            self.send(events.subscription_failed_frame(result.reason))
        else:
            self.count_bad_frame(result.reason)

    def _too_many_frames(self) -> None:
        self.count_bad_frame("too many frames")
        log.info("closing a WebSocket from %s: more than %d frames a second", self.peer,
                 self._frame_rate)
        self.close(websocket.CLOSE_POLICY_VIOLATION, "the client sends too many frames")
        self.conn.pause_reading_for_stream()  # nothing more is read; the grace period ends it

    def count_bad_frame(self, reason: str) -> None:
        self.edge.metrics.incr(time.time(), "websocket_bad_frames")
        log.debug("bad frame from %s: %s", self.peer, reason)

    async def _subscribe(self, subscriptions) -> None:
        if self.ended:
            return
        fresh = [sub for sub in subscriptions if sub.channel not in self.listeners]
        if len(self.listeners) + len(fresh) > self._max_channels:
            reason = f"a socket may subscribe to at most {self._max_channels} channels"
            self.count_bad_frame(reason)
            self.send(events.subscription_failed_frame(reason))
            return
        if self.edge.rules.checks_credentials:
            fresh = await self._allowed(fresh)
            if self.ended:  # closed while the callout was asked
                return
        waits = self.subscribe(fresh)
        if waits:
            await asyncio.gather(*waits)

    async def _allowed(self, subscriptions) -> list:
        """The subscriptions this socket's credential grants; each other one is
        answered with a "Subscription failed" frame."""
        allowed = []
        rules = self.edge.rules
        for sub in subscriptions:
            try:
                if self.multiplexed:  # a single channel's was checked with its upgrade
                    asks = rules.authorize("subscribe", sub.channel, self.credential)
                    if asks:
                        await self.edge.ask_callout(asks)
                rules.filter_subscription(sub.channel, sub.params, self.credential)
            except Exception as exc:  # HttpError, or the callout's AuthError
                reason = getattr(exc, "reason", None)
                if reason is None:
                    raise
                self.send(events.subscription_failed_frame(reason, sub.channel))
                continue
            allowed.append(sub)
        return allowed

    # -- frames out --------------------------------------------------------------

    def _send_raw(self, frame: bytes) -> None:
        """Write a frame the client asked for (a pong, a reply): it counts toward the
        slow-reader limit like a message."""
        if self._closing:
            return
        if self.behind():
            return self.cut_slow_socket()
        self.conn.stream_write(frame)

    def send(self, payload: bytes) -> None:
        self._send_raw(websocket.encode_text(payload))

    def on_items(self, listener, items) -> None:
        if self.ended or self._closing:
            return
        if self.behind():
            return self.cut_slow_socket()
        self.edge.deliveries["websocket"] += len(items)
        write = self.conn.stream_write
        if self.multiplexed:
            for item in items:
                write(websocket.encode_text(item.json_with_channel(listener.channel)))
        else:
            for item in items:
                write(item.encoded(_text_frame_of_json))

    def subscription_lost(self, listener, exc) -> None:
        if listener.closed or not self.multiplexed:
            # A live subscription broke (its owner went down), or a single-channel
            # socket could not subscribe: drop the connection uncleanly; Firehose
            # clients reconnect and resume from their sequences.
            log.info("WebSocket on %r: %s; dropping the connection", listener.channel, exc)
            return self.drop()
        if self.listeners.get(listener.channel) is listener:
            self.unsubscribe([listener.channel])
        self.send(events.subscription_failed_frame(f"Service unavailable: {exc}",
                                                   listener.channel))

    # -- the end -------------------------------------------------------------------

    def cut_slow_socket(self) -> None:
        """Close with 1008 (behind what is queued; the grace period bounds the wait)."""
        self.edge.metrics.incr(time.time(), "slow_readers_closed")
        log.info("closing a WebSocket from %s: its reader is too far behind", self.peer)
        self.close(websocket.CLOSE_POLICY_VIOLATION, "the client reads too slowly")

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

    shutdown = drop  # the edge is stopping: unclean, so clients reconnect

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
        self.end()

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
        if self.behind():
            return self.cut_slow_socket()
        self.conn.stream_write(websocket.encode_ping())
        self._pinger = asyncio.get_running_loop().call_later(self._ping_interval_s, self._ping)
