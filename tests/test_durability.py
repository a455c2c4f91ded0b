"""Restarts, outages, retries and drain against real processes (issue 6, parts 1-5)."""

import itertools
import json
import re
import signal
import threading
import time

import pytest
import zmq

from firehose_zmq.wire import frames

from .cluster import Cluster, channel_on
from .http import request

_names = itertools.count()


def fresh(worker_id, worker_ids=("w1", "w2")):
    return channel_on(worker_id, worker_ids, f"/dur/{next(_names)}")


def publish(cluster, channel, body=b"x", headers=None, timeout_s=10.0):
    return request(cluster.url(channel), "PUT", body, headers, timeout_s=timeout_s)


def poll(cluster, channel, last, timeout_s=30.0):
    return request(cluster.url(f"{channel}?last_message_sequence={last}"), timeout_s=timeout_s)


class InBackground:
    """Run ``fn`` on a thread; ``result(timeout_s)`` returns its value and how long it took."""

    def __init__(self, fn):
        self._value = None
        self._started = time.monotonic()
        self.finished_at = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        self._value = fn()
        self.finished_at = time.monotonic()

    def result(self, timeout_s=30.0):
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"still running after {timeout_s} s"
        return self._value


def worker_call(cluster, worker_id, **request_fields):
    """One request straight to a worker's ROUTER; returns the decoded reply."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        dealer.connect(cluster.endpoints[worker_id][0])
        dealer.send(frames.encode_request({"id": 1, **request_fields}))
        return frames.decode_reply(dealer.recv(), 1 << 20)
    finally:
        dealer.close()


def wait_log(process, pattern, start=0, timeout_s=10.0):
    return process.wait_for(pattern, timeout_s=timeout_s, start=start)


@pytest.fixture
def slow_poll_cluster(tmp_path):
    """A cluster whose long-polls wait 15 s, so an early 204 is not a timeout."""
    with Cluster(tmp_path, long_poll_timeout_s=15.0) as running:
        yield running


def test_sigkill_restart_keeps_messages_sequences_and_buffers(fresh_cluster):
    """After SIGKILL and restart a worker serves every acknowledged message and continues."""
    cluster = fresh_cluster
    channel = fresh("w1")
    size = {"X-Firehose-Buffer-Size": "3"}
    for i in range(1, 6):
        assert publish(cluster, channel, f"m{i}".encode(), size).header(
            "X-Firehose-Sequence") == str(i)
    mark = len(cluster.edge.lines)
    cluster.kill_worker("w1")
    cluster.start_worker("w1")
    wait_log(cluster.workers["w1"], r"loaded 1 channels \(3 messages")
    wait_log(cluster.edge, "worker w1 up", start=mark)
    assert json.loads(poll(cluster, channel, 2).body) == {"message": "m3", "last_sequence": 3}
    assert json.loads(poll(cluster, channel, 4).body) == {"message": "m5", "last_sequence": 5}
    assert json.loads(poll(cluster, channel, 1).body)["last_sequence"] == 5  # fell out: newest
    assert publish(cluster, channel, b"m6", size).header("X-Firehose-Sequence") == "6"
    assert json.loads(poll(cluster, channel, 5).body) == {"message": "m6", "last_sequence": 6}


def test_owner_outage_is_503_at_once_and_waiters_get_204(slow_poll_cluster):
    """A dead owner: waiting long-polls get 204 promptly, new requests 503 at once,
    and within 2 s of its return the edge serves it again without a gap."""
    cluster = slow_poll_cluster
    channel = fresh("w1")
    other = fresh("w2")
    assert publish(cluster, channel, b"before").status == 202
    mark = len(cluster.edge.lines)
    waiter = InBackground(lambda: poll(cluster, channel, 1))
    other_waiter = InBackground(lambda: poll(cluster, other, 0, timeout_s=30))
    wait_for_subscribers(cluster, 2)
    killed_at = time.monotonic()
    cluster.kill_worker("w1")
    r = waiter.result(5.0)
    assert r.status == 204
    assert waiter.finished_at - killed_at < 2.0
    started = time.monotonic()
    r = publish(cluster, channel, b"lost?")
    assert r.status == 503 and time.monotonic() - started < 1.0
    assert request(cluster.url(channel), "HEAD").status == 503
    assert request(cluster.url(other), "HEAD").status == 200
    assert publish(cluster, other, b"w2 still works").status == 202
    assert other_waiter.result(5.0).status == 200
    cluster.start_worker("w1")
    ready_at = time.monotonic()
    wait_log(cluster.edge, "worker w1 up", start=mark, timeout_s=5.0)
    assert time.monotonic() - ready_at < 2.0
    resumed = InBackground(lambda: poll(cluster, channel, 1))
    wait_for_subscribers(cluster, 3)
    assert publish(cluster, channel, b"after").header("X-Firehose-Sequence") == "2"
    assert json.loads(resumed.result(10.0).body) == {"message": "after", "last_sequence": 2}


def wait_for_subscribers(cluster, at_least, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = json.loads(request(cluster.url("/metrics@firehose")).body)
        if sum(b["global"].get("subscribed", 0) for b in report) >= at_least:
            return
    raise AssertionError(f"fewer than {at_least} subscriptions within {timeout_s} s")


def test_publish_id_retry_is_answered_with_first_result_across_restart(fresh_cluster):
    """A publish retried with the same id gets the first seq and is stored once, even
    after the worker was killed between storing and replying."""
    cluster = fresh_cluster
    channel = fresh("w1")
    first = worker_call(cluster, "w1", op="publish", channel=channel, data=b"a", publish_id="p-1")
    assert first["ok"] and first["seq"] == 1
    again = worker_call(cluster, "w1", op="publish", channel=channel, data=b"a", publish_id="p-1")
    assert (again["seq"], again["epoch"], again.get("duplicate")) == (1, first["epoch"], True)
    cluster.kill_worker("w1")
    cluster.start_worker("w1")
    after = worker_call(cluster, "w1", op="publish", channel=channel, data=b"a", publish_id="p-1")
    assert (after["seq"], after["epoch"], after.get("duplicate")) == (1, first["epoch"], True)
    fetched = worker_call(cluster, "w1", op="fetch", channel=channel, since=0, after=True)
    assert fetched["messages"] == [[1, b"a"]]
    misused = worker_call(cluster, "w1", op="publish", channel=fresh("w1"), data=b"a",
                          publish_id="p-1")
    assert misused["ok"] is False and "another channel" in misused["reason"]


def test_late_publish_is_refused_and_not_stored(cluster):
    """A publish read after its deadline is refused with 'deadline' and stores nothing."""
    channel = fresh("w1")
    late = worker_call(cluster, "w1", op="publish", channel=channel, data=b"late",
                       deadline_ms=int(1000 * time.time()) - 1000)
    assert (late["ok"], late["error"]) == (False, "deadline")
    assert publish(cluster, channel).header("X-Firehose-Sequence") == "1"


def test_publish_in_flight_is_resent_when_the_worker_comes_back(tmp_path):
    """A publish the worker never read (hung, then killed) is sent again after the restart
    and answered 202 once, with the next sequence."""
    with Cluster(tmp_path, extra_config="request_timeout_s = 12.0") as cluster:
        channel = fresh("w1")
        assert publish(cluster, channel, b"one").status == 202
        mark = len(cluster.edge.lines)
        cluster.workers["w1"].signal(signal.SIGSTOP)
        pending = InBackground(lambda: publish(cluster, channel, b"two", timeout_s=20))
        wait_log(cluster.edge, "worker w1 down", start=mark, timeout_s=5.0)
        cluster.kill_worker("w1")
        cluster.start_worker("w1")
        r = pending.result(15.0)
        assert (r.status, r.header("X-Firehose-Sequence")) == (202, "2")
        wait_log(cluster.edge, r"resent 1 publish\(es\) to worker w1", start=mark)
        assert publish(cluster, channel, b"three").header("X-Firehose-Sequence") == "3"
        assert json.loads(poll(cluster, channel, 1).body) == {"message": "two",
                                                              "last_sequence": 2}


def publish_concurrently(cluster, channels, rounds):
    """Each channel's publisher sends ``rounds`` publishes, each after the last one's 202;
    the publishers run side by side. Returns every publisher's sequences."""
    def publisher(channel):
        return [publish(cluster, channel, f"m{i}".encode()).header("X-Firehose-Sequence")
                for i in range(1, rounds + 1)]
    running = [InBackground(lambda c=c: publisher(c)) for c in channels]
    return [r.result(30.0) for r in running]


@pytest.mark.parametrize("commit_on", ["loop", "thread"])
def test_commit_window_acknowledges_only_committed_publishes_and_shares_commits(tmp_path,
                                                                              commit_on):
    """With a commit window a 202 still means committed (a SIGKILL right after the last
    202s loses none of them), and the publishes that arrive within one window share
    one commit; whether the worker's loop or a writer thread commits."""
    with Cluster(tmp_path, storage_config=f'commit_window_ms = 200\ncommit_on = "{commit_on}"'
                 ) as cluster:
        committer = "loop" if commit_on == "loop" else "writer thread"
        wait_log(cluster.workers["w1"], f"durability sync, commits on the {committer}")
        rounds = 5
        channels = [fresh("w1") for _ in range(4)]
        expected = [[str(i) for i in range(1, rounds + 1)]] * len(channels)
        assert publish_concurrently(cluster, channels, rounds) == expected
        mark = len(cluster.edge.lines)
        cluster.kill_worker("w1")  # within the next window: nothing acknowledged may be in it
        cluster.start_worker("w1")
        wait_log(cluster.edge, "worker w1 up", start=mark)
        for channel in channels:
            assert json.loads(poll(cluster, channel, rounds - 1).body) == {
                "message": f"m{rounds}", "last_sequence": rounds}
        channels = [fresh("w1") for _ in range(4)]
        assert publish_concurrently(cluster, channels, rounds) == expected
        worker = cluster.workers["w1"]
        worker.signal(signal.SIGTERM)
        assert worker.popen.wait(10) == 0
        line = worker.lines[wait_log(worker, r"worker w1 stopped: .* store commits")]
        published, commits = map(int, re.search(r"(\d+) published.* (\d+) store commits",
                                                line).groups())
        assert published == len(channels) * rounds
        # 4 publishers wait for one commit, then publish again at once: a window holds
        # each round's publishes (5 commits); without one they mostly commit apart
        assert 1 <= commits <= published // 2, line


def test_worker_sigterm_flushes_async_store(tmp_path):
    """SIGTERM makes an async worker answer, flush what it acknowledged, and stop clean."""
    with Cluster(tmp_path, durability="async",
                 storage_config="flush_interval_ms = 60000") as cluster:
        channel = fresh("w1")
        for i in range(1, 4):
            assert publish(cluster, channel, f"m{i}".encode()).status == 202
        worker = cluster.workers["w1"]
        mark = len(cluster.edge.lines)
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.popen.wait(10) == 0
        assert time.monotonic() - started < 5.0
        cluster.start_worker("w1")
        wait_log(cluster.workers["w1"], r"loaded 1 channels \(3 messages.*previous stop clean")
        wait_log(cluster.edge, "worker w1 up", start=mark)
        assert json.loads(poll(cluster, channel, 1).body) == {"message": "m2", "last_sequence": 2}
        assert publish(cluster, channel).header("X-Firehose-Sequence") == "4"


def test_memory_mode_forgets_on_restart(tmp_path):
    """With durability memory a restarted worker starts every channel again at 1."""
    with Cluster(tmp_path, durability="memory") as cluster:
        channel = fresh("w1")
        publish(cluster, channel)
        publish(cluster, channel)
        mark = len(cluster.edge.lines)
        cluster.kill_worker("w1")
        cluster.start_worker("w1")
        wait_log(cluster.edge, "worker w1 up", start=mark)
        assert publish(cluster, channel).header("X-Firehose-Sequence") == "1"
        assert not cluster.data_dir.exists() or not any(cluster.data_dir.iterdir())


def test_edge_sigterm_answers_waiters_and_exits(slow_poll_cluster):
    """SIGTERM to an edge answers waiting long-polls with 204 and exits 0 promptly."""
    cluster = slow_poll_cluster
    channel = fresh("w2")
    waiter = InBackground(lambda: poll(cluster, channel, 0))
    wait_for_subscribers(cluster, 1)
    started = time.monotonic()
    cluster.edge.signal(signal.SIGTERM)
    assert waiter.result(5.0).status == 204
    assert cluster.edge.popen.wait(10) == 0
    assert time.monotonic() - started < 5.0
