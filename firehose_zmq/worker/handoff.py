"""Moving channels to a new ring: a worker's side of ``handoff_take``, as taker and as holder.

Theory of operation
-------------------
A ring change reaches a worker as a config with a new worker list and
``ring_previous``, the ids of the ring being replaced (read at start, or on
SIGHUP). While both rings are known:

- A worker serves a channel only if the current ring gives it to it and, when
  the previous ring gave it to another worker (its *source*, ``ring.source``),
  only after it has taken the channel from that worker. The take is one request
  that the source answers on its single loop; from then on the source, whose
  ring (of the same version: it is checked) gives the channel to the taker,
  refuses it with ``not_owner``. So no two workers ever accept publishes for one
  channel, and the taker continues its sequence and epoch.
- A request for a channel not taken yet is *parked* (at most ``[limits]
  max_parked_requests``; beyond, ``unavailable``) and a ``handoff_take`` naming
  it goes out at once; the parked requests are handled in order once the state
  has arrived.
- Meanwhile the taker takes, in the background and in name order, every channel
  the source holds for it (``BULK_LIMIT`` per request, a reply fits
  ``max_message_bytes``), restores each with its buffer, TTL and recent publish
  ids (so a retried publish is still answered with its first result), records
  it in its store, and acknowledges it (``done``) in its next request once that
  is committed; the source then drops its copy. A source's copy outlives a
  crash of the taker until then; a copy sent twice is kept only if it is newer
  (epoch, then sequence) than what the taker holds.
- A source not yet on the new ring answers ``ring_mismatch``: the requests
  parked for that take are answered ``not_owner`` naming the source, which still
  owns the channel on its ring (edges follow that), and the next request tries
  again, so the channel moves as soon as the source has the new ring.
- When a source answers that nothing is left and every acknowledgement has been
  delivered, the handoff from it is complete; when every source is complete,
  the worker serves without looking at the previous ring.

Links (the taker connects; the source's ROUTER is the one edges use)::

    DEALER (taker, one per source) -> ROUTER (source)
        [handoff_take]   ->   <- [reply: channels, absent, publish_ids, more, last]
"""

import bisect
from collections import deque
import logging
import time

import zmq

from ..auth import curve
from ..ring import Ring, source as ring_source
from ..wire import frames
from ..zmqraw import NOBLOCK, readable, recv_frames, send
from .store import DeleteOp

log = logging.getLogger("firehose.worker")

BULK_LIMIT = 1000         # channels per background take
RETRY_INTERVAL_S = 0.25   # a source that is behind or down is asked again this often
_ID_OVERHEAD_BYTES = 24
_CHANNEL_OVERHEAD_BYTES = 64
_MESSAGE_OVERHEAD_BYTES = 16


class _Take:
    """A handoff_take in flight: ``names`` asked for (None: the background take),
    the acknowledgements it carries, and its deadline (monotonic)."""

    __slots__ = ("names", "done", "deadline")

    def __init__(self, names, done, deadline):
        self.names = names
        self.done = done
        self.deadline = deadline


class Source:
    """A worker that holds channels this one must take, and the link to it."""

    def __init__(self, worker_id: str, dealer):
        self.id = worker_id
        self.dealer = dealer
        self.pending: dict = {}      # request id -> _Take
        self.complete = False
        self.behind = False          # answered ring_mismatch: still on another ring
        self.bulk_in_flight = False
        self.after = ""              # the background take continues after this name
        self.next_try = 0.0
        self.to_ack: list = []       # committed channel names to acknowledge
        self.acks_waiting = 0        # taken channel names whose commit is pending
        self.taken = 0


class Handoff:
    """The handoff state of one worker (see the module docstring); the worker calls
    ``check`` for every request on a channel and ``tick`` once per loop turn."""

    def __init__(self, worker):
        self.worker = worker
        self.previous = None          # the previous Ring while a handoff is configured
        self.sources: dict = {}       # worker id -> Source (only incomplete ones matter)
        self.resolved: set = set()    # channels taken (or found absent) from their source
        self.parked: dict = {}        # channel -> [(request parts, request id)]
        self.parked_count = 0
        self._wanted: dict = {}       # source id -> [names] to ask for at the end of the turn
        self._asked: set = set()      # names in an explicit take in flight
        self._acks: deque = deque()   # (ticket, source id, names) waiting for a commit
        self._outgoing: dict = {}     # taker id -> sorted names held for it (this ring)
        self._outgoing_ids = None     # name -> [(publish_id, seq, epoch)] of moved channels
        self._handed: dict = {}       # taker id -> channels dropped after its ``done``
        self._ids = 0
        self.active = False           # some source is incomplete
        self.counters = {"taken": 0, "handed": 0, "parked": 0, "refused_parked": 0}

    # -- configuration -----------------------------------------------------------

    def set_previous(self, previous_ids, vnodes: int) -> None:
        """Start (or stop, with no ids) taking channels from the ring of ``previous_ids``."""
        worker = self.worker
        self._outgoing = {}
        self._outgoing_ids = None
        self._handed = {}
        self.resolved = set()
        for source in self.sources.values():
            self._close_source(source, "the ring changed")
        self.sources = {}
        # Copies not acknowledged yet are sent again by the next takes, and kept
        # only if newer than what is here.
        self._wanted, self._asked, self._acks = {}, set(), deque()
        self.previous = Ring(previous_ids, vnodes) if previous_ids else None
        me = worker.me.id
        # A worker out of the ring (leaving) takes nothing; it only hands over.
        if self.previous is not None and me in worker.ring.worker_ids:
            for worker_id in self.previous.worker_ids:
                if worker_id != me:
                    self.sources[worker_id] = Source(worker_id, self._connect(worker_id))
        self.active = bool(self.sources)
        self._replay(list(self.parked))

    def _connect(self, worker_id: str):
        config = self.worker.config
        dealer = self.worker.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        dealer.setsockopt(zmq.MAXMSGSIZE, frames.frame_limit(config.limits.max_message_bytes))
        curve.secure_client(dealer, config, worker_id)
        dealer.connect(config.worker(worker_id).router_connect)
        self.worker.poll_register(dealer)
        return dealer

    def _close_source(self, source: Source, why: str) -> None:
        for take in source.pending.values():
            self._fail_names(take.names, frames.UNAVAILABLE, f"the take from {source.id}: {why}")
        source.pending.clear()
        self.worker.poll_unregister(source.dealer)
        source.dealer.close(linger=0)

    def close(self) -> None:
        for source in self.sources.values():
            self._close_source(source, "the worker is stopping")
        self.sources = {}
        self.active = False

    def sockets(self) -> list:
        return [source.dealer for source in self.sources.values()]

    def status(self) -> dict:
        """What is still moving, for logs and the admin status."""
        return {"previous_ring": self.previous.version if self.previous else None,
                "taking_from": sorted(s.id for s in self.sources.values() if not s.complete),
                "behind": sorted(s.id for s in self.sources.values() if s.behind),
                "parked": self.parked_count, **self.counters}

    # -- the taker ---------------------------------------------------------------

    def check(self, name: str, request_id) -> bool:
        """Whether a request for ``name`` (which the current ring gives to this worker)
        may be served now; False: park it (``park`` follows). Raises ProtocolError
        ``not_owner`` naming the source while that is on another ring."""
        if name in self.resolved:
            return True
        source_id = ring_source(self.worker.ring, self.previous, name)
        if source_id is None:
            return True
        source = self.sources.get(source_id)
        if source is None or source.complete:
            return True
        limit = self.worker.limits.max_parked_requests
        if self.parked_count >= limit:
            self.counters["refused_parked"] += 1
            raise frames.ProtocolError(
                f"{limit} requests wait for channels being taken over (max_parked_requests); "
                "retry later", frames.UNAVAILABLE)
        return False

    def park(self, name: str, parts: list, request_id) -> None:
        """Hold a request until ``name`` has been taken from its source."""
        self.parked.setdefault(name, []).append((parts, request_id))
        self.parked_count += 1
        self.counters["parked"] += 1
        if name not in self._asked:
            self._asked.add(name)
            source_id = ring_source(self.worker.ring, self.previous, name)
            self._wanted.setdefault(source_id, []).append(name)

    def tick(self, now: float) -> None:
        """Send this turn's takes; expire takes past their deadline; start background takes."""
        if self._wanted:
            wanted, self._wanted = self._wanted, {}
            for source_id, names in wanted.items():
                source = self.sources.get(source_id)
                for i in range(0, len(names), frames.MAX_HANDOFF_NAMES):
                    self._send_take(source, names[i:i + frames.MAX_HANDOFF_NAMES], now)
        if not self.active:
            return
        for source in self.sources.values():
            for request_id in [i for i, take in source.pending.items() if take.deadline <= now]:
                take = source.pending.pop(request_id)
                self._take_failed(source, take, frames.UNAVAILABLE,
                                  f"worker {source.id} did not answer a take in time")
            if (not source.complete and not source.bulk_in_flight and now >= source.next_try
                    and not source.acks_waiting):
                self._send_take(source, None, now)

    def _send_take(self, source, names, now: float) -> None:
        worker = self.worker
        self._ids += 1
        request = {"id": self._ids, "op": "handoff_take", "ring": worker.ring.version,
                   "to": worker.me.id}
        done = []
        if names is None:
            done, source.to_ack = source.to_ack[:frames.MAX_HANDOFF_NAMES], \
                source.to_ack[frames.MAX_HANDOFF_NAMES:]
            request.update(limit=BULK_LIMIT, after=source.after)
            if done:
                request["done"] = done
            source.bulk_in_flight = True
        else:
            request["channels"] = names
        take = _Take(names, done, now + worker.take_timeout_s)
        try:
            # Never blocks: with ZMQ_IMMEDIATE a source that is not connected (down,
            # or stopped before the handshake) refuses at once.
            send(source.dealer, frames.encode_request(request), NOBLOCK)
        except zmq.ZMQError as exc:
            self._take_failed(source, take, frames.UNAVAILABLE,
                              f"worker {source.id} is not connected ({exc})")
            return
        source.pending[self._ids] = take

    def _take_failed(self, source, take: _Take, code: str, reason: str) -> None:
        if take.names is None:
            source.bulk_in_flight = False
            source.to_ack[:0] = take.done
        source.next_try = time.monotonic() + RETRY_INTERVAL_S
        if code == frames.RING_MISMATCH:
            if not source.behind:
                log.info("worker %s: %s", self.worker.me.id, reason)
            source.behind = True
            self._fail_names(take.names, frames.NOT_OWNER, reason, owner=source.id)
        else:
            log.debug("worker %s: take from %s failed: %s", self.worker.me.id, source.id, reason)
            self._fail_names(take.names, code, reason)

    def _fail_names(self, names, code: str, reason: str, owner=None) -> None:
        worker = self.worker
        for name in names or ():
            self._asked.discard(name)
            for parts, request_id in self.parked.pop(name, ()):
                self.parked_count -= 1
                parts[-1] = frames.encode_error(request_id, code, reason, worker.ring.version,
                                                owner=owner)
                worker.send_reply(parts)

    def drain(self, sock) -> None:
        """Read the replies on one source's DEALER."""
        source = next((s for s in self.sources.values() if s.dealer is sock), None)
        if source is None:
            return
        for _ in range(64):
            if sock.closed or not readable(sock):
                return
            try:
                parts = recv_frames(sock)
            except zmq.Again:
                return
            try:
                reply = frames.decode_reply(parts[-1], self.worker.limits.max_message_bytes)
            except frames.ProtocolError as exc:
                log.warning("worker %s: a bad handoff reply from %s: %s", self.worker.me.id,
                            source.id, exc)
                continue
            take = source.pending.pop(reply["id"], None)
            if take is None:
                continue  # past its deadline
            if not reply["ok"]:
                self._take_failed(source, take, reply["error"],
                                  f"worker {source.id} refused a take: {reply['reason']}")
                continue
            try:
                handoff = frames.decode_handoff(reply)
            except frames.ProtocolError as exc:
                self._take_failed(source, take, frames.UNAVAILABLE,
                                  f"a bad handoff reply from {source.id}: {exc}")
                continue
            self._taken(source, take, handoff)

    def _taken(self, source: Source, take: _Take, handoff) -> None:
        worker = self.worker
        now = worker.clock()
        if source.behind:
            log.info("worker %s: worker %s has ring %s now; taking its channels",
                     worker.me.id, source.id, worker.ring.version)
        source.behind = False
        ids: dict = {}
        for publish_id, name, seq, epoch in handoff.publish_ids:
            ids.setdefault(name, []).append((publish_id, seq, epoch))
        names = []
        for entry in handoff.channels:
            names.append(entry.name)
            held = worker.channels.get(entry.name, now)
            if held is not None and (held.epoch, held.seq) >= (entry.epoch, entry.seq):
                continue  # taken before (a reply sent twice): what is here is newer
            worker.restore_channel(entry, ids.get(entry.name, ()), now)
            source.taken += 1
            self.counters["taken"] += 1
        resolved = names + handoff.absent
        self.resolved.update(resolved)
        if names:
            source.acks_waiting += len(names)
            self._acks.append((worker.visible_ticket(), source.id, names))
            self.committed(worker.committed_ticket())
        if take.names is None:
            source.bulk_in_flight = False
            source.after = handoff.last or source.after
            if not handoff.more and not handoff.channels and not take.done \
                    and not source.to_ack and not source.acks_waiting \
                    and not any(t.names for t in source.pending.values()):
                self._complete(source)
        if take.names is not None:
            answered = set(resolved)
            missing = [name for name in take.names if name not in answered]
            if missing:  # over one reply's bytes: ask again for the rest
                self._wanted.setdefault(source.id, []).extend(missing)
            self._asked.difference_update(answered)
        self._replay(resolved)

    def committed(self, ticket: int) -> None:
        """The store has committed ``ticket``: acknowledge what it made durable."""
        acks = self._acks
        while acks and acks[0][0] <= ticket:
            _, source_id, names = acks.popleft()
            source = self.sources.get(source_id)
            if source is not None:
                source.acks_waiting -= len(names)
                source.to_ack.extend(names)

    def _complete(self, source: Source) -> None:
        source.complete = True
        worker = self.worker
        log.info("worker %s: handoff from %s complete (%d channels taken)", worker.me.id,
                 source.id, source.taken)
        if all(s.complete for s in self.sources.values()):
            self.active = False
            log.info("worker %s: every channel of ring %s is here; handoff complete "
                     "(%d channels taken)", worker.me.id, worker.ring.version,
                     self.counters["taken"])

    def _replay(self, names) -> None:
        """Handle the parked requests of ``names`` again, in the order they came."""
        worker = self.worker
        for name in names:
            waiting = self.parked.pop(name, None)
            if not waiting:
                continue
            self.parked_count -= len(waiting)
            for parts, _ in waiting:
                worker.serve(parts)

    # -- the holder --------------------------------------------------------------

    def give(self, request) -> bytes:
        """Answer a handoff_take: drop what ``done`` acknowledges, then hand over the
        channels asked for (or the next ones held for the asker)."""
        worker = self.worker
        ring = worker.ring
        if request["ring"] != ring.version:
            raise frames.ProtocolError(
                f"worker {worker.me.id} has ring {ring.version}, not {request['ring']}",
                frames.RING_MISMATCH)
        to, me = request["to"], worker.me.id
        if to == me or to not in ring.worker_ids:
            raise frames.ProtocolError(f"{to!r} is not another worker of ring {ring.version}")
        dropped = 0
        for name in request.get("done", ()):
            if ring.owner(name) != me and worker.channels.delete(name):
                worker.record(DeleteOp(name))
                dropped += 1
        if dropped:
            self._handed[to] = self._handed.get(to, 0) + dropped
            self.counters["handed"] += dropped
        now = worker.clock()
        names = request.get("channels")
        limit = request.get("limit", BULK_LIMIT)
        budget = worker.limits.max_message_bytes // 2
        more, last = False, ""
        entries, absent = [], []
        used = 0
        if names is not None:
            for name in names:
                if ring.owner(name) != to:
                    raise frames.ProtocolError(f"ring {ring.version} does not give {name!r} "
                                               f"to {to}")
            candidates = names
        else:
            held = self._held_for(to)
            candidates = held[bisect.bisect_right(held, request.get("after", "")):]
        for name in candidates:
            if len(entries) >= limit:
                more = True
                break
            channel = worker.channels.get(name, now)
            if channel is None:
                if names is not None:
                    absent.append(name)
                last = name
                continue
            entry, cost = self._entry(channel, budget)
            if entries and used + cost > budget:
                more = True  # the asker asks again for the rest
                break
            entries.append(entry)
            used += cost
            last = name
        ids = self._ids_of([e.name for e in entries], budget)
        if names is None and not more and not entries and not request.get("done"):
            log.info("worker %s: every channel for %s handed over (%d dropped)", me, to,
                     self._handed.get(to, 0))
        return frames.encode_handoff(request["id"], entries, absent, ids, more, last)

    def _held_for(self, to: str) -> list:
        """The names of the channels held for ``to`` (computed once per ring)."""
        held = self._outgoing.get(to)
        if held is None:
            owner = self.worker.ring.owner
            held = self._outgoing[to] = sorted(
                c.name for c in self.worker.channels.channels() if owner(c.name) == to)
        return held

    def _entry(self, channel, budget: int) -> tuple:
        """``(HandoffChannel, bytes)``; the oldest buffered messages that do not fit
        ``budget`` stay behind (counted and logged)."""
        messages = list(channel.buffer)
        cost = _CHANNEL_OVERHEAD_BYTES + len(channel.name)
        kept = 0
        for seq, data in reversed(messages):
            size = len(data) + _MESSAGE_OVERHEAD_BYTES
            if cost + size > budget and kept:
                break
            cost += size
            kept += 1
        if kept < len(messages):
            log.warning("worker %s: %s hands over its newest %d of %d buffered messages (the "
                        "rest is over half of max_message_bytes)", self.worker.me.id,
                        channel.name, kept, len(messages))
            messages = messages[len(messages) - kept:]
        return frames.HandoffChannel(channel.name, channel.epoch, channel.seq,
                                     channel.expires_at, messages), cost

    def _ids_of(self, names, budget: int) -> list:
        """The remembered publish ids of ``names``, newest first, within ``budget`` bytes."""
        if not names:
            return []
        if self._outgoing_ids is None:
            owner, me = self.worker.ring.owner, self.worker.me.id
            index: dict = {}
            for publish_id, name, seq, epoch in self.worker.publish_ids.items():
                if owner(name) != me:
                    index.setdefault(name, []).append((publish_id, seq, epoch))
            self._outgoing_ids = index
        ids, used = [], 0
        for name in names:
            for publish_id, seq, epoch in self._outgoing_ids.get(name, ()):
                used += len(publish_id) + len(name) + _ID_OVERHEAD_BYTES
                if used > budget:
                    log.warning("worker %s: publish ids of %s left behind (over half of "
                                "max_message_bytes in one reply)", self.worker.me.id, name)
                    return ids
                ids.append((publish_id, name, seq, epoch))
        return ids
