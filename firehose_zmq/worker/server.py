"""firehose-worker: owns the channels the ring gives it and sequences their messages.

Links (both sockets bind; edges and native clients connect)::

    ROUTER router_bind   <- [envelope..., request]   (edges' DEALERs, native DEALERs)
                         -> [envelope..., reply]
                            (a request body may be a batch; the replies to a
                            batch's requests leave as batches)
    XPUB   pub_bind      -> [channel + b"\\x00", message]   a channel's messages of one
                                                           loop turn (one, or a batch)
                         <- [b"\\x01" + topic] / [b"\\x00" + topic]   (subscriptions)

Frame bodies are in ``wire.frames``. Every subscription that reaches the XPUB
is answered by re-sending that channel's newest message (a last-value cache):
an edge that subscribed and then fetched cannot miss a message published while
its subscription was still travelling, because the re-sent message, carrying
its sequence, arrives as soon as the subscription lands. The re-send happens at
most once per channel per ``resend_newest_interval_ms``; subscriptions within
the interval get one re-send at its end, so a flood of subscriptions costs one
message per interval, not one per subscription.

The XPUB takes exact topics only (``ZMQ_XPUB_MANUAL``): a subscription is
applied only if ``frames.decode_subscription`` accepts it (a valid channel
name and its zero byte); an empty or prefix subscription is refused, counted,
and its sender gets nothing from it. Subscriptions to channels another worker
owns are applied (the ring may change) but re-send nothing.

Bounds: every socket refuses frames over ``frames.frame_limit`` (the XPUB, which
only reads subscriptions, over ``SUBSCRIPTION_FRAME_LIMIT``); the XPUB queues at
most ``worker_send_hwm`` messages per subscriber and drops beyond; publishes
that would grow the worker past its quotas (channels, bytes buffered, store
size) are refused with ``quota``.

The worker is one thread running a zmq poll loop: no lock, no await, and a
publish costs one PUB message whatever the number of subscribers.

Durability (``store``): every change is also recorded as a store operation; the
operations of one loop turn go to the store's writer thread as one batch, which
it commits together with whatever else is waiting (group commit). In ``sync``
mode every reply and every PUB message waits in the *outbox* until the batch
that was current when it was made is committed, so a crash can lose nothing a
client saw; the loop never waits for the disk itself. ``async`` answers first
and commits within the flush interval; ``memory`` keeps no file.

Ring changes (``handoff``): on SIGHUP the worker reads its config file again;
a new worker list or ``ring_previous`` changes its ring, and channels that move
to it are taken from their previous owner before it serves them (requests for
them wait, parked, meanwhile); channels that move away are refused with
``not_owner`` naming their new owner and handed over when it asks. Only the ring
is applied on SIGHUP; other keys need a restart.

Replicas (``replica``, with ``[storage] replicas``): every store operation of a
channel this worker owns is also streamed to the channel's replicas; in ``sync``
mode with ``replica_ack = "one"`` the outbox also holds a channel's replies and
messages until its standby has acknowledged them, and the worker serves a
channel only while that standby's lease holds. As a standby it keeps other
owners' copies, takes an owner's channels over when an edge sends it their
requests and the owner's lease has run out, and hands them back when the owner
returns.

A publish may carry a ``publish_id``: the worker remembers ids (with the seq
and epoch they got, in the store too) for ``publish_id_window_s``, so a retry
after a lost reply, even across a restart, is answered with the first result
and stores nothing. On SIGTERM the worker reads what is already queued,
answers it, flushes the store, marks it clean and exits.
"""

from collections import deque
import logging
import math
import os
import signal
import time

import zmq

from ..auth import curve
from ..wire import frames
from .channel import ChannelTable, PublishIds
from .handoff import Handoff
from .replica import Replica, Replicator
from .. import cli
from ..admin import WorkerAdmin
from ..config import DURABILITY_MODES, ConfigError, check_storage, load_config_with_sources
from ..wire.names import InvalidName, check_channel
from ..ring import Ring
from .store import (DeleteOp, EpochOp, PruneOp, PublishOp, RestoreOp, Store, StoreError,
                    LoopCommitter, StoreWriter)
from ..zmqraw import NOBLOCK, readable, recv, recv_frames, send_frames

log = logging.getLogger("firehose.worker")

_BATCH = 256
_POLL_MS = 100
_EXPIRE_EVERY_S = 1.0
_MAX_PUBLISH_IDS = 1_000_000
_STOP_TIMEOUT_S = 10.0
_MAX_VALID_NAMES = 65536
# Where a reply to a request that came in a batch is queued, in place of the ROUTER:
# such replies leave together, as batches, one or more per peer and loop turn.
_BATCHED = object()
_PER_MESSAGE_OVERHEAD_BYTES = 16  # msgpack framing of one [seq, data] pair, rounded up


class Counters:
    """What a worker counts; logged at shutdown and kept for metrics."""

    def __init__(self):
        self.requests = 0
        self.published = 0
        self.rejected_frames = 0
        self.subscriptions = 0
        self.expired_channels = 0
        self.duplicate_publishes = 0
        self.late_requests = 0
        self.overloaded = 0
        self.refused_subscriptions = 0  # empty, prefix or invalid topics on the XPUB
        self.resends = 0  # newest messages re-sent for subscriptions
        self.over_quota = 0  # publishes refused by a quota
        self.commits = 0  # store transactions (group commits), counted when the store stops
        self.unacknowledged = 0  # replies and messages dropped: their replica never acknowledged


class _Parked(Exception):
    """The request's channel is being taken from its previous owner: hold the request."""


class Worker:
    """The state and request handling of one worker; ``run`` is its loop."""

    def __init__(self, config, worker_id: str, context=None, clock=time.time):
        self.config = config
        self.me = config.worker(worker_id)
        self.ring = Ring(config.ring_members, config.ring_vnodes)
        self.limits = config.limits
        self.storage = check_storage(config.storage)
        self.counters = Counters()
        self._clock = clock
        # Epochs are wall-clock nanoseconds, above any of an earlier run of this worker.
        self._last_epoch = time.time_ns()
        self.channels = ChannelTable(self._new_epoch)
        self._context = context or zmq.Context.instance()
        self._poller = zmq.Poller()
        self._router = None
        self._xpub = None
        self._writer = None          # LoopCommitter or StoreWriter; None in memory mode
        self._gated = False          # sync mode: hold output until committed
        self._ops: list = []         # store operations of the current loop turn
        self._outbox: deque = deque()  # (ticket, socket, frames) waiting for a commit
        self._ready: list = []       # (socket, frames) to send at the end of this loop turn
        self._valid_names: set = set()  # channel names that passed validation lately
        self._reply_reveals_state = True  # set per request by _dispatch
        self._publish_ids = PublishIds(self.storage.publish_id_window_s, _MAX_PUBLISH_IDS,
                                       clock())
        self._resend_interval_s = self.limits.resend_newest_interval_ms / 1000.0
        self._resent_at: dict = {}   # channel -> monotonic time of its last re-send
        self._resend_due: dict = {}  # channel -> monotonic time its deferred re-send is due
        self.handoff = Handoff(self)
        self._parking = None         # (channel, request id) of the request being parked
        # A request for a channel being taken waits at most this long for the take.
        self.take_timeout_s = min(2.0, config.edge.request_timeout_s / 2)
        self.replicator = Replicator(self) if self.storage.replicas > 0 else None
        self.replica = Replica(self) if self.storage.replicas > 0 else None
        self._envelope = None          # the envelope of the request being handled
        self._reply_channel = None     # the channel a successful reply is about
        self.reload_requested = False  # set by SIGHUP: apply reload_config() next turn
        self.reload_config = None      # () -> ClusterConfig, set by main

    @property
    def store_path(self) -> str:
        return os.path.join(self.storage.data_dir, f"{self.me.id}.sqlite3")

    def open_store(self) -> None:
        """Load this worker's file (unless durability is ``memory``) and start its writer.

        Raises StoreError when the file cannot be used."""
        storage = self.storage
        if storage.durability == "memory":
            log.info("worker %s keeps channels in memory only (durability memory)", self.me.id)
            if self.replica is not None:
                self.replica.open()
            return
        started = time.monotonic()
        store = Store(self.store_path, "FULL" if storage.durability == "sync" else "NORMAL")
        now = self._clock()
        try:
            snapshot = store.load(now, now - storage.publish_id_window_s)
            renumbered = []
            for stored in snapshot.channels:
                self._last_epoch = max(self._last_epoch, stored.epoch)
            for stored in snapshot.channels:
                epoch = stored.epoch
                if not snapshot.clean and storage.durability == "async":
                    # The tail of the last run may be lost, and with it sequence numbers
                    # subscribers saw: a new epoch tells edges this is a new incarnation.
                    epoch = self._new_epoch()
                    renumbered.append(EpochOp(stored.name, epoch))
                self.channels.restore(stored.name, epoch, stored.seq, stored.messages,
                                      stored.expires_at, stored.buffer_size)
            for seen in snapshot.publish_ids:
                self._publish_ids.add(seen.publish_id, seen.name, seen.seq, seen.epoch, now)
            if renumbered:
                store.apply([renumbered])
        except (StoreError, ValueError) as exc:
            store.close(clean=False)
            raise StoreError(f"cannot load {self.store_path}: {exc}") from None
        except BaseException:
            store.close(clean=False)
            raise
        if storage.durability == "sync" and storage.commit_on == "loop":
            self._writer = LoopCommitter(store, storage.commit_window_ms / 1000.0)
        else:
            gather_ms = (storage.flush_interval_ms if storage.durability == "async"
                         else storage.commit_window_ms)
            self._writer = StoreWriter(store, self._context, gather_ms / 1000.0)
        self._gated = storage.durability == "sync"
        self._writer.start()
        log.info("worker %s loaded %d channels (%d messages, %d publish ids, %d expired) from "
                 "%s in %.0f ms; durability %s; previous stop %s", self.me.id,
                 len(snapshot.channels), sum(len(c.messages) for c in snapshot.channels),
                 len(snapshot.publish_ids), snapshot.dropped_expired, self.store_path,
                 1000 * (time.monotonic() - started),
                 f"sync, commits on the {'loop' if storage.commit_on == 'loop' else 'writer thread'}"
                 if storage.durability == "sync" else storage.durability,
                 "clean" if snapshot.clean else "unclean (crash or kill)")
        if self.replica is not None:
            self.replica.open()

    def _new_epoch(self) -> int:
        self._last_epoch = max(time.time_ns(), self._last_epoch + 1)
        return self._last_epoch

    # -- sockets ---------------------------------------------------------------

    def bind(self) -> None:
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 100000)
        self._router.setsockopt(zmq.SNDHWM, 100000)
        self._router.setsockopt(zmq.MAXMSGSIZE, frames.frame_limit(self.limits.max_message_bytes))
        curve.secure_server(self._router, self.config, self.me.id)
        self._router.bind(self.me.router_bind)
        self._xpub = self._context.socket(zmq.XPUB)
        self._xpub.setsockopt(zmq.LINGER, 0)
        self._xpub.setsockopt(zmq.SNDHWM, self.limits.worker_send_hwm)
        self._xpub.setsockopt(zmq.MAXMSGSIZE, frames.SUBSCRIPTION_FRAME_LIMIT)
        # Every (un)subscription comes to us and only those we apply take effect.
        self._xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        curve.secure_server(self._xpub, self.config, self.me.id)
        self._xpub.bind(self.me.pub_bind)
        self.handoff.set_previous(self.config.ring_previous, self.config.ring_vnodes)
        if self.replicator is not None:
            self.replicator.open()

    # -- what the handoff and the replicas use ------------------------------------------------------

    @property
    def context(self):
        return self._context

    @property
    def publish_ids(self) -> PublishIds:
        return self._publish_ids

    def clock(self) -> float:
        return self._clock()

    @property
    def router(self):
        return self._router

    def new_epoch(self) -> int:
        return self._new_epoch()

    def drop_gated(self, link) -> None:
        """Forget the replies and messages waiting for ``link``'s acknowledgement: it
        fenced this worker, so they were never acknowledged."""
        kept = [entry for entry in self._outbox
                if entry[1] is None or entry[1][0] is not link]
        self.counters.unacknowledged += len(self._outbox) - len(kept)
        self._outbox = deque(kept)

    def poll_register(self, sock) -> None:
        self._poller.register(sock, zmq.POLLIN)

    def poll_unregister(self, sock) -> None:
        self._poller.unregister(sock)

    def record(self, op) -> None:
        self._record(op)

    def visible_ticket(self) -> int:
        return 0 if self._writer is None else self._visible_ticket()

    def committed_ticket(self) -> int:
        return 0 if self._writer is None else self._writer.committed_ticket

    def send_reply(self, parts) -> None:
        """Send a reply (envelope, body) to the ROUTER once what it reveals is stored."""
        self._send(self._router, parts)

    def restore_channel(self, entry, publish_ids, now: float) -> None:
        """Take over a channel's state (a ``frames.HandoffChannel``) and its publish ids
        ``[(publish_id, seq, epoch)]`` from its previous owner, in memory and store."""
        self._last_epoch = max(self._last_epoch, entry.epoch)
        self.channels.restore(entry.name, entry.epoch, entry.seq, entry.messages,
                              entry.expires_at, len(entry.messages))
        for publish_id, seq, epoch in publish_ids:
            self._publish_ids.add(publish_id, entry.name, seq, epoch, now)
        self._record(RestoreOp(entry.name, entry.epoch, entry.seq, entry.expires_at,
                               entry.messages,
                               [(publish_id, seq, epoch, now)
                                for publish_id, seq, epoch in publish_ids]))

    def apply_config(self, config) -> None:
        """Take the ring of a config read again (SIGHUP); other keys need a restart."""
        try:
            config.worker(self.me.id)
        except ConfigError as exc:
            log.error("worker %s keeps ring %s: %s", self.me.id, self.ring.version, exc)
            return
        ring = Ring(config.ring_members, config.ring_vnodes)
        previous = Ring(config.ring_previous, config.ring_vnodes) if config.ring_previous \
            else None
        old_previous = self.handoff.previous
        if ring.version == self.ring.version and (previous and previous.version) == (
                old_previous and old_previous.version):
            log.info("worker %s: config read again; ring %s unchanged", self.me.id,
                     ring.version)
            return
        before = self.ring
        self.config = config
        self.ring = ring
        self._valid_names.clear()
        self.handoff.set_previous(config.ring_previous, config.ring_vnodes)
        if self.replicator is not None:
            self.replicator.ring_changed()
        away = sum(1 for c in self.channels.channels() if ring.owner(c.name) != self.me.id)
        log.info("worker %s: ring changed from %s to %s (%s)%s; %d channels held here belong "
                 "to other workers now; taking from %s", self.me.id, before.version,
                 ring.version, ", ".join(ring.worker_ids),
                 f", previous ring {previous.version}" if previous else "", away,
                 ", ".join(self.handoff.status()["taking_from"]) or "nobody")

    def _reload(self) -> None:
        self.reload_requested = False
        if self.reload_config is None:
            return
        try:
            config = self.reload_config()
        except ConfigError as exc:
            log.error("worker %s: the config read again cannot be used; ring %s kept: %s",
                      self.me.id, self.ring.version, exc)
            return
        self.apply_config(config)

    def log_ready(self) -> None:
        log.info("worker %s ready: requests on %s, messages on %s (ring %s, %d workers)",
                 self.me.id, self.me.router_bind, self.me.pub_bind, self.ring.version,
                 len(self.ring.worker_ids))

    def close(self, linger_ms: int = 0) -> None:
        """Close the sockets (``linger_ms`` lets queued replies leave) and the store."""
        self.handoff.close()  # answers the requests still parked
        if self._writer is not None:
            if self._writer.stop(_STOP_TIMEOUT_S):
                self._flush_outbox()
            self.counters.commits = self._writer.commits
            self._writer = None
        self._send_ready()
        if self.replicator is not None:
            log.info("worker %s replication: %s; as a replica: %s", self.me.id,
                     self.replicator.counters, self.replica.counters)
            self.replicator.close()
        if self.replica is not None:
            self.replica.close(_STOP_TIMEOUT_S)
        for sock in (self._router, self._xpub):
            if sock is not None:
                sock.close(linger=linger_ms)
        self._router = self._xpub = None

    def run(self, should_stop) -> bool:
        """Serve until ``should_stop()`` is true (checked at least every 100 ms), then
        drain: answer what is already queued and flush the store.

        Returns False when the store failed (the worker stopped at once: what was not
        committed was not acknowledged) or could not be flushed in time."""
        poller = self._poller
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._xpub, zmq.POLLIN)
        notify = self._writer.notify_socket if self._writer is not None else None
        if notify is not None:
            poller.register(notify, zmq.POLLIN)
        next_expiry = self._clock() + _EXPIRE_EVERY_S
        handoff = self.handoff
        replicator, replica = self.replicator, self.replica
        replica_notify = replica.notify_socket if replica is not None else None
        if replica_notify is not None:
            poller.register(replica_notify, zmq.POLLIN)
        try:
            while not should_stop():
                if self.reload_requested:
                    self._reload()
                ready = dict(poller.poll(self._poll_ms()))
                if notify is not None and notify in ready:
                    self._flush_outbox()
                if replicator is not None:
                    links = replicator.sockets()
                    released = False
                    for sock in ready:
                        link = links.get(sock)
                        if link is not None:
                            released |= replicator.drain(sock, link)
                    if released or self._outbox:
                        self._flush_outbox()
                if self._router in ready:
                    self._drain_requests()
                if self._xpub in ready:
                    self._drain_subscriptions()
                if handoff.sources:
                    for sock in handoff.sockets():
                        if sock in ready:
                            handoff.drain(sock)
                    handoff.tick(time.monotonic())
                if self._resend_due:
                    self._resend_due_now()
                now = self._clock()
                if now >= next_expiry:
                    self._expire(now)
                    if replica is not None:
                        replica.tick(now)
                    next_expiry = now + _EXPIRE_EVERY_S
                self._submit()
                if self._writer is not None and self._writer.due_in(time.monotonic()) == 0:
                    # What needs no commit (heartbeat replies) leaves before it runs.
                    self._send_ready()
                    self._writer.commit_due(time.monotonic())
                    self._flush_outbox()
                if replicator is not None:
                    replicator.tick(time.monotonic())
                    replica.flush()
                self._send_ready()
            return self._drain()
        except StoreError as exc:
            log.critical("worker %s stops: %s", self.me.id, exc)
            self._outbox.clear()
            return False

    def _drain(self) -> bool:
        """Answer every request already queued, flush the store, send what waited for it."""
        for _ in range(1000):
            if not self._drain_requests():
                break
            self._submit()
            self._send_ready()
        self._submit()
        self._send_ready()
        if self._writer is None:
            return True
        flushed = self._writer.stop(_STOP_TIMEOUT_S)
        if flushed:
            self._flush_outbox()
        else:
            log.error("worker %s: the store was not flushed; unacknowledged requests dropped",
                      self.me.id)
        self.counters.commits = self._writer.commits
        self._writer = None
        return flushed

    # -- storage and the outbox --------------------------------------------------

    def _record(self, op) -> None:
        if self._writer is not None:
            self._ops.append(op)
        if self.replicator is not None:
            self.replicator.record(op)

    def _submit(self) -> None:
        """Hand this turn's operations to the writer as one batch."""
        if self._ops:
            ops, self._ops = self._ops, []
            self._writer.submit(ops)

    def _visible_ticket(self) -> int:
        """The batch that must be committed before what the worker says now may leave."""
        writer = self._writer
        return writer.last_ticket + 1 if self._ops else writer.last_ticket

    def _send(self, sock, parts, gate=None) -> None:
        """Send at the end of this loop turn, or (sync mode) once the state these
        frames reveal is on disk and, with ``gate`` (``Replicator.gate``), once the
        channel's replica has acknowledged it."""
        if self._gated and self._writer is not None:  # (None: stopped, all committed)
            ticket = self._visible_ticket()
            if self._outbox or ticket > self._writer.committed_ticket or gate is not None:
                self._outbox.append((ticket, gate, sock, parts))
                return
        self._ready.append((sock, parts))

    def _send_ready(self) -> None:
        """Send what this turn produced, together: the I/O thread is woken once for
        all of it instead of once per message."""
        if self._ready:
            ready, self._ready = self._ready, []
            self._send_all(ready)

    def _flush_outbox(self) -> None:
        committed = self._writer.committed() if self._writer is not None else 0
        if self.handoff.sources:
            self.handoff.committed(committed)
        outbox = self._outbox
        replicator = self.replicator
        released = []
        while outbox and (self._writer is None or outbox[0][0] <= committed):
            gate = outbox[0][1]
            if gate is not None:
                state = replicator.gate_state(gate)
                if state == 0:
                    break
                if state < 0:
                    outbox.popleft()
                    self.counters.unacknowledged += 1
                    continue
            _, _, sock, parts = outbox.popleft()
            released.append((sock, parts))
        self._send_all(released)

    def _send_all(self, messages: list) -> None:
        """Send ``(socket, frames)``; replies to requests that came in batches go to
        each peer together, and each channel's messages together, as batches
        (``frames.batches``; a channel's in order)."""
        batched: dict = {}   # envelope -> reply bodies
        channels: dict = {}  # topic -> message bodies
        xpub = self._xpub
        for sock, parts in messages:
            if sock is xpub:
                channels.setdefault(parts[0], []).append(parts[1])
            elif sock is _BATCHED:
                batched.setdefault(tuple(parts[:-1]), []).append(parts[-1])
            else:
                send_frames(sock, parts)
        limit = self.limits.max_message_bytes
        router = self._router
        for envelope, bodies in batched.items():
            for batch in frames.batches(bodies, limit):
                send_frames(router, [*envelope, batch[0] if len(batch) == 1
                                     else frames.encode_batch(batch)])
        for topic, bodies in channels.items():
            for batch in frames.batches(bodies, limit):
                send_frames(xpub, [topic, batch[0] if len(batch) == 1
                                   else frames.encode_batch(batch)])

    def _expire(self, now: float) -> None:
        expired = self.channels.expire(now)
        self.counters.expired_channels += len(expired)
        for name in expired:
            self._record(DeleteOp(name))
        if expired:
            log.debug("expired %d channels", len(expired))
        ids = self._publish_ids
        kept_since = ids.rotate(now)
        if kept_since is not None:
            # The store forgets ids past the window when memory rotates (a restart
            # loads the window's worth, like memory after a rotation by size).
            self._record(PruneOp(min(kept_since, now - self.storage.publish_id_window_s)))
        forgotten = ids.take_forgotten_early()
        if forgotten:
            log.warning("worker %s forgot %d publish ids before publish_id_window_s (%d s): "
                        "over %d ids; a retry of one of them would be stored again",
                        self.me.id, forgotten, self.storage.publish_id_window_s, ids.max_ids)

    def _drain_requests(self) -> bool:
        """Handle up to about ``_BATCH`` queued requests; False when none was waiting."""
        router = self._router
        handled = 0
        while handled < _BATCH:
            if not readable(router):
                return handled > 0
            try:
                parts = recv_frames(router)
            except zmq.Again:
                return handled > 0
            if len(parts) < 2:
                self._reject(f"request of {len(parts)} frame(s) has no body")
                handled += 1
                continue
            body = parts[-1]
            if not frames.is_batch(body):
                self.serve(parts)
                handled += 1
                continue
            envelope = parts[:-1]
            try:
                requests = frames.decode_request_batch(body, self.limits.max_message_bytes)
            except frames.ProtocolError as exc:  # refused whole: one reply, on its own
                self._ready.append((router, envelope + [self.handle_request(exc)]))
                handled += 1
                continue
            for request in requests:
                self.serve(envelope + [request])
            handled += len(requests)
        return True

    def serve(self, parts) -> None:
        """Handle one request (its envelope, then its body, or a request a batch
        carried) and send the reply, or park it while its channel is being taken
        from its previous owner."""
        self._reply_reveals_state = True
        self._reply_channel = None
        self._parking = None
        self._envelope = parts[:-1]
        reply = self.handle_request(parts[-1])
        if reply is None:
            if self._parking is None:
                return  # a replicate: acknowledged once committed
            name, request_id = self._parking
            self.handoff.park(name, parts, request_id)
            return
        # A request a batch carried was decoded already (a map, or the error to
        # answer it with); its reply goes back in a batch too.
        to = self._router if isinstance(parts[-1], bytes) else _BATCHED
        parts[-1] = reply  # the envelope, then the reply
        if self._reply_reveals_state:
            gate = None
            if self._reply_channel is not None and self.replicator is not None:
                gate = self.replicator.gate(self._reply_channel)
            self._send(to, parts, gate)
        else:
            # A heartbeat does not wait for the state to be committed: it leaves
            # with this turn, before the turn's commit (``commit_on = "loop"``).
            self._ready.append((to, parts))

    def _drain_subscriptions(self) -> None:
        """Apply the subscriptions ``frames.decode_subscription`` accepts; refuse the rest.

        With ``ZMQ_XPUB_MANUAL`` a ``setsockopt(SUBSCRIBE)`` applies to the sender of
        the frame just read, so it follows each recv at once."""
        xpub = self._xpub
        for _ in range(_BATCH):
            try:
                frame = recv(xpub, NOBLOCK)
            except zmq.Again:
                return
            try:
                subscribe, name = frames.decode_subscription(frame)
            except frames.ProtocolError as exc:
                if frame[:1] != b"\x00":  # unsubscribing from a refused topic is no harm
                    self._refuse_subscription(str(exc))
                continue
            if subscribe:
                xpub.setsockopt(zmq.SUBSCRIBE, frame[1:])
                self.counters.subscriptions += 1
                if self.ring.owner(name) == self.me.id or (
                        self.replica is not None and self.replica.serving(name)):
                    self._resend_newest(name)
            else:
                xpub.setsockopt(zmq.UNSUBSCRIBE, frame[1:])

    def _refuse_subscription(self, reason: str) -> None:
        self.counters.refused_subscriptions += 1
        count = self.counters.refused_subscriptions
        if count <= 10 or count % 1000 == 0:
            log.warning("refused subscription (%d so far): %s", count, reason)

    def _resend_newest(self, name: str) -> None:
        """Re-send ``name``'s newest message now, or once at the end of its interval."""
        now = time.monotonic()
        last = self._resent_at.get(name)
        if last is not None and now - last < self._resend_interval_s:
            self._resend_due.setdefault(name, last + self._resend_interval_s)
            return
        self._resent_at[name] = now
        wall = self._clock()
        channel = self.channels.get(name, wall)
        if channel is not None and channel.last is not None:
            self.counters.resends += 1
            self._publish_frames(channel, channel.last, wall)

    def _resend_due_now(self) -> None:
        now = time.monotonic()
        due = [name for name, at in self._resend_due.items() if at <= now]
        for name in due:
            del self._resend_due[name]
            self._resent_at.pop(name, None)
            self._resend_newest(name)
        if len(self._resent_at) > len(self._resend_due) + 1024:
            horizon = now - self._resend_interval_s
            self._resent_at = {name: at for name, at in self._resent_at.items() if at > horizon}

    def _poll_ms(self) -> int:
        """How long the loop may wait for a socket: until the next deferred re-send, or
        until the store's commit window ends."""
        now = time.monotonic()
        waits = [_POLL_MS / 1000.0]
        if self._resend_due:
            waits.append(min(self._resend_due.values()) - now)
        if self._writer is not None:
            due = self._writer.due_in(now)
            if due is not None:
                waits.append(due)
        return max(0, math.ceil(min(waits) * 1000))

    def _publish_frames(self, channel, message, now: float) -> None:
        ttl = None
        if channel.expires_at is not None:
            ttl = max(0, math.ceil(channel.expires_at - now))
        seq, data = message
        gate = self.replicator.gate(channel.name) if self.replicator is not None else None
        self._send(self._xpub, frames.encode_message(frames.PubMessage(
            channel.name, seq, channel.epoch, data, ttl)), gate)

    # -- requests --------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.counters.rejected_frames += 1
        count = self.counters.rejected_frames
        if count <= 10 or count % 1000 == 0:
            log.warning("rejected frame (%d so far): %s", count, reason)

    def handle_request(self, body):
        """One request in (a body frame, or an item of ``frames.decode_request_batch``:
        a checked request or the error to answer it with), one reply body out
        (None: the request is parked, see ``serve``); never raises."""
        self.counters.requests += 1
        try:
            if isinstance(body, dict):
                request = body
            elif isinstance(body, frames.ProtocolError):
                raise body
            else:
                request = frames.decode_request(body, self.limits.max_message_bytes)
        except frames.ProtocolError as exc:
            self._reject(str(exc))
            return frames.encode_error(exc.request_id, exc.code, str(exc), self.ring.version)
        request_id = request["id"]
        try:
            return self._dispatch(request)
        except _Parked:
            self._parking = (request["channel"], request_id)
            return None
        except frames.ProtocolError as exc:
            self._reply_channel = None  # a refusal waits for no replica
            if exc.code not in (frames.DEADLINE, frames.OVERLOADED, frames.QUOTA,
                                frames.NOT_OWNER, frames.RING_MISMATCH, frames.UNAVAILABLE,
                                frames.FENCED, frames.RESYNC):
                self._reject(str(exc))
            return frames.encode_error(request_id, exc.code, str(exc), self.ring.version,
                                       owner=exc.owner)
        except Exception:
            self._reply_channel = None
            log.exception("request %r failed", request.get("op"))
            return frames.encode_error(request_id, "internal", "internal error in the worker",
                                         self.ring.version)

    def _owned_channel(self, request) -> str:
        name = request["channel"]
        if name not in self._valid_names:
            try:
                name = check_channel(name)
            except InvalidName as exc:
                raise frames.ProtocolError(exc.reason) from None
            if len(self._valid_names) >= _MAX_VALID_NAMES:
                self._valid_names.clear()
            self._valid_names.add(name)
        owner = self.ring.owner(name)
        if owner != self.me.id:
            if self.replica is not None and self.replica.check(name, owner):
                return name
            raise frames.ProtocolError(
                f"worker {self.me.id} does not own {name!r} (owner {owner}) in ring "
                f"{self.ring.version}", frames.NOT_OWNER, owner=owner)
        if self.handoff.active and not self.handoff.check(name, request["id"]):
            raise _Parked()
        if self.replicator is not None:
            self.replicator.check(name)
        return name

    def _dispatch(self, request) -> bytes:
        op, request_id = request["op"], request["id"]
        if op == "ping":
            self._reply_reveals_state = False
            return frames.encode_reply(request_id, worker=self.me.id, ring=self.ring.version)
        if op == "handoff_take":
            if request.get("failback"):
                if self.replica is None:
                    raise frames.ProtocolError(f"worker {self.me.id} keeps no replicas")
                return self.replica.give_back(request)
            return self.handoff.give(request)
        if op == "replicate":
            if self.replica is None:
                raise frames.ProtocolError(f"worker {self.me.id} keeps no replicas "
                                           "([storage] replicas is 0 here)")
            self.replica.receive(request, self._envelope)
            return None
        name = self._owned_channel(request)
        now = self._clock()
        self._reply_channel = name
        if op == "publish":
            return self._publish(request, name, now)
        if op == "fetch":
            channel = self.channels.get(name, now)
            if channel is None:
                # Gone (or never there): an epoch above every past incarnation and
                # at most the next one, so subscribers can drop what they still hold.
                return frames.encode_reply(request_id, seq=0, epoch=self._last_epoch + 1,
                                             messages=[])
            since = request["since"]
            found = channel.after(since) if request.get("after") else channel.since(since)
            found = self._fit_reply(found, request.get("limit"))
            return frames.encode_reply(request_id, seq=channel.seq, epoch=channel.epoch,
                                         messages=found)
        # op == "delete"
        existed = self.channels.delete(name)
        if existed:
            self._record(DeleteOp(name))
        return frames.encode_reply(request_id, existed=existed)

    def _fit_reply(self, found: list, limit) -> list:
        """The oldest of ``found`` that fit ``limit`` and one message's worth of bytes.

        A reply always carries at least one message; the receiver asks again after
        the last one it got when the reply stops short of the channel's sequence.
        """
        budget = self.limits.max_message_bytes
        used = 0
        for count, (_, data) in enumerate(found[:limit] if limit else found):
            used += len(data) + _PER_MESSAGE_OVERHEAD_BYTES
            if used > budget and count > 0:
                return found[:count]
        return found[:limit] if limit else found

    def _publish(self, request, name: str, now: float) -> bytes:
        limits = self.limits
        publish_id = request.get("publish_id")
        if publish_id is not None:
            seen = self._publish_ids.get(publish_id)
            if seen is not None:
                channel_name, seq, epoch = seen
                if channel_name != name:
                    raise frames.ProtocolError(
                        f"publish_id {publish_id!r} was used for another channel")
                self.counters.duplicate_publishes += 1
                return frames.encode_reply(request["id"], seq=seq, epoch=epoch, duplicate=True)
        deadline_ms = request.get("deadline_ms")
        if deadline_ms is not None and now * 1000.0 > deadline_ms:
            self.counters.late_requests += 1
            raise frames.ProtocolError("the publish's deadline passed before the worker read it",
                                         frames.DEADLINE)
        if (self._writer is not None
                and self._writer.unflushed_ops + len(self._ops) >= self.storage.max_unflushed_ops):
            self.counters.overloaded += 1
            raise frames.ProtocolError("the worker's store is behind; retry later",
                                         frames.OVERLOADED)
        data = request["data"]
        if len(data) > limits.max_message_bytes:
            raise frames.ProtocolError(
                f"message of {len(data)} bytes is over the {limits.max_message_bytes} limit",
                frames.TOO_LARGE)
        buffer_size = request.get("buffer_size", limits.default_buffer_size)
        if buffer_size > limits.max_buffer_size:
            raise frames.ProtocolError(
                f"buffer_size {buffer_size} is above the maximum {limits.max_buffer_size}")
        self._check_quotas(name, data, now, buffer_size)
        ttl_s = None if request.get("persist") else request.get("ttl", limits.default_ttl_s)
        channel, message = self.channels.publish(name, data, now, ttl_s, buffer_size)
        seq = message[0]
        self.counters.published += 1
        self._record(PublishOp(name, channel.epoch, seq, data, buffer_size,
                               channel.expires_at, publish_id, now))
        if publish_id is not None:
            # A retry answered from here waits for the same commit as the first reply.
            self._publish_ids.add(publish_id, name, seq, channel.epoch, now)
        self._publish_frames(channel, message, now)
        return frames.encode_reply(request["id"], seq=seq, epoch=channel.epoch)


    def _check_quotas(self, name: str, data: bytes, now: float, buffer_size: int) -> None:
        """Refuse (``quota``) a publish that would grow a worker that is at a quota;
        one that replaces what it adds (a full buffer) still goes through."""
        limits = self.limits
        new_channel, growth = self.channels.growth(name, data, now, buffer_size)
        reason = None
        if new_channel and len(self.channels) >= limits.max_channels_per_worker:
            reason = (f"worker {self.me.id} holds {len(self.channels)} channels, its "
                      f"max_channels_per_worker")
        elif growth > 0 and self.channels.buffered_bytes + growth > \
                limits.max_buffered_bytes_per_worker:
            reason = (f"worker {self.me.id} buffers {self.channels.buffered_bytes} bytes; "
                      f"this message would pass max_buffered_bytes_per_worker "
                      f"({limits.max_buffered_bytes_per_worker})")
        elif (growth > 0 or new_channel) and self._writer is not None and \
                self._writer.used_bytes >= limits.max_store_bytes_per_worker:
            reason = (f"worker {self.me.id}'s store uses {self._writer.used_bytes} bytes, its "
                      f"max_store_bytes_per_worker ({limits.max_store_bytes_per_worker})")
        if reason is not None:
            self.counters.over_quota += 1
            if self.counters.over_quota <= 10 or self.counters.over_quota % 1000 == 0:
                log.warning("publish refused (%d so far): %s", self.counters.over_quota, reason)
            raise frames.ProtocolError(f"{reason}; delete channels or retry later", frames.QUOTA)


def main(argv=None) -> int:
    parser = cli.command_parser("firehose-worker",
                                "Run one channel worker of a firehose-zmq cluster.")
    parser.add_argument("--id", required=True, help="this worker's id in the config")
    parser.add_argument("--durability", choices=DURABILITY_MODES,
                        help="override storage.durability (default: the config's, sync)")
    parser.add_argument("--data-dir", help="override storage.data_dir (default: ./var)")
    def overrides(args) -> dict:
        return {
            **({("storage", "durability"): (args.durability, "--durability")}
               if args.durability else {}),
            **({("storage", "data_dir"): (args.data_dir, "--data-dir")} if args.data_dir else {})}
    started = cli.start(parser, argv, overrides)
    if started.exit_code is not None:
        return started.exit_code
    args, config = started.args, started.config
    try:
        worker = Worker(config, args.id)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))

    def reload_config():
        return load_config_with_sources(args.config, overrides=overrides(args))[0]
    worker.reload_config = reload_config
    signal.signal(signal.SIGHUP, lambda *_: setattr(worker, "reload_requested", True))
    admin = WorkerAdmin(worker)
    try:
        worker.bind()
        worker.open_store()
        admin.start()
    except (zmq.ZMQError, OSError, ConfigError) as exc:
        log.error("worker %s cannot bind: %s", args.id, exc)
        worker.close()
        return 1
    except StoreError as exc:
        log.error("worker %s: %s", args.id, exc)
        worker.close()
        return 1
    cli.settle()  # before "ready": its full collection runs while nothing waits on it
    worker.log_ready()
    ok = False
    try:
        ok = worker.run(lambda: bool(stopping))
    finally:
        admin.close()
        # A clean stop lingers so the last replies leave; a failed one does not.
        worker.close(linger_ms=1000 if ok else 0)
        c = worker.counters
        log.info("worker %s stopped%s: %d requests, %d published, %d duplicate publishes, "
                 "%d rejected frames, %d refused subscriptions, %d over quota, "
                 "%d store commits", args.id, "" if ok else " (store not flushed)",
                 c.requests, c.published, c.duplicate_publishes, c.rejected_frames,
                 c.refused_subscriptions, c.over_quota, c.commits)
    return 0 if ok else 1

