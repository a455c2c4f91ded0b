"""firehose-edge: the process (docs/protocol.md §1-7 and §9), and what its connections share.

The edge keeps no channel state of its own: every publish and every fetch goes to
the owning worker over ``backend``; waiting subscribers sit in ``fanout``, which
is fed from the workers' message streams. ``Edge`` holds those, the HTTP rules
(``wire.http.Rules``) and the server (``connection.EdgeHTTPServer``); every
client connection calls its operations (``poll``, ``publish``, ``delete``,
``owner_up``, ``metrics_json``).
"""

import asyncio
import json
import logging
import signal
import time

import tornado.netutil

from .. import cli
from ..config import ConfigError, load_config_with_sources
from ..admin import EdgeAdmin
from ..auth.hooks import load_subscription_filter
from ..auth.tokens import AuthError, Authorizer
from ..metrics import LatencyHistogram, TimeSeries
from ..wire import http
from .backend import Backend, BackendError, RequestRejected
from .connection import EdgeHTTPServer
from .fanout import Fanout, Poll, Timeouts
from .handlers import make_app
from .native import NativeEndpoints
from .ratelimit import PublishRates

log = logging.getLogger("firehose.edge")



class Edge:
    """Everything one edge process shares between its requests."""

    def __init__(self, config, context=None, native: bool = True, reuse_port: bool = False,
                 fast_path: bool = True):
        self.config = config
        self.reuse_port = reuse_port
        self.fast_path = fast_path
        self.limits = config.limits
        self.authorizer = Authorizer.from_config(config.auth)
        self.rules = http.Rules(config.limits, config.edge, self.authorizer,
                                load_subscription_filter(config.auth.subscription_filter))
        self.publish_rates = PublishRates(config.edge.publish_rate_per_s,
                                          config.edge.publish_burst)
        self.metrics = TimeSeries(config.edge.metrics_bucket_s, config.edge.metrics_buckets)
        self.backend = Backend(config, self._on_message, context=context,
                               on_worker_change=self._on_worker_change)
        self.fanout = Fanout(self.backend, config.edge.subscription_linger_s)
        # Read by the admin listener at scrape time.
        self.deliveries = {"long_poll": 0, "websocket": 0, "sse": 0}
        self.publish_latency = LatencyHistogram()
        self.fanout_latency = self.fanout.latency
        self.timeouts = Timeouts(config.edge.long_poll_timeout_s)
        self.native = NativeEndpoints(config, self.backend, context=context) if native else None
        self.streams: set = set()  # open WebSockets and event streams (streams.py)
        self.server = None
        self.stopping = False  # set by stop(): a long-poll started now is answered 204 at once
        self.admin = EdgeAdmin(self)  # metrics, health, status page on [admin] bind

    def reload(self, config) -> None:
        """Take the worker list and ring of a config read again (SIGHUP); other keys
        need a restart."""
        if self.backend.reload(config):
            self.fanout.ring_changed()

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
        self.server = EdgeHTTPServer(self, None, fast=self.fast_path,
                                     max_body_size=self.limits.max_message_bytes + 1)
        self.server.request_callback = make_app(self.server)
        if sockets is None:
            sockets = tornado.netutil.bind_sockets(self.config.edge.port, self.config.edge.host,
                                                   reuse_port=self.reuse_port)
        self.server.serve_on(sockets)
        self.admin.start()
        log.info("edge listening on %s://%s:%d (%d workers, long-poll timeout %g s, %s loop, "
                 "%s, at most %d connections)",
                 "https" if self.server.tls is not None else "http", self.config.edge.host, self.config.edge.port, len(self.config.workers),
                 self.config.edge.long_poll_timeout_s,
                 type(asyncio.get_running_loop()).__module__.split(".")[0],
                 "fast path" if self.fast_path else "Tornado only (--no-fast-path)",
                 self.server.max_connections)

    async def stop(self) -> None:
        """Stop accepting, answer every waiting long-poll with 204, let publishes in
        flight get their answer (bounded by the request timeout), close the links."""
        self.stopping = True
        self.admin.close()
        if self.server is not None:
            self.server.stop_accepting()
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
        self.authorizer.close()
        self.fanout.close()
        if self.native is not None:
            self.native.close()
        self.backend.close()

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

    async def ask_callout(self, asks) -> None:
        """Ask the authorization callout each ``(operation, channel, credential)``;
        raises ``AuthError`` at the first refusal."""
        for op, channel, credential in asks:
            await self.authorizer.callout(op, channel, credential)

    @staticmethod
    def auth_refusal(exc, action) -> http.HttpError:
        """The answer to a callout's refusal of ``action``."""
        if not isinstance(exc, AuthError):
            log.error("the authorization callout failed", exc_info=exc)
            return http.HttpError(503, "Service unavailable: the authorization check failed")
        publishing = type(action) in (http.Publish, http.Delete)
        return http.auth_refusal(exc, subscriber=not publishing)

    def delete(self, channel: str) -> asyncio.Future:
        """Delete a channel's state at its owner."""
        return self.backend.request(channel, "delete")

    def owner_up(self, channel: str) -> bool:
        """True when this edge can reach the worker that owns ``channel``."""
        return self.backend.available(channel)

    def metrics_json(self) -> bytes:
        """Firehose 1.4's JSON time buckets (``/metrics@firehose``)."""
        return json.dumps(self.metrics.report(time.time()), separators=(",", ":")).encode()

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


async def serve(config, stop: asyncio.Event, native: bool, reuse_port: bool,
                fast_path: bool, reload_config=None) -> None:
    edge = Edge(config, native=native, reuse_port=reuse_port, fast_path=fast_path)
    await edge.start()
    cli.settle()
    if reload_config is not None:
        def reload() -> None:
            try:
                edge.reload(reload_config())
            except ConfigError as exc:
                log.error("the config read again cannot be used; ring kept: %s", exc)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("edge stopping: answering waiting subscribers")
    await edge.stop()


def main(argv=None) -> int:
    parser = cli.command_parser("firehose-edge", "Run one HTTP edge of a firehose-zmq cluster.")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the HTTP port with other edges on this host (SO_REUSEPORT)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop implementation (default uvloop)")
    parser.add_argument("--no-native", action="store_true",
                        help="do not serve the native ZeroMQ endpoints (another edge does)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="let Tornado read every request (the slow path; for comparison)")
    started = cli.start(parser, argv)
    if started.exit_code is not None:
        return started.exit_code
    args, config = started.args, started.config

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop, native=not args.no_native, reuse_port=args.reuse_port,
                    fast_path=not args.no_fast_path,
                    reload_config=lambda: load_config_with_sources(args.config)[0])

    try:
        if args.loop == "uvloop":
            import uvloop  # a faster asyncio loop: about 6% less CPU per request here
            uvloop.run(run())
        else:
            asyncio.run(run())
    except OSError as exc:
        log.error("edge cannot start: %s", exc)
        return 1
    except ConfigError as exc:
        log.error("edge cannot start: %s", exc)
        return 2
    return 0

