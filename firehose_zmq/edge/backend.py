"""The edge's side of the ZeroMQ links to the workers.

Links (all connect; the workers bind)::

    DEALER  -> worker ROUTER (one per worker)    [request]  ->   <- [reply]
    SUB     <- every worker's XPUB               [channel + b"\\x00", message]
                                                 -> [0x01 + topic] / [0x00 + topic]

Each request carries an id and has a deadline; a reply that comes late is
dropped. A worker is *up* while its DEALER has a completed connection (socket
monitor) and it answered a heartbeat ping within ``heartbeat_liveness``
intervals (Paranoid Pirate): a killed worker is noticed by the disconnect at
once, a hung one within the liveness window. Requests to a worker that is down
fail at once with ``WorkerUnavailable`` instead of waiting for the deadline;
``ZMQ_IMMEDIATE`` keeps the DEALER from queueing for a peer that is not there.

Publishes get a ``publish_id`` (unique per edge process) and a ``deadline_ms``
a little before the edge stops waiting. When their worker goes down they are
not failed at once like other requests: they wait for their deadline, and if
the worker comes back first they are sent again, once, with the same id. The
worker answers a retry of a publish it already stored with the first result,
and refuses a publish whose deadline has passed, so a 202 always means stored
and a 503 almost always means not stored (only a reply lost in the last
``_DEADLINE_MARGIN_S`` before the deadline can leave a 503 for a stored message).

Subscriptions are never dropped on the way: the SUB's send high-water mark is
unlimited (libzmq drops a subscription past it without a word, and re-sends
every subscription at once when it reconnects; what it holds is one topic per
channel with local listeners). The edge does not trust that a re-sent
subscription arrived either: a socket monitor tells when the SUB's link to a
worker drops and comes back, and ``stream_watchers`` hear it (the fan-out then
stops trusting that link and, once it is back and the worker answers, fetches
what its listeners missed).

Replicas (``[storage] replicas``): while a channel's owner is down, its requests
go to the channel's standby (its first replica on the ring), which takes the
owner's channels over (worker/replica.py); an owner that lost its channels
answers ``not_owner`` naming the standby, which the edge follows.

Ring changes: ``reload(config)`` (the edge's SIGHUP) takes a new worker list and
ring; links to new workers are opened and links to workers no longer in the
config closed. A worker that does not own a channel answers ``not_owner``
naming the worker to ask (its ring's owner, or the previous owner that still
serves the channel until it has the new ring too); the edge sends the request
there, with the same publish id, at most ``_MAX_FOLLOWS`` times, so edges and
workers whose rings differ for a moment during a rollout still reach the one
worker that serves the channel. A worker whose ring differs from the edge's is
still used (its ``not_owner`` answers route the requests).

Every socket that reads from a worker refuses frames over the message limit
(``ZMQ_MAXMSGSIZE``, ``frames.frame_limit``): ZeroMQ drops such a connection
before reading the frame.

The sockets are plain (non-async) pyzmq sockets read from the asyncio loop:
their FD is edge-triggered, so every reader drains until EAGAIN and is drained
again after each send on the same socket.
"""

import asyncio
import itertools
import logging
import time
import uuid

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..auth import curve
from ..wire import frames
from ..ring import Ring
from ..zmqraw import NOBLOCK, readable, recv_frames, send

log = logging.getLogger("firehose.backend")

_BATCH = 512
# The worker is told to refuse a publish this long before the edge gives up on it,
# so that an accepted publish's reply has time to arrive.
_DEADLINE_MARGIN_S = 0.5
# A request refused with not_owner is sent on to the worker the refusal names at
# most this many times (a rollout where edges and workers disagree for a moment).
_MAX_FOLLOWS = 3
# A timer may run up to a clock tick early (uvloop's are in milliseconds); a
# deadline that close counts as come.
_TIMER_SLACK_S = 0.001


class BackendError(Exception):
    """A request that did not get a successful reply."""


class WorkerUnavailable(BackendError):
    """The owning worker is down or did not answer within the deadline."""


class OwnerDown(WorkerUnavailable):
    """The owner of a channel went down while a subscriber was waiting on it."""


class RequestRejected(BackendError):
    """The worker answered with an error (``code``, and the reason as the message;
    ``owner``: with not_owner, the worker it names)."""

    def __init__(self, code: str, reason: str, owner=None):
        super().__init__(reason)
        self.code = code
        self.owner = owner


class SocketReader:
    """Calls ``on_frames(frames)`` for every message of a zmq socket, on the loop
    (``zmq.Frame`` objects when ``frame_objects``: their properties, such as a CURVE
    client's ``User-Id``, are wanted)."""

    def __init__(self, loop, sock, on_frames, frame_objects: bool = False):
        self._loop = loop
        self._sock = sock
        self._on_frames = on_frames
        self._frame_objects = frame_objects
        self._scheduled = False
        loop.add_reader(sock.FD, self.drain)
        self.soon()

    def drain(self) -> None:
        self._scheduled = False
        sock = self._sock
        if sock.closed:
            return
        for _ in range(_BATCH):
            if not readable(sock):
                return
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False) if self._frame_objects \
                    else recv_frames(sock)
            except zmq.Again:
                return
            try:
                self._on_frames(parts)
            except Exception:
                log.exception("handling a zmq message failed")
        self.soon()  # more may be waiting; let other work run first

    def soon(self) -> None:
        """Drain on the next loop turn (after a send, which may eat the FD's edge)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.drain)

    def close(self) -> None:
        if not self._sock.closed:
            self._loop.remove_reader(self._sock.FD)


class WorkerLink:
    """The DEALER to one worker, its pending requests and its liveness."""

    def __init__(self, worker_config):
        self.config = worker_config
        self.id = worker_config.id
        self.dealer = None
        self.reader = None
        self.monitor = None
        self.monitor_reader = None
        self.connected = False
        self.last_reply = 0.0
        self.alive = False
        self.ping_in_flight = False
        self.sub_connected = False  # the SUB's link to this worker's XPUB is up
        self.pending: dict = {}  # request id -> Pending
        self.outgoing: list = []  # (request id, body) to send at the end of this loop turn


class Pending:
    """A request waiting for its reply until ``deadline`` (loop time); ``body`` is kept
    for a publish's one retry, ``request`` (a channel's request, as sent but its id)
    to send it on after a not_owner, ``follows`` times so far."""

    __slots__ = ("future", "deadline", "body", "retries_left", "request", "follows")

    def __init__(self, future, deadline: float, body, retries_left: int, request=None,
                 follows: int = 0):
        self.future = future
        self.deadline = deadline
        self.body = body
        self.retries_left = retries_left
        self.request = request
        self.follows = follows


class Backend:
    """Routes requests to channel owners and delivers their messages to ``on_message``."""

    def __init__(self, config, on_message, context=None, on_worker_change=None):
        self.config = config
        self.ring = Ring(config.ring_members, config.ring_vnodes)
        self.previous = self._previous_ring(config)
        self._on_message = on_message
        self._on_worker_change = on_worker_change or (lambda worker_id, up: None)
        self._context = context or zmq.Context.instance()
        self._links = {w.id: WorkerLink(w) for w in config.workers}
        self._ids = itertools.count(1)
        self._publish_id_prefix = uuid.uuid4().hex
        self.resent_publishes = 0
        self._timeout_s = config.edge.request_timeout_s
        self._replicas = config.storage.replicas
        self._interval_s = config.edge.heartbeat_interval_ms / 1000.0
        self._liveness_s = self._interval_s * config.edge.heartbeat_liveness
        self._max_bytes = config.limits.max_message_bytes
        self._loop = None
        self._sub = None
        self._sub_reader = None
        self._heartbeat = None
        # One timer for every request's deadline: every request waits the same
        # timeout, so each link's pending requests (in sending order) are also in
        # deadline order, and the timer only has to be due at the oldest one.
        self._sweep = None
        self._send_scheduled = False
        self.rejected_frames = 0
        self._handshakes = curve.HandshakeWatch(log)
        self._sub_monitor = None
        self._sub_monitor_reader = None
        self._sub_links = {}  # pub_connect endpoint (bytes) -> WorkerLink
        # Called with (worker_id, ready): ready when the SUB is connected to the
        # worker and the worker answers; not ready when the SUB's link drops.
        self.stream_watchers: list = []
        self.followed = 0  # requests sent on after a not_owner
        self._ring_warned: set = set()  # (worker id, ring version) told about once

    # -- lifecycle -------------------------------------------------------------

    def _open_link(self, link) -> None:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, 100000)
        dealer.setsockopt(zmq.RCVHWM, 100000)
        dealer.setsockopt(zmq.MAXMSGSIZE, frames.frame_limit(self._max_bytes))
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        link.monitor = dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | curve.HANDSHAKE_FAILED)
        curve.secure_client(dealer, self.config, link.id)
        dealer.connect(link.config.router_connect)
        link.dealer = dealer
        link.reader = SocketReader(self._loop, dealer,
                                   lambda frames, link=link: self._on_reply(link, frames))
        link.monitor_reader = SocketReader(
            self._loop, link.monitor, lambda frames, link=link: self._on_monitor(link, frames))

    def _close_link(self, link) -> None:
        for reader, sock in ((link.reader, link.dealer), (link.monitor_reader, link.monitor)):
            if reader is not None:
                reader.close()
            if sock is not None:
                sock.close(linger=0)

    def _connect_sub(self, link) -> None:
        curve.secure_client(self._sub, self.config, link.id)
        self._sub_links[link.config.pub_connect.encode()] = link
        self._sub.connect(link.config.pub_connect)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for link in self._links.values():
            self._open_link(link)
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 200000)
        # The SUB only sends subscriptions, one per channel with listeners here;
        # past a send HWM libzmq would drop them silently.
        self._sub.setsockopt(zmq.SNDHWM, 0)
        self._sub.setsockopt(zmq.MAXMSGSIZE, frames.frame_limit(self._max_bytes))
        self._sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sub.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        self._sub_monitor = self._sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._sub_monitor_reader = SocketReader(self._loop, self._sub_monitor,
                                                self._on_sub_monitor)
        for link in self._links.values():
            self._connect_sub(link)
        self._sub_reader = SocketReader(self._loop, self._sub, self._on_pub)
        self._heartbeat = self._loop.call_later(self._interval_s, self._beat)

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for link in self._links.values():
            self._fail_pending(link, "the edge is shutting down")
            self._close_link(link)
        if self._sub_monitor_reader is not None:
            self._sub_monitor_reader.close()
            self._sub_monitor.close(linger=0)
        if self._sub_reader is not None:
            self._sub_reader.close()
            self._sub.close(linger=0)

    @staticmethod
    def _previous_ring(config):
        if not config.ring_previous:
            return None
        return Ring(config.ring_previous, config.ring_vnodes)

    def reload(self, config) -> bool:
        """Take the worker list and ring of ``config`` (read again on SIGHUP); links to
        new workers open, links to workers gone from the config close (their
        requests fail). Returns whether the ring changed."""
        ring = Ring(config.ring_members, config.ring_vnodes)
        old = {w.id: w for w in self.config.workers}
        new = {w.id: w for w in config.workers}
        self.config = config
        self._replicas = config.storage.replicas
        for worker_id in [w for w in old if w not in new or new[w].router_connect
                          != old[w].router_connect or new[w].pub_connect != old[w].pub_connect]:
            link = self._links.pop(worker_id)
            self._fail_pending(link, f"worker {worker_id} left the config")
            self._close_link(link)
            endpoint = link.config.pub_connect.encode()
            if self._sub_links.pop(endpoint, None) is not None:
                try:
                    self._sub.disconnect(link.config.pub_connect)
                except zmq.ZMQError:
                    pass
            if link.alive:
                link.alive = False
                self._on_worker_change(worker_id, False)
        for worker_id, worker in new.items():
            if worker_id in self._links:
                self._links[worker_id].config = worker
                continue
            link = self._links[worker_id] = WorkerLink(worker)
            self._open_link(link)
            self._connect_sub(link)
            self._sub_reader.soon()
        changed = ring.version != self.ring.version
        if changed:
            log.info("ring changed from %s to %s (%s)", self.ring.version, ring.version,
                     ", ".join(ring.worker_ids))
        self.ring = ring
        self.previous = self._previous_ring(config)
        return changed

    # -- routing ---------------------------------------------------------------

    def owner(self, channel: str) -> str:
        return self.ring.owner(channel)

    def is_up(self, worker_id: str) -> bool:
        return self._links[worker_id].alive

    def workers_up(self) -> dict:
        return {worker_id: link.alive for worker_id, link in self._links.items()}

    def request(self, channel: str, op: str, **fields) -> asyncio.Future:
        """Send ``op`` for ``channel`` to its owner; the future gets the reply map.

        During a ring change, while the link to the new owner is not up yet (a
        worker just added), the request goes to the channel's previous owner,
        which serves it or names the worker to ask."""
        return self.call(self.route(channel), {"op": op, "channel": channel, **fields})

    def route(self, channel: str) -> str:
        """The worker to send ``channel``'s requests to: its owner; while the owner is
        down, its standby (first replica, with ``[storage] replicas``), which takes
        the channel over; during a ring change, while the link to the new owner is
        not up yet, its previous owner."""
        owner = self.ring.owner(channel)
        if self._links[owner].alive:
            return owner
        if self.previous is not None:
            before = self.previous.owner(channel)
            link = self._links.get(before)
            if link is not None and link.alive:
                return before
        elif self._replicas:
            standby = self.ring.standby(channel)
            link = self._links.get(standby)
            if link is not None and link.alive:
                return standby
        return owner

    def available(self, channel: str) -> bool:
        """True when this edge can reach a worker that serves ``channel``."""
        return self._links[self.route(channel)].alive

    def call(self, worker_id: str, request: dict, force: bool = False) -> asyncio.Future:
        """Send a request to one worker; the future gets the reply or a BackendError.

        A publish gets a publish id and a deadline unless it has them, and is sent
        again once if the worker reconnects before the deadline."""
        link = self._links[worker_id]
        future = self._loop.create_future()
        if not (link.alive or force):
            future.set_exception(WorkerUnavailable(f"worker {worker_id} is unavailable"))
            return future
        request_id = next(self._ids)
        retries = 0
        if request.get("op") == "publish":
            retries = 1
            request = {"publish_id": f"{self._publish_id_prefix}-{request_id}",
                       "deadline_ms": int(1000 * (time.time() + self._timeout_s
                                                  - min(_DEADLINE_MARGIN_S, self._timeout_s / 4))),
                       **request}
        body = frames.encode_request({"id": request_id, **request})
        deadline = self._loop.time() + self._timeout_s
        link.pending[request_id] = Pending(future, deadline, body if retries else None, retries,
                                           request if "channel" in request else None)
        self._queue(link, request_id, body, deadline)
        return future

    def _follow(self, entry, worker_id: str) -> bool:
        """Send a refused request on to ``worker_id`` (a not_owner named it), with the
        same publish id and the time left of its deadline; False when it cannot go."""
        link = self._links.get(worker_id)
        if link is None or not link.alive or entry.follows >= _MAX_FOLLOWS:
            return False
        request_id = next(self._ids)
        body = frames.encode_request({"id": request_id, **entry.request})
        # A fresh deadline keeps each link's pending requests in deadline order; a
        # publish still carries its first deadline_ms, which the worker enforces.
        deadline = self._loop.time() + self._timeout_s
        link.pending[request_id] = Pending(entry.future, deadline,
                                           body if entry.body is not None else None,
                                           entry.retries_left, entry.request, entry.follows + 1)
        self.followed += 1
        self._queue(link, request_id, body, deadline)
        return True

    def _queue(self, link, request_id, body: bytes, deadline: float) -> None:
        if self._sweep is None:
            self._sweep = self._loop.call_at(deadline, self._expire_due)
        # Requests made in one loop turn leave together, at its end: each send that
        # finds ZeroMQ's I/O thread asleep has to wake it, which costs more than
        # the send itself.
        link.outgoing.append((request_id, body))
        if not self._send_scheduled:
            self._send_scheduled = True
            self._loop.call_soon(self._send_outgoing)

    def _send_outgoing(self) -> None:
        """Send each link's requests of this loop turn as one message (a batch,
        ``frames.encode_batch``; more than one only past MAX_BATCH requests or a
        message's bytes): one recv and one wake-up at each end instead of one a
        request."""
        self._send_scheduled = False
        for link in self._links.values():
            if not link.outgoing:
                continue
            outgoing, link.outgoing = link.outgoing, []
            pending = link.pending
            # Those failed meanwhile (the worker went down, the edge is closing) stay.
            waiting = [(request_id, body) for request_id, body in outgoing
                       if request_id in pending]
            bodies = [body for _, body in waiting]
            sent = 0
            for batch in frames.batches(bodies, self._max_bytes):
                failure = None
                if link.dealer.closed:
                    failure = "is not connected"
                else:
                    try:
                        send(link.dealer, batch[0] if len(batch) == 1
                             else frames.encode_batch(batch), NOBLOCK)
                    except zmq.Again:
                        failure = "is not connected"
                    except zmq.ZMQError as exc:  # any other: fail this batch, send the rest
                        failure = f"could not be sent to: {exc}"
                if failure is not None:
                    for request_id, _ in waiting[sent:sent + len(batch)]:
                        entry = pending.pop(request_id, None)
                        if entry is not None and not entry.future.done():
                            entry.future.set_exception(
                                WorkerUnavailable(f"worker {link.id} {failure}"))
                sent += len(batch)
            link.reader.soon()

    def pending_publishes(self) -> list:
        """The futures of every publish still waiting for its reply."""
        return [p.future for link in self._links.values() for p in link.pending.values()
                if p.body is not None]

    def _expire_due(self) -> None:
        """Fail every request whose deadline has come; be due again at the next one."""
        self._sweep = None
        now = self._loop.time() + _TIMER_SLACK_S
        next_deadline = None
        for link in self._links.values():
            pending = link.pending
            while pending:
                request_id, entry = next(iter(pending.items()))
                if entry.deadline > now:
                    if next_deadline is None or entry.deadline < next_deadline:
                        next_deadline = entry.deadline
                    break
                del pending[request_id]
                if not entry.future.done():
                    entry.future.set_exception(WorkerUnavailable(
                        f"worker {link.id} did not answer within {self._timeout_s:g} s"))
        if next_deadline is not None and self._sweep is None:
            self._sweep = self._loop.call_at(next_deadline, self._expire_due)

    def _on_reply(self, link, parts) -> None:
        try:
            if len(parts) != 1:
                raise frames.ProtocolError(f"reply of {len(parts)} parts")
            replies = frames.decode_replies(parts[0], self._max_bytes)
        except frames.ProtocolError as exc:
            self._reject(f"from worker {link.id}: {exc}")
            return
        link.last_reply = time.monotonic()
        for reply in replies:
            if isinstance(reply, frames.ProtocolError):
                self._reject(f"from worker {link.id}, in a batch: {reply}")
            else:
                self._take_reply(link, reply)

    def _take_reply(self, link, reply: dict) -> None:
        entry = link.pending.pop(reply["id"], None)
        if entry is None:
            log.debug("late reply %r from worker %s dropped", reply["id"], link.id)
            return
        future = entry.future
        if future.done():
            return
        if reply["ok"]:
            future.set_result(reply)
            return
        owner = reply.get("owner")
        if (reply["error"] == frames.NOT_OWNER and entry.request is not None
                and isinstance(owner, str) and owner != link.id and self._follow(entry, owner)):
            log.debug("%s for %r sent on from worker %s to %s", entry.request.get("op"),
                      entry.request.get("channel"), link.id, owner)
            return
        future.set_exception(RequestRejected(reply["error"], reply["reason"],
                                             owner if isinstance(owner, str) else None))

    def _fail_pending(self, link, reason: str, keep_retryable: bool = False) -> None:
        """Fail the link's pending requests; with ``keep_retryable`` publishes that
        may still be retried keep waiting for their deadline."""
        pending, link.pending = link.pending, {}
        for request_id, entry in pending.items():
            if keep_retryable and entry.retries_left > 0 and not entry.future.done():
                link.pending[request_id] = entry
                continue
            if not entry.future.done():
                entry.future.set_exception(WorkerUnavailable(reason))

    def _to_standbys(self, link) -> None:
        """Send the publishes that were waiting on ``link``'s worker, now down, to their
        channels' standbys, with the same publish id: one the owner stored and its
        standby acknowledged is answered with its first result there."""
        moved = 0
        for request_id, entry in list(link.pending.items()):
            if entry.request is None or entry.future.done():
                continue
            target = self.route(entry.request["channel"])
            if target != link.id and self._follow(entry, target):
                del link.pending[request_id]
                moved += 1
        if moved:
            log.info("sent %d publish(es) waiting on worker %s to its channels' standbys",
                     moved, link.id)

    def _resend_publishes(self, link) -> None:
        """Send the publishes that waited through an outage again (same id: the worker
        answers one it already stored with the first result)."""
        resent = 0
        for entry in link.pending.values():
            if entry.retries_left > 0 and not entry.future.done():
                entry.retries_left -= 1
                try:
                    send(link.dealer, entry.body, NOBLOCK)
                except zmq.Again:
                    break
                resent += 1
        if resent:
            self.resent_publishes += resent
            log.info("resent %d publish(es) to worker %s after it came back", resent, link.id)
            link.reader.soon()

    # -- liveness --------------------------------------------------------------

    def _set_alive(self, link, alive: bool, why: str) -> None:
        if link.alive == alive:
            return
        link.alive = alive
        if alive:
            log.info("worker %s up (%s)", link.id, why)
            self._resend_publishes(link)
        else:
            log.warning("worker %s down (%s)", link.id, why)
            self._fail_pending(link, f"worker {link.id} is unavailable ({why})",
                               keep_retryable=True)
            if self._replicas and self.previous is None:
                self._to_standbys(link)
        self._on_worker_change(link.id, alive)
        if alive and link.sub_connected:
            self._stream_changed(link, True)

    def _on_sub_monitor(self, parts) -> None:
        message = parse_monitor_message(parts)
        link = self._sub_links.get(message["endpoint"])
        if link is None:
            return
        event = message["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            log.info("message stream from worker %s connected", link.id)
            link.sub_connected = True
            if link.alive:
                self._stream_changed(link, True)
        elif event == zmq.EVENT_DISCONNECTED and link.sub_connected:
            log.warning("message stream from worker %s lost", link.id)
            link.sub_connected = False
            self._stream_changed(link, False)

    def _stream_changed(self, link, ready: bool) -> None:
        for watcher in self.stream_watchers:
            try:
                watcher(link.id, ready)
            except Exception:
                log.exception("a message stream watcher failed")

    def _on_monitor(self, link, parts) -> None:
        parsed = parse_monitor_message(parts)
        event = parsed["event"]
        if event & curve.HANDSHAKE_FAILED:
            self._handshakes.failed(link.id, parsed)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            link.connected = True
            link.last_reply = time.monotonic()
            self._ping(link)
        elif event == zmq.EVENT_DISCONNECTED:
            link.connected = False
            self._set_alive(link, False, "disconnected")

    def _ping(self, link) -> None:
        if link.ping_in_flight:
            return
        link.ping_in_flight = True
        future = self.call(link.id, {"op": "ping"}, force=True)
        future.add_done_callback(lambda f, link=link: self._on_pong(link, f))

    def _on_pong(self, link, future) -> None:
        link.ping_in_flight = False
        if future.exception() is not None:
            return
        reply = future.result()
        ring = reply.get("ring")
        if ring != self.ring.version and (link.id, ring) not in self._ring_warned:
            # Expected for a moment while a ring change is rolled out; for good, a
            # process reads another config.
            self._ring_warned.add((link.id, ring))
            log.warning("worker %s has ring %s, this edge has %s: its not_owner answers route "
                        "requests until every process has read the same config", link.id, ring,
                        self.ring.version)
        if link.connected:
            self._set_alive(link, True, "answered a heartbeat")

    def _beat(self) -> None:
        now = time.monotonic()
        for link in self._links.values():
            if link.connected:
                if link.alive and now - link.last_reply > self._liveness_s:
                    self._set_alive(link, False, f"no answer for {now - link.last_reply:.1f} s")
                self._ping(link)
        self._heartbeat = self._loop.call_later(self._interval_s, self._beat)

    # -- messages --------------------------------------------------------------

    def subscribe(self, channel: str) -> None:
        self._sub.setsockopt(zmq.SUBSCRIBE, frames.topic(channel))
        self._sub_reader.soon()

    def unsubscribe(self, channel: str) -> None:
        self._sub.setsockopt(zmq.UNSUBSCRIBE, frames.topic(channel))
        self._sub_reader.soon()

    def _on_pub(self, parts) -> None:
        try:
            messages = frames.decode_messages(parts, self._max_bytes)
        except frames.ProtocolError as exc:
            self._reject(f"on the message stream: {exc}")
            return
        for message in messages:
            self._on_message(message)

    def _reject(self, reason: str) -> None:
        self.rejected_frames += 1
        if self.rejected_frames <= 10 or self.rejected_frames % 1000 == 0:
            log.warning("rejected frame (%d so far) %s", self.rejected_frames, reason)
