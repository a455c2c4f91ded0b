"""The edge's fast path: plain long-polls and publishes on a bare asyncio protocol.

Theory of operation
-------------------
Tornado's ``HTTPServer`` accepts every connection and hands it to
``handle_stream`` (a public override point). ``EdgeHTTPServer`` takes the
socket out of that fresh, unused ``IOStream`` and serves it with
``FastConnection``, an ``asyncio.Protocol`` that knows two requests and nothing
else:

- ``GET /<channel>`` or ``GET /<channel>?last_message_sequence=N``, without a
  body, ``Upgrade`` or ``Accept: text/event-stream``, with a valid name and N;
- ``PUT /<channel>`` with a ``Content-Length`` within the limit, no
  ``Expect`` or ``Transfer-Encoding``, and valid publish headers.

Both use the same ``Edge`` operations as the handlers (``Edge.poll``,
``Edge.publish``); only the HTTP plumbing differs, and it is a few bytes
operations per request instead of Tornado's per-request futures, header
objects and stream bookkeeping (``bench/floor.py``: 65 against 29 µs of CPU per
request).

The first request that is anything else (an error, a WebSocket or event-stream
upgrade, multiplexing, metrics, OPTIONS, HEAD, DELETE, HTTP/1.0, a chunked
body, ...) hands the connection back to Tornado for good: the socket becomes an
``IOStream`` again, primed with the bytes already read (``_Primed``), and
Tornado's ``HTTPServer`` serves it with the application, which defines the
behaviour of every one of those requests.

Requests on a connection are answered one at a time, in order (pipelined
requests wait in the buffer). While a request is in flight, or while the
client is not reading its answers (``pause_writing``), nothing more is parsed,
and reading pauses once the buffer holds more than one request could need.
A client that half-closes its side while a long-poll waits is gone (as Tornado
sees it too); one that half-closes after a publish gets its answer first.
"""

import asyncio
import os
import re
import socket
import time

import tornado.httpserver
import tornado.iostream
from tornado import httputil

from ..wire import http

from ..wire import events

from ..wire import websocket
from .backend import BackendError
from .faststreams import FastEventStream, FastWebSocket
from ..wire.http import HttpError, Subscription
from .streams import EVENT_STREAM_HEADERS, EVENT_STREAM_TYPE


MAX_HEAD_BYTES = 65536  # a longer request head goes to Tornado, which refuses it
IDLE_SWEEP_S = 60.0

_SEQUENCE_PARAM = "last_message_sequence="
# A header field as RFC 9112 has it: a token name, then a value of visible
# characters, spaces and tabs (obs-text allowed) with the spaces around it dropped.
_FIELD = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x1f\x7f]|\t)*?)[ \t]*")
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]*")
# Heads already read, with what they ask for (``_read_head``): clients re-poll and
# re-publish with the same head, and a channel's subscribers send identical ones.
_KNOWN_HEADS = 4096
_KNOWN_HEAD_BYTES = 1024
_POLL = "poll"
_PUBLISH = "publish"
_STREAM = "stream"
_CRLF2 = b"\r\n\r\n"
_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
_NO_CONTENT = b"HTTP/1.1 204 No Content\r\n"
_ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nX-Firehose-Sequence: "
_EVENT_STREAM = ("HTTP/1.1 200 OK\r\n"
                 + "".join(f"{name}: {value}\r\n" for name, value in EVENT_STREAM_HEADERS)
                 + "Transfer-Encoding: chunked\r\n").encode()


class EdgeHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer whose connections start on the fast path."""

    def initialize(self, edge, app, **kwargs):
        self.edge = edge
        self.fast_connections: set = set()
        self.known_heads: dict = {}  # see _read_head
        self._idle_timeout_s = kwargs.get("idle_connection_timeout") or 3600.0
        self._sweeper = None
        self._all_closed = None  # while stopping: resolved when no fast connection is left
        super().initialize(app, **kwargs)

    async def handle_stream(self, stream, address):
        self.edge.metrics.connection_opened(time.time())
        sock = socket.socket(fileno=stream.socket.detach())
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.call_later(IDLE_SWEEP_S, self._sweep_idle)
        await loop.connect_accepted_socket(lambda: FastConnection(self, address), sock)

    def serve_with_tornado(self, sock, address, prefix: bytes) -> None:
        """Tornado serves the rest of a connection whose ``prefix`` was read already."""
        stream = _Primed(sock, prefix, max_buffer_size=self.max_buffer_size,
                         read_chunk_size=self.read_chunk_size)
        super().handle_stream(stream, address)

    def on_close(self, server_conn):
        self.edge.metrics.connection_closed(time.time())
        super().on_close(server_conn)

    async def close_fast_connections(self) -> None:
        """Close every fast connection once its answer in progress and its queued
        bytes are written; returns when all are closed."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._all_closed = asyncio.get_running_loop().create_future()
        for conn in list(self.fast_connections):
            conn.close()
        self.connection_gone()
        await self._all_closed

    def connection_gone(self) -> None:
        if self._all_closed is not None and not self.fast_connections \
                and not self._all_closed.done():
            self._all_closed.set_result(None)

    def abort_fast_connections(self) -> None:
        for conn in list(self.fast_connections):
            conn.abort()

    def _sweep_idle(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(IDLE_SWEEP_S, self._sweep_idle)
        cutoff = time.monotonic() - self._idle_timeout_s
        for conn in list(self.fast_connections):
            if conn.idle_since(cutoff):
                conn.abort()  # even one whose client stopped reading its last answer


class _Primed(tornado.iostream.IOStream):
    """An IOStream whose first reads return bytes an earlier reader took off the socket."""

    def __init__(self, sock, prefix: bytes, **kwargs):
        super().__init__(sock, **kwargs)
        self._prefix = memoryview(prefix)

    def read_from_fd(self, buf):
        if not self._prefix:
            return super().read_from_fd(buf)
        size = min(len(buf), len(self._prefix))
        buf[:size] = self._prefix[:size]
        self._prefix = self._prefix[size:]
        return size


class _Headers(dict):
    """Request headers by lower-case name; ``get`` takes any case (httpwire's calls)."""

    __slots__ = ()

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


def _long_poll_sequence(query: str):
    """The last sequence of a plain long-poll's query, or None when Tornado should serve it."""
    if not query:
        return 0
    if not query.startswith(_SEQUENCE_PARAM) or "&" in query:
        return None
    value = query[len(_SEQUENCE_PARAM):]
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) < 19 else None


def _channel(path: str):
    """The channel of a hot request's path, or None when Tornado should serve it."""
    try:
        channel = http.channel_from_path(path)
    except HttpError:
        return None
    return None if http.is_reserved(channel) else channel


def _ok_answer(item) -> bytes:
    body = item.json()
    return b"%s%d\r\n\r\n%s" % (_OK_JSON, len(body), body)


class FastConnection(asyncio.Protocol):
    """One client connection while it asks only for long-polls and publishes."""

    __slots__ = ("_server", "_edge", "_address", "_transport", "_buf", "_busy", "_serving",
                 "_poll", "_extra", "_close_after", "_eof", "_writing_paused",
                 "_reading_paused", "_handing_off", "_handed_off", "_body", "_last_active", "_stream")

    def __init__(self, server: EdgeHTTPServer, address):
        self._server = server
        self._edge = server.edge
        self._address = address
        self._transport = None
        self._buf = bytearray()
        self._busy = False          # a request is being answered
        self._serving = False       # inside _serve (answers given inline do not recurse)
        self._poll = None
        self._extra = b""           # the answer's extra headers (Connection, CORS)
        self._close_after = False
        self._eof = False
        self._writing_paused = False
        self._reading_paused = False
        self._handing_off = False   # to Tornado, once the queued answers are written
        self._handed_off = False
        self._body = None           # (head end, total length, channel, options) of a PUT
        self._last_active = time.monotonic()
        self._stream = None         # the event stream or WebSocket this connection has become

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport):
        self._transport = transport
        self._server.fast_connections.add(self)

    def data_received(self, data):
        if self._stream is not None:
            return self._stream.feed(data)
        self._buf += data
        if self._busy or self._writing_paused:
            if len(self._buf) > MAX_HEAD_BYTES + self._edge.limits.max_message_bytes:
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
        self._transport = None
        self._server.fast_connections.discard(self)
        self._server.connection_gone()
        if self._poll is not None:
            self._poll.cancel()
        if self._stream is not None:
            self._stream.gone()
        if not self._handed_off:
            self._edge.metrics.connection_closed(time.time())

    def pause_writing(self):
        self._writing_paused = True

    def resume_writing(self):
        self._writing_paused = False
        if self._handing_off:
            return self._hand_off()
        if not self._busy:
            self._serve()

    # -- the server's view ---------------------------------------------------------

    def idle_since(self, cutoff: float) -> bool:
        return not self._busy and self._last_active < cutoff

    def close(self) -> None:
        if self._transport is not None and not self._busy:
            self._transport.close()
        else:
            self._close_after = True

    # -- requests ------------------------------------------------------------------

    def _serve(self) -> None:
        """Start answering the buffered requests, one at a time."""
        if self._serving or self._transport is None:
            return
        self._serving = True
        try:
            while not self._busy and not self._writing_paused and self._transport is not None:
                if not self._start_request():
                    break
        finally:
            self._serving = False
        if self._reading_paused and not self._busy and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _start_request(self) -> bool:
        """Start the first buffered request; False when there is none (yet)."""
        buf = self._buf
        if self._body is not None:
            return self._start_publish()
        end = buf.find(_CRLF2)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES or b"\n\n" in buf or b"\n\r\n" in buf:
                self._hand_off()  # too long, or lines ending in a bare LF: Tornado's call
            elif self._eof and self._transport is not None:
                self._transport.close()
            return False
        self._last_active = time.monotonic()
        head = bytes(buf[:end])
        known = self._server.known_heads.get(head)
        if known is None:
            known = self._read_head(head, end)
            if known is None:
                return False  # handed off, or became a stream
        kind, channel, how, length, self._extra, self._close_after = known
        if kind is _POLL:
            del buf[:end + 4]
            self._begin_poll(channel, how)
            return True
        self._body = (end + 4, end + 4 + length, channel, how)
        return self._start_publish()

    def _read_head(self, head: bytes, end: int):
        """What a head not seen before asks for: a ``_POLL`` or ``_PUBLISH`` entry
        (remembered for the next identical head), or None once the request has
        been handed to Tornado or started as a stream."""
        lines = head.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or request_line[2] != "HTTP/1.1":
            return self._hand_off()
        headers = _Headers()
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            if field is None:
                return self._hand_off()  # Tornado answers broken or folded fields
            name, value = field.group(1).lower(), field.group(2)
            if name in headers:
                return self._hand_off()  # and decides about repeated ones
            headers[name] = value
        host = headers.get("host")
        if host is None or not _HOST.fullmatch(host):
            return self._hand_off()
        method, target, _ = request_line
        path, _, query = target.partition("?")
        if method == "GET":
            known = self._read_get(end, headers, path, query)
        elif method == "PUT":
            known = self._read_put(headers, path, query)
        else:
            known = None
        if known is _STREAM:
            return None
        if known is None:
            return self._hand_off()
        if len(head) <= _KNOWN_HEAD_BYTES:
            remembered = self._server.known_heads
            if len(remembered) >= _KNOWN_HEADS:
                remembered.clear()
            remembered[head] = known
        return known

    def _extra_headers(self, headers) -> tuple:
        """(the answer's extra header lines, whether to close after it)."""
        close = "close" in headers.get("connection", "").lower()
        extra = b"Connection: close\r\n" if close else b""
        origin = headers.get("origin")
        if origin and self._edge.allows_origin(origin):
            extra += b"Access-Control-Allow-Origin: " + origin.encode("latin-1") + \
                b"\r\nVary: Origin\r\n"
        return extra, close

    def _read_get(self, end: int, headers, path: str, query: str):
        if "content-length" in headers or "transfer-encoding" in headers:
            return None
        seq = _long_poll_sequence(query)
        channel = _channel(path) if seq is not None else None
        if channel is None:
            return None
        upgrade = headers.get("upgrade")
        if upgrade is not None:
            if upgrade.lower() == "websocket" and self._start_websocket(end, headers, channel):
                return _STREAM
            return None
        if EVENT_STREAM_TYPE in headers.get("accept", ""):
            return _STREAM if self._start_event_stream(end, headers, channel, seq) else None
        return (_POLL, channel, seq, 0, *self._extra_headers(headers))

    def _read_put(self, headers, path: str, query: str):
        if query or "transfer-encoding" in headers or "expect" in headers:
            return None
        limits = self._edge.limits
        length = headers.get("content-length")
        if (length is None or len(length) > 18 or not (length.isascii() and length.isdigit())
                or int(length) > limits.max_message_bytes):
            return None
        channel = _channel(path)
        if channel is None:
            return None
        try:
            options = http.parse_publish_headers(
                headers, limits.default_ttl_s, limits.default_buffer_size, limits.max_buffer_size)
        except HttpError:
            return None
        return (_PUBLISH, channel, options, int(length), *self._extra_headers(headers))

    def _begin_poll(self, channel: str, seq: int) -> None:
        self._busy = True
        edge = self._edge
        edge.metrics.incr(time.time(), "subscribed", channel)
        poll = edge.poll([Subscription(channel, seq, {})], self._polled)
        if self._busy:  # not answered at once
            self._poll = poll

    def _start_event_stream(self, end: int, headers, channel: str, seq: int) -> bool:
        try:
            resume = events.parse_last_event_id(headers.get("last-event-id"))
        except HttpError:
            return False  # Tornado answers it
        del self._buf[:end + 4]
        self._extra, self._close_after = self._extra_headers(headers)
        self._busy = True
        subscription = Subscription(channel, seq if resume is None else resume, {})
        self._stream = FastEventStream(self, self._edge, [subscription],
                                       _EVENT_STREAM + self._extra + b"\r\n", self._error_answer)
        return True

    def _start_websocket(self, end: int, headers, channel: str) -> bool:
        origin = headers.get("origin")
        if origin and not self._edge.allows_origin(origin):
            return False  # Tornado refuses it
        try:
            accept = websocket.handshake("GET", headers)
        except HttpError:
            return False  # Tornado answers it
        del self._buf[:end + 4]
        self._busy = True
        self._transport.write(websocket.response_head(accept))
        self._stream = FastWebSocket(self, self._edge, channel)
        if self._buf:
            early, self._buf = bytes(self._buf), bytearray()
            self._stream.feed(early)
        return True

    def _start_publish(self) -> bool:
        start, total, channel, options = self._body
        if len(self._buf) < total:
            if self._eof and self._transport is not None:
                self._transport.close()  # the client stopped before its body ended
            return False
        with memoryview(self._buf) as view:
            data = bytes(view[start:total])  # one copy of a body of up to megabytes
        del self._buf[:total]
        self._body = None
        self._busy = True
        self._edge.publish(channel, data, options).add_done_callback(self._published)
        return True

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
        elif self._buf and not self._serving:
            self._serve()

    def _error_answer(self, status: int, reason: str) -> bytes:
        body = reason.replace("\n", " ").encode()
        head = (f"HTTP/1.1 {status} {httputil.responses.get(status, 'Error')}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n")
        return head.encode() + self._extra + b"\r\n" + body

    def _fail(self, exc: BackendError) -> None:
        self._answer(self._error_answer(*self._edge.backend_error_status(exc)))

    def _polled(self, result, exc) -> None:
        if exc is not None:
            return self._fail(exc)
        if result is None:
            if self._transport is not None:
                self._edge.metrics.incr(time.time(), "timeouts")
            return self._answer(_NO_CONTENT + self._extra + b"\r\n")
        item = result[1]
        if self._extra:
            body = item.json()  # not copied into each waiter's answer
            return self._answer(b"%s%d\r\n%s\r\n" % (_OK_JSON, len(body), self._extra), body)
        self._answer(item.encoded(_ok_answer))  # the same bytes for every waiter

    def _published(self, future) -> None:
        exc = future.exception()
        if exc is not None:
            return self._fail(exc)
        self._answer(b"%s%d\r\n%s\r\n" % (_ACCEPTED, future.result()["seq"], self._extra))

    # -- event streams -------------------------------------------------------------

    def stream_write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def stream_buffered(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def stream_ended(self, answer: bytes) -> None:
        """The event stream is over: write its last bytes and close."""
        self._stream = None
        self._close_after = True
        self._answer(answer)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def peer(self) -> str:
        return str(self._address[0]) if self._address else "?"

    # -- to Tornado ----------------------------------------------------------------

    def _hand_off(self) -> None:
        """Give the connection, with the bytes read so far, to Tornado's HTTPServer."""
        transport = self._transport
        if transport is None:
            return
        self._handing_off = True
        if transport.get_write_buffer_size():
            # Answers are still queued: hand off once they are written.
            transport.pause_reading()
            transport.set_write_buffer_limits(high=0)
            return
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        prefix = bytes(self._buf)
        self._buf.clear()
        self._handed_off = True
        transport.abort()
        self._transport = None
        self._server.serve_with_tornado(sock, self._address, prefix)


