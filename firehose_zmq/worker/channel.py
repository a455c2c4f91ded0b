"""Channel state and the buffer rules of docs/protocol.md §5, free of sockets and clocks.

Theory of operation
-------------------
A worker holds one ``Channel`` per live channel name in a ``ChannelTable``. A
channel has a sequence ``seq`` (the number of the newest message, 0 before the
first), an ``epoch`` (which incarnation this is: a channel that expires or is
deleted and is then published to again starts over at sequence 1 with a larger
epoch), a buffer of the newest messages (always contiguous and ending at
``seq``), and an expiry time (``None`` for a persistent channel).

What a subscriber whose last sequence is ``c`` gets at once is decided by
``select_since``; its table is docs/protocol.md §5, row by row:

    =======================  =====================================
    case                     delivered at once (oldest first)
    =======================  =====================================
    nothing buffered         nothing: wait for the next publish
    c <= 0                   the newest message only
    c >= seq                 nothing: wait (caught up, or ahead)
    0 < seq - c <= len       every message with sequence > c
    seq - c > len            the newest message only (fell out)
    =======================  =====================================

Time is always passed in (``now``, seconds on the wall clock), so the table and
expiry are tested without waiting.
"""

from collections import deque
import heapq
import itertools
from typing import Callable, Optional


# A buffered message is a plain ``(seq, data)`` tuple. CPython stops tracking a tuple
# of atomic values in the garbage collector, while a NamedTuple stays tracked, and a
# worker buffers up to millions of messages: 5,000 channels x 100 messages made a
# full collection take 22 ms as NamedTuples and 5 ms as tuples.

# What a buffered message costs beyond its data: the tuple, the bytes object's
# header, the sequence int and the deque slot (CPython 3.11, rounded up).
MESSAGE_OVERHEAD_BYTES = 100


def message_cost(data: bytes) -> int:
    """The bytes one buffered message of ``data`` counts toward a worker's quota."""
    return len(data) + MESSAGE_OVERHEAD_BYTES


def select_since(seq: int, buffered, last_seq: int) -> list:
    """The messages a subscriber at ``last_seq`` gets at once (docs/protocol.md §5)."""
    length = len(buffered)
    if length == 0:
        return []
    if last_seq <= 0:
        return [buffered[-1]]
    if last_seq >= seq:
        return []
    behind = seq - last_seq
    if behind <= length:
        return list(itertools.islice(buffered, length - behind, length))
    return [buffered[-1]]


class Channel:
    """The sequence, buffer and expiry of one channel incarnation."""

    __slots__ = ("name", "epoch", "seq", "buffer", "last", "expires_at", "buffered_bytes")

    def __init__(self, name: str, epoch: int):
        self.name = name
        self.epoch = epoch
        self.seq = 0
        self.buffer: deque = deque()
        # The newest message even when the buffer keeps none (buffer size 0): the
        # worker re-sends it to a new subscriber to close the subscribe race.
        self.last: Optional[tuple] = None  # (seq, data)
        self.expires_at: Optional[float] = None
        self.buffered_bytes = 0  # message_cost of every buffered message

    def growth(self, data: bytes, buffer_size: int) -> int:
        """How many bytes ``publish(data, buffer_size)`` would add to ``buffered_bytes``."""
        freed = 0
        buffer = self.buffer
        drop = len(buffer) + 1 - buffer_size
        for i in range(min(max(drop, 0), len(buffer))):
            freed += message_cost(buffer[i][1])
        return (message_cost(data) if buffer_size > 0 else 0) - freed

    def publish(self, data: bytes, buffer_size: int, expires_at: Optional[float]) -> tuple:
        """Append a message, trim the buffer to ``buffer_size`` and set the expiry;
        returns the message, ``(seq, data)``."""
        self.seq += 1
        message = (self.seq, data)
        self.last = message
        buffer = self.buffer
        buffer.append(message)
        self.buffered_bytes += message_cost(data)
        while len(buffer) > buffer_size:
            self.buffered_bytes -= message_cost(buffer.popleft()[1])
        self.expires_at = expires_at
        return message

    def since(self, last_seq: int) -> list:
        """What a subscriber at ``last_seq`` gets at once."""
        return select_since(self.seq, self.buffer, last_seq)

    def after(self, seq: int) -> list:
        """Every buffered message with a sequence above ``seq`` (for filling gaps)."""
        return [m for m in self.buffer if m[0] > seq]

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class ChannelTable:
    """All channels of one worker, with TTL expiry that really frees them.

    ``new_epoch`` returns a number larger than any epoch handed out before (the
    worker uses nanoseconds of the wall clock), so subscribers can tell a newer
    incarnation of a channel from a stale message of an older one.
    """

    def __init__(self, new_epoch: Callable[[], int]):
        self.buffered_bytes = 0  # the sum over every channel in the table
        self._channels: dict = {}
        self._expiry_heap: list = []  # (expires_at, name); stale entries are skipped
        self._new_epoch = new_epoch

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, name: str, now: float) -> Optional[Channel]:
        """The live channel called ``name``, or None.

        An expired channel reads as None but stays in the table until ``expire``
        drops it (or a publish replaces it), so every channel that goes away is
        reported by ``expire`` or ``delete`` and storage can follow.
        """
        channel = self._channels.get(name)
        if channel is not None and channel.expired(now):
            return None
        return channel

    def channels(self):
        """Every channel in the table (live or expired but not yet dropped)."""
        return self._channels.values()

    def restore(self, name: str, epoch: int, seq: int, messages, expires_at: Optional[float],
                buffer_size: int) -> Channel:
        """Put back a channel as storage kept it; ``messages`` are ``(seq, data)``, oldest first.

        ``messages`` must be contiguous and end at ``seq`` (what ``publish`` keeps);
        raises ValueError otherwise, so a damaged store is noticed, not served.
        """
        buffered = [(s, d) for s, d in messages][-buffer_size:] if buffer_size else []
        for i, (message_seq, _) in enumerate(buffered):
            if message_seq != seq - len(buffered) + 1 + i:
                raise ValueError(f"stored messages of {name!r} are not contiguous up to {seq}")
        if seq < 0 or epoch <= 0:
            raise ValueError(f"stored channel {name!r} has seq {seq} and epoch {epoch}")
        channel = Channel(name, epoch)
        channel.seq = seq
        channel.buffer.extend(buffered)
        channel.buffered_bytes = sum(message_cost(d) for _, d in buffered)
        channel.last = buffered[-1] if buffered else None
        channel.expires_at = expires_at
        self._drop(name)
        self._channels[name] = channel
        self.buffered_bytes += channel.buffered_bytes
        if expires_at is not None:
            heapq.heappush(self._expiry_heap, (expires_at, name))
        return channel

    def publish(self, name: str, data: bytes, now: float, ttl_s: Optional[float],
                buffer_size: int) -> tuple:
        """Publish to ``name`` (creating it); ``ttl_s`` None means persistent.

        Returns ``(channel, message)``.
        """
        channel = self.get(name, now)
        if channel is None:
            self._drop(name)  # an expired incarnation not dropped yet
            channel = self._channels[name] = Channel(name, self._new_epoch())
        expires_at = None if ttl_s is None else now + ttl_s
        before = channel.buffered_bytes
        message = channel.publish(data, buffer_size, expires_at)
        self.buffered_bytes += channel.buffered_bytes - before
        if expires_at is not None:
            heapq.heappush(self._expiry_heap, (expires_at, name))
        return channel, message

    def apply_publish(self, name: str, epoch: int, seq: int, data: bytes, buffer_size: int,
                      expires_at: Optional[float]) -> bool:
        """Apply a publish its owner sequenced (a replica following it). False, changing
        nothing, unless it is the next message of the channel's incarnation or the first
        (sequence 1) of a new one."""
        channel = self._channels.get(name)
        if channel is None or channel.epoch != epoch:
            if seq != 1:
                return False
            self._drop(name)
            channel = self._channels[name] = Channel(name, epoch)
        elif channel.seq + 1 != seq:
            return False
        before = channel.buffered_bytes
        channel.publish(data, buffer_size, expires_at)
        self.buffered_bytes += channel.buffered_bytes - before
        if expires_at is not None:
            heapq.heappush(self._expiry_heap, (expires_at, name))
        return True

    def growth(self, name: str, data: bytes, now: float, buffer_size: int) -> tuple:
        """``(new_channel, bytes)``: whether publishing ``data`` to ``name`` would add
        a channel, and how many bytes it would add to ``buffered_bytes``."""
        channel = self.get(name, now)
        if channel is None:
            return True, (message_cost(data) if buffer_size > 0 else 0)
        return False, channel.growth(data, buffer_size)

    def delete(self, name: str) -> bool:
        """Forget ``name``; True when it existed."""
        return self._drop(name)

    def _drop(self, name: str) -> bool:
        channel = self._channels.pop(name, None)
        if channel is None:
            return False
        self.buffered_bytes -= channel.buffered_bytes
        return True

    def expire(self, now: float) -> list:
        """Drop every channel whose expiry has passed; returns their names."""
        heap = self._expiry_heap
        expired = []
        while heap and heap[0][0] <= now:
            _, name = heapq.heappop(heap)
            channel = self._channels.get(name)
            if channel is not None and channel.expired(now):
                self._drop(name)
                expired.append(name)
        # Each publish pushes an entry; keep stale ones from piling up.
        if len(heap) > 4 * len(self._channels) + 1024:
            self._expiry_heap = [
                (c.expires_at, c.name) for c in self._channels.values() if c.expires_at is not None
            ]
            heapq.heapify(self._expiry_heap)
        return expired


class PublishIds:
    """Recent publish ids and the sequence and epoch each got, to answer retries.

    Two plain dicts: ``add`` writes to the newer one, and ``rotate`` drops the older
    one and starts a new one once the newer is ``window_s`` old, so an id is
    remembered for at least ``window_s`` and at most twice that. A dict that only
    ever holds strings is never tracked by the garbage collector, so keys and values
    are strings. A hot worker keeps hundreds of thousands of ids; when they were
    tracked tuples, every full collection stopped the loop for up to 0.1 s.
    ``max_ids`` bounds the memory: when the newer dict holds half of it, ``add``
    rotates early, and ``forgotten_early`` counts the ids that went before their
    window was over. Ids added before ``kept_since`` are forgotten.
    """

    def __init__(self, window_s: float, max_ids: int, now: float):
        self.window_s = window_s
        self.max_ids = max_ids
        self.forgotten_early = 0
        self.kept_since = now
        self._reported_since = now
        self._newer: dict = {}
        self._older: dict = {}
        self._newer_since = now

    def __len__(self) -> int:
        return len(self._newer) + len(self._older)

    def get(self, publish_id) -> Optional[tuple]:
        """``(channel, seq, epoch)`` of an id seen before, or None."""
        value = self._newer.get(publish_id)
        if value is None:
            value = self._older.get(publish_id)
            if value is None:
                return None
        seq, epoch, channel = value.split(":", 2)
        return channel, int(seq), int(epoch)

    def add(self, publish_id, channel: str, seq: int, epoch: int, now: float) -> None:
        """Remember ``publish_id`` (str or bytes: both are atomic for the collector)."""
        if len(self._newer) >= self.max_ids // 2:
            if now - self._newer_since < self.window_s:
                self.forgotten_early += len(self._older)
            self._shift(now)
        self._newer[publish_id] = f"{seq}:{epoch}:{channel}"

    def items(self):
        """Every remembered id as ``(publish_id, channel, seq, epoch)``, newest half first."""
        for ids in (self._newer, self._older):
            for publish_id, value in ids.items():
                seq, epoch, channel = value.split(":", 2)
                yield publish_id, channel, int(seq), int(epoch)

    def rotate(self, now: float) -> Optional[float]:
        """Forget the older half once the newer is ``window_s`` old. Returns the new
        ``kept_since`` when ids were forgotten since the last call (here, or by the
        size bound in ``add``), else None."""
        if now - self._newer_since >= self.window_s:
            self._shift(now)
        if self.kept_since == self._reported_since:
            return None
        self._reported_since = self.kept_since
        return self.kept_since

    def take_forgotten_early(self) -> int:
        """How many ids went before their window since the last call."""
        count, self.forgotten_early = self.forgotten_early, 0
        return count

    def _shift(self, now: float) -> None:
        self._older, self._newer = self._newer, {}
        self.kept_since, self._newer_since = self._newer_since, now
