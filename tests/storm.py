"""A publish storm with resuming long-poll subscribers, and the ledger that checks it.

``Storm`` runs publishers (HTTP PUTs over keep-alive connections, each to a
channel of its list in turn, on the edges in turn) and one long-poll subscriber
per channel and edge that resumes from its last sequence after every answer
(200, 204, 503 or a dropped connection). The ledger then holds, per channel,
every publish that got a 202 (sequence and body), every one that did not (its
body may or may not have been stored), and every delivery to every subscriber.
``check`` returns what is wrong: a 202'd message not delivered, or delivered
twice or out of order, a sequence given to two bodies, a gap.
"""

import asyncio
import json
import time

from .http import parse_response_head


class Http:
    """One keep-alive HTTP/1.1 connection (reopened after an error)."""

    def __init__(self, host: str, port: int, connecting=None):
        self.host, self.port = host, port
        self._reader = self._writer = None
        self._connecting = connecting  # a shared semaphore bounding connects at once

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple:
        if self._writer is None:
            if self._connecting is None:
                self._reader, self._writer = await asyncio.open_connection(self.host,
                                                                           self.port)
            else:
                async with self._connecting:
                    self._reader, self._writer = await asyncio.open_connection(self.host,
                                                                               self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if method == "PUT":
            head += f"Content-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status, headers = parse_response_head(head)
        data = await self._reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


class Storm:
    """Publishers and resuming subscribers over ``edges`` (``[(host, port)]``)."""

    def __init__(self, edges, channels, publishers: int = 6, pause_s: float = 0.002):
        self.edges = list(edges)
        self.channels = list(channels)
        self.publishers = publishers
        self.pause_s = pause_s
        self.acked: dict = {c: {} for c in self.channels}     # seq -> body (202)
        self.reused: list = []                                 # (channel, seq, body, body)
        self.maybe: dict = {c: set() for c in self.channels}   # bodies without a 202
        self.delivered: dict = {}  # (channel, edge index) -> [(seq, body)]
        self.statuses: dict = {}   # publish status -> count
        self.unavailable: list = []  # (monotonic time, channel) of each 503
        self.acked_at: dict = {c: [] for c in self.channels}  # monotonic times of 202s
        self._stopping = False
        self._tasks: list = []
        self._subscribers: dict = {}  # (channel, edge) -> last sequence

    async def prime(self) -> None:
        """Publish the first message of every channel; subscribers start after it."""
        host, port = self.edges[0]
        http = Http(host, port)
        for channel in self.channels:
            assert await self.publish(http, channel, f"{channel}|first".encode()) == 202
        await http.close()

    def start(self) -> None:
        for e in range(len(self.edges)):
            for channel in self.channels:
                self.delivered[(channel, e)] = []
                self._subscribers[(channel, e)] = max(self.acked[channel], default=0)
                self._tasks.append(asyncio.ensure_future(self._subscribe(channel, e)))
        for k in range(self.publishers):
            mine = self.channels[k::self.publishers]
            self._tasks.append(asyncio.ensure_future(self._publish_loop(k, mine)))

    async def publish(self, http: Http, channel: str, body: bytes) -> int:
        """One PUT; records it in the ledger; returns its status (0: no answer)."""
        try:
            status, headers, _ = await http.request("PUT", channel, body)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await http.close()
            status, headers = 0, {}
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 202:
            seq = int(headers["x-firehose-sequence"])
            other = self.acked[channel].get(seq)
            if other is not None:
                self.reused.append((channel, seq, other, body))
            self.acked[channel][seq] = body
            self.acked_at[channel].append(time.monotonic())
        else:
            self.maybe[channel].add(body)
            if status == 503:
                self.unavailable.append((time.monotonic(), channel))
        return status

    async def _publish_loop(self, k: int, channels) -> None:
        https = [Http(host, port) for host, port in self.edges]
        i = 0
        try:
            while not self._stopping:
                channel = channels[i % len(channels)]
                http = https[i % len(https)]
                status = await self.publish(http, channel, f"{channel}|{k}|{i}".encode())
                i += 1
                await asyncio.sleep(self.pause_s if status == 202 else 0.05)
        finally:
            for http in https:
                await http.close()

    async def _subscribe(self, channel: str, e: int) -> None:
        host, port = self.edges[e]
        http = Http(host, port)
        key = (channel, e)
        try:
            while True:
                try:
                    status, _, data = await http.request(
                        "GET", f"{channel}?last_message_sequence={self._subscribers[key]}")
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    await http.close()
                    await asyncio.sleep(0.05)
                    continue
                if status == 200:
                    message = json.loads(data)
                    seq = message["last_sequence"]
                    self.delivered[key].append((seq, message["message"].encode()))
                    self._subscribers[key] = seq
                elif status != 204:
                    await asyncio.sleep(0.05)
        finally:
            await http.close()

    async def stop_publishing(self) -> None:
        self._stopping = True
        await asyncio.sleep(0)

    async def finish(self, timeout_s: float = 20.0) -> None:
        """Stop publishing, publish a last message to every channel (until it gets a
        202) and wait until every subscriber has it; then stop the subscribers."""
        self._stopping = True
        host, port = self.edges[0]
        http = Http(host, port)
        deadline = time.monotonic() + timeout_s
        finals = {}
        for channel in self.channels:
            while True:
                assert time.monotonic() < deadline, f"no 202 for the last publish to {channel}"
                body = f"{channel}|final".encode()
                if await self.publish(http, channel, body) == 202:
                    finals[channel] = max(s for s, b in self.acked[channel].items() if b == body)
                    break
                await asyncio.sleep(0.05)
        await http.close()
        while True:
            behind = [key for key, last in self._subscribers.items() if last < finals[key[0]]]
            if not behind:
                break
            assert time.monotonic() < deadline, \
                f"{len(behind)} subscribers did not get the last message, e.g. {behind[:3]}"
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def check(self) -> list:
        """Every violation, as one line each (empty: all is well)."""
        problems = [f"{c}: sequence {s} given to {a!r} and {b!r}" for c, s, a, b in self.reused]
        for (channel, e), got in self.delivered.items():
            acked = self.acked[channel]
            seqs = [s for s, _ in got]
            first = seqs[0] if seqs else 0
            if seqs != list(range(first, first + len(seqs))) or first != 2:
                at = next((i for i, s in enumerate(seqs) if s != first + i), 0)
                problems.append(f"{channel} on edge {e}: delivered sequences are not 2..n in "
                                f"order: {seqs[max(0, at - 3):at + 3]} around index {at}")
                continue
            for seq, body in got:
                if seq in acked and acked[seq] != body:
                    problems.append(f"{channel} on edge {e}: sequence {seq} is {body!r}, the "
                                    f"202 said {acked[seq]!r}")
                elif seq not in acked and body not in self.maybe[channel]:
                    problems.append(f"{channel} on edge {e}: {body!r} at {seq} was never "
                                    "published")
            missing = sorted(set(acked) - set(seqs) - {1})
            if missing:
                problems.append(f"{channel} on edge {e}: 202'd sequences never delivered: "
                                f"{missing[:10]}")
        return problems

    def longest_gap_s(self, since: float = 0.0) -> tuple:
        """``(seconds, channel)``: the longest time a channel went without a 202 while
        it was being published to (the storm's own pace makes a floor of a few ms),
        counting from ``since`` (monotonic) on."""
        longest = (0.0, None)
        for channel, times in self.acked_at.items():
            for a, b in zip(times, times[1:]):
                if a >= since and b - a > longest[0]:
                    longest = (b - a, channel)
        return longest

    def report(self) -> str:
        gap, channel = self.longest_gap_s()
        return (f"202: {sum(len(a) for a in self.acked.values())}, statuses {self.statuses}, "
                f"deliveries {sum(len(d) for d in self.delivered.values())}, longest time "
                f"without a 202: {gap:.2f} s ({channel})")
