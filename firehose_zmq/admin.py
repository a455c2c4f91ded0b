"""The admin listener of an edge and of a worker: Prometheus metrics, health, status.

Separate from the public port (``[admin] bind`` for an edge, ``[[workers]] admin``
for each worker); nothing here is on a request's path. Everything is read when
asked for, from the counters the processes keep anyway:

    GET  /metrics        Prometheus text format (``prometheus_client``)
    GET  /healthz        200 "ok": the process is alive
    GET  /readyz         200 "ready", or 503 and one line saying why not
    GET  /status.json    the picture the status page, ``firehose-ctl`` and
                         ``/metrics`` are made from (``edge_status``, ``worker_status``)
    GET  /channel?name=  one channel: owner, sequence, epoch, buffer, TTL, subscribers
    GET  /               the live status page (edge only; ``status.html``)
    POST /drain          edge only: answer /readyz 503 at once, stop like SIGTERM
                         after ``[admin] drain_grace_s``

An edge is ready when it is not draining and reaches every worker (the backend's
heartbeats: a worker that stops answering is down within ``heartbeat_interval_ms``
x ``heartbeat_liveness``). A worker is ready when its store is open and has fewer
than ``ready_backlog_ratio`` x ``max_unflushed_ops`` operations waiting for the disk.

The edge's totals come from its ``metrics.TimeSeries``, which keeps only recent
buckets: ``CounterTotals`` adds each bucket once it is closed, and the edge's
admin reads it at least once per half of the kept history, so the totals are
monotonic whether or not anyone scrapes. The edge serves this on its own Tornado
loop; a worker, whose loop is a zmq poll loop, serves it from one thread that
only reads.
"""

import asyncio
import http.server
import json
import logging
import os
import signal
import threading
import time
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
import tornado.httpclient
import tornado.httpserver
import tornado.web

from . import __version__
from .config import split_host_port

log = logging.getLogger("firehose.admin")

STATUS_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "status.html")

# Edge counters (names in metrics.TimeSeries) -> (metric, help, labels).
_EDGE_COUNTERS = {
    "published": ("firehose_publishes", "Publishes acknowledged (202) by this edge", {}),
    "subscribed": ("firehose_long_polls", "Long-poll requests", {"kind": "single"}),
    "subscribed_multiplexed": ("firehose_long_polls", "Long-poll requests",
                               {"kind": "multiplexed"}),
    "timeouts": ("firehose_long_poll_timeouts", "Long-polls answered 204 (no message)", {}),
    "websocket_opened": ("firehose_streams_opened", "Streams opened", {"transport": "websocket"}),
    "event_stream_opened": ("firehose_streams_opened", "Streams opened", {"transport": "sse"}),
    "slow_readers_closed": ("firehose_slow_readers_cut",
                            "WebSockets and event streams cut for reading too slowly", {}),
    "websocket_bad_frames": ("firehose_rejections", "Refused input, by reason",
                             {"reason": "websocket_bad_frame"}),
    "connections_opened": ("firehose_connections_opened", "HTTP connections accepted", {}),
}


class CounterTotals:
    """Monotonic totals from a ``metrics.TimeSeries`` that keeps recent buckets only."""

    def __init__(self, series):
        self._series = series
        self._absorbed_until = -1  # start of the newest bucket already added
        self._totals: dict = {}

    def read(self, now: float) -> dict:
        """Every counter's total up to ``now``."""
        buckets = self._series.global_counts(now)
        current_start, current = buckets[-1]
        for start, counts in buckets[:-1]:
            if start > self._absorbed_until:
                for name, count in counts.items():
                    self._totals[name] = self._totals.get(name, 0) + count
                self._absorbed_until = start
        totals = dict(self._totals)
        for name, count in current.items():
            totals[name] = totals.get(name, 0) + count
        return totals


# -- the edge ---------------------------------------------------------------------

def _subscribers(edge) -> dict:
    from .edge.streams import EventStream, WebSocket
    counts = {"long_poll": len(edge.timeouts.pending()), "websocket": 0, "sse": 0}
    for stream in list(edge.streams):
        if isinstance(stream, WebSocket):
            counts["websocket"] += 1
        elif isinstance(stream, EventStream):
            counts["sse"] += 1
    return counts


def edge_status(edge, admin, now: float) -> dict:
    """This edge as a JSON-able dict (the workers as this edge sees them)."""
    config = edge.config
    series = edge.metrics.global_counts(now)
    return {
        "role": "edge", "version": __version__, "pid": os.getpid(), "time": now,
        "http": f"{config.edge.host}:{config.edge.port}", "admin": config.admin.bind,
        "ready": admin.ready()[0], "draining": admin.draining,
        "connections": edge.metrics.connections,
        "subscribers": _subscribers(edge),
        "totals": admin.totals.read(now),
        "publish_retries": edge.backend.resent_publishes,
        "deliveries": dict(edge.deliveries),
        "rejected_worker_frames": edge.backend.rejected_frames,
        "workers": [{"id": w.id, "up": edge.backend.is_up(w.id), "admin": w.admin}
                    for w in config.workers],
        "series": {"bucket_s": edge.metrics.bucket_s,
                   "buckets": [{"time": start, **counts} for start, counts in series]},
    }


class EdgeCollector:
    """``prometheus_client`` collector over ``edge_status``."""

    def __init__(self, edge, admin):
        self._edge = edge
        self._admin = admin

    def collect(self):
        status = edge_status(self._edge, self._admin, time.time())
        yield _info(status)
        families = {}
        for name, (metric, help_text, labels) in _EDGE_COUNTERS.items():
            family = families.get(metric)
            if family is None:
                family = families[metric] = CounterMetricFamily(metric, help_text,
                                                                 labels=list(labels))
            family.add_metric(list(labels.values()), status["totals"].get(name, 0))
        families["firehose_rejections"].add_metric(["worker_bad_frame"],
                                                   status["rejected_worker_frames"])
        yield from families.values()
        deliveries = CounterMetricFamily("firehose_deliveries", "Messages written to subscribers",
                                         labels=["transport"])
        for transport, count in status["deliveries"].items():
            deliveries.add_metric([transport], count)
        yield deliveries
        edge = self._edge
        yield _histogram("firehose_publish_seconds", "From a publish's body to its 202",
                         edge.publish_latency.cumulative(), edge.publish_latency.sum_s)
        yield _histogram("firehose_fanout_seconds", "From a worker's message reaching this "
                         "edge to its last local subscriber's write",
                         edge.fanout_latency.cumulative(), edge.fanout_latency.sum_s)
        yield CounterMetricFamily("firehose_publish_retries",
                                  "Publishes sent again to a worker that came back",
                                  value=status["publish_retries"])
        subscribers = GaugeMetricFamily("firehose_subscribers", "Subscribers waiting now",
                                        labels=["transport"])
        for transport, count in status["subscribers"].items():
            subscribers.add_metric([transport], count)
        yield subscribers
        yield GaugeMetricFamily("firehose_connections", "HTTP connections open now",
                                value=status["connections"])
        up = GaugeMetricFamily("firehose_worker_up", "1 when this edge reaches the worker",
                               labels=["worker"])
        for worker in status["workers"]:
            up.add_metric([worker["id"]], 1 if worker["up"] else 0)
        yield up
        yield GaugeMetricFamily("firehose_ready", "1 when /readyz answers 200",
                                value=1 if status["ready"] else 0)


def _histogram(name: str, help_text: str, cumulative, sum_s: float, labels=(), values=()):
    """A Prometheus histogram from ``LatencyHistogram.cumulative()`` and its sum."""
    family = HistogramMetricFamily(name, help_text, labels=list(labels))
    buckets = [(bound if bound == "+Inf" else repr(bound), count)
               for bound, count in cumulative]
    family.add_metric(list(values), buckets, sum_s)
    return family


def _info(status: dict) -> GaugeMetricFamily:
    info = GaugeMetricFamily("firehose_build_info", "Version and role of this process",
                             labels=["version", "role"])
    info.add_metric([status["version"], status["role"]], 1)
    return info


class EdgeAdmin:
    """The admin listener of one edge, on the edge's loop."""

    def __init__(self, edge):
        self.edge = edge
        self.config = edge.config.admin
        self.totals = CounterTotals(edge.metrics)
        self.draining = False
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EdgeCollector(edge, self))
        self._server = None
        self._reader = None
        self._drain_timer = None

    def start(self) -> None:
        """Listen on ``[admin] bind`` (nothing when it is empty); raises OSError."""
        if not self.config.bind:
            return
        host, port = split_host_port(self.config.bind, "admin.bind")
        deps = {"admin": self}
        app = tornado.web.Application([
            (r"/metrics", _Metrics, deps), (r"/healthz", _Health, deps),
            (r"/readyz", _Ready, deps), (r"/status\.json", _EdgeStatus, deps),
            (r"/channel", _EdgeChannel, deps), (r"/drain", _Drain, deps),
            (r"/", _Page, deps)])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.listen(port, host)
        loop = asyncio.get_running_loop()
        every_s = max(1.0, self.edge.metrics.kept_s / 2 - self.edge.metrics.bucket_s)
        self._reader = _Every(loop, every_s, lambda: self.totals.read(time.time()))
        log.info("admin listening on http://%s:%d (/metrics, /healthz, /readyz, status page)",
                 host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._reader is not None:
            self._reader.cancel()
        if self._drain_timer is not None:
            self._drain_timer.cancel()

    def ready(self) -> tuple:
        """``(ready, one-line reason)``."""
        if self.draining or self.edge.stopping:
            return False, "draining"
        down = [w.id for w in self.edge.config.workers if not self.edge.backend.is_up(w.id)]
        if down:
            return False, f"worker(s) down: {', '.join(down)}"
        return True, "ready"

    def drain(self) -> float:
        """Answer /readyz 503 from now on and stop this edge (as SIGTERM does) after
        the grace period; returns the grace period in seconds."""
        if not self.draining:
            self.draining = True
            grace_s = self.config.drain_grace_s
            log.info("draining: /readyz answers 503; the edge stops in %g s", grace_s)
            self._drain_timer = asyncio.get_running_loop().call_later(
                grace_s, os.kill, os.getpid(), signal.SIGTERM)
        return self.config.drain_grace_s

    async def status(self) -> dict:
        """This edge's status with each worker's own (from its admin listener)."""
        status = edge_status(self.edge, self, time.time())
        fetched = await asyncio.gather(*(self._worker_get(w["admin"], "/status.json")
                                         for w in status["workers"]))
        for worker, details in zip(status["workers"], fetched):
            worker["status"] = details
        return status

    async def channel(self, name: str) -> dict:
        backend = self.edge.backend
        owner = backend.owner(name)
        admin = self.edge.config.worker(owner).admin
        details = await self._worker_get(admin, "/channel?" + _query(name))
        return {"channel": name, "owner": owner, "owner_up": backend.is_up(owner),
                "subscribers_here": self.edge.fanout.listener_count(name), "worker": details}

    async def _worker_get(self, address: str, path: str):
        """A worker admin's JSON answer, or ``{"error": ...}``."""
        if not address:
            return {"error": "this worker has no admin listener ([[workers]] admin)"}
        client = tornado.httpclient.AsyncHTTPClient()
        try:
            response = await client.fetch(f"http://{address}{path}", raise_error=False,
                                          request_timeout=self.config.status_timeout_s)
        except Exception as exc:  # unreachable, refused, timed out: all the same here
            return {"error": f"unreachable: {exc}"}
        if response.code == 599:
            return {"error": f"unreachable: {response.error}"}
        try:
            return json.loads(response.body)
        except ValueError:
            return {"error": f"HTTP {response.code} without JSON"}


def _query(name: str) -> str:
    from urllib.parse import urlencode
    return urlencode({"name": name})


class _Every:
    """Call ``fn`` every ``interval_s`` on ``loop`` until cancelled."""

    def __init__(self, loop, interval_s: float, fn):
        self._loop, self._interval_s, self._fn = loop, interval_s, fn
        self._handle = loop.call_later(interval_s, self._run)

    def _run(self) -> None:
        self._handle = self._loop.call_later(self._interval_s, self._run)
        self._fn()

    def cancel(self) -> None:
        self._handle.cancel()


class _AdminHandler(tornado.web.RequestHandler):
    def initialize(self, admin):
        self.admin = admin

    def compute_etag(self):
        return None

    def text(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(body + "\n")

    def json(self, value, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(value, separators=(",", ":")))


class _Metrics(_AdminHandler):
    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.admin.registry))


class _Health(_AdminHandler):
    def get(self):
        self.text(200, "ok")


class _Ready(_AdminHandler):
    def get(self):
        ready, reason = self.admin.ready()
        self.text(200 if ready else 503, reason)


class _EdgeStatus(_AdminHandler):
    async def get(self):
        self.json(await self.admin.status())


class _EdgeChannel(_AdminHandler):
    async def get(self):
        name = self.get_query_argument("name", "")
        problem = _channel_problem(name)
        if problem:
            return self.text(400, problem)
        self.json(await self.admin.channel(name))


class _Drain(_AdminHandler):
    def post(self):
        self.json({"draining": True, "stops_in_s": self.admin.drain()}, 202)


class _Page(_AdminHandler):
    def get(self):
        with open(STATUS_PAGE, "rb") as f:
            page = f.read()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(page)


def _channel_problem(name: str):
    """None for a channel name that may be asked about, else why not."""
    from .wire.names import InvalidName, check_channel
    if not name:
        return "give the channel as ?name=/the/channel"
    try:
        check_channel(name)
    except InvalidName as exc:
        return exc.reason
    return None


# -- the worker -------------------------------------------------------------------

def worker_status(worker) -> dict:
    """A worker as a JSON-able dict; read from another thread than the worker's loop."""
    counters = worker.counters
    writer = worker._writer
    storage = worker.storage
    channels = list(worker.channels.channels())
    now = time.time()
    store = {"durability": storage.durability, "open": storage.durability == "memory"
             or (writer is not None and not writer.failed)}
    if storage.durability != "memory":
        store["path"] = worker.store_path
        store["bytes"] = sum(os.path.getsize(path) for path in
                             (worker.store_path, worker.store_path + "-wal")
                             if os.path.exists(path))
        if writer is not None:
            store.update(unflushed_ops=writer.unflushed_ops, commits=writer.commits,
                         commit_seconds=writer.commit_time.sum_s,
                         commit_histogram=writer.commit_time.cumulative())
    ready, reason = worker_ready(worker)
    return {
        "role": "worker", "id": worker.me.id, "version": __version__, "pid": os.getpid(),
        "time": now, "ready": ready, "reason": reason, "store": store,
        "channels": sum(1 for c in channels if not c.expired(now)),
        "messages": sum(len(c.buffer) for c in channels),
        "totals": {"requests": counters.requests, "published": counters.published,
                   "duplicate_publishes": counters.duplicate_publishes,
                   "subscriptions": counters.subscriptions,
                   "expired_channels": counters.expired_channels,
                   "rejected_frames": counters.rejected_frames,
                   "late_requests": counters.late_requests,
                   "overloaded": counters.overloaded},
    }


def worker_ready(worker) -> tuple:
    storage = worker.storage
    writer = worker._writer
    if storage.durability != "memory":
        if writer is None or writer.failed:
            return False, "store not open"
        limit = worker.config.admin.ready_backlog_ratio * storage.max_unflushed_ops
        if writer.unflushed_ops >= limit:
            return False, (f"store backlog {writer.unflushed_ops} operations "
                           f"(limit {limit:.0f})")
    return True, "ready"


def worker_channel(worker, name: str) -> dict:
    now = time.time()
    channel = worker.channels.get(name, now)
    if channel is None:
        return {"channel": name, "exists": False}
    ttl = None if channel.expires_at is None else max(0, round(channel.expires_at - now))
    return {"channel": name, "exists": True, "seq": channel.seq, "epoch": channel.epoch,
            "buffered": len(channel.buffer), "ttl_s": ttl}


class WorkerCollector:
    def __init__(self, worker):
        self._worker = worker

    def collect(self):
        status = worker_status(self._worker)
        totals = status["totals"]
        labels = ["worker"]
        me = [status["id"]]
        yield _info(status)

        def counter(name, help_text, value):
            family = CounterMetricFamily(name, help_text, labels=labels)
            family.add_metric(me, value)
            return family

        def gauge(name, help_text, value):
            family = GaugeMetricFamily(name, help_text, labels=labels)
            family.add_metric(me, value)
            return family

        yield counter("firehose_worker_requests", "Requests read", totals["requests"])
        yield counter("firehose_worker_publishes", "Messages sequenced", totals["published"])
        yield counter("firehose_worker_duplicate_publishes",
                      "Retried publishes answered with their first result",
                      totals["duplicate_publishes"])
        yield counter("firehose_worker_subscriptions", "Subscriptions reaching the XPUB",
                      totals["subscriptions"])
        yield counter("firehose_channels_expired", "Channels dropped at their TTL",
                      totals["expired_channels"])
        rejections = CounterMetricFamily("firehose_rejections", "Refused input, by reason",
                                         labels=["worker", "reason"])
        for reason, key in (("bad_frame", "rejected_frames"), ("late_publish", "late_requests"),
                            ("overloaded", "overloaded")):
            rejections.add_metric([*me, reason], totals[key])
        yield rejections
        yield gauge("firehose_channels", "Live channels", status["channels"])
        yield gauge("firehose_buffered_messages", "Messages in channel buffers",
                    status["messages"])
        yield gauge("firehose_ready", "1 when /readyz answers 200", 1 if status["ready"] else 0)
        store = status["store"]
        if "bytes" in store:
            yield gauge("firehose_store_bytes", "Size of the store file and its WAL",
                        store["bytes"])
        if "commits" in store:
            yield gauge("firehose_store_unflushed_ops", "Store operations waiting for the disk",
                        store["unflushed_ops"])
            yield counter("firehose_store_commits", "Store transactions", store["commits"])
            yield _histogram("firehose_store_commit_seconds", "Time of one store commit",
                             store["commit_histogram"], store["commit_seconds"], labels, me)


class WorkerAdmin:
    """A worker's admin listener: one thread with an HTTP server that only reads."""

    def __init__(self, worker):
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(worker))
        self._server = None
        self._thread = None

    def start(self) -> None:
        """Listen on the worker's ``admin`` address (nothing when empty); raises OSError."""
        address = self.worker.me.admin
        if not address:
            return
        host, port = split_host_port(address, f"workers.{self.worker.me.id}.admin")
        admin = self

        class Handler(_WorkerHandler):
            pass
        Handler.admin = admin
        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="admin",
                                        daemon=True)
        self._thread.start()
        log.info("worker %s admin listening on http://%s:%d", self.worker.me.id, host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None


class _WorkerHandler(http.server.BaseHTTPRequestHandler):
    admin: WorkerAdmin
    server_version = f"firehose-worker/{__version__}"

    def log_message(self, fmt, *args):
        log.debug("admin: " + fmt, *args)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        worker = self.admin.worker
        if url.path == "/metrics":
            return self._answer(200, generate_latest(self.admin.registry), CONTENT_TYPE_LATEST)
        if url.path == "/healthz":
            return self._answer(200, b"ok\n", "text/plain; charset=utf-8")
        if url.path == "/readyz":
            ready, reason = worker_ready(worker)
            return self._answer(200 if ready else 503, (reason + "\n").encode(),
                                "text/plain; charset=utf-8")
        if url.path == "/status.json":
            return self._answer(200, json.dumps(worker_status(worker)).encode(),
                                "application/json")
        if url.path == "/channel":
            name = parse_qs(url.query).get("name", [""])[0]
            problem = _channel_problem(name)
            if problem:
                return self._answer(400, (problem + "\n").encode(), "text/plain; charset=utf-8")
            return self._answer(200, json.dumps(worker_channel(worker, name)).encode(),
                                "application/json")
        self._answer(404, b"not found: /metrics, /healthz, /readyz, /status.json, /channel\n",
                     "text/plain; charset=utf-8")
