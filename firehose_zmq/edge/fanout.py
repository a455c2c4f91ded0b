"""The edge's subscribers, grouped per channel, fed from one SUB subscription each.

Theory of operation
-------------------
A ``Listener`` is one subscriber of one channel on this edge: a long-poll that
wants one message, or a stream (WebSocket, SSE) that wants every message in
order. The edge holds one ``Feed`` per channel that has listeners; a feed owns
the channel's SUB subscription, which outlives its last listener by
``linger_s`` so that lock-step re-polls do not churn subscriptions.

Subscribe, then fetch (DESIGN.md, hard part 1): a new listener first joins its
feed (subscribing when the feed is new), then asks the owning worker for what
it has missed. The fetch reply tells the channel's sequence ``S`` and epoch;
from then on the listener accepts a live message only if it is the next one
(``seq == floor + 1``) of that epoch, or the start of a newer epoch (the channel
expired or was deleted and started over). Live messages that arrive while a
fetch of one of the feed's listeners is in flight are kept in the feed's
``recent`` ring and replayed to the listener once it knows its floor (what
arrived before the fetch left is in its reply; with no fetch in flight the feed
keeps nothing). A message published while the subscription
was still on its way is re-sent by the worker when the subscription lands (its
last-value cache); any message whose sequence jumps past ``floor + 1`` makes the
listener fetch the gap from the worker. So nothing is lost, and duplicates are
dropped by sequence. A fetch for a channel that is gone answers sequence 0 and an
epoch above all of its past ones, so what ``recent`` still holds of an older
incarnation is stale.

The shortcut: once a message has arrived on a feed's subscription (it is
*synced*), the feed knows the newest sequence the worker published; a listener
whose last sequence is exactly that waits for the next live message without
asking the worker (the worker's answer would be "wait"). This is the re-poll of
every caught-up long-poll client, the hot path of a fan-out.

When the owner of a channel goes down (``worker_changed``), every listener of
its channels gets ``on_error(listener, OwnerDown)`` and is removed: a long-poll
answers 204 and its client re-polls from its sequence; a stream tells its
client to reconnect. New listeners fail at once while it is down; when it is
back, the SUB socket has re-sent its subscriptions by itself and clients resume
from their sequences.

Re-sync: the edge does not trust that its subscriptions reached a worker after
the SUB's link to it dropped (a restart, a network cut that left the request
link up). While the link is down, the worker's feeds are not *synced*; once it
is back and the worker answers (``stream_changed``), every feed of that worker
with listeners fetches what follows its listeners' lowest floor, at most
``RESYNC_IN_FLIGHT`` fetches at a time, and each listener gets what it missed,
in order (or fetches further itself after a gap or a new epoch). A message
published after that fetch is answered but before the re-sent subscription
lands reaches the edge through the worker's re-send of the newest message when
the subscription lands.

Each message is encoded for the JSON transports once (``Item.json``) and the
same bytes go to every listener.
"""

import asyncio
from collections import deque
import logging
import time

from ..metrics import LatencyHistogram
from ..wire import http
from .backend import BackendError, OwnerDown

log = logging.getLogger("firehose.fanout")

RECENT_SIZE = 64
SETUP_BATCH = 100  # subscriptions a multiplexed long-poll sets up per loop turn
RESYNC_IN_FLIGHT = 256  # re-sync fetches in flight at once, per edge


class Item:
    """One message as delivered to listeners; its JSON bodies are built once."""

    __slots__ = ("seq", "data", "_json", "_json_channel", "_encoded")

    def __init__(self, seq: int, data: bytes):
        self.seq = seq
        self.data = data
        self._json = None
        self._json_channel = None
        self._encoded = None

    def json(self) -> bytes:
        """``{"message":...,"last_sequence":N}``."""
        if self._json is None:
            self._json = http.message_json(self.data, self.seq)
        return self._json

    def json_with_channel(self, channel: str) -> bytes:
        """``{"channel":...,"message":...,"last_sequence":N}``."""
        cached = self._json_channel
        if cached is None or cached[0] != channel:
            cached = self._json_channel = (channel, http.message_json(self.data, self.seq,
                                                                          channel))
        return cached[1]

    def encoded(self, encoder) -> bytes:
        """``encoder(item)``, built once per item and encoder: every listener of a
        transport gets the same bytes."""
        if self._encoded is None:
            self._encoded = {}
        body = self._encoded.get(encoder)
        if body is None:
            body = self._encoded[encoder] = encoder(self)
        return body


class Listener:
    """A subscriber of one channel. ``on_items(listener, items)`` gets messages in order;
    ``on_error(listener, exc)`` a fetch that failed. ``once`` listeners end after one item.
    ``on_ready(listener)``, if given, is called exactly once, when the listener has
    first caught up: what it missed was delivered (or it was already caught up), or
    the fetch failed (after ``on_error``), or it was removed meanwhile. Streams use
    it to order their replies after a subscription's replay.
    """

    __slots__ = ("channel", "once", "on_items", "on_error", "on_ready", "floor", "epoch",
                 "fetching", "closed", "context")

    def __init__(self, channel: str, on_items, on_error, once: bool, context=None,
                 on_ready=None):
        self.channel = channel
        self.once = once
        self.on_items = on_items
        self.on_error = on_error
        self.on_ready = on_ready
        self.floor = 0
        self.epoch = 0
        self.fetching = False
        self.closed = False
        self.context = context


class Feed:
    """One channel's subscription on this edge.

    ``synced`` is true once a message of the channel has arrived on the
    subscription (the worker re-sends the newest one when it lands) and until the
    owner is lost; while synced, ``head_seq``/``head_epoch`` are the newest message
    the worker has published as far as this edge has heard.
    """

    __slots__ = ("channel", "listeners", "recent", "fetches", "idle_since", "synced",
                 "head_seq", "head_epoch")

    def __init__(self, channel: str):
        self.channel = channel
        self.listeners: set = set()
        self.recent: deque = deque(maxlen=RECENT_SIZE)
        self.fetches = 0  # listeners' fetches in flight: while any, ``recent`` keeps messages
        self.idle_since = 0.0
        self.synced = False
        self.head_seq = 0
        self.head_epoch = 0


class Fanout:
    """Listeners per channel on one edge, fed by the backend's messages."""

    def __init__(self, backend, linger_s: float):
        self._backend = backend
        self._linger_s = linger_s
        self._feeds: dict = {}
        self._sweeper = None
        self._resync_queue: deque = deque()  # channel names waiting for a re-sync fetch
        self._resync_in_flight = 0
        self.resyncs = 0  # re-sync fetches answered
        self.latency = LatencyHistogram()  # a live message's arrival to its last write here
        backend.stream_watchers.append(self.stream_changed)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    # -- listeners -------------------------------------------------------------

    def add(self, listener: Listener, last_seq: int) -> None:
        """Start delivering to ``listener`` what follows ``last_seq``."""
        feed = self._feeds.get(listener.channel)
        if feed is None:
            feed = self._feeds[listener.channel] = Feed(listener.channel)
            self._backend.subscribe(listener.channel)
        feed.listeners.add(listener)
        if feed.synced and last_seq == feed.head_seq:
            # Caught up with what the worker last published: the answer would be
            # "wait", and every later message will arrive on the subscription.
            listener.epoch = feed.head_epoch
            listener.floor = last_seq
            self._ready(listener)
            return
        self._fetch(listener, since=last_seq, after=False)

    def remove(self, listener: Listener) -> None:
        if listener.closed:
            return
        listener.closed = True
        feed = self._feeds.get(listener.channel)
        if feed is not None:
            feed.listeners.discard(listener)
            if not feed.listeners:
                feed.idle_since = time.monotonic()

    def _fetch(self, listener: Listener, since: int, after: bool) -> None:
        listener.fetching = True
        fields = {"since": since}
        if after:
            fields["after"] = True
        if listener.once:
            fields["limit"] = 1
        feed = self._feeds.get(listener.channel)
        if feed is not None:
            feed.fetches += 1
        future = self._backend.request(listener.channel, "fetch", **fields)
        future.add_done_callback(lambda f: self._fetched(listener, f, after, feed))

    def _fetched(self, listener: Listener, future, after: bool, feed) -> None:
        if feed is not None:
            feed.fetches -= 1
        try:
            self._apply_fetch(listener, future, after)
        finally:
            if feed is not None and not feed.fetches:
                feed.recent.clear()  # what it kept was for fetches no longer in flight
            if listener.closed or not listener.fetching:
                self._ready(listener)

    @staticmethod
    def _ready(listener: Listener) -> None:
        on_ready = listener.on_ready
        if on_ready is not None:
            listener.on_ready = None
            on_ready(listener)

    def _apply_fetch(self, listener: Listener, future, after: bool) -> None:
        if listener.closed:
            if not future.cancelled():
                future.exception()  # retrieved, so asyncio does not log it
            return
        exc = future.exception()
        if exc is not None:
            listener.fetching = False
            if not isinstance(exc, BackendError):
                log.error("fetch for %r failed", listener.channel, exc_info=exc)
            listener.on_error(listener, exc)
            return
        reply = future.result()
        epoch = reply["epoch"]
        if after and epoch != listener.epoch and reply["seq"] > 0:
            # The channel started over while we filled a gap: fill from its start.
            listener.epoch = epoch
            listener.floor = 0
            self._fetch(listener, since=0, after=True)
            return
        listener.fetching = False
        listener.epoch = epoch
        items = [Item(seq, data) for seq, data in reply["messages"]]
        listener.floor = items[-1].seq if items else reply["seq"]
        if items:
            self._deliver(listener, items)
        if listener.closed:
            return
        if listener.floor < reply["seq"]:
            # The reply stopped short (size limit): ask for the rest.
            self._fetch(listener, since=listener.floor, after=True)
            return
        feed = self._feeds.get(listener.channel)
        if feed is not None:
            for message in list(feed.recent):
                self._offer(listener, message)
                if listener.closed or listener.fetching:
                    break

    def _deliver(self, listener: Listener, items) -> None:
        if listener.once:
            if len(items) > 1:
                items = items[:1]
            self.remove(listener)
        listener.on_items(listener, items)

    def _offer(self, listener: Listener, message) -> None:
        """Give a live message to a listener that knows its floor."""
        if listener.fetching or listener.closed:
            return
        if message.epoch < listener.epoch:
            return
        if message.epoch > listener.epoch:
            listener.epoch = message.epoch
            listener.floor = 0
        if message.seq <= listener.floor:
            return
        if message.seq == listener.floor + 1:
            listener.floor = message.seq
            self._deliver(listener, [message.item])
        else:
            log.debug("gap on %r: have %d, got %d; fetching", listener.channel,
                      listener.floor, message.seq)
            self._fetch(listener, since=listener.floor, after=True)

    def listener_count(self, channel: str) -> int:
        """Listeners of ``channel`` on this edge (long-polls and streams)."""
        feed = self._feeds.get(channel)
        return len(feed.listeners) if feed is not None else 0

    def worker_changed(self, worker_id: str, up: bool) -> None:
        """The backend's verdict on a worker changed; see the module docstring.

        Only a loss matters here: while a worker is down every request for its
        channels fails at once, so no listener of them is left when it returns.
        """
        if up:
            return
        self.owner_lost(worker_id)
        owned = [feed for channel, feed in self._feeds.items()
                 if self._backend.owner(channel) == worker_id]
        for feed in owned:
            for listener in list(feed.listeners):
                if listener.closed:
                    continue
                self.remove(listener)
                listener.on_error(listener, OwnerDown(
                    f"worker {worker_id}, the owner of {listener.channel}, is unavailable"))

    def stream_changed(self, worker_id: str, ready: bool) -> None:
        """The SUB's link to ``worker_id`` dropped (not ``ready``), or is back and the
        worker answers (``ready``): see "Re-sync" in the module docstring."""
        if not ready:
            self.owner_lost(worker_id)
            return
        owner = self._backend.owner
        queued = [channel for channel, feed in self._feeds.items()
                  if feed.listeners and owner(channel) == worker_id]
        if queued:
            log.info("re-syncing %d channels of worker %s", len(queued), worker_id)
        self._resync_queue.extend(queued)
        self._resync_next()

    def _resync_next(self) -> None:
        queue = self._resync_queue
        while queue and self._resync_in_flight < RESYNC_IN_FLIGHT:
            channel = queue.popleft()
            feed = self._feeds.get(channel)
            if feed is None:
                continue
            floors = [listener.floor for listener in feed.listeners
                      if not (listener.fetching or listener.closed)]
            if not floors:
                continue  # every listener is fetching already (or gone)
            self._resync_in_flight += 1
            future = self._backend.request(channel, "fetch", since=min(floors), after=True)
            future.add_done_callback(lambda f, feed=feed: self._resynced(feed, f))

    def _resynced(self, feed: Feed, future) -> None:
        self._resync_in_flight -= 1
        try:
            exc = future.exception()
            if exc is not None:
                # The worker went down again: its listeners hear OwnerDown.
                if not isinstance(exc, BackendError):
                    log.error("re-sync fetch for %r failed", feed.channel, exc_info=exc)
                return
            self.resyncs += 1
            reply = future.result()
            epoch, seq = reply["epoch"], reply["seq"]
            messages = [LiveMessage(s, epoch, Item(s, data)) for s, data in reply["messages"]]
            for listener in list(feed.listeners):
                if listener.fetching or listener.closed:
                    continue
                if listener.epoch != epoch:
                    # Started over meanwhile: the listener's own fetch handles epochs.
                    self._fetch(listener, since=listener.floor, after=True)
                    continue
                for message in messages:
                    self._offer(listener, message)
                    if listener.closed or listener.fetching:
                        break
                if not (listener.closed or listener.fetching) and listener.floor < seq:
                    self._fetch(listener, since=listener.floor, after=True)
        finally:
            self._resync_next()

    # -- messages --------------------------------------------------------------

    def on_message(self, message) -> None:
        """A channel message from the backend (a ``protocol.PubMessage``)."""
        feed = self._feeds.get(message.channel)
        if feed is None:
            return
        started = time.monotonic()
        live = LiveMessage(message.seq, message.epoch, Item(message.seq, message.data))
        if feed.fetches:
            feed.recent.append(live)
        if message.epoch > feed.head_epoch or (message.epoch == feed.head_epoch
                                                and message.seq > feed.head_seq):
            feed.head_epoch, feed.head_seq = message.epoch, message.seq
        feed.synced = True
        for listener in list(feed.listeners):
            self._offer(listener, live)
        self.latency.observe(time.monotonic() - started)

    def ring_changed(self) -> None:
        """The ring changed: channels may now come from another worker, whose stream
        this edge has not heard them on. Stop trusting every feed and re-sync the
        ones with listeners (the fetch goes to the new owner)."""
        queued = []
        for channel, feed in self._feeds.items():
            feed.synced = False
            if feed.listeners:
                queued.append(channel)
        if queued:
            log.info("ring changed: re-syncing %d channels", len(queued))
        self._resync_queue.extend(queued)
        self._resync_next()

    def owner_lost(self, worker_id: str) -> None:
        """The subscriptions to ``worker_id`` may have missed messages: stop trusting them."""
        owner = self._backend.owner
        for feed in self._feeds.values():
            if owner(feed.channel) == worker_id:
                feed.synced = False

    def _sweep(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)
        now = time.monotonic()
        idle = [feed for feed in self._feeds.values()
                if not feed.listeners and now - feed.idle_since >= self._linger_s]
        for feed in idle:
            del self._feeds[feed.channel]
            self._backend.unsubscribe(feed.channel)


class LiveMessage:
    __slots__ = ("seq", "epoch", "item")

    def __init__(self, seq: int, epoch: int, item: Item):
        self.seq = seq
        self.epoch = epoch
        self.item = item


class Poll:
    """One long-poll over one or more channels: ends once, with the first message.

    ``on_done(result, exc)`` is called exactly once: ``result`` is
    ``(channel, item)``, or None on timeout or cancel; ``exc`` a BackendError.

    A poll is the hot path of every long-poll client, so it allocates little: its
    listeners call back through module functions (``_poll_items``,
    ``_poll_error``) with the poll as their ``context``, not through bound
    methods made per poll, and a poll over one channel subscribes at once.
    """

    __slots__ = ("on_done", "done", "slot", "_fanout", "_timeouts", "_listeners")

    def __init__(self, fanout: Fanout, timeouts: "Timeouts", subscriptions, on_done):
        self.on_done = on_done
        self.done = False
        self._fanout = fanout
        self._timeouts = timeouts
        timeouts.add(self)
        if len(subscriptions) == 1:
            sub = subscriptions[0]
            listener = Listener(sub.channel, _poll_items, _poll_error, True, self)
            self._listeners = (listener,)
            fanout.add(listener, sub.last_sequence)
            return
        self._listeners = [Listener(sub.channel, _poll_items, _poll_error, True, self)
                           for sub in subscriptions]
        self._add(list(zip(self._listeners, subscriptions)))

    def _add(self, pending: list) -> None:
        """Subscribe ``pending`` (listener, subscription) pairs, ``SETUP_BATCH`` per
        loop turn: a poll over many channels does not hold up other clients."""
        batch, rest = pending[:SETUP_BATCH], pending[SETUP_BATCH:]
        for listener, sub in batch:
            if self.done:
                return
            self._fanout.add(listener, sub.last_sequence)
        if rest and not self.done:
            asyncio.get_running_loop().call_soon(self._add, rest)

    def _on_error(self, listener, exc) -> None:
        # One channel's owner failing does not end a multiplexed poll while
        # another channel can still answer.
        self._fanout.remove(listener)
        if any(not other.closed for other in self._listeners):
            return
        # A wait cut short by an outage ends like a timeout: the client re-polls.
        self._end(None, None if isinstance(exc, OwnerDown) else exc)

    def _end(self, result, exc) -> None:
        if self.done:
            return
        self.done = True
        self._timeouts.discard(self)
        listeners, self._listeners = self._listeners, ()
        remove = self._fanout.remove
        for listener in listeners:
            remove(listener)
        # No cycle is left (poll -> listener -> poll): the poll is freed by
        # reference counting, not by the cyclic collector.
        on_done, self.on_done = self.on_done, None
        on_done(result, exc)

    def expire(self) -> None:
        """The long-poll timeout passed: end with no message."""
        self._end(None, None)

    cancel = expire


def _poll_items(listener: Listener, items) -> None:
    """A poll's listener got its message: the poll ends with it."""
    listener.context._end((listener.channel, items[0]), None)


def _poll_error(listener: Listener, exc) -> None:
    listener.context._on_error(listener, exc)


class Timeouts:
    """Long-polls grouped by the tenth of a second in which they time out.

    One timer sweeps the whole table every 100 ms, instead of one timer per poll.
    """

    _SLOT_S = 0.1

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._slots: dict = {}
        self._timer = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._SLOT_S, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def add(self, poll: Poll) -> None:
        slot = int((time.monotonic() + self.timeout_s) / self._SLOT_S)
        poll.slot = slot
        polls = self._slots.get(slot)
        if polls is None:
            polls = self._slots[slot] = set()
        polls.add(poll)

    def discard(self, poll: Poll) -> None:
        polls = self._slots.get(poll.slot)
        if polls is not None:
            polls.discard(poll)

    def pending(self) -> list:
        return [poll for polls in self._slots.values() for poll in polls]

    def _sweep(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._SLOT_S, self._sweep)
        now_slot = int(time.monotonic() / self._SLOT_S)
        for slot in [slot for slot in self._slots if slot <= now_slot]:
            for poll in list(self._slots.pop(slot)):
                try:
                    poll.expire()
                except Exception:
                    log.exception("ending a timed-out long-poll failed")
