"""Subscriptions at scale: no waiting poller misses a message after its worker returns.

An edge holds thousands of long-polls (one connection each); the worker that owns
them is SIGKILLed and restarted; one message is then published to each channel.
Every poller must get it within 2 s of the edge seeing the worker back (or of
the publish's acknowledgement, when the test's own publishing on a busy machine
took longer than that): none may wait for its long-poll timeout because a
subscription was lost on the way.
"""

import asyncio
import time

import pytest

from firehose_zmq.ring import Ring

from .cluster import Cluster
from .pollers import NativePublisher, Poller, async_context, channels_on

RETURN_BOUND_S = 2.0


async def _kill_and_return(cluster, channels, killed: str, backoff_s: float) -> dict:
    """Run the scenario; returns the delivery delays (seconds after the return) by channel."""
    loop = asyncio.get_running_loop()
    connecting = asyncio.Semaphore(64)
    pollers = [Poller(cluster.http_port, channel, backoff_s, connecting) for channel in channels]
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    context = async_context()
    # Straight to the owning workers (their ROUTERs take native requests too), so
    # that the edge's CPU goes to the pollers.
    ring = Ring(cluster.worker_ids)
    publishers = {w: NativePublisher(cluster.endpoints[w][0], context) for w in cluster.worker_ids}

    async def publish(data: bytes) -> dict:
        """{channel: monotonic time of its acknowledgement}"""
        by_owner = {w: [] for w in publishers}
        for p in pollers:
            by_owner[ring.owner(p.channel)].append((p.channel, data))
        acked = {}
        for replies in await asyncio.gather(*(publishers[w].publish_all(items)
                                               for w, items in by_owner.items())):
            acked.update({channel: at for channel, (_, at) in replies.items()})
        return acked

    async def all_get(timeout_s: float) -> None:
        waits = [asyncio.ensure_future(p.wait()) for p in pollers]
        _, pending = await asyncio.wait(waits, timeout=timeout_s)
        for wait in pending:
            wait.cancel()

    try:
        for p in pollers:
            p.want(1)
        started = time.monotonic()
        await publish(b"first")
        await all_get(60.0)
        print(f"\n{len(channels)} pollers connected and got their first message in "
              f"{time.monotonic() - started:.1f} s")
        behind = [(p.channel, p.errors, round(p.polled_at - time.monotonic(), 1) if p.polled_at else None) for p in pollers if p.last < 1]
        assert not behind, (f"{len(behind)} pollers did not get the first message "
                            f"(channel, errors, polled s ago): {behind[:5]}\nedge log:\n"
                            + "\n".join(cluster.edge.lines[-30:]))

        mark = len(cluster.edge.lines)
        cluster.kill_worker(killed)
        await loop.run_in_executor(None, cluster.edge.wait_for, f"worker {killed} down", 10.0,
                                   mark)
        await loop.run_in_executor(None, cluster.start_worker, killed)
        await loop.run_in_executor(None, cluster.edge.wait_for, f"worker {killed} up", 20.0, mark)
        returned = time.monotonic()

        for p in pollers:
            p.want(2)
        acked = await publish(b"second")
        published_s = time.monotonic() - returned
        # Bounded well past RETURN_BOUND_S so that a miss shows as a delay, not a hang.
        await all_get(RETURN_BOUND_S + 8.0)
        delays = {p.channel: (p.received[2][0] - max(returned, acked[p.channel])
                              if 2 in p.received else None) for p in pollers}
        got = [d for d in delays.values() if d is not None]
        last_delivery = max((p.received[2][0] for p in pollers if 2 in p.received),
                            default=returned)
        print(f"\n{len(channels)} pollers: all published {published_s:.2f} s after the return; "
              f"{len(got)} delivered, the last {last_delivery - returned:.2f} s after the "
              f"return; slowest {max(got, default=0):.2f} s after the return or the ack")
        return delays
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for publisher in publishers.values():
            publisher.close()
        context.term()


def _check(delays: dict) -> None:
    missed = [c for c, d in delays.items() if d is None]
    late = {c: round(d, 2) for c, d in delays.items() if d is not None and d > RETURN_BOUND_S}
    assert not missed, f"{len(missed)} of {len(delays)} pollers never got the message: {missed[:5]}"
    assert not late, f"{len(late)} pollers got it later than {RETURN_BOUND_S} s: " \
                     f"{list(late.items())[:5]}"


@pytest.mark.slow
def test_2400_waiting_pollers_of_one_worker_get_the_message_after_its_restart(tmp_path, run):
    """2,400 long-polls on one worker's channels: after a SIGKILL and restart of that
    worker, each gets the next message within 2 s of the worker's return."""
    channels = channels_on("w1", ("w1", "w2"), 2400)
    with Cluster(tmp_path, long_poll_timeout_s=60.0) as cluster:
        delays = run(_kill_and_return(cluster, channels, "w1", backoff_s=0.2), timeout_s=150)
    _check(delays)


@pytest.mark.slow
def test_chaos_10000_channels_on_one_edge_survive_a_worker_kill(tmp_path, run):
    """10,000 long-polls on one edge over both workers' channels; one worker is SIGKILLed
    and restarted: every poller gets the next message within 2 s of its return."""
    channels = (channels_on("w1", ("w1", "w2"), 5000, "/chaos")
                + channels_on("w2", ("w1", "w2"), 5000, "/chaos"))
    with Cluster(tmp_path, long_poll_timeout_s=60.0) as cluster:
        delays = run(_kill_and_return(cluster, channels, "w1", backoff_s=0.5), timeout_s=150)
    _check(delays)
