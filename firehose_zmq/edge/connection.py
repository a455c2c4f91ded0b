"""Client connections of the edge: one implementation of HTTP/1.1 serving, on asyncio.

Theory of operation
-------------------
``Acceptor`` accepts every connection of the edge's listening sockets, below a
connection cap (past it, a one-line 503 and a close; on ``EMFILE`` it backs off
instead of spinning). ``EdgeHTTPServer`` (Tornado's ``HTTPServer``) then
serves it in one of two ways:

- **fast** (the default): the socket is served by a ``Connection``, an
  ``asyncio.Protocol`` that reads request heads and bodies itself and asks
  ``wire.http.Rules`` what each means;
- **slow** (``firehose-edge --no-fast-path``): Tornado's ``HTTP1ServerConnection``
  reads each request, and ``handlers.RequestHandler`` asks the same rules, takes
  the connection (``RequestHandler.detach()``) and gives the decided request to a
  ``Connection`` on a ``StreamTransport``, which answers it and gives the socket
  back to Tornado for the next request (or keeps it, as a stream).

Either way a ``Connection`` runs the action: a long-poll, a publish, a delete, a
health check, the metrics, an event stream or a WebSocket (``streams``). Every
answer's bytes come from ``wire.http``.

Requests on a connection are answered one at a time, in order (pipelined requests
wait in the buffer). While a request is in flight, or while the client is not
reading its answers (``pause_writing``), nothing more is parsed, and reading
pauses once the buffer holds more than one request could need. A client that
half-closes its side while a long-poll waits is gone; one that half-closes after
a publish gets its answer first.

Bounds: a head must arrive within ``header_timeout_s`` (408, close) and be at
most ``max_head_bytes`` (431, close); a body must keep coming (no gap of
``header_timeout_s``); a connection with nothing in flight is closed after
``idle_timeout_s``; bodies are at most the message limit (413).
"""

import asyncio
import errno
import logging
import resource
import socket
import ssl
import time
import weakref

import tornado.httpserver
import tornado.iostream

from ..wire import http
from ..wire.http import HttpError
from .backend import BackendError
from .streams import EventStream, WebSocket

log = logging.getLogger("firehose.edge")

# Heads already read, with what they ask for: clients re-poll and re-publish with
# the same head, and a channel's subscribers send identical ones (KnownHeads).
_KNOWN_HEADS = 4096
_KNOWN_HEAD_BYTES = 1024
_SWEEP_S = 1.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TOO_MANY = http.render(503, b"Too many connections; try again later", http.TEXT_TYPE,
                        (), b"Connection: close\r\n")
_ACCEPT_BATCH = 64
_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_LOG_EVERY_S = 10.0  # rate limit of the warnings a flood could repeat


def connection_cap(configured: int) -> int:
    """The connection cap: ``configured``, or (0) the descriptor limit less a reserve
    for the edge's own files and ZeroMQ sockets."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - max(64, soft // 16))


def tls_context(cert_file: str, key_file: str):
    """The server's TLS context (HTTPS, WSS), or None without a certificate; raises
    OSError naming the file that cannot be used."""
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot use the TLS certificate {cert_file} and key {key_file}: "
                      f"{exc}") from None
    return context


class RateLimitedLog:
    """A warning logged at most once per ``interval_s``, with the count in between."""

    def __init__(self, interval_s: float = _LOG_EVERY_S):
        self.interval_s = interval_s
        self._last = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last report)"
        self._last, self._suppressed = now, 0
        log.warning(message, *args)


class Acceptor:
    """Accepts connections on ``sock`` and hands each to ``server.accepted``."""

    def __init__(self, sock: socket.socket, server: "EdgeHTTPServer"):
        self.sock = sock
        self.server = server
        self._loop = asyncio.get_running_loop()
        self._backoff_s = 0.0
        self._retry = None
        self._errors = RateLimitedLog()
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_ERRORS:
                    raise
                # Out of descriptors: stop accepting for a while instead of
                # spinning on a socket that stays readable.
                self._backoff_s = min(1.0, self._backoff_s * 2 or 0.05)
                self._errors.warning("cannot accept connections (%s); pausing for %.2f s",
                                     exc.strerror, self._backoff_s)
                self._loop.remove_reader(self.sock.fileno())
                self._retry = self._loop.call_later(self._backoff_s, self._resume)
                return
            self._backoff_s = 0.0
            self.server.accepted(conn, address)

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class EdgeHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer, fed by ``Acceptor``; its connections start as ``Connection``
    (fast) or in Tornado (slow)."""

    def initialize(self, edge, app, fast: bool = True, **kwargs):
        self.edge = edge
        self.rules = edge.rules
        self.fast = fast
        self.connections: set = set()  # every Connection, fast or adopted
        self.known_heads = KnownHeads()
        self.adopted_streams = weakref.WeakSet()  # detached from Tornado, served by us
        self.closed_streams = weakref.WeakSet()   # counted closed already
        config = edge.config.edge
        self.max_connections = connection_cap(config.max_connections)
        self.header_timeout_s = config.header_timeout_s
        self.idle_timeout_s = config.idle_timeout_s
        self.refused = RateLimitedLog()
        self.tls = tls_context(config.tls_cert, config.tls_key)
        self._acceptors: list = []
        self._sweeper = None
        self._all_closed = None  # while stopping: resolved when no connection is left
        super().initialize(app, max_header_size=2 * config.max_head_bytes,
                           idle_connection_timeout=config.idle_timeout_s,
                           body_timeout=config.header_timeout_s, **kwargs)

    def serve_on(self, sockets) -> None:
        for sock in sockets:
            sock.setblocking(False)
            self._acceptors.append(Acceptor(sock, self))
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_S, self._sweep)

    def open_connections(self) -> int:
        """Sockets accepted and not closed yet (whoever serves them, counted from the
        accept on: a burst of accepts is counted before its protocols start)."""
        return self.edge.metrics.connections

    def accepted(self, sock: socket.socket, address) -> None:
        metrics = self.edge.metrics
        if self.open_connections() >= self.max_connections:
            metrics.incr(time.time(), "connections_refused")
            self.refused.warning("refusing connections: %d open, the cap is %d "
                                 "([edge] max_connections)", self.open_connections(),
                                 self.max_connections)
            try:
                sock.send(_TOO_MANY)
            except OSError:
                pass
            sock.close()
            return
        metrics.connection_opened(time.time())
        if self.fast:
            loop = asyncio.get_running_loop()
            task = loop.create_task(loop.connect_accepted_socket(
                lambda: Connection(self, address), sock, ssl=self.tls))
            task.add_done_callback(self._set_up)
        elif self.tls is not None:
            wrapped = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self.serve_with_tornado(tornado.iostream.SSLIOStream(
                wrapped, max_buffer_size=self.max_buffer_size,
                read_chunk_size=self.read_chunk_size), address)
        else:
            self.serve_with_tornado(tornado.iostream.IOStream(
                sock, max_buffer_size=self.max_buffer_size,
                read_chunk_size=self.read_chunk_size), address)

    def _set_up(self, task) -> None:
        if task.cancelled() or task.exception() is not None:
            # The client was gone before its connection was set up.
            self.edge.metrics.connection_closed(time.time())

    def serve_with_tornado(self, stream, address) -> None:
        """Tornado reads the next request of ``stream`` (the slow path)."""
        super().handle_stream(stream, address)

    def on_close(self, server_conn):
        # Tornado is done with the socket: it closed it, or a handler detached it (and
        # may have given it back already: one socket can end several Tornado connections).
        stream = server_conn.stream
        if stream.closed() and stream not in self.adopted_streams \
                and stream not in self.closed_streams:
            self.closed_streams.add(stream)
            self.edge.metrics.connection_closed(time.time())
        super().on_close(server_conn)

    def adopt(self, stream, address) -> "Connection":
        """A ``Connection`` for a socket a Tornado handler has detached."""
        self.adopted_streams.add(stream)
        conn = Connection(self, address)
        StreamTransport(stream, conn)
        return conn

    def connection_gone(self, conn) -> None:
        self.connections.discard(conn)
        if self._all_closed is not None and not self.connections \
                and not self._all_closed.done():
            self._all_closed.set_result(None)

    def stop_accepting(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []

    async def close_fast_connections(self) -> None:
        """Close every connection once its answer in progress and its queued bytes
        are written; returns when all are closed."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._all_closed = asyncio.get_running_loop().create_future()
        for conn in list(self.connections):
            conn.close()
        if not self.connections:
            self._all_closed.set_result(None)
        await self._all_closed

    def abort_fast_connections(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    def _sweep(self) -> None:
        """Close connections whose head is late, whose body stalled, or that idled."""
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_S, self._sweep)
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now)


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = ("_server", "_edge", "_rules", "_address", "_transport", "_buf", "_busy",
                 "_serving", "_poll", "_extra", "_close_after", "_eof", "_writing_paused",
                 "_reading_paused", "_body", "_skip", "_last_active", "_reading_since",
                 "_stream", "_adopted", "_last_data", "_adopted_body",
                 "_publish_started")

    def __init__(self, server: EdgeHTTPServer, address):
        self._server = server
        self._edge = server.edge
        self._rules = server.rules
        self._address = address
        self._transport = None
        self._buf = bytearray()
        self._busy = False          # a request is being answered
        self._serving = False       # inside _serve (answers given inline do not recurse)
        self._poll = None
        self._extra = b""           # the answer's extra header lines (CORS, Connection)
        self._close_after = False
        self._eof = False
        self._writing_paused = False
        self._reading_paused = False
        self._body = None           # (action, head, total length or ChunkedBody) being read
        self._skip = 0              # body bytes of a request that needs none, to drop
        self._last_active = time.monotonic()
        self._reading_since = None  # when the request being read started (head timeout)
        self._stream = None         # the event stream or WebSocket this connection became
        self._adopted = False       # on a StreamTransport (its request came from Tornado)
        self._last_data = 0.0       # when the last bytes arrived (a stalled body)
        self._publish_started = 0.0  # when the publish in flight went to its worker
        self._adopted_body = b""    # the body Tornado read, while the callout is asked

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport):
        self._transport = transport
        self._server.connections.add(self)

    def data_received(self, data):
        if self._stream is not None:
            return self._stream.feed(data)
        self._buf += data
        if self._body is not None:
            self._last_data = time.monotonic()
        if self._busy or self._writing_paused:
            if len(self._buf) > self._rules.max_head_bytes + \
                    self._edge.limits.max_message_bytes:
                self._reading_paused = True
                self._transport.pause_reading()
            return
        self._serve()

    def eof_received(self):
        self._eof = True
        if self._poll is not None or self._stream is not None:
            return False  # the waiting client is gone: connection_lost ends the wait
        if self._busy or self._buf:
            if not self._busy:
                self._serve()
            return True  # answer what was asked, then close
        return False

    def connection_lost(self, exc):
        transport, self._transport = self._transport, None
        self._server.connection_gone(self)
        if self._poll is not None:
            self._poll.cancel()
        if self._stream is not None:
            self._stream.gone()
            # The session points back at this connection: without the cycle both are
            # freed now, not at the garbage collector's next full collection.
            self._stream = None
        if transport is not None and not getattr(transport, "released", False):
            self._edge.metrics.connection_closed(time.time())

    def pause_writing(self):
        self._writing_paused = True
        if self._stream is not None and self._transport is not None:
            self._transport.pause_reading()  # a stream's client reads nothing while behind

    def resume_writing(self):
        self._writing_paused = False
        if self._stream is not None:
            if self._transport is not None and not self._reading_paused:
                self._transport.resume_reading()
            return
        if not self._busy:
            self._serve()

    # -- the server's view ---------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        server = self._server
        if self._reading_since is not None and not self._busy:
            if self._body is None:
                if now - self._reading_since > server.header_timeout_s:
                    self._refuse(HttpError(408, "The request head took too long to arrive",
                                           close=True), b"")
            elif now - max(self._reading_since, self._last_data) > server.header_timeout_s:
                self._refuse(HttpError(408, "The request body stopped arriving",
                                       close=True), self._extra)
        elif not self._busy and now - self._last_active > server.idle_timeout_s:
            self.abort()  # even one whose client stopped reading its last answer

    def close(self) -> None:
        if self._stream is not None:
            self._stream.shutdown()
        elif self._transport is not None and not self._busy:
            self._transport.close()
        else:
            self._close_after = True

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def peer(self) -> str:
        return str(self._address[0]) if self._address else "?"

    # -- requests ------------------------------------------------------------------

    def _serve(self) -> None:
        """Start answering the buffered requests, one at a time."""
        if self._serving or self._transport is None or self._adopted:
            return
        self._serving = True
        try:
            while not self._busy and not self._writing_paused and self._transport is not None \
                    and self._stream is None:
                if not self._start_request():
                    break
        finally:
            self._serving = False
        if self._reading_paused and not self._busy and self._transport is not None \
                and self._stream is None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _start_request(self) -> bool:
        """Start the first buffered request; False when there is none (yet)."""
        buf = self._buf
        if self._skip:
            dropped = min(self._skip, len(buf))
            del buf[:dropped]
            self._skip -= dropped
            if self._skip:
                return False
        if self._body is not None:
            return self._read_body()
        if buf[:1] in (b"\r", b"\n"):  # RFC 9112 §2.2: empty lines before a request
            kept = buf.lstrip(b"\r\n")
            del buf[:len(buf) - len(kept)]
        found = http.head_end(buf)
        if found is None:
            if not buf:
                self._reading_since = None
            elif len(buf) > self._rules.max_head_bytes:
                self._refuse(http.head_too_large(self._rules.max_head_bytes), b"")
            elif self._eof:
                self._transport.close()
            elif self._reading_since is None:
                self._reading_since = time.monotonic()
            return False
        end, body_start = found
        raw = bytes(buf[:end])
        del buf[:body_start]
        self._last_active = time.monotonic()
        known = self._server.known_heads.get(raw)
        if known is not None:
            self._reading_since = None
            action, self._extra, self._close_after = known
            return self._run(action, None)
        rules = self._rules
        try:
            head = http.parse_head(raw, rules.max_head_bytes)
        except HttpError as exc:
            return self._refuse(exc, b"")
        extra = rules.extra_headers(head)
        self._close_after = not head.keep_alive
        try:
            action = rules.decide(head)
        except HttpError as exc:
            if not exc.close and self._skip_body(head):
                exc.close = True
            exc.bodiless = head.method == "HEAD"
            return self._refuse(exc, extra)
        self._extra = extra
        if len(raw) <= _KNOWN_HEAD_BYTES and not rules.checks_credentials \
                and _cacheable(action, head):
            self._server.known_heads.offer(raw, (action, extra, self._close_after))
        return self._run(action, head)

    def _skip_body(self, head) -> bool:
        """For a request whose body is not used: drop its body as it comes; True when
        the connection must close instead (a chunked body is not read)."""
        if "transfer-encoding" in head.fields:
            return True
        length = head.get("content-length")
        if length:
            limit = http.DISCARD_LIMIT_FACTOR * self._edge.limits.max_message_bytes
            self._skip = http.digits_value(length, limit)  # within it (Rules.decide)
        return False

    def _run(self, action, head) -> bool:
        kind = type(action)
        if kind is http.Authorize:
            self._busy = True
            task = asyncio.ensure_future(self._edge.ask_callout(action.asks))
            task.add_done_callback(lambda done: self._authorized(done, action.action, head))
            return True
        if kind is http.Poll:
            if head is not None and self._skip_body(head):
                self._close_after = True
            self._reading_since = None
            self._begin_poll(action)
            return True
        if kind is http.Publish or kind is http.ReadBody:
            length = action.limit if kind is http.ReadBody else action.length
            if head is not None and "transfer-encoding" in head.fields:
                length = http.ChunkedBody(self._edge.limits.max_message_bytes)
            elif kind is http.ReadBody:
                length = int(head.get("content-length") or 0)
            if head is not None and head.get("expect") and head.version == "HTTP/1.1" and \
                    (not isinstance(length, int) or len(self._buf) < length):
                self._transport.write(_CONTINUE)  # the client waits for it to send the body
            if self._reading_since is None:
                self._reading_since = time.monotonic()
            self._body = (action, head, length)
            return self._read_body()
        self._reading_since = None
        if head is not None and self._skip_body(head):
            self._close_after = True
        self._execute(action, head)
        return True

    def _authorized(self, done, action, head) -> None:
        """The callout answered for ``action``: run it, or refuse it."""
        if self._transport is None:
            return
        self._busy = False
        exc = done.exception()
        if exc is not None:
            self._refuse(self._edge.auth_refusal(exc, action), self._extra)
        elif self._adopted:
            self._body_or_execute(action, head, self._adopted_body)
        else:
            self._run(action, head)
        if not self._busy and self._buf:
            self._serve()

    def serve_decided(self, head, action, body) -> None:
        """Answer a request Tornado has read (the slow path): ``action`` is the rules'
        decision (or the HttpError they raised), ``body`` the request body."""
        self._adopted = True
        self._extra = self._rules.extra_headers(head) if head is not None else b""
        self._close_after = head is None or not head.keep_alive
        if isinstance(action, HttpError):
            self._refuse(action, self._extra)
        elif type(action) is http.Authorize:
            self._adopted_body = body
            self._run(action, head)
        else:
            self._body_or_execute(action, head, body)

    def _body_or_execute(self, action, head, body) -> None:
        if type(action) is http.Publish or type(action) is http.ReadBody:
            self._body_complete(action, head, body)
        else:
            self._execute(action, head)

    def _read_body(self) -> bool:
        action, head, length = self._body
        buf = self._buf
        if isinstance(length, int):
            if len(buf) < length:
                if self._eof and self._transport is not None:
                    self._transport.close()  # the client stopped before its body ended
                return False
            with memoryview(buf) as view:
                body = bytes(view[:length])  # one copy of a body of up to megabytes
            del buf[:length]
        else:
            try:
                body = length.feed(buf)
            except HttpError as exc:
                self._body = None
                return self._refuse(exc, self._extra)
            if body is None:
                if self._eof and self._transport is not None:
                    self._transport.close()
                return False
        self._body = None
        self._reading_since = None
        self._body_complete(action, head, body)
        return True

    def _body_complete(self, action, head, body: bytes) -> None:
        if type(action) is http.ReadBody:
            try:
                action = self._rules.decide_body(head, body)
            except HttpError as exc:
                self._refuse(exc, self._extra)
                return
            if type(action) is http.Authorize:
                self._run(action, head)
            else:
                self._execute(action, head)
            return
        edge = self._edge
        rates = edge.publish_rates
        if rates.enabled and not rates.allow(self.peer, time.monotonic()):
            edge.metrics.incr(time.time(), "publishes_rate_limited")
            self._refuse(HttpError(429, "Too many publishes from this client: at most "
                                        f"{rates.rate_per_s} a second",
                                   (("Retry-After", "1"),)), self._extra)
            return
        self._busy = True
        self._publish_started = time.monotonic()
        edge.publish(action.channel, body, action.options).add_done_callback(self._published)

    def _execute(self, action, head) -> None:
        kind = type(action)
        edge = self._edge
        extra = self._extra
        self._busy = True
        if kind is http.Poll:
            self._begin_poll(action)
        elif kind is http.Delete:
            edge.delete(action.channel).add_done_callback(self._deleted)
        elif kind is http.Health:
            self._answer(http.health_answer(edge.owner_up(action.channel), extra))
        elif kind is http.Metrics:
            self._answer(http.json_answer(edge.metrics_json(), extra))
        elif kind is http.Answer:
            self._answer(http.render(action.status, b"", None, action.headers, extra))
        elif kind is http.Stream:
            self._become_stream()
            self._stream = EventStream(self, edge, action.subscriptions, action.multiplexed,
                                       extra)
        elif kind is http.Upgrade:
            self._become_stream()
            self._transport.write(http.upgrade_answer(action.accept))
            self._stream = WebSocket(self, edge, action.channel, action.subscriptions,
                                     action.url_params, action.credential)
            if self._buf:
                early, self._buf = bytes(self._buf), bytearray()
                self._stream.feed(early)

    def _become_stream(self) -> None:
        transport = self._transport
        if isinstance(transport, StreamTransport):
            transport.start_reading()

    def _begin_poll(self, action) -> None:
        self._busy = True
        if self._eof:  # the client half-closed before this poll began: it is gone
            self._close_after = True
            return self._answer(b"")
        edge = self._edge
        metric = "subscribed_multiplexed" if action.multiplexed else "subscribed"
        now = time.time()
        for sub in action.subscriptions:
            edge.metrics.incr(now, metric, sub.channel)
        callback = self._polled_multiplexed if action.multiplexed else self._polled
        self._poll = None
        poll = edge.poll(action.subscriptions, callback)
        if self._busy and self._poll is None:  # not answered at once (nor a later request)
            self._poll = poll

    # -- answers -----------------------------------------------------------------

    def _answer(self, data: bytes, body: bytes = b"") -> None:
        self._busy = False
        self._poll = None
        transport = self._transport
        if transport is None:
            return
        if body:
            transport.writelines((data, body))  # one system call, no copy of the body
        else:
            transport.write(data)
        self._last_active = time.monotonic()
        if self._close_after or (self._eof and not self._buf):
            self._buf.clear()  # nothing after a closing answer is served
            transport.close()
        elif self._adopted:
            transport.release_to_tornado(self._server, self._address)
        elif self._buf and not self._serving:
            self._serve()

    def _refuse(self, exc: HttpError, extra: bytes) -> bool:
        """Answer a refused request; True when the connection goes on."""
        if exc.status >= 500:
            self._server.refused.warning("answering %d: %s", exc.status, exc.reason)
        self._reading_since = None
        self._busy = True
        if exc.close:
            self._close_after = True
        self._answer(http.error_answer(exc, extra))
        return not exc.close and self._transport is not None

    def _fail(self, exc: BackendError) -> None:
        status, reason = self._edge.backend_error_status(exc)
        self._server.refused.warning("answering %d: %s", status, reason)
        self._answer(http.error_answer(HttpError(status, reason), self._extra))

    def _polled(self, result, exc) -> None:
        if exc is not None:
            return self._fail(exc)
        if result is None:
            if self._transport is not None:
                self._edge.metrics.incr(time.time(), "timeouts")
            return self._answer(http.no_content_answer(self._extra))
        self._edge.deliveries["long_poll"] += 1
        item = result[1]
        if self._extra:
            body = item.json()  # not copied into each waiter's answer
            return self._answer(http.poll_answer_head(len(body), self._extra), body)
        self._answer(item.encoded(_ok_answer))  # the same bytes for every waiter

    def _polled_multiplexed(self, result, exc) -> None:
        if exc is not None or result is None:
            return self._polled(result, exc)
        channel, item = result
        self._edge.deliveries["long_poll"] += 1
        body = item.json_with_channel(channel)
        self._answer(http.poll_answer_head(len(body), self._extra), body)

    def _published(self, future) -> None:
        exc = future.exception()
        if exc is not None:
            return self._fail(exc)
        self._edge.publish_latency.observe(time.monotonic() - self._publish_started)
        self._answer(http.published_answer(future.result()["seq"], self._extra))

    def _deleted(self, future) -> None:
        exc = future.exception()
        if exc is not None:
            return self._fail(exc)
        self._answer(http.no_content_answer(self._extra))

    # -- streams (the ``conn`` of ``streams``) ---------------------------------------

    def stream_write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def stream_buffered(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def stream_ended(self, answer: bytes) -> None:
        """The stream is over: write its last bytes and close."""
        self._stream = None
        self._close_after = True
        self._answer(answer)

    def pause_reading_for_stream(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading_for_stream(self) -> None:
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            if not self._writing_paused:
                self._transport.resume_reading()


class KnownHeads:
    """The decisions for heads read before, from a head's second sight on.

    A channel's subscribers send identical heads, and so does a publisher to one
    channel, but a long-poll's head carries its sequence: with one subscriber per
    channel no poll head is ever read twice. Remembering every head would fill
    the table with those and clear it every few thousand requests, taking the
    heads that do repeat with it; a head is remembered only when it comes a
    second time. Each table holds at most ``_KNOWN_HEADS`` heads (of at most
    ``_KNOWN_HEAD_BYTES``) and is emptied when full.
    """

    __slots__ = ("_decisions", "_seen")

    def __init__(self):
        self._decisions: dict = {}  # head -> (action, extra headers, close after)
        self._seen: set = set()     # heads read once

    def get(self, raw: bytes):
        return self._decisions.get(raw)

    def offer(self, raw: bytes, decision) -> None:
        seen = self._seen
        if raw not in seen:
            if len(seen) >= _KNOWN_HEADS:
                seen.clear()
            seen.add(raw)
            return
        seen.discard(raw)
        decisions = self._decisions
        if len(decisions) >= _KNOWN_HEADS:
            decisions.clear()
        decisions[raw] = decision

    def __len__(self) -> int:
        return len(self._decisions)


def _cacheable(action, head) -> bool:
    """Whether the decision for this head holds for every identical head: a
    single-channel long-poll or a publish with a length, without a body to skip
    (never a decision that checked a credential: tokens expire)."""
    kind = type(action)
    if kind is http.Poll:
        return not action.multiplexed and not head.get("content-length") \
            and "transfer-encoding" not in head.fields
    return kind is http.Publish and action.length is not None and "expect" not in head.fields


def _ok_answer(item) -> bytes:
    return http.poll_answer(item.json())


class StreamTransport(asyncio.Transport):
    """An asyncio transport over an ``IOStream`` a Tornado handler has detached.

    Reads only when asked (``start_reading``: a stream's client frames), so that
    the socket can go back to Tornado after an answer (``release_to_tornado``) with
    every unread byte still in its stream. Writes are counted until the stream has
    written them, for the slow-reader measure and for ``pause_writing``.
    """

    _HIGH_WATER = 64 * 1024

    def __init__(self, stream, protocol):
        super().__init__()
        self._stream = stream
        self._protocol = protocol
        self._pending = 0
        self._paused = False
        self._reading = False
        self._read_paused = False
        self._resumed = None  # resolved when reading may go on
        self._closing = False
        self.released = False
        stream.set_close_callback(self._on_close)
        protocol.connection_made(self)

    # -- reading -----------------------------------------------------------------

    def start_reading(self) -> None:
        if not self._reading:
            self._reading = True
            asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        stream = self._stream
        try:
            while not self._closing and not self.released:
                if self._read_paused:
                    self._resumed = asyncio.get_running_loop().create_future()
                    await self._resumed
                    continue
                data = await stream.read_bytes(65536, partial=True)
                if data:
                    self._protocol.data_received(data)
        except tornado.iostream.StreamClosedError:
            pass
        except Exception:  # a stream must not stay open with nobody reading it
            log.exception("reading a connection Tornado handed over failed")
            self.abort()

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self._resumed is not None and not self._resumed.done():
                self._resumed.set_result(None)

    def is_reading(self) -> bool:
        return self._reading and not self._read_paused

    # -- writing -----------------------------------------------------------------

    def write(self, data) -> None:
        if self._closing or self._stream.closed():
            return
        size = len(data)
        self._pending += size
        self._stream.write(data).add_done_callback(lambda f, size=size: self._written(f, size))
        if not self._paused and self._pending > self._HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def _written(self, future, size: int) -> None:
        self._pending -= size
        if not future.cancelled():
            future.exception()  # a write to a closed stream is not an error here
        if self._paused and self._pending <= self._HIGH_WATER // 4:
            self._paused = False
            self._protocol.resume_writing()
        if self._closing and not self._pending and not self._stream.closed():
            self._stream.close()

    def get_write_buffer_size(self) -> int:
        return self._pending

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        self._closing = True
        if not self._pending:
            self._stream.close()

    def abort(self) -> None:
        self._closing = True
        self._stream.close()

    def is_closing(self) -> bool:
        return self._closing or self._stream.closed()

    def get_extra_info(self, name, default=None):
        if name == "socket":
            return self._stream.socket
        return default

    def _on_close(self) -> None:
        if not self.released:
            self._protocol.connection_lost(None)

    def release_to_tornado(self, server: EdgeHTTPServer, address) -> None:
        """Give the socket back to Tornado for its next request, once the answer is
        written; the connection is no longer this transport's."""
        self.released = True
        self._stream.set_close_callback(None)
        server.connection_gone(self._protocol)
        server.adopted_streams.discard(self._stream)
        server.serve_with_tornado(self._stream, address)
