"""WebSocket, single channel and multiplexed (docs/protocol.md §6), against real processes."""

import asyncio
import itertools
import json
import random
import time

import pytest
from tornado.httpclient import HTTPClientError

from .cluster import Cluster, channel_on
from .http import async_request, request
from .streamclient import (EventStreamReader, RawWebSocket, global_counter, ws_connect,
                           ws_ping, ws_recv, ws_send)


@pytest.fixture(scope="module")
def cluster(cluster_on_both_paths):
    """This module's tests run on both serving paths."""
    return cluster_on_both_paths

_names = itertools.count()


def fresh():
    return f"/ws/{next(_names)}"


async def publish(cluster, channel, body, headers=None):
    r = await async_request(cluster.url(channel), "PUT", body.encode() if isinstance(body, str)
                            else body, headers)
    assert r.status == 202
    return int(r.header("X-Firehose-Sequence"))


def test_ping_pong(cluster, run):
    """{"ping":"PING"} gets {"pong":"PONG"} on a channel and on /channels@firehose."""
    async def go():
        for path in (fresh(), "/channels@firehose"):
            ws = await ws_connect(cluster, path)
            await ws_ping(ws)
            await ws_ping(ws)
            ws.close()
    run(go())


def test_open_websockets_count_as_connections(cluster, run):
    """The metrics' connections include upgraded sockets."""
    async def go():
        sockets = [await ws_connect(cluster, fresh()) for _ in range(3)]
        for ws in sockets:
            await ws_ping(ws)
        report = json.loads(request(cluster.url("/metrics@firehose")).body)
        assert report[-1]["global"]["connections"] >= 4  # 3 sockets and this request
        for ws in sockets:
            ws.close()
    run(go())


def test_js_client_upgrade_replays_after_message_sequence_then_streams(cluster, run):
    """The Firehose JS client's sequence: ping, pong, {"message_sequence": N}; then live."""
    async def go():
        channel = fresh()
        for i in range(1, 4):
            await publish(cluster, channel, f"m{i}")
        ws = await ws_connect(cluster, channel)
        await ws_ping(ws)
        await ws_send(ws, {"message_sequence": 1})
        assert await ws_recv(ws) == {"message": "m2", "last_sequence": 2}
        assert await ws_recv(ws) == {"message": "m3", "last_sequence": 3}
        await publish(cluster, channel, "m4")
        assert await ws_recv(ws) == {"message": "m4", "last_sequence": 4}
        ws.close()
    run(go())


def test_frames_are_exact_compact_json(cluster, run):
    """Message frames are the long-poll body, byte for byte."""
    async def go():
        channel = fresh()
        await publish(cluster, channel, '{"a": [1, 2]}')
        ws = await ws_connect(cluster, channel)
        await ws_send(ws, {"last_message_sequence": 0})
        text = await asyncio.wait_for(ws.read_message(), 10)
        assert text == '{"message":"{\\"a\\": [1, 2]}","last_sequence":1}'
        ws.close()
    run(go())


def test_pong_comes_after_the_replay_of_an_earlier_subscribe(cluster, run):
    """Subscribe and ping sent back to back: the replay frames come before the pong."""
    async def go():
        channel = fresh()
        for i in range(1, 6):
            await publish(cluster, channel, f"m{i}")
        ws = await ws_connect(cluster, channel)
        await ws_send(ws, {"last_message_sequence": 2})
        await ws_send(ws, {"ping": "PING"})
        frames = [await ws_recv(ws) for _ in range(4)]
        assert [f.get("last_sequence") for f in frames[:3]] == [3, 4, 5]
        assert frames[3] == {"pong": "PONG"}
        ws.close()
    run(go())


def test_newest_only_at_zero_and_caught_up_waits(cluster, run):
    """Sequence 0 gets the newest message only; a caught-up subscriber waits for the next."""
    async def go():
        channel = fresh()
        for i in range(1, 4):
            await publish(cluster, channel, f"m{i}")
        ws = await ws_connect(cluster, channel)
        await ws_send(ws, {"last_message_sequence": 0})
        assert await ws_recv(ws) == {"message": "m3", "last_sequence": 3}
        caught_up = await ws_connect(cluster, channel)
        await ws_send(caught_up, {"last_message_sequence": 3})
        await ws_ping(caught_up)  # nothing was replayed before the pong
        await publish(cluster, channel, "m4")
        assert await ws_recv(ws) == {"message": "m4", "last_sequence": 4}
        assert await ws_recv(caught_up) == {"message": "m4", "last_sequence": 4}
        ws.close()
        caught_up.close()
    run(go())


def test_second_subscribe_on_a_channel_socket_is_ignored(cluster, run):
    """A channel socket subscribes once; a later subscribe frame changes nothing."""
    async def go():
        channel = fresh()
        await publish(cluster, channel, "m1")
        await publish(cluster, channel, "m2")
        ws = await ws_connect(cluster, channel)
        await ws_send(ws, {"last_message_sequence": 1})
        assert (await ws_recv(ws))["last_sequence"] == 2
        await ws_send(ws, {"last_message_sequence": 0})
        await ws_ping(ws)
        await publish(cluster, channel, "m3")
        assert (await ws_recv(ws))["last_sequence"] == 3
        ws.close()
    run(go())


def test_bad_frames_are_ignored_counted_and_the_socket_stays_open(cluster, run):
    """Junk frames get no answer and are counted; a bad subscribe gets an error frame."""
    async def go():
        channel = fresh()
        before = global_counter(cluster, "websocket_bad_frames")
        ws = await ws_connect(cluster, channel)
        for junk in ("not json", "[1, 2]", "17", '{"hello": 1}', '{"ping": "pong"}',
                     b"\x00binary"):
            await ws_send(ws, junk)
        await ws_ping(ws)  # nothing was answered before the pong
        for bad in ({"last_message_sequence": -1}, {"message_sequence": "x"},
                    {"message_sequence": 1, "extra": True}, {"params": "x"}):
            await ws_send(ws, bad)
            frame = await ws_recv(ws)
            assert frame["error"] == "Subscription failed"
            assert frame["reason"]
        assert global_counter(cluster, "websocket_bad_frames") - before == 10
        await publish(cluster, channel, "m1")
        await ws_send(ws, {"message_sequence": 0})
        assert await ws_recv(ws) == {"message": "m1", "last_sequence": 1}
        ws.close()
    run(go())


def test_oversized_frame_closes_with_1009(cluster, run):
    """A client frame above the limit closes that socket with 1009; others are untouched."""
    async def go():
        other = await ws_connect(cluster, fresh())
        ws = await ws_connect(cluster, fresh())
        await ws_send(ws, "x" * (1024 * 1024 + 1))
        assert await asyncio.wait_for(ws.read_message(), 10) is None
        assert ws.close_code == 1009
        await ws_ping(other)
        other.close()
    run(go())


@pytest.mark.parametrize("path, status", [
    ("/channels@firehose?subscribe=/a!x", 400),
    ("/channels@firehose?subscribe=nope", 400),
    ("/bad!name", 400),
    ("/metrics@firehose", 404),
])
def test_invalid_upgrade_url_is_an_http_error(cluster, run, path, status):
    """An invalid ?subscribe= or channel path on the upgrade gets an HTTP error, no upgrade."""
    async def go():
        with pytest.raises(HTTPClientError) as caught:
            await ws_connect(cluster, path)
        assert caught.value.code == status
    run(go())


def test_cross_origin_websocket_is_allowed(cluster, run):
    """A page from another origin may open a WebSocket (no allow-list configured)."""
    async def go():
        ws = await ws_connect(cluster, fresh(), {"Origin": "http://elsewhere.example"})
        await ws_ping(ws)
        ws.close()
    run(go())


def test_multiplexed_url_subscribe_and_frames_carry_channel(cluster, run):
    """?subscribe=/a!1,/b!0 replays at once; frames carry "channel"."""
    async def go():
        a, b = fresh(), fresh()
        await publish(cluster, a, "a1")
        await publish(cluster, a, "a2")
        ws = await ws_connect(cluster, f"/channels@firehose?subscribe={a}!1,{b}!0")
        assert await ws_recv(ws) == {"channel": a, "message": "a2", "last_sequence": 2}
        await publish(cluster, b, "b1")
        frame = await asyncio.wait_for(ws.read_message(), 10)
        assert frame == json.dumps({"channel": b, "message": "b1", "last_sequence": 1},
                                   separators=(",", ":"))
        ws.close()
    run(go())


def test_multiplex_subscribe_object_list_duplicates_and_unsubscribe(cluster, run):
    """Subscribe with an object or a list, either sequence key; duplicates ignored;
    unsubscribed channels stop."""
    async def go():
        a, b, c = fresh(), fresh(), fresh()
        for channel in (a, b, c):
            await publish(cluster, channel, f"{channel}-1")
            await publish(cluster, channel, f"{channel}-2")
        ws = await ws_connect(cluster, "/channels@firehose")
        await ws_send(ws, {"multiplex_subscribe": {"channel": a, "message_sequence": 1}})
        assert await ws_recv(ws) == {"channel": a, "message": f"{a}-2", "last_sequence": 2}
        await ws_send(ws, {"multiplex_subscribe": [
            {"channel": b, "last_message_sequence": 0, "params": {"k": "v"}},
            {"channel": c},
            {"channel": a, "message_sequence": 0},  # already subscribed: ignored
        ]})
        got = {}
        for _ in range(2):
            frame = await ws_recv(ws)
            got[frame["channel"]] = frame["last_sequence"]
        assert got == {b: 2, c: 2}
        await ws_ping(ws)  # nothing more (no duplicate of a) before the pong
        await ws_send(ws, {"multiplex_unsubscribe": [a, "/never-subscribed"]})
        await ws_send(ws, {"multiplex_unsubscribe": c})
        await ws_ping(ws)
        await publish(cluster, a, "a3")
        await publish(cluster, c, "c3")
        await publish(cluster, b, "b3")
        assert await ws_recv(ws) == {"channel": b, "message": "b3", "last_sequence": 3}
        ws.close()
    run(go())


def test_multiplex_rejected_subscription_gets_error_frame(cluster, run):
    """An invalid multiplex_subscribe gets one error frame and subscribes nothing."""
    async def go():
        ws = await ws_connect(cluster, "/channels@firehose")
        for bad in ({"multiplex_subscribe": {"channel": "nope"}},
                    {"multiplex_subscribe": []},
                    {"multiplex_subscribe": [{"channel": "/ok"}, {"channel": "/x@firehose"}]},
                    {"multiplex_subscribe": {"channel": "/ok", "message_sequence": -3}}):
            await ws_send(ws, bad)
            frame = await ws_recv(ws)
            assert frame["error"] == "Subscription failed", bad
        await ws_send(ws, {"multiplex_unsubscribe": 5})  # ignored, no answer
        await ws_ping(ws)
        ws.close()
    run(go())


def test_every_client_gets_all_200_messages_in_order_with_random_buffer_sizes(cluster, run):
    """Firehose's check: 200 messages, random buffer sizes, every WebSocket gets all in order."""
    async def go():
        rng = random.Random(7)
        channel = fresh()
        clients = []
        for i in range(8):
            ws = await ws_connect(cluster, channel if i % 2 else
                                  f"/channels@firehose?subscribe={channel}!0")
            if i % 2:
                await ws_send(ws, {"message_sequence": 0})
            await ws_ping(ws)
            clients.append(ws)
        for n in range(1, 201):
            await publish(cluster, channel, f"msg {n}",
                          {"X-Firehose-Buffer-Size": str(rng.randint(0, 20))})
        for ws in clients:
            seqs = [(await ws_recv(ws))["last_sequence"] for _ in range(200)]
            assert seqs == list(range(1, 201))
            ws.close()
    run(go(), timeout_s=120)


def _publish_blocking(cluster, channel, body):
    r = request(cluster.url(channel), "PUT", body)
    assert r.status == 202


def test_slow_reader_is_closed_with_1008_and_others_keep_up(tmp_path, run):
    """A client that stops reading is closed with 1008 and counted; a reader on the same
    channel keeps receiving every message promptly."""
    limit = 256 * 1024
    config = f"stream_queue_limit_bytes = {limit}\nws_ping_interval_s = 60.0\n" \
             "ws_ping_timeout_s = 60.0"
    with Cluster(tmp_path, extra_config=config) as cluster:
        channel = fresh()
        slow = RawWebSocket(cluster, channel, rcvbuf=4096)
        slow.send_text('{"last_message_sequence":0}')
        slow.send_text('{"ping":"PING"}')
        assert slow.read_frame() == (0x1, b'{"pong":"PONG"}')
        payload = "x" * (64 * 1024)

        async def go():
            fast = await ws_connect(cluster, channel)
            await ws_send(fast, {"last_message_sequence": 0})
            await ws_ping(fast)
            latencies = []
            sent = 0
            # Publish until the slow reader is cut off (bounded by the loop count).
            for n in range(1, 1001):
                started = time.monotonic()
                await publish(cluster, channel, payload)
                frame = await ws_recv(fast)
                latencies.append(time.monotonic() - started)
                assert frame["last_sequence"] == n
                sent = n
                if n % 10 == 0 and global_counter(cluster, "slow_readers_closed") >= 1:
                    break
            fast.close()
            return sent, latencies

        sent, latencies = run(go(), timeout_s=120)
        assert global_counter(cluster, "slow_readers_closed") == 1
        frames, code = slow.read_until_close()
        slow.close()
        assert code == 1008
        assert 0 < len(frames) < sent
        latencies.sort()
        print(f"slow reader cut after {sent} x 64 KiB messages, got {len(frames)}; fast reader "
              f"publish-to-receive p50 {1000 * latencies[len(latencies) // 2]:.1f} ms, "
              f"max {1000 * latencies[-1]:.1f} ms")
        assert latencies[len(latencies) // 2] < 0.5


def test_dead_socket_is_closed_by_protocol_pings(tmp_path, run):
    """A client that answers no protocol ping is closed after the ping timeout;
    a client that answers stays open."""
    config = "ws_ping_interval_s = 0.3\nws_ping_timeout_s = 0.3"
    with Cluster(tmp_path, extra_config=config) as cluster:
        async def go():
            alive = await ws_connect(cluster, fresh())
            dead = RawWebSocket(cluster, fresh())
            started = time.monotonic()
            frames, code = await asyncio.get_running_loop().run_in_executor(
                None, dead.read_until_close, 10.0)
            elapsed = time.monotonic() - started
            dead.close()
            assert (0x9, b"") in frames  # the server pinged
            assert code == 1000 and elapsed < 5
            await ws_ping(alive)  # Tornado's client answered every ping
            alive.close()
        run(go())


def test_streams_are_dropped_when_their_owner_goes_down(fresh_cluster, run):
    """When a channel's worker dies, its WebSockets are dropped uncleanly and its event
    streams end, so that clients reconnect and resume; other channels are untouched."""
    cluster = fresh_cluster
    doomed = channel_on("w1", cluster.worker_ids, "/doomed")
    healthy = channel_on("w2", cluster.worker_ids, "/healthy")

    async def go():
        single = await ws_connect(cluster, doomed)
        await ws_send(single, {"message_sequence": 0})
        await ws_ping(single)
        multiplexed = await ws_connect(cluster, f"/channels@firehose?subscribe={doomed}!0,"
                                                f"{healthy}!0")
        await ws_ping(multiplexed)
        other = await ws_connect(cluster, healthy)
        await ws_send(other, {"message_sequence": 0})
        await ws_ping(other)
        stream = EventStreamReader(cluster.url(doomed))
        assert stream.read_block() == ["retry: 2000"]
        cluster.kill_worker("w1")
        for ws in (single, multiplexed):
            assert await asyncio.wait_for(ws.read_message(), 10) is None
            assert ws.close_code is None  # no closing handshake: clients reconnect
        with pytest.raises(EOFError):
            while True:
                stream.read_block()
        stream.close()
        await publish(cluster, healthy, "still here")
        assert await ws_recv(other) == {"message": "still here", "last_sequence": 1}
        other.close()
    run(go())
