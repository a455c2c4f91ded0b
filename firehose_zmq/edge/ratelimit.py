"""Per-client publish rates: a token bucket per client address, in a bounded table.

``PublishRates.allow(client, now)`` is False once a client has used its burst and
publishes faster than ``rate_per_s``; the edge then answers 429 (README, "Limits").
The table holds at most ``max_clients`` buckets: past that the least recently seen
is forgotten (it starts again with a full burst).
"""

from collections import OrderedDict


class PublishRates:
    """Token buckets of ``burst`` tokens refilled at ``rate_per_s``; 0 turns it off."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 65536):
        self.rate_per_s = rate_per_s
        self.burst = burst or max(1, int(rate_per_s))
        self.max_clients = max_clients
        self.refused = 0
        self._buckets: OrderedDict = OrderedDict()  # client -> [tokens, last refill]

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def allow(self, client: str, now: float) -> bool:
        """Take one token of ``client``'s bucket; False when it has none."""
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = [float(self.burst), now]
        else:
            self._buckets.move_to_end(client)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        if bucket[0] < 1.0:
            self.refused += 1
            return False
        bucket[0] -= 1.0
        return True
