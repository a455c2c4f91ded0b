"""Consistent hashing of channel names over the cluster's worker ids.

Every edge and every worker builds the same ``Ring`` from the same worker list and
so computes the same owner for a channel. Each worker id is placed on a 64-bit
circle at ``vnodes`` points; a channel belongs to the first point at or after its
own hash. The hash is BLAKE2b (never Python's ``hash()``, which differs per
process), so assignments are stable across processes, hosts and releases.
Adding one worker to W moves about 1/(W+1) of the channels, all of them to it.

With replicas, ``preference`` lists a channel's owner and then the next distinct
workers clockwise: its replicas, the first of which (its *standby*) takes over
when the owner is down.

While channels move from one ring to the next, both are known: ``source`` tells
a worker which channels it must first take from their previous owner.
"""

import bisect
import hashlib
from typing import Optional

DEFAULT_VNODES = 160
MAX_REMEMBERED = 65536  # owners of the channels seen lately; the memo is emptied when full


def stable_hash64(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and on every host."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """Maps a channel name to the id of the worker that owns it."""

    def __init__(self, worker_ids, vnodes: int = DEFAULT_VNODES):
        ids = list(worker_ids)
        if not ids:
            raise ValueError("a ring needs at least one worker id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate worker ids in {ids!r}")
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        points = sorted(
            (stable_hash64(f"{worker_id}#{i}".encode()), worker_id)
            for worker_id in ids
            for i in range(vnodes)
        )
        self._hashes = [point for point, _ in points]
        self._owners = [worker_id for _, worker_id in points]
        self.worker_ids = tuple(sorted(ids))
        identity = "\n".join(self.worker_ids) + f"\nvnodes={vnodes}"
        self.version = hashlib.blake2b(identity.encode(), digest_size=4).hexdigest()
        self._remembered: dict = {}  # channel -> owner: every request asks, a hash is dear
        self._preferences: dict = {}  # (channel, count) -> preference list

    def owner(self, channel: str) -> str:
        """The worker id that owns ``channel``."""
        owner = self._remembered.get(channel)
        if owner is None:
            point = stable_hash64(channel.encode("utf-8", "surrogateescape"))
            i = bisect.bisect_left(self._hashes, point)
            owner = self._owners[i if i < len(self._hashes) else 0]
            if len(self._remembered) >= MAX_REMEMBERED:
                self._remembered.clear()
            self._remembered[channel] = owner
        return owner

    def preference(self, channel: str, count: int) -> tuple:
        """The first ``count`` distinct workers from ``channel``'s point clockwise: its
        owner, then its replicas in order (fewer when the ring has fewer workers)."""
        key = (channel, count)
        found = self._preferences.get(key)
        if found is None:
            point = stable_hash64(channel.encode("utf-8", "surrogateescape"))
            start = bisect.bisect_left(self._hashes, point)
            owners, size = self._owners, len(self._owners)
            chosen = []
            for k in range(size):
                worker_id = owners[(start + k) % size]
                if worker_id not in chosen:
                    chosen.append(worker_id)
                    if len(chosen) == count:
                        break
            found = tuple(chosen)
            if len(self._preferences) >= MAX_REMEMBERED:
                self._preferences.clear()
            self._preferences[key] = found
        return found

    def standby(self, channel: str) -> Optional[str]:
        """``channel``'s first replica (None in a ring of one worker)."""
        preference = self.preference(channel, 2)
        return preference[1] if len(preference) > 1 else None


def source(current: Ring, previous: Optional[Ring], channel: str) -> Optional[str]:
    """The worker ``channel`` must be taken from before its owner in ``current`` may
    serve it: its owner in ``previous`` when that is another worker, else None."""
    if previous is None:
        return None
    before = previous.owner(channel)
    return None if before == current.owner(channel) else before
