"""Counters in time buckets, reported as Firehose 1.4 did at ``/metrics@firehose``.

Each bucket covers ``bucket_s`` seconds of wall time; the newest ``keep`` buckets
are kept. A bucket reports ``{"time": <bucket start>, "global": {...},
"channels": {"/c": {...}}}``; ``global`` also has ``active_channels`` (channels
with any activity in the bucket) and ``connections`` (connections open at the
time of the report, or at the end of a closed bucket).
"""

import bisect
from collections import OrderedDict

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """Durations counted per bucket of ``bounds`` (upper bounds; the last count is above
    them all) and summed: one ``observe`` is a bisect and two additions. Read from
    another thread (the admin listener), a snapshot may be one observation apart."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds=LATENCY_BUCKETS_S):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    def cumulative(self) -> list:
        """``[(upper bound, count at or below it)]``, ``"+Inf"`` last (Prometheus' shape,
        and JSON's: it has no infinity)."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, "+Inf"), list(self.counts)):
            total += count
            out.append((bound, total))
        return out


class _Bucket:
    __slots__ = ("time", "global_counts", "channel_counts", "connections")

    def __init__(self, start: int):
        self.time = start
        self.global_counts: dict = {}
        self.channel_counts: dict = {}
        self.connections = 0

    def as_dict(self) -> dict:
        counts = dict(self.global_counts)
        counts["active_channels"] = len(self.channel_counts)
        counts["connections"] = self.connections
        return {"time": self.time, "global": counts,
                "channels": {name: dict(c) for name, c in self.channel_counts.items()}}


class TimeSeries:
    """Counts events per time bucket; ``now`` is always passed in."""

    def __init__(self, bucket_s: int = 5, keep: int = 60):
        if bucket_s < 1 or keep < 1:
            raise ValueError("bucket_s and keep must be at least 1")
        self._bucket_s = bucket_s
        self._keep = keep
        self._buckets: OrderedDict = OrderedDict()
        self.connections = 0

    def _current(self, now: float) -> _Bucket:
        start = int(now) - int(now) % self._bucket_s
        bucket = self._buckets.get(start)
        if bucket is None:
            bucket = self._buckets[start] = _Bucket(start)
            while len(self._buckets) > self._keep:
                self._buckets.popitem(last=False)
        bucket.connections = self.connections
        return bucket

    def incr(self, now: float, name: str, channel=None, by: int = 1) -> None:
        bucket = self._current(now)
        bucket.global_counts[name] = bucket.global_counts.get(name, 0) + by
        if channel is not None:
            counts = bucket.channel_counts.get(channel)
            if counts is None:
                counts = bucket.channel_counts[channel] = {}
            counts[name] = counts.get(name, 0) + by

    def connection_opened(self, now: float) -> None:
        self.connections += 1
        self.incr(now, "connections_opened")

    def connection_closed(self, now: float) -> None:
        self.connections -= 1
        self.incr(now, "connections_closed")

    def global_counts(self, now: float) -> list:
        """``[(bucket start, {name: count})]`` of every kept bucket, oldest first; the
        last is the current one (still counting)."""
        self._current(now)
        return [(bucket.time, dict(bucket.global_counts)) for bucket in self._buckets.values()]

    @property
    def bucket_s(self) -> int:
        return self._bucket_s

    @property
    def kept_s(self) -> int:
        """Seconds of history kept: a reader must look at least this often to see every bucket."""
        return self._bucket_s * self._keep

    def report(self, now: float) -> list:
        """Every kept bucket, oldest first."""
        self._current(now)
        return [bucket.as_dict() for bucket in self._buckets.values()]
