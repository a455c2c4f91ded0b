"""WebSocket and Server-Sent Events on the edge (PROTOCOL.md §6-7).

Theory of operation
-------------------
A stream is a connection that holds one ``fanout.Listener`` (``once=False``) per
channel it subscribes to: the subscribe-then-fetch mechanism of long-poll, so
the replay and the live messages reach ``on_items`` in order and without
duplicates. Each message's bytes are built once per item (``Item.json``,
``Item.json_with_channel``, ``Item.encoded(channel_event)``) and shared by every
stream on the edge.

Ordering: a WebSocket's frames are handled one at a time (``on_message`` is a
coroutine, and Tornado reads the next frame only when it has returned); a
subscribe returns when its first fetch has been delivered (``on_ready``), so a
pong written after it follows the replayed messages.

Slow readers: the future of every write tells when its bytes were handed to the
kernel; ``Outbox`` sums the bytes still queued in user space. When messages
arrive for a connection whose queue is over ``stream_queue_limit_bytes``, the
reader has fallen behind: it is disconnected (WebSocket close 1008; an event
stream is cut) and counted as ``slow_readers_closed`` in the metrics. A batch is
always written whole, so a replay of any size reaches a reader that keeps up.

Dead peers: Tornado's protocol-level pings (``websocket_ping_interval`` and
``websocket_ping_timeout``) close a WebSocket that stops answering; an event
stream's keep-alive comments make writes to a dead peer fail.

Routing: ``stream_rules`` are Tornado rules that send a GET carrying
``Upgrade: websocket`` to the socket handlers, before the path rules of the
long-poll handlers see it. Event streams are plain GET responses: the long-poll
handlers delegate to ``serve_event_stream`` when the request accepts
``text/event-stream``.

Edge shutdown drops WebSockets without a closing handshake: the Firehose
JavaScript client reconnects after an unclean close only, and a restarting edge
wants its clients back. Event streams end normally; browsers reconnect them.
"""

import asyncio
import logging
import time

import tornado.routing
import tornado.websocket

from ..wire import http

from ..wire import events

from ..wire import websocket
from .fanout import Listener
from ..wire.http import HttpError

log = logging.getLogger("firehose.streams")

EVENT_STREAM_TYPE = "text/event-stream"
# The head of every event stream's 200 answer, on either path.
EVENT_STREAM_HEADERS = (("Content-Type", EVENT_STREAM_TYPE + "; charset=utf-8"),
                        ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))


class Outbox:
    """The bytes of one connection written but not yet handed to the kernel."""

    __slots__ = ("limit_bytes", "pending_bytes")

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.pending_bytes = 0

    def behind(self) -> bool:
        """True when the reader has more than the limit waiting for it."""
        return self.pending_bytes > self.limit_bytes

    def track(self, future, size: int) -> None:
        """Count ``size`` bytes until ``future`` (their write) resolves."""
        self.pending_bytes += size
        future.add_done_callback(lambda f: self._written(f, size))

    def _written(self, future, size: int) -> None:
        self.pending_bytes -= size
        if not future.cancelled():
            future.exception()  # a write to a closed connection is not an error here


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


def _ready_callback(listener) -> None:
    _resolve(listener.context)


def _subscription_lost(listener) -> bool:
    """After ``on_error``: True when the listener will get nothing more.

    That is when its first fetch failed, or when the fan-out removed it (its
    channel's owner went down). A failed gap fetch is retried by the fan-out on
    the channel's next message.
    """
    return listener.closed or not listener.context.done()


# -- routing -----------------------------------------------------------------------

class WebSocketUpgrade(tornado.routing.Matcher):
    """Matches a GET asking for ``Upgrade: websocket`` on a path matching ``pattern``."""

    def __init__(self, pattern: str):
        self._path = tornado.routing.PathMatches(pattern)

    def match(self, request):
        if request.method != "GET" or \
                request.headers.get("Upgrade", "").strip().lower() != "websocket":
            return None
        return self._path.match(request)


def stream_rules(deps: dict) -> list:
    """The rules for the WebSocket handlers; they go before the long-poll rules."""
    return [
        tornado.routing.Rule(WebSocketUpgrade(r"/channels@firehose"), MultiplexSocket, deps),
        tornado.routing.Rule(WebSocketUpgrade(r"/.*"), ChannelSocket, deps),
    ]


def websocket_settings(edge_config) -> dict:
    """Tornado application settings for the WebSocket handlers."""
    return {"websocket_ping_interval": edge_config.ws_ping_interval_s,
            "websocket_ping_timeout": edge_config.ws_ping_timeout_s,
            "websocket_max_message_size": edge_config.ws_max_frame_bytes}


def wants_event_stream(request) -> bool:
    return EVENT_STREAM_TYPE in request.headers.get("Accept", "")


# -- WebSocket ---------------------------------------------------------------------

class SocketSession:
    """The Firehose protocol of one WebSocket (PROTOCOL.md §6): ping/pong,
    subscriptions, bounded output, whoever owns the frames.

    ``link`` owns them: Tornado's handlers here (``_Socket``), or a fast-path
    connection (``faststreams.FastWebSocket``). It provides ``send(payload)`` (one
    text frame), ``send_item(channel, item)`` (a message's frame),
    ``behind()`` (the reader is past the queue limit), ``close(code, reason)``
    (a closing handshake), ``drop()`` (an unclean close) and ``peer``.
    A single-channel session (``channel`` set) subscribes with its first
    subscribe frame; a multiplexed one (``channel`` None) takes ``?subscribe=``
    and multiplex frames.
    """

    def __init__(self, edge, link, channel=None, url_params=None):
        self.edge = edge
        self.link = link
        self.channel = channel
        self.multiplexed = channel is None
        self.url_params = url_params or {}
        self.listeners: dict = {}  # channel -> Listener
        self.ended = False

    async def open(self, initial_subscriptions=()) -> None:
        if self.ended:
            return  # closed before it opened
        self.edge.streams.add(self)
        self.edge.metrics.incr(time.time(), "websocket_opened")
        if initial_subscriptions:
            await self.subscribe(initial_subscriptions)

    def closed(self) -> None:
        """The connection is gone."""
        self.end()
        self.edge.streams.discard(self)

    def end(self) -> None:
        """Stop every subscription of this socket."""
        self.ended = True
        listeners, self.listeners = self.listeners, {}
        for listener in listeners.values():
            self.edge.fanout.remove(listener)

    def shutdown(self) -> None:
        """The edge is stopping: drop the connection (unclean, so clients reconnect)."""
        self.end()
        self.link.drop()

    def close_slow(self) -> None:
        self.edge.metrics.incr(time.time(), "slow_readers_closed")
        log.info("closing a WebSocket from %s: its reader is too far behind", self.link.peer)
        self.end()
        self.link.close(websocket.CLOSE_POLICY_VIOLATION, "the client reads too slowly")

    def frame_for(self, channel: str, item) -> bytes:
        """The payload of a message's frame."""
        return item.json_with_channel(channel) if self.multiplexed else item.json()

    # -- frames in ---------------------------------------------------------------

    async def on_message(self, text) -> None:
        if isinstance(text, bytes):
            result = events.Ignored("binary frames are not part of the protocol")
        elif self.multiplexed:
            result = events.parse_multiplex_frame(text)
        else:
            result = events.parse_channel_frame(text, self.channel, self.url_params)
        if result is events.PING:
            self.link.send(events.PONG_FRAME)
        elif isinstance(result, events.Subscribe):
            await self.subscribe(result.subscriptions)
        elif isinstance(result, events.Unsubscribe):
            self.unsubscribe(result.channels)
        elif isinstance(result, events.Rejected):
            self.count_bad_frame(result.reason)
            self.link.send(events.subscription_failed_frame(result.reason))
        else:
            self.count_bad_frame(result.reason)

    def count_bad_frame(self, reason: str) -> None:
        self.edge.metrics.incr(time.time(), "websocket_bad_frames")
        log.debug("bad frame from %s: %s", self.link.peer, reason)

    async def subscribe(self, subscriptions) -> None:
        """Subscribe to the channels not subscribed yet; returns once each has replayed."""
        if self.ended:
            return
        fresh = [sub for sub in subscriptions if sub.channel not in self.listeners]
        limit = self.edge.config.edge.stream_max_channels
        if len(self.listeners) + len(fresh) > limit:
            reason = f"a socket may subscribe to at most {limit} channels"
            self.count_bad_frame(reason)
            self.link.send(events.subscription_failed_frame(reason))
            return
        loop = asyncio.get_running_loop()
        now = time.time()
        waits = []
        for sub in fresh:
            ready = loop.create_future()
            listener = Listener(sub.channel, self.on_items, self.on_error, once=False,
                                context=ready, on_ready=_ready_callback)
            self.listeners[sub.channel] = listener
            self.edge.metrics.incr(now, "subscribed_multiplexed" if self.multiplexed
                                   else "subscribed", sub.channel)
            self.edge.fanout.add(listener, sub.last_sequence)
            waits.append(ready)
        if waits:
            await asyncio.gather(*waits)

    def unsubscribe(self, channels) -> None:
        for channel in channels:
            listener = self.listeners.pop(channel, None)
            if listener is not None:
                self.edge.fanout.remove(listener)

    # -- frames out --------------------------------------------------------------

    def on_items(self, listener, items) -> None:
        if self.ended:
            return
        if self.link.behind():
            return self.close_slow()
        for item in items:
            self.link.send_item(listener.channel, item)

    def on_error(self, listener, exc) -> None:
        if self.ended:
            return
        if not _subscription_lost(listener):
            log.debug("filling a gap on %r failed: %s", listener.channel, exc)
            return
        if listener.closed or not self.multiplexed:
            # A live subscription broke (its owner went down), or a single-channel
            # socket could not subscribe: drop the connection uncleanly; Firehose
            # clients reconnect and resume from their sequences.
            log.info("WebSocket on %r: %s; dropping the connection", listener.channel, exc)
            self.shutdown()
            return
        if self.listeners.get(listener.channel) is listener:
            self.unsubscribe([listener.channel])
        self.link.send(events.subscription_failed_frame(f"Service unavailable: {exc}",
                                                            listener.channel))


class _Socket(tornado.websocket.WebSocketHandler):
    """A Firehose WebSocket served by Tornado: the ``link`` of a ``SocketSession``.

    Subclasses parse the upgrade URL (``url_session``).
    """

    json_errors = False  # whether an upgrade URL error is answered as "Subscription failed"

    def initialize(self, edge):
        self.edge = edge
        self.session = None
        self.outbox = Outbox(edge.config.edge.stream_queue_limit_bytes)
        self.counted = False
        self.initial_subscriptions = ()

    def check_origin(self, origin: str) -> bool:
        return self.edge.allows_origin(origin)

    async def get(self, *args, **kwargs):
        try:
            self.session, self.initial_subscriptions = self.url_session()
        except HttpError as exc:
            self.set_status(exc.status)
            if self.json_errors:
                self.set_header("Content-Type", "application/json")
                return self.finish(events.subscription_failed_frame(exc.reason))
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            return self.finish(exc.reason.replace("\n", " "))
        await super().get(*args, **kwargs)

    def url_session(self) -> tuple:
        """(the session, its initial subscriptions) for the upgrade URL; raises HttpError."""
        raise NotImplementedError

    @property
    def peer(self) -> str:
        return self.request.remote_ip

    async def open(self, *args, **kwargs):
        # Tornado's HTTP server saw the connection close when it was upgraded;
        # it stays open, so it counts again until on_close.
        self.edge.metrics.connections += 1
        self.counted = True
        await self.session.open(self.initial_subscriptions)

    def on_close(self):
        if self.session is not None:
            self.session.closed()
        if self.counted:
            self.counted = False
            self.edge.metrics.connections -= 1

    async def on_message(self, text):
        await self.session.on_message(text)

    # -- the link ------------------------------------------------------------------

    def drop(self) -> None:
        connection = self.ws_connection
        if connection is not None and connection.stream is not None:
            connection.stream.close()

    def behind(self) -> bool:
        return self.outbox.behind()

    def send_item(self, channel: str, item) -> None:
        self.send(self.session.frame_for(channel, item))

    def send(self, frame: bytes) -> None:
        try:
            written = self.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            self.session.end()
            return
        self.outbox.track(written, len(frame))


class ChannelSocket(_Socket):
    """A WebSocket on one channel: its first subscribe frame subscribes."""

    def url_session(self) -> tuple:
        channel = http.channel_from_path(self.request.path)
        if http.is_reserved(channel):
            raise HttpError(404, f"Unknown endpoint {channel}")
        url_params = {name: self.get_query_argument(name)
                      for name in self.request.query_arguments
                      if name != "last_message_sequence"}
        return SocketSession(self.edge, self, channel, url_params), ()


class MultiplexSocket(_Socket):
    """A WebSocket on ``/channels@firehose``: ``?subscribe=`` and multiplex frames."""

    json_errors = True

    def url_session(self) -> tuple:
        value = self.get_query_argument("subscribe", None)
        subscriptions = http.parse_subscribe_query(value) if value else ()
        return SocketSession(self.edge, self), subscriptions


# -- Server-Sent Events --------------------------------------------------------------

async def serve_event_stream(handler, edge, subscriptions, multiplexed: bool) -> None:
    """Answer ``handler``'s GET with an event stream of ``subscriptions``.

    ``Last-Event-ID`` wins over the sequences of ``subscriptions``. Errors are
    answered with ``handler.answer(status, reason)``. While the stream runs,
    ``handler.poll_in_flight`` is the stream, so the client going away ends it;
    returns when the stream has ended.
    """
    last_event_id = handler.request.headers.get("Last-Event-ID")
    try:
        if multiplexed:
            resume = events.parse_multiplex_event_id(last_event_id)
            subscriptions = [sub._replace(last_sequence=resume.get(sub.channel,
                                                                   sub.last_sequence))
                             for sub in subscriptions]
        else:
            seq = events.parse_last_event_id(last_event_id)
            if seq is not None:
                subscriptions = [sub._replace(last_sequence=seq) for sub in subscriptions]
    except HttpError as exc:
        return handler.answer(exc.status, exc.reason)
    limit = edge.config.edge.stream_max_channels
    if len(subscriptions) > limit:
        return handler.answer(400, f"an event stream may subscribe to at most {limit} channels")
    await HandlerEventStream(handler, edge, subscriptions, multiplexed).run()


def channel_event_of(item) -> bytes:
    """The single-channel event of an ``Item`` (an ``Item.encoded`` encoder)."""
    return events.channel_event(item.seq, item.data)


class EventStream:
    """One ``text/event-stream`` response over one or more channels.

    The subscriptions, the replay, keep-alives and slow readers are here; the
    subclasses own the connection: ``HandlerEventStream`` answers through a
    Tornado handler, ``faststreams.FastEventStream`` writes to an asyncio transport.
    """

    def __init__(self, edge, subscriptions, multiplexed: bool):
        self.edge = edge
        self.subscriptions = subscriptions
        self.multiplexed = multiplexed
        self.positions = {sub.channel: sub.last_sequence for sub in subscriptions}
        self.listeners: list = []
        self.done = asyncio.get_running_loop().create_future()
        self.started = False
        self.cut = False
        self.failed = None  # why the stream could not start (answered 503 instead)
        self._keepalive = None

    # -- the connection (subclasses) -----------------------------------------------

    def begin(self) -> None:
        """Prepare the 200 answer's head; it goes out with the first flush."""
        raise NotImplementedError

    def write(self, chunk: bytes) -> None:
        raise NotImplementedError

    def write_item(self, item) -> None:
        """Write one message of a single-channel stream."""
        self.write(item.encoded(channel_event_of))

    def flush(self) -> None:
        raise NotImplementedError

    def behind(self) -> bool:
        """True when the reader has more than the queue limit waiting for it."""
        raise NotImplementedError

    def drop(self) -> None:
        """Close the connection at once (a slow reader)."""
        raise NotImplementedError

    def conclude(self) -> None:
        """The stream has ended: finish the answer, or answer ``failed`` if nothing was sent."""
        raise NotImplementedError

    # -- the stream ----------------------------------------------------------------

    async def run(self) -> None:
        edge = self.edge
        self.begin()
        edge.streams.add(self)
        edge.metrics.incr(time.time(), "event_stream_opened")
        self.write(events.retry_field(edge.config.edge.sse_retry_ms))
        loop = asyncio.get_running_loop()
        now = time.time()
        waits = []
        for sub in self.subscriptions:
            ready = loop.create_future()
            listener = Listener(sub.channel, self.on_items, self.on_error, once=False,
                                context=ready, on_ready=_ready_callback)
            self.listeners.append(listener)
            edge.metrics.incr(now, "subscribed_multiplexed" if self.multiplexed
                              else "subscribed", sub.channel)
            edge.fanout.add(listener, sub.last_sequence)
            waits.append(ready)
        try:
            # The headers go out once every channel has replayed: an open
            # EventSource is a subscribed one.
            await asyncio.gather(*waits)
            if not self.done.done():
                self.started = True
                self.flush()
                self._schedule_keepalive()
                await self.done
        finally:
            self.end()
            edge.streams.discard(self)
        self.conclude()

    def end(self) -> None:
        _resolve(self.done)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            self.edge.fanout.remove(listener)

    def cancel(self) -> None:
        """The client went away."""
        self.end()

    def shutdown(self) -> None:
        """The edge is stopping: end the response; browsers reconnect."""
        self.end()

    def cut_slow(self) -> None:
        self.edge.metrics.incr(time.time(), "slow_readers_closed")
        log.info("cutting an event stream to %s: its reader is too far behind", self.peer)
        self.cut = True
        self.end()
        self.drop()

    def on_items(self, listener, items) -> None:
        if self.done.done():
            return
        if self.behind():
            return self.cut_slow()
        for item in items:
            if self.multiplexed:
                self.positions[listener.channel] = item.seq
                event_id = events.multiplex_event_id(self.positions)
                self.write(events.multiplex_event(event_id,
                                                      item.json_with_channel(listener.channel)))
            else:
                self.write_item(item)
        if self.started:
            self.flush()

    def on_error(self, listener, exc) -> None:
        if self.done.done():
            return
        if not _subscription_lost(listener):
            log.debug("filling a gap on %r failed: %s", listener.channel, exc)
            return
        # End the response: the browser reconnects after ``retry`` and resumes.
        log.info("event stream on %r: %s; ending it", listener.channel, exc)
        self.failed = exc
        self.end()

    def _schedule_keepalive(self) -> None:
        delay = self.edge.config.edge.sse_keepalive_s
        self._keepalive = asyncio.get_running_loop().call_later(delay, self._keep_alive)

    def _keep_alive(self) -> None:
        if self.done.done():
            return
        if self.behind():
            return self.cut_slow()
        self.write(events.KEEPALIVE_COMMENT)
        self.flush()
        self._schedule_keepalive()


class HandlerEventStream(EventStream):
    """An event stream answered through a Tornado ``RequestHandler``."""

    def __init__(self, handler, edge, subscriptions, multiplexed: bool):
        super().__init__(edge, subscriptions, multiplexed)
        self.handler = handler
        self.outbox = Outbox(edge.config.edge.stream_queue_limit_bytes)
        self.unflushed = 0
        self.peer = handler.request.remote_ip

    def begin(self) -> None:
        handler = self.handler
        handler.set_status(200)
        for name, value in EVENT_STREAM_HEADERS:
            handler.set_header(name, value)
        handler.poll_in_flight = self

    def write(self, chunk: bytes) -> None:
        self.handler.write(chunk)
        self.unflushed += len(chunk)

    def flush(self) -> None:
        size, self.unflushed = self.unflushed, 0
        self.outbox.track(self.handler.flush(), size)

    def behind(self) -> bool:
        return self.outbox.behind()

    def drop(self) -> None:
        self.handler.request.connection.close()

    def conclude(self) -> None:
        handler = self.handler
        handler.poll_in_flight = None
        if handler.client_gone or self.cut:
            return
        if self.failed is not None and not self.started:
            # Nothing was sent yet: say why, as a long-poll would.
            return handler.answer_backend_error(self.failed)
        handler.finish()
