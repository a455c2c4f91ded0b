"""The Python clients and console scripts against a real cluster."""

import asyncio
import itertools
import json
import subprocess
import threading
import time

import pytest
import zmq

from firehose_zmq.client import (AsyncProducer, ClientError, Consumer, Gap, Message, Producer,
                                 PublishError, TransportError, ZmqSubscriber)

from .cluster import BIN, Cluster, free_port
from .http import async_request, request

_names = itertools.count()


def fresh(prefix="/client"):
    return f"{prefix}/{next(_names)}"




def test_producer_publishes_with_options_and_returns_the_sequence(cluster):
    """publish() returns 1, 2, ...; ttl, buffer size and persist reach the server."""
    channel = fresh()
    with Producer(cluster.url("")) as producer:
        assert producer.publish(channel, b"a", ttl_s=60, buffer_size=2) == 1
        assert producer.publish(channel, "b", persist=True) == 2
        assert producer.publish(channel, b"c", buffer_size=1) == 3
    body = request(cluster.url(channel + "?last_message_sequence=1")).body
    assert json.loads(body) == {"message": "c", "last_sequence": 3}  # 2 fell out of the buffer


def test_producer_raises_clear_errors(cluster):
    """Anything but 202 is a PublishError with the reason; an unreachable edge a TransportError."""
    with Producer(cluster.url("")) as producer:
        with pytest.raises(PublishError) as error:
            producer.publish(fresh(), b"x", buffer_size=10**6)
        assert error.value.status == 400 and "buffer" in error.value.reason.lower()
    with Producer(f"http://127.0.0.1:{free_port()}", timeout_s=2.0) as producer:
        with pytest.raises(TransportError):
            producer.publish("/x", b"x")


def test_consumer_resumes_by_sequence(cluster):
    """The long-poll consumer yields every message after ``since`` in order, then live ones."""
    channel = fresh()
    with Producer(cluster.url("")) as producer:
        for i in range(1, 4):
            producer.publish(channel, f"m{i}")
        consumer = Consumer(cluster.url(channel), since=1, poll_timeout_s=10)
        got = []
        for message in consumer:
            got.append((message.seq, message.data))
            if message.seq == 3:
                producer.publish(channel, "m4")
            if message.seq == 4:
                break
    assert got == [(2, "m2"), (3, "m3"), (4, "m4")]
    assert consumer.last_sequence == 4


def test_consumer_backs_off_then_gives_up_after_max_errors():
    """An unreachable edge is retried with back-off, and max_errors ends it with the error."""
    consumer = Consumer(f"http://127.0.0.1:{free_port()}/a", max_errors=3, poll_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(ClientError):
        list(consumer)
    assert time.monotonic() - started < 10


def test_async_producer_and_consumer(cluster, run):
    """The asyncio faces run the same programs."""
    channel = fresh()

    async def scenario():
        async with AsyncProducer(cluster.url("")) as producer:
            assert await producer.publish(channel, b"one") == 1
            got = []
            async for message in Consumer(cluster.url(channel), poll_timeout_s=10):
                got.append(message)
                if len(got) == 1:
                    await producer.publish(channel, b"two")
                else:
                    break
        return got

    assert [(m.seq, m.data) for m in run(scenario(), 30)] == [(1, "one"), (2, "two")]


def test_console_scripts_publish_and_consume(cluster):
    """firehose-publish prints sequences; firehose-consume --json prints frames."""
    channel = fresh()
    url = cluster.url(channel)
    published = subprocess.run([str(BIN / "firehose-publish"), url, "--lines", "--ttl", "60"],
                               input=b"first\nsecond\n", capture_output=True, timeout=30)
    assert published.returncode == 0, published.stderr
    assert published.stdout.split() == [b"1", b"2"]
    consumed = subprocess.run([str(BIN / "firehose-consume"), url, "--since", "0", "--count",
                               "1", "--json"], capture_output=True, timeout=30)
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout == b'{"message":"second","last_sequence":2}\n'
    refused = subprocess.run([str(BIN / "firehose-publish"), url, "x", "--buffer-size",
                              "999999"], capture_output=True, timeout=30)
    assert refused.returncode == 1 and b"HTTP 400" in refused.stderr


def test_zmq_subscriber_asyncio(cluster, run, ctx):
    """``async for`` over a ZmqSubscriber yields messages once, in order, as bytes."""
    channel = fresh()

    async def scenario():
        async with AsyncProducer(cluster.url("")) as producer:
            await producer.publish(channel, b"first")
            got = []
            async with ZmqSubscriber(cluster.native_pub, cluster.native_router, {channel: 0},
                                     idle_timeout_s=10, context=ctx) as sub:
                async for event in sub:
                    got.append(event)
                    if event.seq == 1:
                        for i in range(2, 6):
                            await producer.publish(channel, b"m%d" % i)
                    if event.seq == 5:
                        break
        return got

    got = run(scenario(), 30)
    assert [(e.seq, e.data) for e in got] == [(1, b"first")] + [(i, b"m%d" % i)
                                                               for i in range(2, 6)]
    assert all(isinstance(e, Message) and e.channel == channel for e in got)


def test_zmq_subscriber_reports_what_fell_out_of_the_buffer(cluster, ctx):
    """Resuming further back than the buffer yields a Gap, then the kept messages."""
    channel = fresh()
    with Producer(cluster.url("")) as producer:
        for i in range(1, 6):
            producer.publish(channel, b"m%d" % i, buffer_size=2)
    with ZmqSubscriber(cluster.native_pub, cluster.native_router, {channel: 1},
                       idle_timeout_s=2, context=ctx) as sub:
        events = list(itertools.islice(sub, 3))
    assert events[0] == Gap(channel, events[1].epoch, 2, 3)
    assert [(e.seq, e.data) for e in events[1:]] == [(4, b"m4"), (5, b"m5")]


# -- many channels, a slow subscriber -------------------------------------------

CHANNELS = 40
PER_CHANNEL = 75
PAYLOAD = b"x" * 4000


@pytest.fixture
def small_hwm_cluster(tmp_path):
    """A cluster whose native subscribe endpoint queues only 20 messages per subscriber."""
    with Cluster(tmp_path, extra_config="native_send_hwm = 20") as running:
        yield running


class Collector(threading.Thread):
    """Iterates a ZmqSubscriber in a thread; ``ready`` is set once it saw every hello."""

    def __init__(self, subscriber, channels, total, pause=None):
        super().__init__(daemon=True)
        self.subscriber = subscriber
        self.channels = channels
        self.total = total
        self.pause = pause
        self.ready = threading.Event()
        self.events: dict = {c: [] for c in channels}
        self.error = None

    def run(self):
        try:
            with self.subscriber as sub:
                count = 0
                for event in sub:
                    self.events[event.channel].append(event)
                    count += 1
                    if count == len(self.channels):
                        self.ready.set()
                        if self.pause is not None:
                            self.pause.wait(60)  # deliberately slow: let the HWM overflow
                    if count == self.total:
                        return
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_many_channels_exactly_once_in_order_while_a_slow_subscriber_catches_up(
        small_hwm_cluster, run):
    """Messages over HTTP reach a fast and a deliberately stalled ZmqSubscriber exactly once,
    in order per channel; the stalled one's HWM drops are found as gaps and filled."""
    cluster = small_hwm_cluster
    channels = [f"/load/{i}" for i in range(CHANNELS)]
    total = CHANNELS * (PER_CHANNEL + 1)
    with Producer(cluster.url("")) as producer:
        for channel in channels:
            producer.publish(channel, b"hello", buffer_size=PER_CHANNEL + 10)
    context = zmq.Context()
    pause = threading.Event()
    options = dict(idle_timeout_s=20, probe_interval_s=0.3, context=context)
    fast = Collector(ZmqSubscriber(cluster.native_pub, cluster.native_router,
                                   {c: 0 for c in channels}, **options), channels, total)
    slow = Collector(ZmqSubscriber(cluster.native_pub, cluster.native_router,
                                   {c: 0 for c in channels}, rcvhwm=10, **options),
                     channels, total, pause)
    try:
        for collector in (fast, slow):
            collector.start()
            assert collector.ready.wait(30), collector.error

        async def publish_all():
            async def one_channel(channel):
                for i in range(PER_CHANNEL):
                    r = await async_request(cluster.url(channel), "PUT", PAYLOAD,
                                            {"X-Firehose-Buffer-Size": str(PER_CHANNEL + 10)})
                    assert r.status == 202
            await asyncio.gather(*(one_channel(c) for c in channels))

        started = time.monotonic()
        run(publish_all(), 120)
        publish_s = time.monotonic() - started
        pause.set()
        for collector in (fast, slow):
            collector.join(60)
            assert not collector.is_alive() and collector.error is None, collector.error
    finally:
        pause.set()
        for collector in (fast, slow):
            collector.join(10)
        context.destroy(linger=0)
    for collector in (fast, slow):
        for channel in channels:
            events = collector.events[channel]
            assert all(isinstance(e, Message) for e in events), [e for e in events
                                                                 if isinstance(e, Gap)]
            assert [e.seq for e in events] == list(range(1, PER_CHANNEL + 2))
    slow_core = slow.subscriber.core
    assert slow_core.gaps_detected > 0 and slow_core.filled > 0
    print(f"\n{total} messages published in {publish_s:.1f} s; slow subscriber: "
          f"{slow_core.gaps_detected} gaps, {slow_core.filled} filled, "
          f"{slow_core.duplicates} duplicates; fast: {fast.subscriber.core.filled} filled")
