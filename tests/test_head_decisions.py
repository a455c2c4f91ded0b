"""The edge remembers decisions for heads that repeat, and only for those, within a bound;
the server processes tune the garbage collector once they serve."""

import subprocess
import sys
import time

from firehose_zmq import cli
from firehose_zmq.edge.connection import _KNOWN_HEADS, KnownHeads


def test_a_head_is_remembered_from_its_second_sight():
    heads = KnownHeads()
    head = b"GET /a?last_message_sequence=3 HTTP/1.1\r\nHost: x"
    heads.offer(head, "decision")
    assert heads.get(head) is None
    heads.offer(head, "decision")
    assert heads.get(head) == "decision"


def test_heads_read_once_do_not_push_out_those_that_repeat():
    """One subscriber per channel: every poll head is new. A publisher's repeating
    head stays known through them (the old table was cleared every 4,096)."""
    heads = KnownHeads()
    publish = b"PUT /hot HTTP/1.1\r\nHost: x\r\nContent-Length: 5"
    heads.offer(publish, "publish")
    heads.offer(publish, "publish")
    for seq in range(3 * _KNOWN_HEADS):
        heads.offer(b"GET /c%d?last_message_sequence=%d HTTP/1.1\r\nHost: x" % (seq, seq), "poll")
    assert heads.get(publish) == "publish"


def test_both_tables_stay_within_their_bound():
    heads = KnownHeads()
    started = time.process_time()
    for n in range(100_000):
        head = b"GET /c%d HTTP/1.1\r\nHost: x" % n
        heads.offer(head, n)
        heads.offer(head, n)
        assert len(heads) <= _KNOWN_HEADS and len(heads._seen) <= _KNOWN_HEADS
    print(f"200,000 offers: {time.process_time() - started:.3f} s CPU")


def test_settle_freezes_start_up_objects_and_raises_the_thresholds():
    """In a process of its own, as the edge and the worker call it once they serve."""
    out = subprocess.run(
        [sys.executable, "-c", "import gc; from firehose_zmq import cli; cli.settle(); "
         "print(gc.get_threshold(), gc.get_freeze_count() > 1000)"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == f"{cli.GC_THRESHOLDS} True"
