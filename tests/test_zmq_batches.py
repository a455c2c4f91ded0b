"""Batched requests and replies on the edge <-> worker ZeroMQ link, on real processes.

A body that is a msgpack array carries several requests; the worker serves each on
its own and answers a peer that batches with arrays of replies, and a peer that
never batches with one map per message (wire/frames.py, "Batches").
"""

import asyncio
import collections
import json
import time

import msgpack
import zmq

from firehose_zmq.wire import frames

from .cluster import channel_on
from .http import request
from .storm import Http

REPLY_WAIT_S = 30.0


def dealer_to(ctx, cluster, worker_id: str, routing_id=None):
    """A DEALER connected to ``worker_id``'s ROUTER, as an edge's or a native client's."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(cluster.endpoints[worker_id][0])
    return sock


def publish(request_id, channel: str, data: bytes) -> bytes:
    return frames.encode_request({"id": request_id, "op": "publish", "channel": channel,
                                  "data": data})


def receive(sock, replies: int, timeout_s: float = REPLY_WAIT_S) -> list:
    """Messages until they hold ``replies`` replies in all: ``[(batched, [reply])]``,
    each reply unpacked with msgpack itself; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    messages, count = [], 0
    while count < replies:
        remaining_ms = int(1000 * (deadline - time.monotonic()))
        assert remaining_ms > 0 and sock.poll(remaining_ms), \
            f"{count} of {replies} replies within {timeout_s} s"
        parts = sock.recv_multipart()
        assert len(parts) == 1, parts
        body = msgpack.unpackb(parts[0], raw=False)
        batched = isinstance(body, list)
        items = body if batched else [body]
        assert all(isinstance(item, dict) for item in items), body
        messages.append((batched, items))
        count += len(items)
    assert count == replies, f"{count} replies, {replies} expected"
    return messages


def worker_totals(cluster, worker_id: str) -> dict:
    response = request(cluster.admin_url("/status.json", worker_id))
    assert response.status == 200
    return json.loads(response.body)["totals"]


def stored(cluster, worker_id: str, channel: str) -> dict:
    response = request(cluster.admin_url(f"/channel?name={channel}", worker_id))
    assert response.status == 200
    return json.loads(response.body)


def test_a_batch_of_publishes_gets_every_reply_in_batches(cluster, ctx):
    """300 publishes in one message: 300 replies, in arrays, each id once, each
    channel's sequences 1..100 in the order sent; a request for another worker's
    channel in the batch gets its own not_owner and disturbs none of the others."""
    channels = [channel_on("w1", cluster.worker_ids, f"/batch-a{i}") for i in range(3)]
    elsewhere = channel_on("w2", cluster.worker_ids, "/batch-a-w2")
    sock = dealer_to(ctx, cluster, "w1")
    bodies = [publish(i, channels[i % 3], b"m%d" % i) for i in range(300)]
    bodies.insert(150, publish("stray", elsewhere, b"x"))
    sock.send(frames.encode_batch(bodies))

    messages = receive(sock, 301)
    assert all(batched for batched, _ in messages)
    replies = [reply for _, items in messages for reply in items]
    by_id = {reply["id"]: reply for reply in replies}
    assert len(by_id) == 301
    stray = by_id.pop("stray")
    assert (stray["ok"], stray["error"], stray["owner"]) == (False, "not_owner", "w2")
    assert all(reply["ok"] for reply in by_id.values())
    for n, channel in enumerate(channels):
        ids = range(n, 300, 3)
        assert [by_id[i]["seq"] for i in ids] == list(range(1, 101))
        assert len({by_id[i]["epoch"] for i in ids}) == 1
        assert stored(cluster, "w1", channel)["seq"] == 100
    assert not stored(cluster, "w2", elsewhere)["exists"]


def test_a_peer_that_never_batches_gets_one_map_per_message(cluster, ctx):
    """While another DEALER batches, one that sends 50 single requests back to back
    gets 50 messages, each one reply map; the batching one gets arrays."""
    channel = channel_on("w1", cluster.worker_ids, "/batch-b")
    batching, single = dealer_to(ctx, cluster, "w1"), dealer_to(ctx, cluster, "w1")
    batching.send(frames.encode_batch([publish(f"b{i}", channel, b"b") for i in range(50)]))
    for i in range(50):
        single.send(publish(i, channel, b"s"))
    batching.send(frames.encode_batch([publish(f"c{i}", channel, b"c") for i in range(50)]))

    singles = receive(single, 50)
    assert [batched for batched, _ in singles] == [False] * 50
    assert [items[0]["id"] for _, items in singles] == list(range(50))
    batched = receive(batching, 100)
    assert all(is_batch for is_batch, _ in batched)
    seqs = sorted(items[0]["seq"] for _, items in singles) + \
        sorted(reply["seq"] for _, items in batched for reply in items)
    assert sorted(seqs) == list(range(1, 151))


def test_a_new_peer_reusing_a_batching_peers_routing_id_gets_maps(cluster, ctx):
    """A DEALER with an explicit routing id batches and goes away; a new one with the
    same id that never batches gets one map per reply."""
    channel = channel_on("w1", cluster.worker_ids, "/batch-identity")
    first = dealer_to(ctx, cluster, "w1", routing_id=b"fixed-identity")
    first.send(frames.encode_batch([publish(i, channel, b"x") for i in range(3)]))
    assert all(batched for batched, _ in receive(first, 3))
    first.close(linger=0)
    second = dealer_to(ctx, cluster, "w1", routing_id=b"fixed-identity")
    # The ROUTER refuses a routing id still in use; the DEALER reconnects until it is free.
    deadline = time.monotonic() + 10
    while not second.poll(100):
        assert time.monotonic() < deadline, "the second peer was never answered"
        second.send(frames.encode_request({"id": "ping", "op": "ping"}))
    publish_ids = set(range(100, 120))
    for request_id in sorted(publish_ids):
        second.send(publish(request_id, channel, b"y"))
    shapes = []
    while publish_ids:
        assert second.poll(int(1000 * max(0.0, deadline - time.monotonic()))), publish_ids
        body = msgpack.unpackb(second.recv(), raw=False)
        items = body if isinstance(body, list) else [body]
        mine = [item["id"] for item in items if item["id"] != "ping"]
        publish_ids.difference_update(mine)
        if mine:
            shapes.append(isinstance(body, list))
    assert shapes == [False] * 20


def test_a_batch_over_max_batch_gets_one_error_and_stores_nothing(cluster, ctx):
    """MAX_BATCH + 1 publishes in one message: one bad_request reply, the rejection is
    counted, and the channel does not exist (a fetch after it finds sequence 0)."""
    channel = channel_on("w1", cluster.worker_ids, "/batch-c")
    sock = dealer_to(ctx, cluster, "w1")
    before = worker_totals(cluster, "w1")
    sock.send(frames.encode_batch([publish(i, channel, b"x")
                                   for i in range(frames.MAX_BATCH + 1)]))
    sock.send(frames.encode_request({"id": "after", "op": "fetch", "channel": channel,
                                     "since": 0}))
    refusal, fetched = [reply for _, items in receive(sock, 2) for reply in items]
    assert (refusal["ok"], refusal["id"], refusal["error"]) == (False, None, "bad_request")
    assert f"a batch of {frames.MAX_BATCH + 1} bodies" in refusal["reason"]
    assert (fetched["id"], fetched["ok"], fetched["seq"], fetched["messages"]) == \
        ("after", True, 0, [])
    after = worker_totals(cluster, "w1")
    assert after["rejected_frames"] - before["rejected_frames"] == 1
    assert after["published"] == before["published"]
    assert not stored(cluster, "w1", channel)["exists"]


def test_20000_publishes_in_batches_of_1000_are_all_answered(cluster, ctx):
    """One DEALER sends 20 batches of 1,000 publishes without reading: every one is
    answered once, in batches of at most MAX_BATCH, and the worker counts 20,000
    publishes; each channel's sequences follow the order sent."""
    channels = [channel_on("w1", cluster.worker_ids, f"/batch-d{i}") for i in range(10)]
    sock = dealer_to(ctx, cluster, "w1")
    before = worker_totals(cluster, "w1")
    total = 20000
    for first in range(0, total, 1000):
        sock.send(frames.encode_batch([publish(i, channels[i % 10], b"%d" % i)
                                       for i in range(first, first + 1000)]))

    messages = receive(sock, total)
    assert all(batched and len(items) <= frames.MAX_BATCH for batched, items in messages)
    replies = [reply for _, items in messages for reply in items]
    assert sorted(reply["id"] for reply in replies) == list(range(total))
    assert all(reply["ok"] for reply in replies)
    seq_of = {reply["id"]: reply["seq"] for reply in replies}
    for n in range(10):
        assert [seq_of[i] for i in range(n, total, 10)] == list(range(1, total // 10 + 1))
    after = worker_totals(cluster, "w1")
    assert after["published"] - before["published"] == total
    assert after["rejected_frames"] == before["rejected_frames"]
    assert after["overloaded"] == before["overloaded"]


def test_2000_concurrent_http_publishes_get_consecutive_sequences(cluster, run):
    """50 keep-alive connections each PUT 40 messages through the edge to 20 channels
    on both workers: 2,000 202s, each channel's sequences exactly 1..100, rising on
    every connection."""
    channels = [channel_on(worker_id, cluster.worker_ids, f"/batch-http-{worker_id}-{i}")
                for worker_id in cluster.worker_ids for i in range(10)]

    async def connection(n):
        http = Http("127.0.0.1", cluster.http_port)
        got = []
        try:
            for i in range(40):
                channel = channels[(n + i) % len(channels)]
                status, headers, _ = await http.request("PUT", channel, b"%d-%d" % (n, i))
                got.append((channel, status, int(headers.get("x-firehose-sequence", "0"))))
        finally:
            await http.close()
        return got

    async def scenario():
        return await asyncio.gather(*(connection(n) for n in range(50)))

    per_connection = run(scenario(), timeout_s=60)
    assert [status for got in per_connection for _, status, _ in got] == [202] * 2000
    seqs = collections.defaultdict(list)
    for got in per_connection:
        mine = collections.defaultdict(list)
        for channel, _, seq in got:
            seqs[channel].append(seq)
            mine[channel].append(seq)
        assert all(s == sorted(s) for s in mine.values())
    assert sorted(seqs) == sorted(channels)
    assert all(sorted(s) == list(range(1, 101)) for s in seqs.values())


def subscriber(ctx, endpoint: str, channel: str):
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.setsockopt(zmq.SUBSCRIBE, frames.topic(channel))
    return sock


def wait_for_resend(sub, dealer, channel: str) -> int:
    """Until the subscription is live: the worker re-sends a channel's newest message
    when one lands; published again while it travels (bounded). Returns how many
    publishes that took (their replies are the caller's to read)."""
    deadline = time.monotonic() + REPLY_WAIT_S
    sent = 0
    while not sub.poll(100):
        assert time.monotonic() < deadline, "the subscription never landed"
        dealer.send(publish(f"warm-{sent}", channel, b"warm"))
        sent += 1
    return sent


def test_a_channels_messages_of_one_turn_leave_the_worker_as_one_message(cluster, ctx):
    """A batch of 50 publishes to one channel: a SUB on the worker's XPUB gets them in
    arrays (each in order, once); a native subscriber on the edge gets one message per
    frame pair, as docs/native-zeromq.md promises."""
    channel = channel_on("w1", cluster.worker_ids, "/batch-messages")
    dealer = dealer_to(ctx, cluster, "w1")
    direct = subscriber(ctx, cluster.endpoints["w1"][1], channel)
    native = subscriber(ctx, cluster.native_pub, channel)
    try:
        dealer.send(publish("first", channel, b"warm"))
        warm = 1 + wait_for_resend(direct, dealer, channel) + wait_for_resend(native, dealer,
                                                                              channel)
        receive(dealer, warm)  # every warm-up publish is answered: stored
        dealer.send(frames.encode_batch([publish(i, channel, b"m%d" % i) for i in range(50)]))
        receive(dealer, 50)

        def collect(sub, decode):
            got, shapes = [], []
            deadline = time.monotonic() + REPLY_WAIT_S
            while len(got) < 50:
                assert sub.poll(int(1000 * max(0.0, deadline - time.monotonic()))), len(got)
                parts = sub.recv_multipart()
                messages = [m for m in decode(parts) if m.data != b"warm"]
                if messages:
                    shapes.append(frames.is_batch(parts[1]))
                    got.extend(messages)
            return got, shapes

        messages, shapes = collect(direct, lambda p: frames.decode_messages(p, 1 << 20))
        first = messages[0].seq
        assert [m.seq for m in messages] == list(range(first, first + 50))
        assert [m.data for m in messages] == [b"m%d" % i for i in range(50)]
        assert any(shapes), "the worker sent no batch"
        forwarded, shapes = collect(native, lambda p: [frames.decode_message(p, 1 << 20)])
        assert [m.seq for m in forwarded] == list(range(first, first + 50))
        assert not any(shapes)
    finally:
        for sock in (dealer, direct, native):
            sock.close(linger=0)
