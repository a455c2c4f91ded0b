"""Many subscribers, many publishers, and the subscribe-then-fetch race, on real processes."""

import asyncio
import itertools
import json
import socket
import time
from urllib.parse import quote

from .http import async_request, request

_names = itertools.count()


def fresh():
    return f"/fan/{next(_names)}"


async def publish(cluster, channel, body: bytes):
    r = await async_request(cluster.url(channel), "PUT", body)
    assert r.status == 202, r
    return int(r.header("X-Firehose-Sequence"))


async def wait_for_subscribed(cluster, channel, count, timeout_s=10.0):
    """Until the edge has counted ``count`` subscriptions on ``channel``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        report = json.loads((await async_request(cluster.url("/metrics@firehose"))).body)
        if sum(b["channels"].get(channel, {}).get("subscribed", 0) for b in report) >= count:
            return
        await asyncio.sleep(0.02)  # polling a counter, bounded by the deadline
    raise AssertionError(f"{channel} never had {count} subscribers")


def test_one_publish_reaches_100_waiting_long_polls(cluster, run):
    """100 concurrent long-polls on one channel all receive the one publish."""
    channel = fresh()

    async def scenario():
        await publish(cluster, channel, b"first")
        polls = [asyncio.ensure_future(async_request(cluster.url(f"{channel}?last_message_sequence=1")))
                 for _ in range(100)]
        await wait_for_subscribed(cluster, channel, 100)
        await publish(cluster, channel, b"second")
        return await asyncio.gather(*polls)

    responses = run(scenario())
    assert [r.status for r in responses] == [200] * 100
    assert {r.body for r in responses} == {b'{"message":"second","last_sequence":2}'}


def test_concurrent_publishers_get_distinct_contiguous_sequences(cluster, run):
    """10 publishers x 30 messages on one channel get sequences 1..300, each once."""
    channel = fresh()

    async def publisher(n):
        return [await publish(cluster, channel, f"{n}-{i}".encode()) for i in range(30)]

    async def scenario():
        return await asyncio.gather(*(publisher(n) for n in range(10)))

    per_publisher = run(scenario())
    assert sorted(itertools.chain.from_iterable(per_publisher)) == list(range(1, 301))
    assert all(seqs == sorted(seqs) for seqs in per_publisher)


def test_publish_during_subscription_setup_is_never_lost(cluster, run):
    """A publish racing a new long-poll's subscription is delivered, 300 times over.

    Each round uses a new channel, so the edge must subscribe, fetch and catch the
    publish that races both. A lost message would show as a 204 after 3 s.
    """
    async def round_(channel):
        await publish(cluster, channel, b"before")
        poll = asyncio.ensure_future(async_request(cluster.url(f"{channel}?last_message_sequence=1")))
        await publish(cluster, channel, b"racing")
        return await poll

    async def scenario():
        results = []
        for batch in range(6):
            results += await asyncio.gather(*(round_(fresh()) for _ in range(50)))
        return results

    results = run(scenario(), timeout_s=120)
    assert [(r.status, r.body) for r in results] == \
        [(200, b'{"message":"racing","last_sequence":2}')] * 300


def test_following_subscribers_see_every_message_in_order(cluster, run):
    """Subscribers that re-poll with their sequence see every message published after theirs."""
    channel = fresh()
    count = 60

    async def follower():
        seen, last = [], 1
        while last < count:
            r = await async_request(cluster.url(f"{channel}?last_message_sequence={last}"))
            if r.status == 204:
                continue
            message = json.loads(r.body)
            seen.append(message["last_sequence"])
            last = message["last_sequence"]
        return seen

    async def scenario():
        await publish(cluster, channel, b"1")  # followers start after sequence 1
        followers = [asyncio.ensure_future(follower()) for _ in range(20)]
        for i in range(2, count + 1):
            await publish(cluster, channel, str(i).encode())
        return await asyncio.gather(*followers)

    for seen in run(scenario(), timeout_s=120):
        assert seen == list(range(2, count + 1))


def subscribers_here(cluster, channel: str) -> int:
    """The edge's listeners of ``channel`` (its admin listener's ``/channel``)."""
    answer = request(cluster.admin_url(f"/channel?name={quote(channel, safe='')}"))
    assert answer.status == 200, answer
    return json.loads(answer.body)["subscribers_here"]


def wait_for_subscribers(cluster, channel: str, count: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while subscribers_here(cluster, channel) != count:
        assert time.monotonic() < deadline, f"{channel} never had {count} listeners here"


def test_client_that_disconnects_is_forgotten(cluster):
    """A long-poll whose client goes away leaves no listener on the edge, at once."""
    channel = fresh()
    assert request(cluster.url(channel), "PUT", b"1").status == 202
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as sock:
        sock.sendall(f"GET {channel}?last_message_sequence=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        wait_for_subscribers(cluster, channel, 1)
    wait_for_subscribers(cluster, channel, 0, timeout_s=2.0)
    assert request(cluster.url(channel), "PUT", b"2").status == 202
    answer = request(cluster.url(f"{channel}?last_message_sequence=1"))
    assert answer.body == b'{"message":"2","last_sequence":2}'


def test_deleted_or_expired_channel_is_not_served_from_the_edge(cluster, run):
    """After DELETE (or expiry) the edge's recent messages of the old channel are not delivered."""
    deleted, expired = fresh(), fresh()

    async def scenario():
        for channel, headers in ((deleted, {}), (expired, {"Cache-Control": "max-age=1"})):
            assert (await async_request(cluster.url(channel), "PUT", b"m1", headers)).status == 202
            keep = asyncio.ensure_future(
                async_request(cluster.url(f"{channel}?last_message_sequence=1")))
            await wait_for_subscribed(cluster, channel, 1)
            assert (await async_request(cluster.url(channel), "PUT", b"m2", headers)).status == 202
            assert (await keep).status == 200  # the edge now holds m1 and m2 for the channel
        assert (await async_request(cluster.url(deleted), "DELETE")).status == 204
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: request(cluster.url(expired), "HEAD"))
        gone_by = loop.time() + 1.5
        while loop.time() < gone_by:  # bounded wait for the 1 s TTL to pass
            await asyncio.sleep(0.1)
        return await asyncio.gather(*(
            async_request(cluster.url(path)) for path in (
                f"{deleted}?last_message_sequence=1", deleted,
                f"{expired}?last_message_sequence=1", expired)))

    assert [r.status for r in run(scenario())] == [204, 204, 204, 204]
