"""firehose-edge: the HTTP face of the cluster (Tornado), PROTOCOL.md §1-7 and §9.

The edge keeps no channel state of its own: every publish and every fetch goes to
the owning worker over ``backend``; waiting subscribers sit in ``fanout``, which
is fed from the workers' message streams. Handlers get the ``Edge`` injected;
``make_app(edge)`` builds the Tornado application. WebSockets and event streams
(§6-7) live in ``streams``: its rules route upgrades, and the GET handlers here
hand ``Accept: text/event-stream`` requests to it.
"""

import argparse
import asyncio
import json
import logging
import signal
import time

import tornado.web

from ..wire import http

from . import streams
from .backend import Backend, BackendError, RequestRejected
from ..config import ConfigError, load_config
from .fanout import Fanout, Poll, Timeouts
from .connection import EdgeHTTPServer
from ..wire.http import HttpError, Subscription
from ..metrics import TimeSeries
from .native import NativeEndpoints

log = logging.getLogger("firehose.edge")

JSON_TYPE = "application/json"
# A PUT body up to this many times the message limit is read and dropped before
# the 413; a larger one is refused at once.
_DISCARD_LIMIT_FACTOR = 4


class Edge:
    """Everything one edge process shares between its requests."""

    def __init__(self, config, context=None, native: bool = True, reuse_port: bool = False):
        self.config = config
        self.reuse_port = reuse_port
        self.limits = config.limits
        self.metrics = TimeSeries(config.edge.metrics_bucket_s, config.edge.metrics_buckets)
        self.backend = Backend(config, self._on_message, context=context,
                               on_worker_change=self._on_worker_change)
        self.fanout = Fanout(self.backend, config.edge.subscription_linger_s)
        self.timeouts = Timeouts(config.edge.long_poll_timeout_s)
        self.native = NativeEndpoints(config, self.backend, context=context) if native else None
        self.streams: set = set()  # open WebSockets and event streams (streams.py)
        self.server = None
        self.stopping = False  # set by stop(): a long-poll started now is answered 204 at once

    def _on_message(self, message) -> None:
        self.fanout.on_message(message)

    def _on_worker_change(self, worker_id: str, up: bool) -> None:
        self.fanout.worker_changed(worker_id, up)

    async def start(self, sockets=None) -> None:
        """Connect to the workers and listen (on ``sockets`` if given, else the config)."""
        self.backend.start()
        self.fanout.start()
        self.timeouts.start()
        if self.native is not None:
            self.native.start(asyncio.get_running_loop())
        self.server = EdgeHTTPServer(self, make_app(self),
                                     max_body_size=self.limits.max_message_bytes,
                                     idle_connection_timeout=3600)
        if sockets is None:
            self.server.listen(self.config.edge.port, self.config.edge.host,
                               reuse_port=self.reuse_port)
        else:
            self.server.add_sockets(sockets)
        log.info("edge listening on http://%s:%d (%d workers, long-poll timeout %g s, %s loop)",
                 self.config.edge.host, self.config.edge.port, len(self.config.workers),
                 self.config.edge.long_poll_timeout_s,
                 type(asyncio.get_running_loop()).__module__.split(".")[0])

    async def stop(self) -> None:
        """Stop accepting, answer every waiting long-poll with 204, let publishes in
        flight get their answer (bounded by the request timeout), close the links."""
        self.stopping = True
        if self.server is not None:
            self.server.stop()
        for poll in self.timeouts.pending():
            poll.expire()
        for stream in list(self.streams):
            stream.shutdown()
        publishes = self.backend.pending_publishes()
        if publishes:
            log.info("edge stopping: waiting for %d publish(es) in flight", len(publishes))
            await asyncio.wait(publishes, timeout=self.config.edge.request_timeout_s + 1.0)
            await asyncio.sleep(0)  # let their handlers write the answers
        if self.server is not None:
            try:
                await asyncio.wait_for(asyncio.gather(self.server.close_fast_connections(),
                                                      self.server.close_all_connections()), 2.0)
            except asyncio.TimeoutError:
                log.warning("some connections did not close within 2 s")
                self.server.abort_fast_connections()
        self.timeouts.close()
        self.fanout.close()
        if self.native is not None:
            self.native.close()
        self.backend.close()

    def allows_origin(self, origin: str) -> bool:
        """True when a page from ``origin`` may use this edge (CORS, WebSocket)."""
        allowed = self.config.edge.cors_allow_origins
        return not allowed or origin in allowed

    def publish(self, channel: str, data: bytes, options) -> asyncio.Future:
        """Publish to the owning worker; the future gets the worker's reply map
        (its ``seq`` is the message's sequence) or a BackendError."""
        fields = {"data": data, "buffer_size": options.buffer_size}
        if options.ttl_s is None:
            fields["persist"] = True
        else:
            fields["ttl"] = options.ttl_s
        reply = self.backend.request(channel, "publish", **fields)

        def count(future):
            if not future.cancelled() and future.exception() is None:
                self.metrics.incr(time.time(), "published", channel)
        reply.add_done_callback(count)
        return reply

    @staticmethod
    def backend_error_status(exc: BackendError) -> tuple:
        """The HTTP status and one-line reason for a failed worker request."""
        if isinstance(exc, RequestRejected):
            if exc.code == "too_large":
                return 413, str(exc)
            if exc.code == "bad_request":
                return 400, str(exc)
            if exc.code == "quota":
                return 507, f"Insufficient storage: {exc}"
        return 503, f"Service unavailable: {exc}"

    def poll(self, subscriptions, on_done) -> Poll:
        """Start a long-poll; ``on_done(result, exc)`` ends it (see ``Poll``), at once
        when the edge is stopping and no message is waiting (the client re-polls)."""
        poll = Poll(self.fanout, self.timeouts, subscriptions, on_done)
        if self.stopping:
            poll.expire()
        return poll


class BaseHandler(tornado.web.RequestHandler):
    """CORS, one-line error answers, and the request's client-gone state."""

    allow = "GET"

    def initialize(self, edge: Edge):
        self.edge = edge
        self.poll_in_flight = None
        self.client_gone = False

    def compute_etag(self):
        return None

    def set_default_headers(self):
        self.clear_header("Content-Type")

    def prepare(self):
        self.set_cors_headers()

    def set_cors_headers(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin:
            if self.edge.allows_origin(origin):
                self.set_header("Access-Control-Allow-Origin", origin)
                self.set_header("Vary", "Origin")

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None))[1]
        reason = getattr(exc, "log_message", None) or self._reason
        if status_code == 405:
            reason = f"Method {self.request.method} is not allowed here; use {self.allow}"
        self.answer(status_code, reason)

    def answer(self, status: int, reason: str) -> None:
        """Finish with ``status`` and a one-line plain-text reason."""
        if self._finished:
            return
        self.clear()
        self.set_cors_headers()
        self.set_status(status)
        if status == 405:
            self.set_header("Allow", self.allow)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(reason.replace("\n", " "))

    def answer_json(self, body: bytes, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(body)

    def answer_backend_error(self, exc: BackendError) -> None:
        self.answer(*self.edge.backend_error_status(exc))

    def options(self, *args):
        """CORS preflight."""
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", "GET, PUT, POST, DELETE, HEAD, OPTIONS")
        requested = self.request.headers.get("Access-Control-Request-Headers")
        if requested:
            self.set_header("Access-Control-Allow-Headers", requested)
        self.set_header("Access-Control-Expose-Headers", "X-Firehose-Sequence")
        self.set_header("Access-Control-Max-Age", "86400")
        self.finish()

    def health(self, channel: str) -> None:
        """HEAD: 200 when the owner of ``channel`` is reachable, else 503."""
        owner = self.edge.backend.owner(channel)
        self.set_status(200 if self.edge.backend.is_up(owner) else 503)
        self.finish()

    def on_connection_close(self):
        self.client_gone = True
        if self.poll_in_flight is not None:
            self.poll_in_flight.cancel()

    async def long_poll(self, subscriptions, multiplexed: bool) -> None:
        edge = self.edge
        now = time.time()
        for sub in subscriptions:
            edge.metrics.incr(now, "subscribed_multiplexed" if multiplexed else "subscribed",
                              sub.channel)
        ended = asyncio.get_running_loop().create_future()
        self.poll_in_flight = edge.poll(subscriptions, lambda *outcome: ended.set_result(outcome))
        result, exc = await ended
        self.poll_in_flight = None
        if self.client_gone:
            return
        if exc is not None:
            return self.answer_backend_error(exc)
        if result is None:
            edge.metrics.incr(time.time(), "timeouts")
            self.set_status(204)
            return self.finish()
        channel, item = result
        self.answer_json(item.json_with_channel(channel) if multiplexed else item.json())


@tornado.web.stream_request_body
class ChannelHandler(BaseHandler):
    """Every channel path: PUT publishes, GET long-polls, HEAD checks health."""

    def prepare(self):
        super().prepare()
        self.channel = None
        self.body_parts = []
        self.body_too_large = False
        self.body_bytes = 0
        method = self.request.method
        if method in ("POST", "PATCH"):
            raise tornado.web.HTTPError(405)
        try:
            self.channel = http.channel_from_path(self.request.path)
        except HttpError as exc:
            return self.answer(exc.status, exc.reason)
        if http.is_reserved(self.channel) and method != "HEAD":
            if method == "PUT":
                return self.answer(400, "Channel names containing @firehose are reserved")
            return self.answer(404, f"Unknown endpoint {self.channel}")
        if method == "PUT":
            limit = self.edge.limits.max_message_bytes
            length = self.request.headers.get("Content-Length")
            if length is None:
                # Chunked: count as it comes (data_received), answer 413 at the end.
                self.request.connection.set_max_body_size(_DISCARD_LIMIT_FACTOR * limit)
                return
            if not (length.isascii() and length.isdigit()):
                length = 0
            else:
                length = http.digits_value(length, _DISCARD_LIMIT_FACTOR * limit + 1)
            if length > limit:
                self.body_too_large = True
                if length > _DISCARD_LIMIT_FACTOR * limit:
                    # Not worth reading: answer now and drop the connection.
                    self.answer(413, f"Message body is larger than {limit} bytes")
                    self.request.connection.close()
                    return
                # Read and drop the body, then answer: a client still sending when
                # the connection closes would see a reset instead of the 413.
                self.request.connection.set_max_body_size(length)
            else:
                self.request.connection.set_max_body_size(limit)

    def data_received(self, chunk):
        if self.body_too_large:
            return
        self.body_parts.append(chunk)
        self.body_bytes += len(chunk)
        if self.body_bytes > self.edge.limits.max_message_bytes:
            self.body_too_large = True
            self.body_parts = []

    async def put(self, *args):
        edge = self.edge
        limits = edge.limits
        if self.body_too_large:
            return self.answer(413, f"Message body is larger than {limits.max_message_bytes} bytes")
        try:
            options = http.parse_publish_headers(self.request.headers, limits.default_ttl_s,
                                                     limits.default_buffer_size,
                                                     limits.max_buffer_size)
        except HttpError as exc:
            return self.answer(exc.status, exc.reason)
        try:
            seq = (await edge.publish(self.channel, b"".join(self.body_parts), options))["seq"]
        except BackendError as exc:
            return self.answer_backend_error(exc)
        self.set_status(202)
        self.set_header("X-Firehose-Sequence", str(seq))
        self.finish()

    async def get(self, *args):
        query = self.get_query_argument("last_message_sequence", None)
        try:
            last_seq = http.parse_sequence(query)
        except HttpError as exc:
            return self.answer(exc.status, exc.reason)
        params = {name: self.get_query_argument(name) for name in self.request.query_arguments
                  if name != "last_message_sequence"}
        subscriptions = [Subscription(self.channel, last_seq, params)]
        if streams.wants_event_stream(self.request):
            return await streams.serve_event_stream(self, self.edge, subscriptions, False)
        await self.long_poll(subscriptions, multiplexed=False)

    def head(self, *args):
        self.health(self.channel)

    async def delete(self, *args):
        try:
            await self.edge.backend.request(self.channel, "delete")
        except BackendError as exc:
            return self.answer_backend_error(exc)
        self.set_status(204)
        self.finish()

    def post(self, *args):
        raise tornado.web.HTTPError(405)

    patch = post


class MultiplexHandler(BaseHandler):
    """``/channels@firehose``: one long-poll over many channels."""

    allow = "GET, POST"

    async def get(self):
        await self._subscribe(lambda: http.parse_subscribe_query(
            self.get_query_argument("subscribe", None)),
            event_stream=streams.wants_event_stream(self.request))

    async def post(self):
        await self._subscribe(lambda: http.parse_subscribe_body(self.request.body))

    async def _subscribe(self, parse, event_stream: bool = False):
        try:
            subscriptions = parse()
        except HttpError as exc:
            return self.answer_json(http.subscription_failed_json(exc.reason), exc.status)
        if event_stream:
            return await streams.serve_event_stream(self, self.edge, subscriptions, True)
        await self.long_poll(subscriptions, multiplexed=True)

    def put(self):
        self.answer(400, "Channel names containing @firehose are reserved")

    def head(self):
        self.health(self.request.path)

    def delete(self):
        raise tornado.web.HTTPError(405)

    patch = delete


class MetricsHandler(BaseHandler):
    """``/metrics@firehose``: Firehose 1.4's JSON time buckets."""

    allow = "GET"

    def get(self):
        report = self.edge.metrics.report(time.time())
        self.answer_json(json.dumps(report, separators=(",", ":")).encode())

    post = patch = delete = options = get

    def put(self):
        self.answer(400, "Channel names containing @firehose are reserved")

    def head(self):
        self.health(self.request.path)


def make_app(edge: Edge) -> tornado.web.Application:
    deps = {"edge": edge}
    return tornado.web.Application([
        *streams.stream_rules(deps),
        (r"/channels@firehose", MultiplexHandler, deps),
        (r"/metrics@firehose", MetricsHandler, deps),
        (r"/.*", ChannelHandler, deps),
    ], compress_response=False, log_function=_log_request,
        **streams.websocket_settings(edge.config.edge))


def _log_request(handler) -> None:
    status = handler.get_status()
    level = logging.WARNING if status >= 500 else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "%d %s %s %.1f ms", status, handler.request.method, handler.request.uri,
                1000.0 * handler.request.request_time())


async def serve(config, stop: asyncio.Event, native: bool, reuse_port: bool) -> None:
    edge = Edge(config, native=native, reuse_port=reuse_port)
    await edge.start()
    await stop.wait()
    log.info("edge stopping: answering waiting subscribers")
    await edge.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="firehose-edge",
                                     description="Run one HTTP edge of a firehose-zmq cluster.")
    parser.add_argument("--config", help="cluster config (TOML); default: the embedded local one")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the HTTP port with other edges on this host (SO_REUSEPORT)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop implementation (default uvloop)")
    parser.add_argument("--no-native", action="store_true",
                        help="do not serve the native ZeroMQ endpoints (another edge does)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop, native=not args.no_native, reuse_port=args.reuse_port)

    try:
        if args.loop == "uvloop":
            import uvloop  # a faster asyncio loop: about 6% less CPU per request here
            uvloop.run(run())
        else:
            asyncio.run(run())
    except OSError as exc:
        log.error("edge cannot start: %s", exc)
        return 1
    return 0

