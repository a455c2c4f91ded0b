"""Replicas: an owner streams its channels to the next workers on the ring; when it is
lost its standby takes them over, and when it returns it takes them back."""

import asyncio
import time

import pytest

from firehose_zmq import config as config_module
from firehose_zmq.ring import Ring
from firehose_zmq.wire import frames
from firehose_zmq.worker.channel import ChannelTable

from .hostbed import HostBed
from .storm import Storm
from .test_ring_change import epochs

REPLICAS = "replicas = 1\nreplica_lease_ms = 500"


# -- the pure parts ---------------------------------------------------------------------

def test_preference_lists_the_owner_then_distinct_replicas():
    """A channel's preference list starts at its owner and names each worker once."""
    ring = Ring(["w1", "w2", "w3"])
    for i in range(500):
        name = f"/p/{i}"
        preference = ring.preference(name, 3)
        assert preference[0] == ring.owner(name) and sorted(preference) == ["w1", "w2", "w3"]
        assert ring.standby(name) == preference[1] == ring.preference(name, 2)[1]
    assert Ring(["w1"]).standby("/p/1") is None


def test_replicate_batches_are_checked_op_by_op():
    """A replicate with a bad operation is refused as a whole; good ones round-trip."""
    good = [frames.encode_replica_publish("/a", 5, 1, b"x", 100, None, "pid", 1.0),
            frames.encode_replica_delete("/a"),
            frames.encode_replica_restore("/a", 5, 3, 9.5, [(2, b"x"), (3, b"y")],
                                          [("pid", 3, 5, 1.5)])]
    body = frames.encode_request({"id": 1, "op": "replicate", "from": "w1", "ring": "ab",
                                  "stream": "s", "n": 1, "ops": good})
    ops = frames.decode_replica_ops(frames.decode_request(body, 1 << 20)["ops"])
    assert [op[0] for op in ops] == ["p", "d", "r"] and ops[2][5] == [[2, b"x"], [3, b"y"]]
    for bad in (["p", "/a", 5, 0, b"x", 100, None, None, 1.0],   # sequence 0
                ["p", "/a", 5, 1, "text", 100, None, None, 1.0],  # data not bytes
                ["d"], ["x", "/a"], "d",
                ["r", "/a", 5, 3, None, [[1, b"x"]], []]):         # not contiguous up to 3
        with pytest.raises(frames.ProtocolError):
            frames.decode_replica_ops([bad])
    with pytest.raises(frames.ProtocolError, match="'n'"):
        frames.decode_request(frames.encode_request(
            {"id": 1, "op": "replicate", "from": "w1", "ring": "ab", "stream": "s", "n": 0,
             "ops": []}), 1 << 20)


def test_a_replica_applies_only_the_next_publish():
    """A copy takes a publish only if it continues the incarnation or starts a new one."""
    table = ChannelTable(lambda: 1)
    assert not table.apply_publish("/a", 7, 2, b"x", 10, None)  # nothing before it
    assert table.apply_publish("/a", 7, 1, b"x", 10, None)
    assert table.apply_publish("/a", 7, 2, b"y", 10, None)
    assert not table.apply_publish("/a", 7, 2, b"z", 10, None)  # seen: refused, unchanged
    assert table.apply_publish("/a", 9, 1, b"new", 10, None)    # a new incarnation
    channel = table.get("/a", 0)
    assert (channel.epoch, channel.seq, list(channel.buffer)) == (9, 1, [(1, b"new")])


def test_config_checks_the_replica_keys():
    """replicas must leave an owner besides its replicas; replica_ack is one or none."""
    workers = [{"id": w, "router_bind": f"tcp://127.0.0.1:{p}",
                "router_connect": f"tcp://127.0.0.1:{p}", "pub_bind": f"tcp://127.0.0.1:{p + 1}",
                "pub_connect": f"tcp://127.0.0.1:{p + 1}"} for w, p in (("w1", 9000),
                                                                        ("w2", 9002))]
    parsed = config_module.parse_config({"workers": workers, "storage": {"replicas": 1}})
    assert parsed.storage.replicas == 1 and parsed.storage.replica_ack == "one"
    for storage, message in (({"replicas": 2}, "below the number"),
                             ({"replicas": 1, "replica_ack": "all"}, "replica_ack"),
                             ({"replicas": 1, "replica_lease_ms": 10}, "replica_lease_ms")):
        with pytest.raises(config_module.ConfigError, match=message):
            config_module.parse_config({"workers": workers, "storage": storage})


# -- real processes -----------------------------------------------------------------------

def unavailable_windows(storm, since: float) -> list:
    """Per channel that answered 503 after ``since``: seconds from its first 503 to its
    next 202."""
    windows = []
    for channel in storm.channels:
        first = [t for t, c in storm.unavailable if c == channel and t >= since]
        if first:
            after = [t for t in storm.acked_at[channel] if t > first[0]]
            windows.append((after[0] if after else time.monotonic()) - first[0])
    return windows


def longest_gap(storm, channel: str, since: float) -> float:
    """The longest time ``channel`` went without a 202 from ``since`` on."""
    times = [t for t in storm.acked_at[channel]]
    return max((b - a for a, b in zip(times, times[1:]) if b >= since), default=0.0)


def moving(channels, owner: str, ring) -> list:
    return [c for c in channels if ring.owner(c) == owner]


def test_killing_an_owner_under_a_storm_loses_and_reuses_nothing(tmp_path, run):
    """w1 of three SIGKILLed under a publish storm with replicas = 1: its standbys take
    its channels over, sequences continue and epochs stay, the channels it backed are
    served without it; w1 restarted takes its channels back; every 202'd message is
    delivered once, in order, to resuming subscribers on both edges."""
    channels = [f"/kill/{i}" for i in range(30)]
    ring = Ring(["w1", "w2", "w3"])
    lost = moving(channels, "w1", ring)
    assert {ring.standby(c) for c in lost} == {"w2", "w3"}
    with HostBed(tmp_path, ["w1", "w2", "w3"], edges=2, storage=REPLICAS) as bed:
        storm = Storm([(host, port) for _, host, port, _ in bed.edges], channels, publishers=4)
        w1, w2, w3 = (bed.workers[w] for w in ("w1", "w2", "w3"))
        for process in (w1, w2, w3):
            mark = 0
            for _ in range(2):  # it holds the snapshots of both others
                mark = process.wait_for("holds our snapshot", 10, mark) + 1

        async def scenario():
            await storm.prime()
            before = epochs(bed, channels)
            storm.start()
            started = time.monotonic()
            await asyncio.sleep(1.0)  # the storm runs before the kill (not a synchronisation)
            killed_at = time.monotonic()
            bed.kill("w1")
            await asyncio.to_thread(w2.wait_for, "takes over", 10)
            await asyncio.to_thread(w3.wait_for, "takes over", 10)
            await asyncio.sleep(1.5)
            marks = {w: len(bed.workers[w].lines) for w in ("w2", "w3")}
            bed.start_worker("w1")
            for worker_id in ("w2", "w3"):
                await asyncio.to_thread(bed.workers[worker_id].wait_for,
                                        "took its channels back", 10, marks[worker_id])
            await asyncio.sleep(1.0)
            await storm.finish()
            return before, epochs(bed, channels), started, killed_at

        before, after, started, killed_at = run(scenario(), timeout_s=60)
        problems = storm.check()
        windows = unavailable_windows(storm, killed_at)
        gap, _ = storm.longest_gap_s(started)
        print(f"\n{storm.report()}\n503 after the kill: {len(windows)} channels, longest "
              f"{max(windows, default=0):.2f} s; longest time without a 202 once the storm "
              f"ran: {gap:.2f} s")
        assert not problems, "\n".join(problems[:20])
        assert before == after, "a channel got a new epoch"
        assert sum(len(a) for a in storm.acked.values()) > 24 * 5
        for process in (w2, w3):
            assert "takes over" in process.log_text()
            assert "its process is gone; serving the channels it backs without it" in \
                process.log_text()


def test_a_frozen_owner_is_fenced_and_catches_up_before_it_serves(tmp_path, run):
    """w1 SIGSTOPped (a partition) under a storm: its lease runs out, w2 takes its channels
    over; thawed, w1 accepts no publish for them, takes them back and continues: no
    sequence is given twice, no epoch changes."""
    channels = [f"/stop/{i}" for i in range(24)]
    with HostBed(tmp_path, ["w1", "w2"], edges=1, storage=REPLICAS) as bed:
        storm = Storm([(host, port) for _, host, port, _ in bed.edges], channels, publishers=4)
        w1, w2 = bed.workers["w1"], bed.workers["w2"]
        w2.wait_for("holds our snapshot")
        w1.wait_for("holds our snapshot")

        async def scenario():
            await storm.prime()
            before = epochs(bed, channels)
            storm.start()
            await asyncio.sleep(1.0)
            frozen_at = time.monotonic()
            bed.freeze("w1")
            await asyncio.to_thread(w2.wait_for, "takes over", 10)
            at_takeover = {c: len(storm.acked[c]) for c in channels}
            await asyncio.sleep(1.5)  # w2 serves w1's channels this long
            at_thaw = {c: len(storm.acked[c]) for c in channels}
            mark = len(w1.lines)
            bed.thaw("w1")
            await asyncio.to_thread(w1.wait_for, "took back", 10, mark)
            await asyncio.sleep(1.0)
            await storm.finish()
            return before, epochs(bed, channels), frozen_at, at_takeover, at_thaw

        before, after, frozen_at, at_takeover, at_thaw = run(scenario(), timeout_s=60)
        problems = storm.check()
        ring = Ring(["w1", "w2"])
        w1_channels = moving(channels, "w1", ring)
        windows = unavailable_windows(storm, frozen_at)
        gaps = {owner: max(longest_gap(storm, c, frozen_at) for c in moving(channels, owner, ring))
                for owner in ("w1", "w2")}
        print(f"\n{storm.report()}\nafter the freeze: {len(windows)} channels answered 503, "
              f"the longest for {max(windows, default=0):.2f} s; the longest time without a "
              f"202 for w1's channels {gaps['w1']:.2f} s, for w2's {gaps['w2']:.2f} s")
        assert not problems, "\n".join(problems[:20])
        assert before == after, "a channel got a new epoch"
        # w2 served w1's channels while w1 was frozen.
        assert sum(at_thaw[c] - at_takeover[c] for c in w1_channels) > 10
        log = w1.log_text()
        assert "fenced" in log and "took back" in log
