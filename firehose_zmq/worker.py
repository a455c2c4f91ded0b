"""firehose-worker: owns the channels the ring gives it and sequences their messages.

Links (both sockets bind; edges and native clients connect)::

    ROUTER router_bind   <- [envelope..., request]   (edges' DEALERs, native DEALERs)
                         -> [envelope..., reply]
    XPUB   pub_bind      -> [channel + b"\\x00", message]   one per publish
                         <- [b"\\x01" + topic] / [b"\\x00" + topic]   (subscriptions)

Frame bodies are in ``protocol``. Every subscription that reaches the XPUB is
answered by re-sending that channel's newest message (a last-value cache): an
edge that subscribed and then fetched cannot miss a message published while its
subscription was still travelling, because the re-sent message, carrying its
sequence, arrives as soon as the subscription lands.

The worker is one thread running a zmq poll loop: no lock, no await, and a
publish costs one PUB message whatever the number of subscribers.
"""

import argparse
import logging
import math
import signal
import time

import zmq

from . import protocol
from .channel import ChannelTable
from .config import ConfigError, load_config
from .httpwire import HttpError, validate_channel
from .ring import Ring

log = logging.getLogger("firehose.worker")

_BATCH = 256
_POLL_MS = 100
_EXPIRE_EVERY_S = 1.0
_PER_MESSAGE_OVERHEAD_BYTES = 16  # msgpack framing of one [seq, data] pair, rounded up


class Counters:
    """What a worker counts; logged at shutdown and kept for metrics."""

    def __init__(self):
        self.requests = 0
        self.published = 0
        self.rejected_frames = 0
        self.subscriptions = 0
        self.expired_channels = 0


class Worker:
    """The state and request handling of one worker; ``run`` is its loop."""

    def __init__(self, config, worker_id: str, context=None, clock=time.time):
        self.config = config
        self.me = config.worker(worker_id)
        self.ring = Ring([w.id for w in config.workers], config.ring_vnodes)
        self.limits = config.limits
        self.counters = Counters()
        self._clock = clock
        self._last_epoch = 0
        self.channels = ChannelTable(self._new_epoch)
        self._context = context or zmq.Context.instance()
        self._router = None
        self._xpub = None

    def _new_epoch(self) -> int:
        self._last_epoch = max(time.time_ns(), self._last_epoch + 1)
        return self._last_epoch

    # -- sockets ---------------------------------------------------------------

    def bind(self) -> None:
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 100000)
        self._router.setsockopt(zmq.SNDHWM, 100000)
        self._router.bind(self.me.router_bind)
        self._xpub = self._context.socket(zmq.XPUB)
        self._xpub.setsockopt(zmq.LINGER, 0)
        self._xpub.setsockopt(zmq.SNDHWM, 100000)
        self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, for the cache
        self._xpub.bind(self.me.pub_bind)
        log.info("worker %s ready: requests on %s, messages on %s (ring %s, %d workers)",
                 self.me.id, self.me.router_bind, self.me.pub_bind, self.ring.version,
                 len(self.ring.worker_ids))

    def close(self) -> None:
        for sock in (self._router, self._xpub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._xpub = None

    def run(self, should_stop) -> None:
        """Serve until ``should_stop()`` is true (checked at least every 100 ms)."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._xpub, zmq.POLLIN)
        next_expiry = self._clock() + _EXPIRE_EVERY_S
        while not should_stop():
            ready = dict(poller.poll(_POLL_MS))
            if self._router in ready:
                self._drain_requests()
            if self._xpub in ready:
                self._drain_subscriptions()
            now = self._clock()
            if now >= next_expiry:
                expired = self.channels.expire(now)
                self.counters.expired_channels += len(expired)
                if expired:
                    log.debug("expired %d channels", len(expired))
                next_expiry = now + _EXPIRE_EVERY_S

    def _drain_requests(self) -> None:
        router = self._router
        for _ in range(_BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                self._reject(f"request of {len(frames)} frame(s) has no body")
                continue
            reply = self.handle_request(frames[-1])
            router.send_multipart(frames[:-1] + [reply])

    def _drain_subscriptions(self) -> None:
        xpub = self._xpub
        for _ in range(_BATCH):
            try:
                frame = xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] == b"\x01" and frame.endswith(b"\x00"):
                self.counters.subscriptions += 1
                self._resend_newest(frame[1:-1])

    def _resend_newest(self, channel_bytes: bytes) -> None:
        try:
            name = channel_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return
        if self.ring.owner(name) != self.me.id:
            return
        channel = self.channels.get(name, self._clock())
        if channel is not None and channel.last is not None:
            self._publish_frames(channel, channel.last)

    def _publish_frames(self, channel, message) -> None:
        ttl = None
        if channel.expires_at is not None:
            ttl = max(0, math.ceil(channel.expires_at - self._clock()))
        self._xpub.send_multipart(protocol.encode_message(protocol.PubMessage(
            channel.name, message.seq, channel.epoch, message.data, ttl)))

    # -- requests --------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.counters.rejected_frames += 1
        count = self.counters.rejected_frames
        if count <= 10 or count % 1000 == 0:
            log.warning("rejected frame (%d so far): %s", count, reason)

    def handle_request(self, body: bytes) -> bytes:
        """One request body in, one reply body out; never raises."""
        self.counters.requests += 1
        try:
            request = protocol.decode_request(body, self.limits.max_message_bytes)
        except protocol.ProtocolError as exc:
            self._reject(str(exc))
            return protocol.encode_error(exc.request_id, exc.code, str(exc), self.ring.version)
        request_id = request["id"]
        try:
            return self._dispatch(request)
        except protocol.ProtocolError as exc:
            self._reject(str(exc))
            return protocol.encode_error(request_id, exc.code, str(exc), self.ring.version)
        except Exception:
            log.exception("request %r failed", request.get("op"))
            return protocol.encode_error(request_id, "internal", "internal error in the worker",
                                         self.ring.version)

    def _owned_channel(self, request) -> str:
        try:
            name = validate_channel(request["channel"])
        except HttpError as exc:
            raise protocol.ProtocolError(exc.reason) from None
        owner = self.ring.owner(name)
        if owner != self.me.id:
            raise protocol.ProtocolError(
                f"worker {self.me.id} does not own {name!r} (owner {owner}) in ring "
                f"{self.ring.version}", protocol.NOT_OWNER)
        return name

    def _dispatch(self, request) -> bytes:
        op, request_id = request["op"], request["id"]
        if op == "ping":
            return protocol.encode_reply(request_id, worker=self.me.id, ring=self.ring.version)
        name = self._owned_channel(request)
        now = self._clock()
        if op == "publish":
            return self._publish(request, name, now)
        if op == "fetch":
            channel = self.channels.get(name, now)
            if channel is None:
                return protocol.encode_reply(request_id, seq=0, epoch=0, messages=[])
            since = request["since"]
            found = channel.after(since) if request.get("after") else channel.since(since)
            found = self._fit_reply(found, request.get("limit"))
            return protocol.encode_reply(request_id, seq=channel.seq, epoch=channel.epoch,
                                         messages=[[m.seq, m.data] for m in found])
        # op == "delete"
        return protocol.encode_reply(request_id, existed=self.channels.delete(name))

    def _fit_reply(self, found: list, limit) -> list:
        """The oldest of ``found`` that fit ``limit`` and one message's worth of bytes.

        A reply always carries at least one message; the receiver asks again after
        the last one it got when the reply stops short of the channel's sequence.
        """
        budget = self.limits.max_message_bytes
        used = 0
        for count, message in enumerate(found[:limit] if limit else found):
            used += len(message.data) + _PER_MESSAGE_OVERHEAD_BYTES
            if used > budget and count > 0:
                return found[:count]
        return found[:limit] if limit else found

    def _publish(self, request, name: str, now: float) -> bytes:
        limits = self.limits
        data = request["data"]
        if len(data) > limits.max_message_bytes:
            raise protocol.ProtocolError(
                f"message of {len(data)} bytes is over the {limits.max_message_bytes} limit",
                protocol.TOO_LARGE)
        buffer_size = request.get("buffer_size", limits.default_buffer_size)
        if buffer_size > limits.max_buffer_size:
            raise protocol.ProtocolError(
                f"buffer_size {buffer_size} is above the maximum {limits.max_buffer_size}")
        ttl_s = None if request.get("persist") else request.get("ttl", limits.default_ttl_s)
        channel, message = self.channels.publish(name, data, now, ttl_s, buffer_size)
        self.counters.published += 1
        self._publish_frames(channel, message)
        return protocol.encode_reply(request["id"], seq=message.seq, epoch=channel.epoch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="firehose-worker",
                                     description="Run one channel worker of a firehose-zmq cluster.")
    parser.add_argument("--config", help="cluster config (TOML); default: the embedded local one")
    parser.add_argument("--id", required=True, help="this worker's id in the config")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
    try:
        config = load_config(args.config)
        worker = Worker(config, args.id)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))
    try:
        worker.bind()
    except zmq.ZMQError as exc:
        log.error("worker %s cannot bind: %s", args.id, exc)
        return 1
    try:
        worker.run(lambda: bool(stopping))
    finally:
        worker.close()
        c = worker.counters
        log.info("worker %s stopped: %d requests, %d published, %d rejected frames",
                 args.id, c.requests, c.published, c.rejected_frames)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
