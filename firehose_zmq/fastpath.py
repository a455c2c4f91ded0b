"""The edge's fast path: plain long-polls and publishes below Tornado's RequestHandler.

Tornado's ``HTTPServer`` hands every request to an ``HTTPServerConnectionDelegate``
(a public interface). ``FastPath`` is that delegate: when a request's headers
show it is one of the two hot requests, it serves it itself with a few calls on
the connection; every other request (errors, WebSocket and event-stream
upgrades, multiplexing, metrics, OPTIONS, chunked bodies, ...) goes unchanged to
the Tornado application and its handlers, which define the behaviour of all of
them. The hot requests:

- ``GET /<channel>`` or ``GET /<channel>?last_message_sequence=N``, without
  ``Upgrade`` or ``Accept: text/event-stream``, with a valid name and N;
- ``PUT /<channel>`` with a ``Content-Length`` within the limit and valid
  publish headers.

Both use the same ``Edge`` operations as the handlers (``Edge.poll``,
``Edge.publish``); only the HTTP plumbing differs.
"""

import time

from tornado import httputil

from . import httpwire
from .backend import BackendError
from .httpwire import HttpError, Subscription

_OK = httputil.ResponseStartLine("HTTP/1.1", 200, "OK")
_NO_CONTENT = httputil.ResponseStartLine("HTTP/1.1", 204, "No Content")
_ACCEPTED = httputil.ResponseStartLine("HTTP/1.1", 202, "Accepted")
_SEQUENCE_PARAM = "last_message_sequence="


class FastPath(httputil.HTTPServerConnectionDelegate):
    """Serves hot requests itself and passes the rest to ``app``."""

    def __init__(self, edge, app):
        self.edge = edge
        self.app = app

    def start_request(self, server_conn, request_conn):
        return _Request(self, server_conn, request_conn)

    def on_close(self, server_conn):
        self.app.on_close(server_conn)


def _long_poll_sequence(start_line, headers):
    """The last sequence of a plain long-poll, or None when the app should serve it."""
    if "Upgrade" in headers or "text/event-stream" in headers.get("Accept", ""):
        return None
    _, _, query = start_line.path.partition("?")
    if not query:
        return 0
    if not query.startswith(_SEQUENCE_PARAM) or "&" in query:
        return None
    value = query[len(_SEQUENCE_PARAM):]
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) < 19 else None


class _Request(httputil.HTTPMessageDelegate):
    __slots__ = ("_fast", "_server_conn", "_conn", "_inner", "_channel", "_seq", "_origin",
                 "_body", "_options", "_poll", "_gone")

    # ``_body`` is None for a long-poll and a list of chunks for a publish.

    def __init__(self, fast: FastPath, server_conn, request_conn):
        self._fast = fast
        self._server_conn = server_conn
        self._conn = request_conn
        self._inner = None
        self._poll = None
        self._gone = False
        self._body = None

    # -- choosing ----------------------------------------------------------------

    def headers_received(self, start_line, headers):
        if start_line.method == "GET":
            seq = _long_poll_sequence(start_line, headers)
            if seq is not None and self._take_channel(start_line):
                self._seq = seq
                self._origin = headers.get("Origin")
                return None
        elif start_line.method == "PUT" and self._take_channel(start_line):
            if self._take_publish(headers):
                self._origin = headers.get("Origin")
                self._body = []
                return None
        self._inner = self._fast.app.start_request(self._server_conn, self._conn)
        return self._inner.headers_received(start_line, headers)

    def _take_channel(self, start_line) -> bool:
        path = start_line.path.partition("?")[0]
        try:
            channel = httpwire.channel_from_path(path)
        except HttpError:
            return False
        if httpwire.is_reserved(channel):
            return False
        self._channel = channel
        return True

    def _take_publish(self, headers) -> bool:
        limits = self._fast.edge.limits
        length = headers.get("Content-Length")
        if (length is None or not (length.isascii() and length.isdigit())
                or int(length) > limits.max_message_bytes):
            return False
        try:
            self._options = httpwire.parse_publish_headers(
                headers, limits.default_ttl_s, limits.default_buffer_size, limits.max_buffer_size)
        except HttpError:
            return False
        self._conn.set_max_body_size(limits.max_message_bytes)
        return True

    # -- the rest of the message -----------------------------------------------

    def data_received(self, chunk):
        if self._inner is not None:
            return self._inner.data_received(chunk)
        if self._body is not None:  # a long-poll's body, if it has one, is ignored
            self._body.append(chunk)
        return None

    def finish(self):
        if self._inner is not None:
            return self._inner.finish()
        self._conn.set_close_callback(self._on_gone)
        edge = self._fast.edge
        if self._body is None:
            edge.metrics.incr(time.time(), "subscribed", self._channel)
            self._poll = edge.poll([Subscription(self._channel, self._seq, {})], self._polled)
        else:
            future = edge.publish(self._channel, b"".join(self._body), self._options)
            future.add_done_callback(self._published)
        return None

    def on_connection_close(self):
        if self._inner is not None:
            return self._inner.on_connection_close()
        self._on_gone()
        return None

    def _on_gone(self) -> None:
        self._gone = True
        if self._poll is not None:
            self._poll.cancel()

    # -- answers ---------------------------------------------------------------

    def _headers(self, content_type=None, length=0):
        """Response headers; ``length`` None for a 204, which has no body or length."""
        headers = httputil.HTTPHeaders()
        if content_type is not None:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        if self._origin and self._fast.edge.allows_origin(self._origin):
            headers["Access-Control-Allow-Origin"] = self._origin
            headers["Vary"] = "Origin"
        return headers

    def _write(self, start_line, headers, body=b"") -> None:
        if self._gone:
            return
        self._conn.write_headers(start_line, headers, body or None)
        self._conn.finish()

    def _fail(self, exc: BackendError) -> None:
        status, reason = self._fast.edge.backend_error_status(exc)
        body = reason.replace("\n", " ").encode()
        headers = self._headers("text/plain; charset=utf-8", len(body))
        self._write(httputil.ResponseStartLine("HTTP/1.1", status, httputil.responses[status]),
                    headers, body)

    def _polled(self, result, exc) -> None:
        self._poll = None
        if exc is not None:
            return self._fail(exc)
        if result is None:
            if not self._gone:
                self._fast.edge.metrics.incr(time.time(), "timeouts")
            return self._write(_NO_CONTENT, self._headers(length=None))
        body = result[1].json()
        self._write(_OK, self._headers("application/json", len(body)), body)

    def _published(self, future) -> None:
        exc = future.exception()
        if exc is not None:
            return self._fail(exc)
        headers = self._headers()
        headers["X-Firehose-Sequence"] = str(future.result()["seq"])
        self._write(_ACCEPTED, headers)
