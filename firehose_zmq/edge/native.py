"""The edge's native ZeroMQ endpoints (docs/protocol.md §10; docs/native-zeromq.md).

Links (the two native endpoints bind, native clients connect; the XSUB
connects to every worker's XPUB, apart from the edge's own SUB so that the
HTTP fan-out and the native subscribers never share subscriptions)::

    native client SUB             edge                       workers
                        XPUB native_pub_bind   XSUB
      [topic, message] <------------------- <------------- [topic, message]
      [0x01 + topic]   -------------------> -------------> [0x01 + topic]
      [0x00 + topic]   -------------------> -------------> [0x00 + topic]

    native client DEALER / REQ   ROUTER native_router_bind     backend DEALERs
      [request]        ------> [identity, request] ---------> owning worker
      [reply]          <------ [identity, reply]   <---------
      (a REQ adds an empty delimiter: [identity, b"", request])

``topic`` is ``channel + b"\\x00"``; ``message`` and the request/reply bodies
are the msgpack maps of ``wire.frames``. The XPUB is manual
(``ZMQ_XPUB_MANUAL``): every subscription comes to the edge, which applies it
only when ``frames.decode_subscription`` accepts it (exact topics of valid
channel names; an empty or prefix subscription is refused and counted, and its
sender gets nothing from it). Each accepted subscription travels to the owning
worker, whose last-value cache then re-sends the channel's newest message (at
most once per channel per ``resend_newest_interval_ms``), so a new native
subscriber cannot miss a message published while its subscription was on its
way (existing subscribers of that channel see that message again; sequences
tell them it is a duplicate). An unsubscription goes on towards the workers as
often as subscriptions of that topic went before it, so the XSUB keeps a topic
while any native subscriber holds it.

Bounds: the XPUB queues at most ``native_send_hwm`` messages per subscriber
(dropping beyond: a subscriber that never reads holds at most that many); the
XSUB's send HWM is unlimited, as it only carries subscriptions (libzmq would
drop them silently past it); the XSUB and XPUB refuse frames over the message
limit and a subscription's size (``ZMQ_MAXMSGSIZE``). A peer that sends
something other than subscriptions to the XPUB is counted and logged: with a
manual XPUB, libzmq can then apply a subscription that was queued behind that
message to the wrong subscriber.

Requests are decoded and checked here, routed by the ring through the edge's
``Backend`` (same deadlines and liveness as HTTP), and answered with the
worker's reply under the client's own request id. A frame that breaks the
format gets an error reply when it came on the ROUTER (which always knows the
sender) and is counted and dropped when it came on the XPUB.
"""

import logging

import zmq

from ..auth import curve
from ..auth.tokens import AuthError
from ..wire import frames
from .backend import BackendError, RequestRejected, SocketReader
from ..wire.names import InvalidName, check_channel

log = logging.getLogger("firehose.native")

# A request frame this many times the message limit is not even read: ZeroMQ
# drops the connection (ZMQ_MAXMSGSIZE). Smaller oversized frames get a
# ``too_large`` reply.
_MAXMSGSIZE_FACTOR = 4
_MAX_IN_FLIGHT = 10000


class NativeCounters:
    """What the native endpoints count."""

    def __init__(self):
        self.forwarded = 0
        self.subscriptions = 0
        self.refused_subscriptions = 0
        self.requests = 0
        self.rejected_frames = 0


class NativeEndpoints:
    """The native subscribe (XPUB) and request (ROUTER) endpoints of one edge."""

    def __init__(self, config, backend, context=None):
        self.config = config
        self.backend = backend
        self.counters = NativeCounters()
        self._context = context or zmq.Context.instance()
        self._max_bytes = config.limits.max_message_bytes
        self._in_flight = 0
        self._topics: dict = {}  # topic -> subscriptions forwarded and not yet withdrawn
        self._xpub = self._xsub = self._router = None
        self._readers = []
        self.rights = curve.NativeRights(config)  # what each CURVE client key may do

    @property
    def pub_endpoint(self) -> str:
        return self.config.edge.native_pub_bind

    @property
    def router_endpoint(self) -> str:
        return self.config.edge.native_router_bind

    def start(self, loop) -> None:
        """Bind both endpoints and connect to the workers; raises OSError if a bind fails."""
        edge = self.config.edge
        try:
            self._xpub = self._socket(zmq.XPUB)
            self._xpub.setsockopt(zmq.SNDHWM, edge.native_send_hwm)
            self._xpub.setsockopt(zmq.MAXMSGSIZE, frames.SUBSCRIPTION_FRAME_LIMIT)
            self._xpub.setsockopt(zmq.XPUB_MANUAL, 1)
            curve.secure_server(self._xpub, self.config, curve.NATIVE)
            self._xpub.bind(edge.native_pub_bind)
            self._router = self._socket(zmq.ROUTER)
            self._router.setsockopt(zmq.RCVHWM, 10000)
            self._router.setsockopt(zmq.SNDHWM, 10000)
            self._router.setsockopt(zmq.MAXMSGSIZE, _MAXMSGSIZE_FACTOR * self._max_bytes)
            curve.secure_server(self._router, self.config, curve.NATIVE)
            self._router.bind(edge.native_router_bind)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"cannot bind the native ZeroMQ endpoints: {exc}") from None
        self._xsub = self._socket(zmq.XSUB)
        self._xsub.setsockopt(zmq.RCVHWM, 200000)
        self._xsub.setsockopt(zmq.SNDHWM, 0)  # subscriptions only; see the module docstring
        self._xsub.setsockopt(zmq.MAXMSGSIZE, frames.frame_limit(self._max_bytes))
        self._xsub.setsockopt(zmq.RECONNECT_IVL, 100)
        self._xsub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        for worker in self.config.workers:
            curve.secure_client(self._xsub, self.config, worker.id)
            self._xsub.connect(worker.pub_connect)
        keyed = self.rights.enabled  # frames carry their client's key
        self._xpub_reader = SocketReader(loop, self._xpub, self._on_subscription, keyed)
        self._xsub_reader = SocketReader(loop, self._xsub, self._on_worker_message)
        self._router_reader = SocketReader(loop, self._router, self._on_request, keyed)
        self._readers = [self._xpub_reader, self._xsub_reader, self._router_reader]
        log.info("native ZeroMQ: subscribe on %s, requests on %s",
                 edge.native_pub_bind, edge.native_router_bind)

    def _socket(self, kind):
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []
        for sock in (self._xpub, self._xsub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._xpub = self._xsub = self._router = None
        c = self.counters
        log.info("native ZeroMQ closed: %d messages forwarded, %d subscriptions (%d refused), "
                 "%d requests, %d rejected frames", c.forwarded, c.subscriptions,
                 c.refused_subscriptions, c.requests, c.rejected_frames)

    def _reject(self, reason: str) -> None:
        self.counters.rejected_frames += 1
        count = self.counters.rejected_frames
        if count <= 10 or count % 1000 == 0:
            log.warning("native: rejected frame (%d so far): %s", count, reason)

    # -- subscribe endpoint -----------------------------------------------------

    def _on_worker_message(self, parts) -> None:
        """A worker's message: forward it as is, or a batch as its messages one by one
        (the XPUB drops at a subscriber's HWM)."""
        if frames.is_batch(parts[-1]):
            try:
                messages = frames.split_messages(parts, self._max_bytes)
            except frames.ProtocolError as exc:
                self._reject(f"from a worker's message stream: {exc}")
                return
        else:
            messages = (parts,)
        for message in messages:
            self.counters.forwarded += 1
            self._xpub.send_multipart(message, zmq.NOBLOCK)
        self._xpub_reader.soon()

    def _on_subscription(self, parts) -> None:
        """A native subscriber's (un)subscription: apply it and forward it towards the
        workers if it is an exact topic its key may read; refuse it otherwise."""
        if self.rights.enabled:
            keyed, parts = parts[0], [part.bytes for part in parts]
            if len(parts) == 1 and not self.rights.subscription_allowed(keyed):
                self._refuse_subscription("the client's key does not grant that channel")
                return
        if len(parts) != 1 or parts[0][:1] not in (b"\x00", b"\x01"):
            self._reject(f"subscribe endpoint got a {len(parts)}-frame message that is not a "
                         "subscription")
            return
        frame = parts[0]
        try:
            subscribe, _ = frames.decode_subscription(frame)
        except frames.ProtocolError as exc:
            if frame[:1] == b"\x01":  # unsubscribing from a refused topic is no harm
                self._refuse_subscription(str(exc))
            return
        topic = frame[1:]
        topics = self._topics
        if subscribe:
            self._xpub.setsockopt(zmq.SUBSCRIBE, topic)
            topics[topic] = topics.get(topic, 0) + 1
            self.counters.subscriptions += 1
        else:
            self._xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
            held = topics.get(topic, 0)
            if held == 0:
                return  # more unsubscriptions than subscriptions: keep the others' topic
            if held == 1:
                del topics[topic]
            else:
                topics[topic] = held - 1
        self._xsub.send(frame, zmq.NOBLOCK)
        self._xsub_reader.soon()

    def _refuse_subscription(self, reason: str) -> None:
        self.counters.refused_subscriptions += 1
        count = self.counters.refused_subscriptions
        if count <= 10 or count % 1000 == 0:
            log.warning("native: refused subscription (%d so far): %s", count, reason)

    # -- request endpoint -------------------------------------------------------

    def _on_request(self, parts) -> None:
        """``[identity, body]`` (DEALER) or ``[identity, b"", body]`` (REQ)."""
        self.counters.requests += 1
        keyed = None
        if self.rights.enabled:
            keyed, parts = parts[-1], [part.bytes for part in parts]
        if len(parts) == 2:
            envelope, body = parts[:1], parts[1]
        elif len(parts) == 3 and parts[1] == b"":
            envelope, body = parts[:2], parts[2]
        else:
            envelope = parts[:2] if len(parts) > 1 and parts[1] == b"" else parts[:1]
            self._reply_error(envelope, None, frames.ProtocolError(
                f"a request is one frame (two with a REQ socket's empty delimiter), "
                f"not {len(parts) - 1}"))
            return
        try:
            request = frames.decode_request(body, self._max_bytes)
            if request["op"] != "ping":
                self._check_channel(request)
            if keyed is not None:
                self.rights.check_request(request, keyed)
        except frames.ProtocolError as exc:
            self._reply_error(envelope, exc.request_id, exc)
            return
        except AuthError as exc:
            self._reply_error(envelope, request["id"], frames.ProtocolError(
                exc.reason, request_id=request["id"], code=frames.FORBIDDEN))
            return
        request_id = request["id"]
        if request["op"] == "ping":
            self._send(envelope, frames.encode_reply(
                request_id, ring=self.backend.ring.version, workers=self.backend.workers_up()))
            return
        if self._in_flight >= _MAX_IN_FLIGHT:
            self._send(envelope, frames.encode_error(
                request_id, frames.UNAVAILABLE,
                f"the edge has {_MAX_IN_FLIGHT} native requests in flight; retry later",
                self.backend.ring.version))
            return
        forwarded = {k: v for k, v in request.items() if k not in ("v", "id")}
        self._in_flight += 1
        future = self.backend.call(self.backend.route(request["channel"]), forwarded)
        future.add_done_callback(lambda f: self._on_reply(envelope, request_id, f))

    def _check_channel(self, request) -> None:
        try:
            check_channel(request["channel"])
        except InvalidName as exc:
            raise frames.ProtocolError(exc.reason, request_id=request["id"]) from None

    def _on_reply(self, envelope, request_id, future) -> None:
        self._in_flight -= 1
        if self._router is None:
            if not future.cancelled():
                future.exception()
            return
        ring = self.backend.ring.version
        exc = future.exception()
        if exc is None:
            body = frames.encode_reply(request_id, **frames.reply_fields(future.result()))
        elif isinstance(exc, RequestRejected):
            body = frames.encode_error(request_id, exc.code, str(exc), ring)
        elif isinstance(exc, BackendError):
            body = frames.encode_error(request_id, frames.UNAVAILABLE, str(exc), ring)
        else:
            log.error("native request failed", exc_info=exc)
            body = frames.encode_error(request_id, "internal", "internal error in the edge", ring)
        self._send(envelope, body)

    def _reply_error(self, envelope, request_id, exc: frames.ProtocolError) -> None:
        self._reject(str(exc))
        self._send(envelope, frames.encode_error(request_id, exc.code, str(exc),
                                                   self.backend.ring.version))

    def _send(self, envelope, body: bytes) -> None:
        try:
            self._router.send_multipart(envelope + [body], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer's queue is full; the client will time out
            log.debug("native reply dropped: %s", exc)
        self._router_reader.soon()
