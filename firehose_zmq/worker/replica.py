"""Replicas: an owner streams what it stores to the next workers on the ring, and the
first of them (the channel's *standby*) takes the channel over when the owner is down.

Theory of operation
-------------------
With ``[storage] replicas = N`` a channel's preference list (``Ring.preference``)
is its owner and then N replicas; the first replica is its *standby*.

The owner (``Replicator``) keeps one link per other worker: a DEALER to its
ROUTER. When the link connects it starts a *stream*: a snapshot of every
channel that worker is a replica of (``r`` ops, in name order, a thousand per
loop turn), then, in the same ordered stream, every operation its store
commits for those channels (``p`` publish, ``d`` delete or expiry, ``r`` a
channel restored by a handoff). Operations of channels the snapshot has not
reached yet are left out: the snapshot carries their state when it gets there
(the Clone pattern's snapshot and updates, on one connection). Batches are
numbered; the replica applies them in order to a table and a store of its own
(``Replica``: ``<id>.replica.sqlite3``, apart from the channels it owns) and
acknowledges each once that store has committed it. A batch out of order, or a
publish that does not continue the replica's copy, is answered ``resync`` and
the owner starts a new stream.

Fencing: the owner serves a channel only while it holds a *lease* from the
channel's standby: an acknowledgement of a batch sent less than
``replica_lease_ms`` ago by a standby that holds the whole snapshot (the owner
sends an empty batch every fifth of the lease). The standby takes a channel over
only when asked for it (an edge that declared the owner down sends its requests
there), only if it holds the owner's whole snapshot, and only once the lease it
last granted has run out (``replica_lease_ms`` and a margin, on its own clock),
or at once if its own link to the owner was closed (the owner's process is
gone). It then takes over every channel of that owner it is standby of (moved
into its own table and store, sequence and epoch unchanged when every 202
waited for it, ``replica_ack = "one"``; a new epoch otherwise), stops granting,
and answers the owner's stream with ``fenced``. An owner whose lease has run out
refuses its channels (``not_owner`` naming the standby); one told ``fenced``
takes them back (``handoff_take`` with ``failback``, in bulk, unconditionally:
the standby's copy is the truth), drops its channels the standby no longer has,
commits, and starts a new stream; the standby hands back from the first such
take, and drops its copies when that stream starts. So at every moment at most
one of them accepts a publish for a channel.

``sync`` with ``replica_ack = "one"``: every reply and message about a channel
waits (the worker's outbox) until the owner's store has committed it and the
standby has acknowledged the batch that carried it; one gated on a standby whose
lease ran out or that fenced the owner is dropped (the publish was not
acknowledged). A standby whose connection *closed* while the lease held is gone
(its process died; it cannot have taken over): the owner serves its channels
without it, unacknowledged, until its new process holds a snapshot again.

Links (the owner connects to every other worker's ROUTER, the one edges use)::

    DEALER (owner) -> ROUTER (replica)
        [replicate]      ->   <- [reply: n, synced] | [error: fenced | resync]
        [handoff_take failback] -> <- [reply: channels, publish_ids, more, last]
"""

import logging
import os
import time
import uuid

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..auth import curve
from ..wire import frames
from ..zmqraw import NOBLOCK, readable, recv_frames, send, send_frames
from .channel import ChannelTable, PublishIds
from .store import DeleteOp, PruneOp, PublishOp, RestoreOp, Store, StoreError, StoreWriter

log = logging.getLogger("firehose.worker")

SNAPSHOT_CHANNELS = 1000      # channels per snapshot batch
FAILBACK_LIMIT = 1000         # channels per failback take
RETRY_INTERVAL_S = 0.25
_LEASE_MARGIN_S = 0.05        # added to the lease by the standby before it takes over
_OP_OVERHEAD_BYTES = 64
_MAX_PUBLISH_IDS = 1_000_000
_NOT_SENT = float("inf")      # a gate whose batch never left: never acknowledged


def _op_name(op):
    kind = type(op)
    if kind is PublishOp or kind is DeleteOp or kind is RestoreOp:
        return op.name
    return None


def _encode_op(op) -> list:
    """The wire form of a store operation."""
    kind = type(op)
    if kind is PublishOp:
        return frames.encode_replica_publish(op.name, op.epoch, op.seq, op.data, op.buffer_size,
                                             op.expires_at, op.publish_id, op.at)
    if kind is DeleteOp:
        return frames.encode_replica_delete(op.name)
    return frames.encode_replica_restore(op.name, op.epoch, op.seq, op.expires_at, op.messages,
                                         op.publish_ids)


def _op_bytes(op: list) -> int:
    """About what a wire operation adds to a batch."""
    if op[0] == "p":
        return len(op[4]) + _OP_OVERHEAD_BYTES
    if op[0] == "r":
        return sum(len(d) + 16 for _, d in op[5]) + _OP_OVERHEAD_BYTES
    return _OP_OVERHEAD_BYTES


class Link:
    """The owner's stream to one other worker."""

    def __init__(self, worker_id: str, dealer, monitor):
        self.id = worker_id
        self.dealer = dealer
        self.monitor = monitor
        self.connected = False
        self.stream = None            # id of the current stream; None: none started
        self.stream_start = 0         # the first batch number of the current stream
        self.n = 0                    # the last batch number sent (never reset)
        self.acked = 0                # the highest batch number acknowledged
        self.sent_at: dict = {}       # batch number -> monotonic send time
        self.synced = False           # the replica holds this stream's whole snapshot
        self.lease_until = 0.0        # monotonic; the owner may serve until then
        self.gone = False             # closed while the lease held: served without it
        self.fenced = False           # it took this owner's channels over
        self.failback = None          # _Failback while taking them back
        self.snapshot = None          # sorted names still to send, or None
        self.snapshot_ids = {}        # name -> [(publish_id, seq, epoch)] for the snapshot
        self.cursor = None            # names up to this one have been sent (during a snapshot)
        self.pending: list = []       # wire ops of this loop turn
        self.turn_gate = None         # [batch number] the replies of this turn wait for
        self.last_sent = 0.0
        self.next_try = 0.0
        self.closed_at = None         # monotonic time its connection last closed


class _Failback:
    __slots__ = ("after", "taken", "request_id", "deadline", "ticket")

    def __init__(self):
        self.after = ""
        self.taken: set = set()
        self.request_id = None
        self.deadline = 0.0
        self.ticket = None  # set when every take is in: wait for this commit


class Replicator:
    """The owner's side (see the module docstring); ``worker`` is the Worker."""

    def __init__(self, worker):
        self.worker = worker
        storage = worker.storage
        self.count = storage.replicas
        self.lease_s = storage.replica_lease_ms / 1000.0
        self.gated = storage.durability == "sync" and storage.replica_ack == "one"
        self.links: dict = {}
        self._ids = 0
        self._prefix = uuid.uuid4().hex[:12]
        self.counters = {"batches": 0, "resyncs": 0, "fenced": 0, "failbacks": 0,
                         "dropped_replies": 0}

    # -- links -------------------------------------------------------------------

    def open(self) -> None:
        me = self.worker.me.id
        for worker_id in self.worker.ring.worker_ids:
            if worker_id != me and worker_id not in self.links:
                self.links[worker_id] = self._connect(worker_id)

    def _connect(self, worker_id: str) -> Link:
        worker = self.worker
        config = worker.config
        dealer = worker.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, 100000)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        dealer.setsockopt(zmq.MAXMSGSIZE, frames.frame_limit(config.limits.max_message_bytes))
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                            | zmq.EVENT_DISCONNECTED)
        curve.secure_client(dealer, config, worker_id)
        dealer.connect(config.worker(worker_id).router_connect)
        worker.poll_register(dealer)
        worker.poll_register(monitor)
        return Link(worker_id, dealer, monitor)

    def _close_link(self, link: Link) -> None:
        self.worker.drop_gated(link)
        self.worker.poll_unregister(link.dealer)
        self.worker.poll_unregister(link.monitor)
        link.dealer.disable_monitor()
        link.monitor.close(linger=0)
        link.dealer.close(linger=0)

    def close(self) -> None:
        for link in self.links.values():
            self._close_link(link)
        self.links = {}

    def ring_changed(self) -> None:
        """The worker's ring changed: links to workers gone close, new ones open, and
        every stream starts again with a snapshot under the new ring."""
        ids = set(self.worker.ring.worker_ids)
        for worker_id in [w for w in self.links if w not in ids]:
            self._close_link(self.links.pop(worker_id))
        self.open()
        for link in self.links.values():
            if link.failback is None and not link.fenced:
                link.stream = None
                link.synced = False
                link.snapshot = None

    def sockets(self) -> dict:
        found = {}
        for link in self.links.values():
            found[link.dealer] = link
            found[link.monitor] = link
        return found

    def closed_since(self, worker_id: str, since: float) -> bool:
        """Whether this worker's link to ``worker_id`` closed after ``since`` (monotonic)
        and is not back: the process it reached then is gone."""
        link = self.links.get(worker_id)
        return (link is not None and not link.connected and link.closed_at is not None
                and link.closed_at > since)

    # -- serving -----------------------------------------------------------------

    def replicas_of(self, name: str) -> tuple:
        return self.worker.ring.preference(name, self.count + 1)[1:]

    def check(self, name: str) -> None:
        """Raise ProtocolError unless this owner may serve ``name`` now."""
        standby = self.worker.ring.standby(name)
        link = self.links.get(standby)
        if link is None:
            return
        if link.gone:
            return
        if link.failback is not None:
            raise frames.ProtocolError(f"{name!r} is being taken back from worker {standby}",
                                       frames.UNAVAILABLE)
        if link.fenced or not link.synced or time.monotonic() >= link.lease_until:
            raise frames.ProtocolError(
                f"worker {self.worker.me.id} holds no lease from {standby}, the standby of "
                f"{name!r}", frames.NOT_OWNER, owner=standby)

    def gate(self, name: str):
        """What a reply or message about ``name`` must wait for besides the disk:
        ``(link, batch number)``, or None."""
        if not self.gated:
            return None
        link = self.links.get(self.worker.ring.standby(name))
        if link is None or link.gone:
            return None
        if link.pending:
            # The last batch this turn's operations go out in (``tick`` fills it in).
            if link.turn_gate is None:
                link.turn_gate = [_NOT_SENT]
            return (link, link.stream, link.turn_gate)
        return (link, link.stream, [link.n])

    def gate_state(self, gate) -> int:
        """1: may leave; 0: wait; -1: drop (never acknowledged)."""
        link, stream, last = gate
        if link.gone:
            return 1
        if stream == link.stream and link.acked >= last[0]:
            return 1
        if stream != link.stream or link.fenced or link.failback is not None or \
                not link.synced or time.monotonic() >= link.lease_until:
            return -1
        return 0

    # -- streaming ---------------------------------------------------------------

    def record(self, op) -> None:
        """An operation the worker's store commits: queue it for the replicas of its channel."""
        name = _op_name(op)
        if name is None:
            return
        worker = self.worker
        if worker.ring.owner(name) != worker.me.id:
            return
        encoded = None
        for replica in self.replicas_of(name):
            link = self.links.get(replica)
            if link is None or link.stream is None:
                continue
            if link.snapshot is not None and (link.cursor is None or name > link.cursor):
                continue  # the snapshot brings its state when it gets there
            if encoded is None:
                encoded = _encode_op(op)
            link.pending.append(encoded)

    def _start_stream(self, link: Link) -> None:
        worker = self.worker
        me = worker.me.id
        self.counters["resyncs"] += 1
        link.stream = f"{self._prefix}-{link.n + 1}"
        link.stream_start = link.n + 1
        link.synced = False
        link.pending = []
        link.turn_gate = None
        link.snapshot = sorted(
            c.name for c in worker.channels.channels()
            if worker.ring.owner(c.name) == me and link.id in self.replicas_of(c.name))
        link.cursor = None
        link.snapshot_ids = self._ids_by_name(set(link.snapshot))
        self._send(link, [], sync=True)

    def _send(self, link: Link, ops: list, sync: bool = False, synced: bool = False) -> bool:
        worker = self.worker
        link.n += 1
        request = {"id": link.n, "op": "replicate", "from": worker.me.id,
                   "ring": worker.ring.version, "stream": link.stream, "n": link.n, "ops": ops}
        if sync:
            request["sync"] = True
        if synced:
            request["synced"] = True
        try:
            send(link.dealer, frames.encode_request(request), NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("replicate to %s not sent (%s): a new stream follows", link.id, exc)
            link.stream = None
            link.next_try = time.monotonic() + RETRY_INTERVAL_S
            return False
        now = time.monotonic()
        link.sent_at[link.n] = now
        link.last_sent = now
        self.counters["batches"] += 1
        return True

    def tick(self, now: float) -> None:
        """End of a loop turn: send this turn's batches, the snapshots' next part,
        heartbeats; move failbacks on."""
        heartbeat_s = self.lease_s / 5
        budget = self.worker.limits.max_message_bytes
        for link in self.links.values():
            if link.failback is not None:
                self._failback_tick(link, now)
                continue
            if not link.connected or link.fenced:
                link.pending = []
                link.turn_gate = None
                continue
            if link.stream is None:
                if now >= link.next_try:
                    self._start_stream(link)
                continue
            if link.snapshot is not None:
                self._snapshot_part(link, budget)
            if link.pending:
                ops, link.pending = link.pending, []
                start, used = 0, 0
                for i, op in enumerate(ops):
                    size = _op_bytes(op)
                    if used + size > budget // 2 and i > start:
                        if not self._send(link, ops[start:i]):
                            break
                        start, used = i, 0
                    used += size
                else:
                    self._send(link, ops[start:])
                if link.turn_gate is not None:
                    if link.stream is not None:
                        link.turn_gate[0] = link.n
                    link.turn_gate = None
            elif now - link.last_sent >= heartbeat_s:
                self._send(link, [])

    def _snapshot_part(self, link: Link, budget: int) -> None:
        worker = self.worker
        now = worker.clock()
        names, link.snapshot = link.snapshot[:SNAPSHOT_CHANNELS], link.snapshot[SNAPSHOT_CHANNELS:]
        ids = link.snapshot_ids
        ops, used = [], 0
        handoff = worker.handoff
        for i, name in enumerate(names):
            channel = worker.channels.get(name, now)
            if channel is None:
                continue
            entry, cost = handoff._entry(channel, budget // 2)
            if ops and used + cost > budget // 2:
                link.snapshot[:0] = names[i:]
                break
            ops.append(frames.encode_replica_restore(
                entry.name, entry.epoch, entry.seq, entry.expires_at, entry.messages,
                [(pid, seq, epoch, now) for pid, seq, epoch in ids.get(name, ())]))
            used += cost
            link.cursor = name
        # Operations of channels now covered were left out until here; this turn's
        # operations of them follow the snapshot's entries (they are newer).
        done = not link.snapshot
        if done:
            link.snapshot = None
            link.cursor = None
            link.snapshot_ids = {}
        self._send(link, ops, synced=done)

    def _ids_by_name(self, names: set) -> dict:
        found: dict = {}
        if names:
            for publish_id, name, seq, epoch in self.worker.publish_ids.items():
                if name in names:
                    found.setdefault(name, []).append((publish_id, seq, epoch))
        return found

    # -- replies -----------------------------------------------------------------

    def drain(self, sock, link: Link) -> bool:
        """Read what arrived on a link; True when an acknowledgement may release replies."""
        if sock is link.monitor:
            self._drain_monitor(link)
            return True
        released = False
        for _ in range(256):
            if sock.closed or not readable(sock):
                break
            try:
                parts = recv_frames(sock)
            except zmq.Again:
                break
            try:
                reply = frames.decode_reply(parts[-1], self.worker.limits.max_message_bytes)
            except frames.ProtocolError as exc:
                log.warning("worker %s: a bad reply from %s: %s", self.worker.me.id, link.id, exc)
                continue
            if isinstance(reply["id"], str):
                self._failback_reply(link, reply)
                released = True
                continue
            released |= self._ack(link, reply)
        return released

    def _drain_monitor(self, link: Link) -> None:
        while not link.monitor.closed and readable(link.monitor):
            try:
                event = parse_monitor_message(link.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            now = time.monotonic()
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.connected = True
                if not link.fenced and link.failback is None:
                    self._start_stream(link)
            elif event == zmq.EVENT_DISCONNECTED and link.connected:
                link.connected = False
                link.closed_at = now
                if link.synced and now < link.lease_until and not link.fenced:
                    link.gone = True
                    log.warning("worker %s: the link to %s closed while its lease held: its "
                                "process is gone; serving the channels it backs without it",
                                self.worker.me.id, link.id)
                link.synced = False
                link.stream = None
                link.snapshot = None

    def _ack(self, link: Link, reply: dict) -> bool:
        n = reply["id"]
        sent = link.sent_at.pop(n, None)
        for old in [k for k in link.sent_at if k < n]:
            del link.sent_at[old]
        if not reply["ok"]:
            code = reply["error"]
            if code == frames.FENCED:
                if not link.fenced:
                    self.counters["fenced"] += 1
                    log.warning("worker %s: %s serves the channels it backs for us (fenced); "
                                "taking them back", self.worker.me.id, link.id)
                link.fenced = True
                link.stream = None
                link.synced = False
                link.gone = False
                self.worker.drop_gated(link)
                link.failback = _Failback()
                self.counters["failbacks"] += 1
            elif link.stream is not None and n >= link.stream_start:
                if code != frames.RESYNC:
                    log.warning("worker %s: %s refused a batch: %s", self.worker.me.id, link.id,
                                reply["reason"])
                link.stream = None
                link.next_try = time.monotonic() + (0 if code == frames.RESYNC
                                                    else RETRY_INTERVAL_S)
            return True
        if n < link.stream_start or link.stream is None:
            return False  # a batch of an earlier stream
        if n > link.acked:
            link.acked = n
        if reply.get("synced") is True and sent is not None:
            if not link.synced:
                log.info("worker %s: %s holds our snapshot; streaming to it", self.worker.me.id,
                         link.id)
            link.synced = True
            link.gone = False
            link.lease_until = max(link.lease_until, sent + self.lease_s)
        return True

    # -- failback ----------------------------------------------------------------

    def _failback_tick(self, link: Link, now: float) -> None:
        failback = link.failback
        worker = self.worker
        if failback.ticket is not None:
            if worker.committed_ticket() >= failback.ticket or worker.visible_ticket() == 0:
                log.info("worker %s: took back %d channels from %s; streaming to it again",
                         worker.me.id, len(failback.taken), link.id)
                link.failback = None
                link.fenced = False
                link.stream = None
                if link.connected:
                    self._start_stream(link)
            return
        if failback.request_id is not None and now < failback.deadline:
            return
        if now < link.next_try:
            return
        self._ids += 1
        failback.request_id = f"f{self._ids}"
        failback.deadline = now + worker.take_timeout_s
        request = {"id": failback.request_id, "op": "handoff_take", "ring": worker.ring.version,
                   "to": worker.me.id, "failback": True, "after": failback.after,
                   "limit": FAILBACK_LIMIT}
        try:
            send(link.dealer, frames.encode_request(request), NOBLOCK)
        except zmq.ZMQError:
            failback.request_id = None
            link.next_try = now + RETRY_INTERVAL_S

    def _failback_reply(self, link: Link, reply: dict) -> None:
        failback = link.failback
        if failback is None or reply["id"] != failback.request_id:
            return
        failback.request_id = None
        worker = self.worker
        if not reply["ok"]:
            if reply["error"] == frames.RESYNC:
                # It holds none of our channels: nothing to take back.
                failback.ticket = worker.visible_ticket()
                return
            link.next_try = time.monotonic() + RETRY_INTERVAL_S
            log.info("worker %s: taking back from %s: %s", worker.me.id, link.id,
                     reply["reason"])
            return
        try:
            handoff = frames.decode_handoff(reply)
        except frames.ProtocolError as exc:
            log.warning("worker %s: a bad failback reply from %s: %s", worker.me.id, link.id, exc)
            link.next_try = time.monotonic() + RETRY_INTERVAL_S
            return
        now = worker.clock()
        ids: dict = {}
        for publish_id, name, seq, epoch in handoff.publish_ids:
            ids.setdefault(name, []).append((publish_id, seq, epoch))
        for entry in handoff.channels:
            worker.restore_channel(entry, ids.get(entry.name, ()), now)
            failback.taken.add(entry.name)
        failback.after = handoff.last or failback.after
        if handoff.more:
            return
        me = worker.me.id
        stale = [c.name for c in worker.channels.channels()
                 if worker.ring.owner(c.name) == me and worker.ring.standby(c.name) == link.id
                 and c.name not in failback.taken]
        for name in stale:
            worker.channels.delete(name)
            worker.record(DeleteOp(name))
        if stale:
            log.info("worker %s: dropped %d channels %s no longer holds", me, len(stale), link.id)
        failback.ticket = worker.visible_ticket()


class _Owner:
    """What a replica knows of one owner's stream to it."""

    def __init__(self):
        self.state = "following"   # following | serving | handing_back
        self.stream = None
        self.expected = 0
        self.synced = False
        self.snapshot_names = None  # names in the snapshot being received
        self.last_grant = 0.0       # monotonic time the last lease-granting ack left
        self.last_heard = time.monotonic()


class Replica:
    """The copies this worker keeps for other owners, and its standby duties."""

    def __init__(self, worker):
        self.worker = worker
        storage = worker.storage
        self.count = storage.replicas
        self.lease_s = storage.replica_lease_ms / 1000.0
        self.keeps_epoch = storage.durability == "sync" and storage.replica_ack == "one"
        self.channels = ChannelTable(worker.new_epoch)
        self.publish_ids = PublishIds(storage.publish_id_window_s, _MAX_PUBLISH_IDS,
                                      worker.clock())
        self.owners: dict = {}
        self._writer = None
        self._ops: list = []
        self._acks: list = []  # [(replica ticket, main ticket, owner, parts)]
        self.counters = {"applied": 0, "takeovers": 0, "handed_back": 0}

    @property
    def store_path(self) -> str:
        return os.path.join(self.worker.storage.data_dir, f"{self.worker.me.id}.replica.sqlite3")

    def open(self) -> None:
        """Load the copies kept before (unless durability is memory) and the owners
        whose channels this worker had taken over."""
        worker = self.worker
        storage = worker.storage
        if storage.durability != "memory":
            store = Store(self.store_path, "FULL" if storage.durability == "sync" else "NORMAL")
            now = worker.clock()
            try:
                snapshot = store.load(now, now - storage.publish_id_window_s)
                for stored in snapshot.channels:
                    self.channels.restore(stored.name, stored.epoch, stored.seq, stored.messages,
                                          stored.expires_at, stored.buffer_size)
                for seen in snapshot.publish_ids:
                    self.publish_ids.add(seen.publish_id, seen.name, seen.seq, seen.epoch, now)
            except (StoreError, ValueError) as exc:
                store.close(clean=False)
                raise StoreError(f"cannot load {self.store_path}: {exc}") from None
            self._writer = StoreWriter(store, worker.context, 0.0)
            self._writer.start()
        me = worker.me.id
        for channel in worker.channels.channels():
            owner = worker.ring.owner(channel.name)
            if owner != me and worker.ring.standby(channel.name) == me:
                self.owners.setdefault(owner, _Owner()).state = "serving"
        for owner in self.owners:
            log.info("worker %s serves the channels it had taken over from %s", me, owner)
        log.info("worker %s keeps %d replica channels (%s)", me, len(self.channels),
                 self.store_path if self._writer else "memory")

    @property
    def notify_socket(self):
        return self._writer.notify_socket if self._writer is not None else None

    def close(self, timeout_s: float) -> None:
        if self._writer is not None:
            self._submit()
            self._writer.stop(timeout_s)
            self._writer = None

    def _record(self, op) -> None:
        if self._writer is not None:
            self._ops.append(op)

    def _submit(self) -> None:
        if self._ops:
            ops, self._ops = self._ops, []
            self._writer.submit(ops)

    def _ticket(self) -> int:
        if self._writer is None:
            return 0
        return self._writer.last_ticket + 1 if self._ops else self._writer.last_ticket

    # -- the stream --------------------------------------------------------------

    def receive(self, request, envelope: list) -> None:
        """Apply a replicate batch; its acknowledgement leaves once it is committed.
        Raises ProtocolError (the worker answers it at once)."""
        worker = self.worker
        owner_id, me = request["from"], worker.me.id
        ring = worker.ring
        if request["ring"] != ring.version:
            raise frames.ProtocolError(f"worker {me} has ring {ring.version}, not "
                                       f"{request['ring']}", frames.RING_MISMATCH)
        if owner_id == me or owner_id not in ring.worker_ids:
            raise frames.ProtocolError(f"{owner_id!r} is not another worker of ring "
                                       f"{ring.version}")
        owner = self.owners.setdefault(owner_id, _Owner())
        owner.last_heard = time.monotonic()
        sync = request.get("sync", False)
        if owner.state == "serving" or (owner.state == "handing_back" and not sync):
            raise frames.ProtocolError(f"worker {me} serves the channels it backs for "
                                       f"{owner_id}: take them back", frames.FENCED)
        if not sync and (request["stream"] != owner.stream or request["n"] != owner.expected):
            owner.stream = None
            raise frames.ProtocolError("a batch out of order: start a new stream",
                                       frames.RESYNC)
        try:
            ops = frames.decode_replica_ops(request["ops"])
            for op in ops:
                name = op[1]
                if ring.owner(name) != owner_id or me not in ring.preference(
                        name, self.count + 1)[1:]:
                    raise frames.ProtocolError(f"{name!r} is not a channel of {owner_id} "
                                               f"that {me} is a replica of")
        except frames.ProtocolError:
            owner.stream = None
            raise
        if sync:
            if owner.state == "handing_back":
                self._drop_taken(owner_id)
                owner.state = "following"
            owner.stream = request["stream"]
            owner.synced = False
            owner.snapshot_names = set()
        now = worker.clock()
        for op in ops:
            if not self._apply(owner, op, now):
                owner.stream = None
                owner.synced = False
                raise frames.ProtocolError(f"the copy of {op[1]!r} does not continue with "
                                           "this publish: start a new stream", frames.RESYNC)
        owner.expected = request["n"] + 1
        if request.get("synced"):
            names = owner.snapshot_names or set()
            stale = [c.name for c in self.channels.channels()
                     if ring.owner(c.name) == owner_id and c.name not in names]
            for name in stale:
                self.channels.delete(name)
                self._record(DeleteOp(name))
            owner.snapshot_names = None
            owner.synced = True
            log.info("worker %s holds the snapshot of %s (%d channels)", me, owner_id,
                     len(names))
        parts = envelope + [frames.encode_reply(request["id"], n=request["n"],
                                                synced=owner.synced)]
        self._acks.append((self._ticket(), worker.visible_ticket(), owner, parts))

    def _apply(self, owner: _Owner, op, now: float) -> bool:
        kind, name = op[0], op[1]
        self.counters["applied"] += 1
        if kind == "p":
            _, _, epoch, seq, data, buffer_size, expires_at, publish_id, at = op
            if not self.channels.apply_publish(name, epoch, seq, data, buffer_size, expires_at):
                return False
            if publish_id is not None:
                self.publish_ids.add(publish_id, name, seq, epoch, now)
            self._record(PublishOp(name, epoch, seq, data, buffer_size, expires_at,
                                   publish_id, at))
        elif kind == "d":
            if self.channels.delete(name):
                self._record(DeleteOp(name))
        else:
            _, _, epoch, seq, expires_at, messages, ids = op
            messages = [(s, d) for s, d in messages]
            self.channels.restore(name, epoch, seq, messages, expires_at, len(messages))
            for publish_id, id_seq, id_epoch, _ in ids:
                self.publish_ids.add(publish_id, name, id_seq, id_epoch, now)
            self._record(RestoreOp(name, epoch, seq, expires_at, messages,
                                   [tuple(i) for i in ids]))
            if owner.snapshot_names is not None:
                owner.snapshot_names.add(name)
        return True

    def flush(self) -> None:
        """Submit this turn's operations; send the acknowledgements now committed."""
        self._submit()
        replica_done = self._writer.committed() if self._writer is not None else 0
        if not self._acks:
            return
        main_done = self.worker.committed_ticket()
        sent = 0
        for ticket, main_ticket, owner, parts in self._acks:
            if ticket > replica_done or main_ticket > main_done:
                break
            sent += 1
            if owner.state != "following":
                continue  # taken over meanwhile: grant nothing more
            if parts[-1] is not None:
                owner.last_grant = time.monotonic()
                send_frames(self.worker.router, parts)
        del self._acks[:sent]

    def tick(self, now: float) -> None:
        expired = self.channels.expire(now)
        for name in expired:
            self._record(DeleteOp(name))
        kept_since = self.publish_ids.rotate(now)
        if kept_since is not None:
            self._record(PruneOp(min(kept_since, now - self.worker.storage.publish_id_window_s)))

    # -- taking over -------------------------------------------------------------

    def serving(self, name: str) -> bool:
        owner = self.owners.get(self.worker.ring.owner(name))
        return owner is not None and owner.state == "serving" and \
            self.worker.ring.standby(name) == self.worker.me.id

    def check(self, name: str, owner_id: str) -> bool:
        """Whether this worker serves ``name`` (of ``owner_id``) now, taking its owner's
        channels over if it may; raises ProtocolError ``unavailable`` if it may not yet.
        False: it is not this worker's to take (not its standby)."""
        worker = self.worker
        if worker.handoff.previous is not None or worker.ring.standby(name) != worker.me.id:
            return False
        owner = self.owners.setdefault(owner_id, _Owner())
        if owner.state == "serving":
            return True
        now = time.monotonic()
        if owner.state == "handing_back":
            if now - owner.last_heard < self.lease_s + _LEASE_MARGIN_S:
                raise frames.ProtocolError(f"{name!r} is being handed back to {owner_id}",
                                           frames.UNAVAILABLE)
            owner.state = "serving"
            log.warning("worker %s: %s went silent while taking its channels back; serving "
                        "them again", worker.me.id, owner_id)
            return True
        if not owner.synced:
            raise frames.ProtocolError(f"worker {owner_id} (the owner of {name!r}) is not "
                                       f"reachable and {worker.me.id} does not hold all of its "
                                       "channels", frames.UNAVAILABLE)
        # A link that closed after the last lease was granted: the process holding
        # it is gone (a partition closes nothing), so no lease needs to run out.
        closed = worker.replicator.closed_since(owner_id, owner.last_grant)
        if not closed and now < owner.last_grant + self.lease_s + _LEASE_MARGIN_S:
            raise frames.ProtocolError(f"worker {owner_id}'s lease on {name!r} has not ended",
                                       frames.UNAVAILABLE)
        self._take_over(owner_id, owner, "its connection closed" if closed
                        else "its lease ran out")
        return True

    def _take_over(self, owner_id: str, owner: _Owner, why: str) -> None:
        worker = self.worker
        me = worker.me.id
        ring = worker.ring
        now = worker.clock()
        owner.state = "serving"
        owner.synced = False
        owner.stream = None
        # Acknowledgements not sent yet would renew a lease: never send them.
        self._acks = [a for a in self._acks if a[2] is not owner]
        ids: dict = {}
        names = [c.name for c in self.channels.channels()
                 if ring.owner(c.name) == owner_id and ring.standby(c.name) == me]
        wanted = set(names)
        for publish_id, name, seq, epoch in self.publish_ids.items():
            if name in wanted:
                ids.setdefault(name, []).append((publish_id, seq, epoch))
        for name in names:
            channel = self.channels.get(name, now)
            if channel is not None:
                epoch = channel.epoch if self.keeps_epoch else worker.new_epoch()
                worker.restore_channel(frames.HandoffChannel(
                    name, epoch, channel.seq, channel.expires_at, list(channel.buffer)),
                    ids.get(name, ()), now)
            self.channels.delete(name)
            self._record(DeleteOp(name))
        self.counters["takeovers"] += 1
        log.warning("worker %s takes over %d channels of %s (%s)%s", me, len(names), owner_id,
                    why, "" if self.keeps_epoch else " with new epochs")

    def give_back(self, request) -> bytes:
        """Answer a ``handoff_take`` with ``failback`` from the owner of channels this
        worker took over: hand them back (it stops serving them at the first take)."""
        worker = self.worker
        ring = worker.ring
        to, me = request["to"], worker.me.id
        if request["ring"] != ring.version:
            raise frames.ProtocolError(f"worker {me} has ring {ring.version}, not "
                                       f"{request['ring']}", frames.RING_MISMATCH)
        owner = self.owners.get(to)
        if owner is None or owner.state == "following":
            raise frames.ProtocolError(f"worker {me} holds no channels taken over from {to}",
                                       frames.RESYNC)
        owner.last_heard = time.monotonic()
        if owner.state == "serving":
            owner.state = "handing_back"
            worker.handoff._outgoing_ids = None
            self.counters["handed_back"] += 1
            log.info("worker %s hands the channels it took over back to %s", me, to)
        now = worker.clock()
        held = sorted(c.name for c in worker.channels.channels()
                      if ring.owner(c.name) == to and ring.standby(c.name) == me)
        after = request.get("after", "")
        limit = request.get("limit", FAILBACK_LIMIT)
        budget = worker.limits.max_message_bytes // 2
        entries, used, more, last = [], 0, False, ""
        for name in held:
            if name <= after:
                continue
            if len(entries) >= limit:
                more = True
                break
            channel = worker.channels.get(name, now)
            if channel is None:
                last = name
                continue
            entry, cost = worker.handoff._entry(channel, budget)
            if entries and used + cost > budget:
                more = True
                break
            entries.append(entry)
            used += cost
            last = name
        ids = worker.handoff._ids_of([e.name for e in entries], budget)
        return frames.encode_handoff(request["id"], entries, [], ids, more, last)

    def _drop_taken(self, owner_id: str) -> None:
        """The owner streams again after taking its channels back: drop the copies
        this worker served."""
        worker = self.worker
        me = worker.me.id
        names = [c.name for c in worker.channels.channels()
                 if worker.ring.owner(c.name) == owner_id and worker.ring.standby(c.name) == me]
        for name in names:
            worker.channels.delete(name)
            worker.record(DeleteOp(name))
        log.info("worker %s: %s took its channels back; %d copies dropped", me, owner_id,
                 len(names))
