"""Chaos: faults injected into a running cluster under load (issue 6, part 6).

Every test is bounded in time and checks the promise that matters: each
message that got a 202 reaches a subscriber that resumes by sequence, exactly
once and in order, and no sequence number ever carries two messages. Outage
times seen by clients are printed (``pytest -s``) for the README's figures.
"""

import asyncio
import itertools
import json
import signal
import time

from tornado.httpclient import HTTPClientError

from .cluster import Cluster, channel_on
from .http import async_request, request

BUFFER = {"X-Firehose-Buffer-Size": "2000"}


class Ledger:
    """What publishers were told and what subscribers got, per channel."""

    def __init__(self, channels):
        self.acked = {c: {} for c in channels}       # seq -> body, from 202s
        self.refused = set()                          # bodies that got a 503
        self.delivered = {c: [] for c in channels}   # [(seq, body)] in arrival order
        self.ack_times = {c: [] for c in channels}   # monotonic time of each 202

    def ack(self, channel, seq, body):
        previous = self.acked[channel].setdefault(seq, body)
        assert previous == body, f"{channel} seq {seq} acknowledged for {previous!r} and {body!r}"
        self.ack_times[channel].append(time.monotonic())

    def refuse(self, body):
        self.refused.add(body)

    def longest_pause(self, channels) -> float:
        """The longest time without a 202 on any of ``channels`` (an outage's length)."""
        times = sorted(t for c in channels for t in self.ack_times[c])
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def check(self, first_seq):
        """Every acknowledged message delivered once, in order, with its own sequence."""
        for channel, acked in self.acked.items():
            got = self.delivered[channel]
            seqs = [seq for seq, _ in got]
            assert seqs == list(range(first_seq, first_seq + len(seqs))), \
                f"{channel}: delivered sequences are not consecutive from {first_seq}: {seqs}"
            by_seq = dict(got)
            for seq, body in acked.items():
                assert by_seq.get(seq) == body, \
                    f"{channel}: acknowledged seq {seq} {body!r} delivered as {by_seq.get(seq)!r}"
            for seq, body in got:
                if seq not in acked:
                    # Stored without a 202 (its reply was lost): never a refused body
                    # reused under another message's number.
                    assert body not in {b for b in acked.values()}, f"{channel}: {body!r} twice"


async def subscribe(urls, channel, ledger, last, done, poll_timeout_s=30.0):
    """Long-poll ``channel`` from ``last`` until ``done()``; on an error move to the next
    URL (another edge) and resume from the last sequence seen."""
    url_index = 0
    while not done(channel, last):
        base = urls[url_index % len(urls)]
        try:
            r = await async_request(f"{base}{channel}?last_message_sequence={last}",
                                    timeout_s=poll_timeout_s)
        except (OSError, HTTPClientError, asyncio.TimeoutError):
            url_index += 1
            await asyncio.sleep(0.05)  # a client's reconnect back-off
            continue
        if r.status == 200:
            message = json.loads(r.body)
            ledger.delivered[channel].append((message["last_sequence"],
                                              message["message"].encode()))
            last = message["last_sequence"]
        elif r.status != 204:
            await asyncio.sleep(0.05)  # 503: the owner is away; retry shortly


async def publish_loop(url_of, channels, ledger, name, stop):
    for n in itertools.count():
        if stop.is_set():
            return
        channel = channels[n % len(channels)]
        body = f"{name}-{n}".encode()
        try:
            r = await async_request(url_of(channel), "PUT", body, BUFFER, timeout_s=10.0)
        except (OSError, HTTPClientError, asyncio.TimeoutError):
            ledger.refuse(body)
            await asyncio.sleep(0.05)
            continue
        if r.status == 202:
            ledger.ack(channel, int(r.header("X-Firehose-Sequence")), body)
        else:
            assert r.status == 503, (r.status, r.body)
            ledger.refuse(body)
            await asyncio.sleep(0.02)


async def until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        await asyncio.sleep(0.05)


def test_publish_storm_survives_two_worker_kills(tmp_path, run):
    """100 channels under publish load while w1 is SIGKILLed and restarted twice: every
    202'd message is delivered once, in order, to subscribers that resume by sequence."""
    with Cluster(tmp_path, long_poll_timeout_s=5.0) as cluster:
        channels = [f"/storm/{i}" for i in range(100)]
        ledger = Ledger(channels)
        for channel in channels:
            assert request(cluster.url(channel), "PUT", b"start", BUFFER).status == 202
        on_w1 = [c for c in channels if cluster_owner(cluster, c) == "w1"]
        assert 20 < len(on_w1) < 80

        async def scenario():
            stop = asyncio.Event()
            final = {}
            subscribers = [asyncio.ensure_future(subscribe(
                [cluster.url("")], c, ledger, 1,
                lambda ch, last: ch in final and last >= final[ch])) for c in channels]
            publishers = [asyncio.ensure_future(publish_loop(
                cluster.url, channels, ledger, f"p{i}", stop)) for i in range(8)]
            total = lambda: sum(len(a) for a in ledger.acked.values())  # noqa: E731
            for round_ in range(2):
                await until(lambda: total() >= 300 * (round_ + 1), 60, "300 more publishes")
                mark = len(cluster.edge.lines)
                await asyncio.to_thread(cluster.kill_worker, "w1")
                await asyncio.to_thread(cluster.start_worker, "w1")
                await asyncio.to_thread(cluster.edge.wait_for, "worker w1 up", 10.0, mark)
            await until(lambda: total() >= 900, 60, "300 publishes after the last restart")
            stop.set()
            await asyncio.gather(*publishers)
            for channel, acked in ledger.acked.items():
                final[channel] = max(acked, default=1)
            await asyncio.wait_for(asyncio.gather(*subscribers), 60)

        run(scenario(), timeout_s=150)
        ledger.check(first_seq=2)
        acked = sum(len(a) for a in ledger.acked.values())
        pause_w1 = ledger.longest_pause(on_w1)
        pause_w2 = ledger.longest_pause([c for c in channels if c not in on_w1])
        print(f"\nCHAOS storm: {acked} acknowledged, {len(ledger.refused)} refused (503); "
              f"longest pause without a 202: w1 {pause_w1:.2f} s (killed twice), "
              f"w2 {pause_w2:.2f} s")
        assert acked >= 900
        assert pause_w1 < 5.0


def cluster_owner(cluster, channel):
    from firehose_zmq.ring import Ring
    return Ring(cluster.worker_ids).owner(channel)


def test_subscribers_move_to_a_second_edge_when_one_is_killed(tmp_path, run):
    """Subscribers of a SIGKILLed edge reconnect to another edge and miss nothing."""
    with Cluster(tmp_path, long_poll_timeout_s=5.0) as cluster:
        _, second_port = cluster.start_edge()
        first, second = cluster.url(""), cluster.url("", second_port)
        channels = [f"/edge/{i}" for i in range(20)]
        per_channel = 50  # 1,000 subscribers
        ledgers = [Ledger(channels) for _ in range(per_channel)]
        for channel in channels:
            assert request(cluster.url(channel), "PUT", b"start", BUFFER).status == 202

        async def scenario():
            stop = asyncio.Event()
            final = {}
            subscribers = [asyncio.ensure_future(subscribe(
                [first, second], c, ledger, 1,
                lambda ch, last: ch in final and last >= final[ch]))
                for ledger in ledgers for c in channels]
            publisher_ledger = ledgers[0]
            await until(lambda: cluster.edge.popen.poll() is None, 1, "edge running")
            publishers = [asyncio.ensure_future(publish_loop(
                lambda c: cluster.url(c, second_port), channels, publisher_ledger, f"p{i}", stop))
                for i in range(2)]
            total = lambda: sum(len(a) for a in publisher_ledger.acked.values())  # noqa: E731
            await until(lambda: total() >= 100, 60, "100 publishes")
            killed_at = time.monotonic()
            cluster.edge.signal(signal.SIGKILL)
            await until(lambda: total() >= 250, 60, "150 more publishes")
            stop.set()
            await asyncio.gather(*publishers)
            for channel, acked in publisher_ledger.acked.items():
                final[channel] = max(acked, default=1)
            await asyncio.wait_for(asyncio.gather(*subscribers), 60)
            return time.monotonic() - killed_at

        elapsed = run(scenario(), timeout_s=150)
        for ledger in ledgers[1:]:
            ledger.acked = ledgers[0].acked
        for ledger in ledgers:
            ledger.check(first_seq=2)
        print(f"\nCHAOS edge kill: {len(ledgers) * len(channels)} subscribers moved edges; "
              f"all caught up {elapsed:.1f} s after the kill")


def test_a_hung_worker_is_detected_and_recovered(tmp_path):
    """A worker SIGSTOPped for 5 s: declared down within 2 s (waiters 204, publishes 503,
    late publishes refused by it afterwards), back within 2 s of SIGCONT, nothing lost."""
    with Cluster(tmp_path, long_poll_timeout_s=15.0) as cluster:
        channel = channel_on("w1", cluster.worker_ids, "/hung")
        assert request(cluster.url(channel), "PUT", b"one").status == 202
        results = {}

        async def during_stop():
            waiter = asyncio.ensure_future(async_request(
                cluster.url(f"{channel}?last_message_sequence=1"), timeout_s=20))
            await until(lambda: subscribed(cluster) >= 1, 5, "the waiter subscribed")
            mark = len(cluster.edge.lines)
            stopped_at = time.monotonic()
            cluster.workers["w1"].signal(signal.SIGSTOP)
            try:
                unread = asyncio.ensure_future(async_request(cluster.url(channel), "PUT", b"unread",
                                                             timeout_s=10))
                r = await waiter
                results["waiter"] = (r.status, time.monotonic() - stopped_at)
                await asyncio.to_thread(cluster.edge.wait_for, "worker w1 down", 5.0, mark)
                results["detected_s"] = time.monotonic() - stopped_at
                started = time.monotonic()
                r = await async_request(cluster.url(channel), "PUT", b"refused")
                results["fast_503"] = (r.status, time.monotonic() - started)
                results["head"] = (await async_request(cluster.url(channel), "HEAD")).status
                results["unread"] = (await unread).status
                # The fault being injected: the process stays stopped for 5 s in all.
                await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - stopped_at)))
            finally:
                cluster.workers["w1"].signal(signal.SIGCONT)
            resumed_at = time.monotonic()
            await asyncio.to_thread(cluster.edge.wait_for, "worker w1 up", 5.0, mark)
            results["recovered_s"] = time.monotonic() - resumed_at

        asyncio.run(bounded(during_stop(), 40))
        assert results["waiter"][0] == 204 and results["waiter"][1] < 2.5
        assert results["detected_s"] < 2.5
        assert results["fast_503"][0] == 503 and results["fast_503"][1] < 0.5
        assert results["head"] == 503
        assert results["unread"] == 503
        assert results["recovered_s"] < 2.0
        r = request(cluster.url(channel), "PUT", b"two")
        assert (r.status, r.header("X-Firehose-Sequence")) == (202, "2")  # nothing late slipped in
        assert json.loads(request(cluster.url(f"{channel}?last_message_sequence=1")).body) == \
            {"message": "two", "last_sequence": 2}
        print(f"\nCHAOS SIGSTOP: waiter answered after {results['waiter'][1]:.2f} s, down after "
              f"{results['detected_s']:.2f} s, up {results['recovered_s']:.2f} s after SIGCONT")


async def bounded(coro, timeout_s):
    from .http import reset_async_client
    try:
        return await asyncio.wait_for(coro, timeout_s)
    finally:
        reset_async_client()


def subscribed(cluster):
    report = json.loads(request(cluster.url("/metrics@firehose")).body)
    return sum(b["global"].get("subscribed", 0) for b in report)
