"""The SQLite store and its writer thread, in-process, on a temporary file."""

import time

import pytest
import zmq

from firehose_zmq.worker.channel import ChannelTable
from firehose_zmq.worker.store import (DeleteOp, EpochOp, PruneOp, PublishOp, Store, StoreError,
                                LoopCommitter, StoreWriter)


def pub(name, seq, data=b"x", epoch=7, buffer_size=100, expires_at=None, publish_id=None, at=0.0):
    return PublishOp(name, epoch, seq, data, buffer_size, expires_at, publish_id, at)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "sub" / "w1.sqlite3")


def reopen(path, now=0.0, since=-1.0):
    store = Store(path)
    return store, store.load(now, since)


def test_publishes_survive_reopen_with_seq_epoch_ttl_and_buffer(path):
    """Messages, sequence, epoch, buffer size and expiry are read back after a reopen."""
    store = Store(path)
    store.load(0.0, 0.0)
    store.apply([[pub("/a", 1, b"one", expires_at=500.0, buffer_size=2),
                  pub("/a", 2, b"two", expires_at=500.0, buffer_size=2)],
                 [pub("/a", 3, b"three", expires_at=600.0, buffer_size=2)]])
    store.close(clean=False)
    store, snapshot = reopen(path, now=100.0)
    (channel,) = snapshot.channels
    assert (channel.name, channel.epoch, channel.seq, channel.buffer_size, channel.expires_at) == \
        ("/a", 7, 3, 2, 600.0)
    assert channel.messages == [(2, b"two"), (3, b"three")]
    assert snapshot.clean is False
    store.close(clean=True)
    assert reopen(path, now=100.0)[1].clean is True


def test_trim_keeps_store_bounded(path):
    """A channel never holds more stored messages than its buffer size."""
    store = Store(path)
    store.apply([[pub("/a", seq, buffer_size=5) for seq in range(1, 1001)]])
    store.apply([[pub("/a", 1001, buffer_size=1)]])
    assert store.counts()["messages"] == 1
    store.apply([[pub("/b", 1, buffer_size=0)]])
    assert store.counts() == {"channels": 2, "messages": 1, "publish_ids": 0}


def test_new_incarnation_drops_old_messages(path):
    """A publish with seq 1 (the channel started over) forgets the older incarnation."""
    store = Store(path)
    store.apply([[pub("/a", 1, b"old"), pub("/a", 2, b"old2"), pub("/a", 1, b"new", epoch=9)]])
    store.close(clean=True)
    (channel,) = reopen(path)[1].channels
    assert (channel.epoch, channel.seq, channel.messages) == (9, 1, [(1, b"new")])


def test_delete_expiry_and_prune(path):
    """Deleted channels, channels expired by load time and old publish ids leave the file."""
    store = Store(path)
    store.apply([[pub("/gone", 1), pub("/old", 1, expires_at=50.0), pub("/kept", 1),
                  pub("/kept", 2, publish_id="p-old", at=10.0),
                  pub("/kept", 3, publish_id="p-new", at=90.0)],
                 [DeleteOp("/gone"), PruneOp(20.0), EpochOp("/kept", 11)]])
    store.close(clean=True)
    store, snapshot = reopen(path, now=100.0, since=0.0)
    assert [c.name for c in snapshot.channels] == ["/kept"]
    assert snapshot.channels[0].epoch == 11
    assert snapshot.dropped_expired == 1
    assert [(p.publish_id, p.seq) for p in snapshot.publish_ids] == [("p-new", 3)]
    assert store.counts() == {"channels": 1, "messages": 3, "publish_ids": 1}


def test_failed_batch_is_rolled_back(path):
    """A batch that fails leaves nothing of itself behind."""
    store = Store(path)
    with pytest.raises(TypeError):
        store.apply([[pub("/a", 1), "not an op"]])
    assert store.counts()["channels"] == 0


def test_unreadable_file_is_a_clear_error(tmp_path):
    """A file that is not SQLite gives StoreError naming the file."""
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="bad.sqlite3"):
        Store(str(bad))


def test_restore_rebuilds_the_table():
    """A restored channel answers the buffer rules and continues its sequence."""
    table = ChannelTable(lambda: 99)
    table.restore("/a", 7, 5, [(4, b"d"), (5, b"e")], None, 100)
    channel = table.get("/a", 0.0)
    assert [seq for seq, _ in channel.since(3)] == [4, 5]
    _, message = table.publish("/a", b"f", 0.0, None, 100)
    assert (message, channel.epoch) == ((6, b"f"), 7)
    with pytest.raises(ValueError):
        table.restore("/b", 7, 5, [(2, b"x"), (4, b"y")], None, 100)


def test_expired_channel_stays_until_expire_reports_it():
    """An expired channel reads as gone but is dropped (and reported) only by expire()."""
    table = ChannelTable(lambda: 1)
    table.publish("/a", b"x", 0.0, 10.0, 100)
    assert table.get("/a", 20.0) is None
    assert table.expire(20.0) == ["/a"]
    assert len(table) == 0


def wait_committed(writer, ticket, timeout_s=5.0):
    poller = zmq.Poller()
    poller.register(writer.notify_socket, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    while writer.committed() < ticket:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"ticket {ticket} not committed in {timeout_s} s"
        poller.poll(remaining * 1000)


@pytest.mark.parametrize("interval_s", [0.0, 0.05])
def test_writer_commits_batches_and_notifies(path, interval_s):
    """The writer commits submitted batches together and reports the newest ticket."""
    context = zmq.Context()
    try:
        store = Store(path)
        writer = StoreWriter(store, context, interval_s)
        writer.start()
        tickets = [writer.submit([pub("/a", seq)]) for seq in range(1, 51)]
        assert tickets == list(range(1, 51))
        wait_committed(writer, 50)
        assert writer.unflushed_ops == 0
        assert writer.commits <= 50
        assert writer.stop(5.0) is True
        snapshot = reopen(path)[1]
        assert [c.seq for c in snapshot.channels] == [50]
        assert snapshot.clean is True
    finally:
        context.term()


def test_writer_failure_is_reported(path):
    """A batch the store cannot apply stops the writer and is reported to the loop."""
    context = zmq.Context()
    try:
        writer = StoreWriter(Store(path), context)
        writer.start()
        writer.submit(["not an op"])
        poller = zmq.Poller()
        poller.register(writer.notify_socket, zmq.POLLIN)
        assert poller.poll(5000)
        with pytest.raises(StoreError):
            writer.committed()
        assert writer.stop(5.0) is False
    finally:
        context.term()


def test_commit_window_gathers_the_batches_submitted_within_it_into_one_commit(path):
    """With a window, batches submitted while it is open share the one commit after it."""
    context = zmq.Context()
    try:
        writer = StoreWriter(Store(path), context, gather_s=0.5)
        writer.start()
        for seq in range(1, 11):
            writer.submit([pub("/a", seq)])
        wait_committed(writer, 10)
        assert writer.stop(5.0) is True
        assert writer.commits == 1
        assert [c.seq for c in reopen(path)[1].channels] == [10]
    finally:
        context.term()


def test_stop_ends_the_commit_window_and_commits_what_waits(path):
    """A stop does not wait out the window: what is queued is committed, the file is clean."""
    context = zmq.Context()
    try:
        writer = StoreWriter(Store(path), context, gather_s=60.0)
        writer.start()
        writer.submit([pub("/a", 1)])
        writer.submit([pub("/a", 2)])
        assert writer.stop(5.0) is True  # False if the writer still sat in its window
        assert writer.commits == 1
        snapshot = reopen(path)[1]
        assert [c.seq for c in snapshot.channels] == [2] and snapshot.clean is True
    finally:
        context.term()


def test_loop_committer_commits_what_a_turn_submitted_when_due(path):
    """sync's committer: batches wait until commit_due (the loop calls it each turn);
    then they are committed together and the newest ticket is reported."""
    committer = LoopCommitter(Store(path))
    assert committer.due_in(time.monotonic()) is None
    tickets = [committer.submit([pub("/a", seq)]) for seq in range(1, 4)]
    assert tickets == [1, 2, 3] and committer.unflushed_ops == 3
    assert committer.committed() == 0
    now = time.monotonic()
    assert committer.due_in(now) == 0.0
    assert committer.commit_due(now) is True
    assert committer.committed() == 3 and committer.commits == 1
    assert committer.unflushed_ops == 0 and committer.due_in(now) is None
    assert committer.commit_due(now) is False  # nothing waits
    assert committer.stop(5.0) is True
    snapshot = reopen(path)[1]
    assert [c.seq for c in snapshot.channels] == [3] and snapshot.clean is True


def test_loop_committer_window_holds_batches_until_it_ends(path):
    """With a commit window the first batch waits that long; batches within it share
    the commit. Times are passed in, so nothing sleeps."""
    committer = LoopCommitter(Store(path), window_s=0.5)
    committer.submit([pub("/a", 1)])
    started = time.monotonic()
    assert 0.4 < committer.due_in(started) <= 0.5
    committer.submit([pub("/a", 2)])
    assert committer.commit_due(started) is False
    assert committer.committed() == 0
    assert committer.commit_due(started + 0.5) is True
    assert committer.committed() == 2 and committer.commits == 1
    assert committer.stop(5.0) is True


def test_loop_committer_stop_commits_what_waits_and_a_failure_is_reported(tmp_path):
    waiting = LoopCommitter(Store(str(tmp_path / "a.sqlite3")), window_s=60.0)
    waiting.submit([pub("/a", 1)])
    assert waiting.stop(5.0) is True and waiting.commits == 1
    assert waiting.stop(5.0) is True  # the same answer again
    assert [c.seq for c in reopen(str(tmp_path / "a.sqlite3"))[1].channels] == [1]

    failing = LoopCommitter(Store(str(tmp_path / "b.sqlite3")))
    failing.submit(["not an op"])
    with pytest.raises(StoreError):
        failing.commit_due(time.monotonic())
    with pytest.raises(StoreError):
        failing.committed()
    assert failing.stop(5.0) is False


def test_a_batch_leaves_what_one_commit_per_publish_leaves(tmp_path):
    """Publishes written together as one run store exactly what they store one by one,
    across buffer-size changes, new incarnations and deletes."""
    import random
    rng = random.Random(7)
    ops, seqs, epochs = [], {}, {}
    for i in range(600):
        name = f"/c{rng.randrange(5)}"
        if rng.random() < 0.06:  # deleted, or expired (which starts over without a DeleteOp)
            if rng.random() < 0.5:
                ops.append(DeleteOp(name))
            seqs.pop(name, None)
            continue
        seq = seqs.get(name, 0) + 1
        if seq == 1:
            epochs[name] = epochs.get(name, 0) + 1
        seqs[name] = seq
        ops.append(pub(name, seq, b"m%d" % i, epoch=epochs[name],
                       buffer_size=rng.choice([0, 1, 3, 10])))

    def contents(store):
        db = store._db
        return (db.execute("SELECT * FROM channels ORDER BY name").fetchall(),
                db.execute("SELECT * FROM messages ORDER BY name, seq").fetchall())

    one_by_one = Store(str(tmp_path / "a.sqlite3"))
    one_by_one.load(0.0, 0.0)
    for op in ops:
        one_by_one.apply([[op]])
    together = Store(str(tmp_path / "b.sqlite3"))
    together.load(0.0, 0.0)
    together.apply([ops[:250], ops[250:]])
    assert contents(together) == contents(one_by_one)
    assert contents(together)[1]  # the comparison is not between two empty stores


def test_a_version_1_file_is_upgraded_with_its_rows(path):
    """A file written with schema version 1 opens with every channel, message and
    publish id it held."""
    import os
    import sqlite3
    os.makedirs(os.path.dirname(path))
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("""
        PRAGMA journal_mode=WAL;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
        CREATE TABLE channels (name TEXT PRIMARY KEY, epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL, buffer_size INTEGER NOT NULL, expires_at REAL) WITHOUT ROWID;
        CREATE TABLE messages (name TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY (name, seq));
        CREATE TABLE publish_ids (publish_id PRIMARY KEY, name TEXT NOT NULL,
            epoch INTEGER NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL) WITHOUT ROWID;
        CREATE INDEX publish_ids_at ON publish_ids (at);
        INSERT INTO meta VALUES ('schema_version', 1), ('clean', 1);
        INSERT INTO channels VALUES ('/a', 7, 3, 100, NULL);
        INSERT INTO messages VALUES ('/a', 2, x'62'), ('/a', 3, x'63');
        INSERT INTO publish_ids VALUES ('p-2', '/a', 7, 2, 20.0), ('p-3', '/a', 7, 3, 30.0);
    """)
    db.close()
    store, snapshot = reopen(path, now=40.0, since=0.0)
    assert snapshot.clean
    assert snapshot.channels == [("/a", 7, 3, 100, None, [(2, b"b"), (3, b"c")])]
    assert [(p.publish_id, p.seq, p.at) for p in snapshot.publish_ids] == [("p-2", 2, 20.0),
                                                                            ("p-3", 3, 30.0)]
    store.apply([[pub("/a", 4, b"d", publish_id="p-4", at=45.0)]])
    store.close(clean=True)
    store, snapshot = reopen(path, now=50.0, since=25.0)
    assert snapshot.channels[0].messages == [(2, b"b"), (3, b"c"), (4, b"d")]
    assert [p.publish_id for p in snapshot.publish_ids] == ["p-3", "p-4"]
    store.close(clean=True)

