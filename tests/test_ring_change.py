"""Ring changes on a running cluster: workers added and removed under a publish storm,
channels handed over with their sequences, epochs, buffers and publish ids."""

import asyncio
import contextlib
import signal
import time

import pytest
import zmq

from firehose_zmq import config as config_module
from firehose_zmq.ring import Ring, source
from firehose_zmq.wire import frames

from .hostbed import HostBed
from .storm import Storm


# -- the pure parts ---------------------------------------------------------------------

def test_source_names_the_previous_owner_of_a_moved_channel_only():
    """A channel that moves to the new worker comes from its previous owner; others from nobody."""
    old, new = Ring(["w1", "w2"]), Ring(["w1", "w2", "w3"])
    moved = [f"/c{i}" for i in range(2000) if new.owner(f"/c{i}") != old.owner(f"/c{i}")]
    assert moved and all(new.owner(name) == "w3" for name in moved)
    assert all(source(new, old, name) == old.owner(name) for name in moved)
    assert all(source(new, old, f"/c{i}") is None for i in range(2000) if f"/c{i}" not in moved)
    assert source(new, None, moved[0]) is None


def test_handoff_take_is_checked_field_by_field():
    """A handoff_take with a bad field is refused; a good one and its reply round-trip."""
    body = frames.encode_request({"id": 1, "op": "handoff_take", "ring": "ab", "to": "w3",
                                  "channels": ["/a"], "done": ["/b"]})
    assert frames.decode_request(body, 1 << 20)["channels"] == ["/a"]
    for bad in ({"to": "w3"}, {"ring": "ab", "to": "w3", "channels": "/a"},
                {"ring": "ab", "to": "w3", "limit": 0},
                {"ring": "ab", "to": "w3", "done": ["/a"] * (frames.MAX_HANDOFF_NAMES + 1)}):
        with pytest.raises(frames.ProtocolError):
            frames.decode_request(frames.encode_request({"id": 1, "op": "handoff_take", **bad}),
                                  1 << 20)
    reply = frames.encode_handoff(7, [frames.HandoffChannel("/a", 5, 3, None,
                                                            [(2, b"x"), (3, b"y")])],
                                  ["/b"], [("pid", "/a", 3, 5)], True, "/a")
    handoff = frames.decode_handoff(frames.decode_reply(reply, 1 << 20))
    assert handoff.channels[0].messages == [(2, b"x"), (3, b"y")]
    assert handoff.absent == ["/b"] and handoff.publish_ids == [("pid", "/a", 3, 5)]
    gap = frames.encode_handoff(7, [frames.HandoffChannel("/a", 5, 3, None, [(1, b"x")])],
                                [], [], False, "")
    with pytest.raises(frames.ProtocolError, match="contiguous"):
        frames.decode_handoff(frames.decode_reply(gap, 1 << 20))


def test_config_keeps_a_leaving_worker_out_of_the_ring():
    """``leaving`` workers are listed but not ring members; ring_previous must name listed ids."""
    workers = [{"id": w, "router_bind": f"tcp://127.0.0.1:{p}",
                "router_connect": f"tcp://127.0.0.1:{p}", "pub_bind": f"tcp://127.0.0.1:{p + 1}",
                "pub_connect": f"tcp://127.0.0.1:{p + 1}"} for w, p in (("w1", 9000),
                                                                        ("w2", 9002))]
    workers[1]["leaving"] = True
    parsed = config_module.parse_config({"workers": workers, "ring_previous": ["w1", "w2"]})
    assert parsed.ring_members == ("w1",) and parsed.ring_previous == ("w1", "w2")
    with pytest.raises(config_module.ConfigError, match="not in"):
        config_module.parse_config({"workers": workers, "ring_previous": ["w1", "w9"]})
    workers[0]["leaving"] = True
    with pytest.raises(config_module.ConfigError, match="at least one"):
        config_module.parse_config({"workers": workers})


# -- real processes -----------------------------------------------------------------------

def native_fetch(endpoint: str, channel: str) -> dict:
    """The owner's answer to a fetch through an edge's native endpoint."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(frames.encode_request({"id": 1, "op": "fetch", "channel": channel,
                                         "since": 0}))
        assert sock.poll(5000), f"no answer to a fetch of {channel}"
        return frames.decode_reply(sock.recv(), 1 << 24)
    finally:
        sock.close()


def epochs(bed, channels) -> dict:
    endpoint = bed.edges[0][3]
    return {channel: native_fetch(endpoint, channel)["epoch"] for channel in channels}


def test_adding_and_removing_a_worker_under_a_publish_storm(tmp_path, run):
    """Add w3 to w1+w2, then remove w1, under a storm: every 202'd message is delivered once,
    in order, on both edges; no sequence is reused and no channel gets a new epoch."""
    channels = [f"/storm/{i}" for i in range(40)]
    with HostBed(tmp_path, ["w1", "w2"], edges=2) as bed:
        storm = Storm([(host, port) for _, host, port, _ in bed.edges], channels)

        async def scenario():
            await storm.prime()
            before = epochs(bed, channels)
            storm.start()
            await asyncio.sleep(1.0)  # the storm runs before the change (not a synchronisation)
            # Add w3 as README "Growing the cluster" says: the new config, w3 started
            # with it, SIGHUP to the edges, then (once they reach w3) to the workers.
            bed.add_host("w3")
            bed.write_config(["w1", "w2", "w3"], previous=["w1", "w2"])
            w3 = bed.start_worker("w3")
            mark = len(w3.lines)
            bed.reload([edge[0] for edge in bed.edges])
            for edge, *_ in bed.edges:
                await asyncio.to_thread(edge.wait_for, "worker w3 up")
            bed.reload([bed.workers["w1"], bed.workers["w2"]])
            await asyncio.to_thread(w3.wait_for, "handoff complete", 20, mark)
            await asyncio.sleep(1.0)
            # Remove w1 (out of the ring: leaving), its channels going to w2 and w3; the
            # workers hear of it first this time, then the edges.
            marks = {w: len(p.lines) for w, p in bed.workers.items()}
            bed.write_config(["w2", "w3"], previous=["w1", "w2", "w3"], leaving=["w1"])
            bed.reload()
            for worker_id in ("w2", "w3"):
                await asyncio.to_thread(bed.workers[worker_id].wait_for, "handoff complete", 20,
                                        marks[worker_id])
            await asyncio.sleep(1.0)
            bed.workers["w1"].stop()
            bed.write_config(["w2", "w3"])
            bed.reload([bed.workers["w2"], bed.workers["w3"], *(e[0] for e in bed.edges)])
            await asyncio.sleep(0.5)
            await storm.finish()
            return before, epochs(bed, channels)

        before, after = run(scenario(), timeout_s=90)
        problems = storm.check()
        acked = sum(len(a) for a in storm.acked.values())
        print("\n" + storm.report())
        assert not problems, "\n".join(problems[:20])
        assert before == after, "a channel got a new epoch"
        assert acked > 40 * 5
        log = bed.workers["w3"].log_text()
        assert "handoff from w1 complete" in log


def test_handoff_of_many_channels_is_timed(tmp_path, run):
    """20,000 channels on w1; w2 joins and takes about half: print how long it took."""
    with HostBed(tmp_path, ["w1"], edges=1) as bed:
        names = [f"/many/{i}" for i in range(20000)]
        endpoint = bed.edges[0][3]

        async def fill():
            import zmq.asyncio
            context = zmq.asyncio.Context()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            pending = set()
            sent = 0
            while sent < len(names) or pending:
                while sent < len(names) and len(pending) < 500:
                    await sock.send(frames.encode_request({
                        "id": sent, "op": "publish", "channel": names[sent],
                        "data": b"m" * 100}))
                    pending.add(sent)
                    sent += 1
                assert await sock.poll(10000)
                reply = frames.decode_reply(await sock.recv(), 1 << 20)
                assert reply["ok"], reply
                pending.discard(reply["id"])
            sock.close()
            context.term()

        run(fill(), timeout_s=120)
        ring = Ring(["w1", "w2"])
        moving = sum(1 for name in names if ring.owner(name) == "w2")
        bed.add_host("w2")
        bed.write_config(["w1", "w2"], previous=["w1"])
        w2 = bed.start_worker("w2")
        mark = len(bed.workers["w1"].lines)
        started = time.monotonic()
        bed.reload([bed.workers["w1"]])
        w2.wait_for("handoff complete", 60)
        elapsed = time.monotonic() - started
        bed.workers["w1"].wait_for("every channel for w2 handed over", 10, mark)
        print(f"\nhandoff of {moving} channels (100-byte message each, durability sync): "
              f"{elapsed:.2f} s")
        bed.reload([edge[0] for edge in bed.edges])
        bed.edges[0][0].wait_for("worker w2 up")
        sample = names[:50]
        for name in sample:
            reply = native_fetch(endpoint, name)
            assert reply["seq"] == 1 and reply["messages"] == [[1, b"m" * 100]], (name, reply)


def test_a_handoff_survives_a_frozen_source_and_a_killed_new_owner(tmp_path, run):
    """w1 frozen (a partition) while its channels move to w3: they answer 503, never reset;
    w3 killed and restarted after taking them: they continue from its disk."""
    channels = [f"/cut/{i}" for i in range(30)]
    with HostBed(tmp_path, ["w1", "w2"], edges=1) as bed:
        storm = Storm([(host, port) for _, host, port, _ in bed.edges], channels, publishers=4)
        moving = [c for c in channels if Ring(["w1", "w2", "w3"]).owner(c) == "w3"
                  and Ring(["w1", "w2"]).owner(c) == "w1"]
        assert moving

        async def scenario():
            await storm.prime()
            before = epochs(bed, channels)
            storm.start()
            await asyncio.sleep(0.5)
            bed.add_host("w3")
            bed.write_config(["w1", "w2", "w3"], previous=["w1", "w2"])
            w3 = bed.start_worker("w3")
            edge = bed.edges[0][0]
            bed.reload([edge])
            await asyncio.to_thread(edge.wait_for, "worker w3 up")
            bed.freeze("w1")
            bed.reload([bed.workers["w1"], bed.workers["w2"]])  # w1 reads it when it resumes
            await asyncio.sleep(2.5)  # the partition lasts this long
            bed.thaw("w1")
            await asyncio.to_thread(w3.wait_for, "handoff complete", 20)
            await asyncio.sleep(0.5)
            bed.kill("w3")
            mark = len(edge.lines)
            restarted = bed.start_worker("w3")
            await asyncio.to_thread(edge.wait_for, "worker w3 up", 20, mark)
            await asyncio.to_thread(restarted.wait_for, "handoff complete", 20)
            await asyncio.sleep(1.0)
            await storm.finish()
            return before, epochs(bed, channels)

        before, after = run(scenario(), timeout_s=90)
        problems = storm.check()
        print("\n" + storm.report())
        assert not problems, "\n".join(problems[:20])
        assert before == after, "a channel got a new epoch"
        # The frozen w1 held its channels' publishes (and so its publisher's others).
        assert storm.longest_gap_s()[0] >= 1.5
        assert "loaded" in bed.workers["w3"].log_text()


def test_requests_waiting_for_a_take_are_bounded(tmp_path):
    """While a channel's source does not answer, at most max_parked_requests wait for the
    take; more are refused at once, the waiting ones get 'unavailable' at the take's deadline."""
    with fetching_from_a_frozen_source(tmp_path, 8, "[limits]\nmax_parked_requests = 5\n"
                                       ) as (_, sock, moving, started):
        answers = {}
        while len(answers) < len(moving):
            assert sock.poll(5000), f"only {len(answers)} answers"
            reply = frames.decode_reply(sock.recv(), 1 << 20)
            answers[reply["id"]] = (time.monotonic() - started, reply)
        refused = [a for a in answers.values() if "max_parked_requests" in a[1]["reason"]]
        parked = [a for a in answers.values() if a not in refused]
        assert len(refused) == 3 and len(parked) == 5
        assert all(not r["ok"] and r["error"] == "unavailable" for _, r in answers.values())
        assert max(t for t, _ in refused) < 1.0
        assert all(1.0 <= t < 4.0 for t, _ in parked), [t for t, _ in parked]
        print(f"\nrefused at once within {max(t for t, _ in refused) * 1000:.0f} ms; parked "
              f"answered after {min(t for t, _ in parked):.2f} s")


def test_a_worker_stopped_while_requests_are_parked_answers_them_and_exits_cleanly(tmp_path):
    """Requests parked for channels still being taken (the old owner frozen) are answered
    ``unavailable`` when the worker stops, and the stop is clean (it crashed on them)."""
    with fetching_from_a_frozen_source(tmp_path, 3) as (w2, sock, moving, _):
        # Read in order after the fetches: once it is answered, they are parked.
        sock.send(frames.encode_request({"id": "ping", "op": "ping"}))
        assert sock.poll(10000) and frames.decode_reply(sock.recv(), 1 << 20)["id"] == "ping"
        w2.signal(signal.SIGTERM)
        assert w2.popen.wait(10) == 0
        replies = []
        while len(replies) < len(moving) and sock.poll(5000):
            replies.extend(frames.decode_replies(sock.recv(), 1 << 20))
        assert sorted((r["id"], r.get("error")) for r in replies) == [
            (i, "unavailable") for i in range(len(moving))]


@contextlib.contextmanager
def fetching_from_a_frozen_source(tmp_path, count: int, tables: str = ""):
    """w2 joins w1's ring and w1 freezes: a DEALER to w2 has sent fetches for ``count``
    channels moving to w2, which wait for a take w1 does not answer. Yields (w2's
    process, the DEALER, the channels, when the fetches were sent)."""
    with HostBed(tmp_path, ["w1"], edges=0, tables=tables) as bed:
        bed.add_host("w2")
        bed.write_config(["w1", "w2"], previous=["w1"])
        w2 = bed.start_worker("w2")
        w2.wait_for("refused a take")  # connected to w1, which is still on the old ring
        bed.freeze("w1")
        ring = Ring(["w1", "w2"])
        moving = [f"/park/{i}" for i in range(100) if ring.owner(f"/park/{i}") == "w2"][:count]
        host, router, _ = bed.hosts["w2"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{host}:{router}")
        try:
            started = time.monotonic()
            for i, name in enumerate(moving):
                sock.send(frames.encode_request({"id": i, "op": "fetch", "channel": name,
                                                 "since": 0}))
            yield w2, sock, moving, started
        finally:
            sock.close(linger=0)
