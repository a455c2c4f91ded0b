"""Durable channel state for a worker: one SQLite file (WAL), with group commit.

Theory of operation
-------------------
The worker's loop stays the only owner of channel state in memory (``channel``).
Every change it makes is also described as a small operation (``PublishOp``,
``DeleteOp``, ``EpochOp``, ``PruneOp``); the loop collects the operations of one
loop turn into a batch and hands the batch to ``StoreWriter.submit``, which
returns the batch's *ticket* (1, 2, 3, ...). The writer thread takes every batch
waiting at that moment, applies them in one transaction and commits (group
commit), then tells the loop the highest ticket that is on disk by sending it
on an inproc PAIR socket that the loop polls with its other sockets::

    loop thread                               writer thread
    submit(ops) -> ticket   --SimpleQueue-->  BEGIN; apply batches; COMMIT
    PAIR (bind)             <--[ticket]-----  PAIR (connect)   8 bytes, big-endian
                            <--[b""]--------  the store failed; the writer has stopped

In ``sync`` mode the loop holds back every reply and every PUB message until
the ticket that was current when it was produced is committed, so nothing a
client can see (a 202, a sequence, a message) is ever lost by a crash. In
``async`` mode the loop answers at once and the writer commits at most every
``flush_interval_s``; a crash loses at most that interval's tail.

In ``sync`` mode (with ``commit_on = "loop"``, the default) the worker commits
on its own loop thread instead (``LoopCommitter``, the same interface without a
thread): at the end of each
loop turn, after the turn's requests were read and before its replies leave,
what the turn recorded is committed. What arrives while that commit's fsync runs
waits in ZeroMQ's queues and is read in the next turn, so it shares the next
commit: group commit without a hand-off between threads, which cost the worker
about a fifth of its CPU per publish (the writer thread's wake-up and notice,
and the two threads taking turns at the interpreter lock for every statement).

When the writer wakes for a batch it first lets more gather for ``gather_s``
(async: the flush interval; sync: the commit window, 0 by default), then takes
everything queued and commits it once. A commit costs about the same for one
publish as for a hundred (its fsync dominates), so what arrives while the
previous commit runs, or within the window, shares the next one; ``commits``
counts them, for ``published / commits``.

Tables (primary key first)::

    meta        (key, value)                 schema version; clean = 1 after a clean stop
    channels    (name, epoch, seq, buffer_size, expires_at)   one row per live channel
    messages    (name, seq, data)            the buffered messages, trimmed on publish
    publish_ids (at, publish_id, name, epoch, seq)   recent publish ids, for retries

The connection holds the file's lock for as long as it is open (exclusive
locking mode): no other process can use the file meanwhile, and no commit pays
for taking and releasing locks.

The store never grows without bound: a publish trims its channel's messages to
the buffer size, an expired or deleted channel loses its rows, and publish ids
older than the retry window are pruned.
"""

import logging
import os
import queue
import sqlite3
import threading
import time
from typing import NamedTuple, Optional

import zmq

from ..metrics import LatencyHistogram
from ..zmqraw import readable

log = logging.getLogger("firehose.store")

SCHEMA_VERSION = 2

# Every table is one b-tree clustered on the key it is written and trimmed by, so a
# commit touches few pages (each one is written to the WAL and synced): a publish
# adds a message next to its channel's others and trims the oldest ones beside it,
# and publish ids are appended in time order and pruned from the old end.
_META_TABLE = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID"
_TABLES = _META_TABLE + """;
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    buffer_size INTEGER NOT NULL, expires_at REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {messages} (
    name TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (name, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {publish_ids} (
    at REAL NOT NULL, publish_id NOT NULL, name TEXT NOT NULL, epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL, PRIMARY KEY (at, publish_id)) WITHOUT ROWID;
"""
_SCHEMA = _TABLES.format(messages="messages", publish_ids="publish_ids")

# Version 1 had a rowid table for messages and publish ids keyed by id with an
# index on ``at``: the same rows, in more b-trees.
_MIGRATE_FROM_1 = _TABLES.format(messages="messages_v2", publish_ids="publish_ids_v2") + """
INSERT INTO messages_v2 (name, seq, data) SELECT name, seq, data FROM messages;
INSERT OR REPLACE INTO publish_ids_v2 (at, publish_id, name, epoch, seq)
    SELECT at, publish_id, name, epoch, seq FROM publish_ids;
DROP TABLE messages;
DROP TABLE publish_ids;
ALTER TABLE messages_v2 RENAME TO messages;
ALTER TABLE publish_ids_v2 RENAME TO publish_ids;
"""


class StoreError(Exception):
    """The store cannot be opened or written; the message says which file and why."""


class PublishOp(NamedTuple):
    """A message was sequenced: store it, the channel's new state, and its publish id."""

    name: str
    epoch: int
    seq: int
    data: bytes
    buffer_size: int
    expires_at: Optional[float]
    publish_id: object  # str, bytes or None
    at: float


class DeleteOp(NamedTuple):
    """A channel was deleted or expired: forget it and its messages."""

    name: str


class EpochOp(NamedTuple):
    """A channel got a new epoch without a publish (after an unclean async restart)."""

    name: str
    epoch: int


class RestoreOp(NamedTuple):
    """A channel taken from its previous owner (a ring change): replace whatever is
    stored of it with this state; ``messages`` are ``(seq, data)``, oldest first, and
    ``publish_ids`` ``(publish_id, seq, epoch, at)`` of its recent publishes."""

    name: str
    epoch: int
    seq: int
    expires_at: Optional[float]
    messages: list
    publish_ids: list


class PruneOp(NamedTuple):
    """Forget publish ids recorded before ``before`` (wall-clock seconds)."""

    before: float


class StoredChannel(NamedTuple):
    name: str
    epoch: int
    seq: int
    buffer_size: int
    expires_at: Optional[float]
    messages: list  # [(seq, data)], oldest first


class StoredPublishId(NamedTuple):
    publish_id: object
    name: str
    epoch: int
    seq: int
    at: float


class Snapshot(NamedTuple):
    """What ``Store.load`` found: live channels, recent publish ids, and whether the
    previous run stopped cleanly (everything it acknowledged was flushed)."""

    channels: list
    publish_ids: list
    clean: bool
    dropped_expired: int


class _PublishRun:
    """Consecutive publishes, written with one statement per table.

    The result is what applying them one by one would leave: the last state of
    each channel; the messages above the highest trim point any of them set
    (the in-memory buffer only ever loses its oldest messages); nothing of a
    channel's older incarnation once a publish starts a new one (sequence 1).
    """

    __slots__ = ("last", "messages", "cutoff", "restarted", "publish_ids")

    def __init__(self):
        self.last: dict = {}        # name -> newest PublishOp
        self.messages: dict = {}    # name -> [(seq, data)] of this run
        self.cutoff: dict = {}      # name -> highest seq that must not stay stored
        self.restarted: set = set() # names whose stored messages all go first
        self.publish_ids: list = []

    def add(self, op: "PublishOp") -> None:
        name = op.name
        if op.seq == 1:
            self.restarted.add(name)
            self.messages.pop(name, None)
            self.cutoff.pop(name, None)
        self.last[name] = op
        if op.buffer_size > 0:
            self.messages.setdefault(name, []).append((op.seq, op.data))
        cutoff = op.seq - op.buffer_size
        if cutoff > self.cutoff.get(name, 0):
            self.cutoff[name] = cutoff
        if op.publish_id is not None:
            self.publish_ids.append((op.publish_id, name, op.epoch, op.seq, op.at))

    def write(self, db) -> None:
        if not self.last:
            return
        if self.restarted:
            db.executemany("DELETE FROM messages WHERE name = ?",
                           [(name,) for name in self.restarted])
        cutoff = self.cutoff
        db.executemany("INSERT OR REPLACE INTO messages (name, seq, data) VALUES (?, ?, ?)",
                       [(name, seq, data) for name, rows in self.messages.items()
                        for seq, data in rows if seq > cutoff.get(name, 0)])
        if cutoff:
            db.executemany("DELETE FROM messages WHERE name = ? AND seq <= ?", cutoff.items())
        db.executemany("INSERT OR REPLACE INTO channels (name, epoch, seq, buffer_size, expires_at)"
                       " VALUES (?, ?, ?, ?, ?)",
                       [(op.name, op.epoch, op.seq, op.buffer_size, op.expires_at)
                        for op in self.last.values()])
        if self.publish_ids:
            db.executemany("INSERT OR REPLACE INTO publish_ids (publish_id, name, epoch, seq, at)"
                           " VALUES (?, ?, ?, ?, ?)", self.publish_ids)


class Store:
    """One worker's SQLite file. Not thread-safe: after ``StoreWriter.start`` only the
    writer thread uses it."""

    def __init__(self, path: str, synchronous: str = "FULL"):
        self.path = path
        try:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute(_META_TABLE)
            version = self._meta("schema_version")
            if version is None:
                self._db.executescript(_SCHEMA)
                self._set_meta("schema_version", SCHEMA_VERSION)
            elif version == 1:
                self._db.executescript(f"BEGIN IMMEDIATE; {_MIGRATE_FROM_1} "
                                       f"UPDATE meta SET value = {SCHEMA_VERSION} "
                                       "WHERE key = 'schema_version'; COMMIT;")
                log.info("store %s: schema version 1 upgraded to %d", path, SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise StoreError(f"{path} has schema version {version}; this is "
                                 f"{SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None

    def _meta(self, key: str):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def load(self, now: float, publish_ids_since: float) -> Snapshot:
        """Read back every channel still live at ``now`` (dropping expired ones from the
        file) and the publish ids recorded since ``publish_ids_since``; marks the file
        as in use (not clean) until ``close(clean=True)``."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            clean = self._meta("clean") != 0  # a new file (None) has nothing to lose
            expired = [name for (name,) in db.execute(
                "SELECT name FROM channels WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,))]
            for name in expired:
                self._delete(name)
            db.execute("DELETE FROM publish_ids WHERE at < ?", (publish_ids_since,))
            rows = db.execute("SELECT name, epoch, seq, buffer_size, expires_at FROM channels "
                              "ORDER BY name").fetchall()
            messages: dict = {}
            for name, seq, data in db.execute("SELECT name, seq, data FROM messages "
                                              "ORDER BY name, seq"):
                messages.setdefault(name, []).append((seq, data))
            channels = [StoredChannel(name, epoch, seq, size, expires_at, messages.get(name, []))
                        for name, epoch, seq, size, expires_at in rows]
            ids = [StoredPublishId(*row) for row in db.execute(
                "SELECT publish_id, name, epoch, seq, at FROM publish_ids ORDER BY at")]
            self._set_meta("clean", 0)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.path}: {exc}") from None
        return Snapshot(channels, ids, clean, len(expired))

    def apply(self, batches) -> int:
        """Apply every operation of ``batches`` (lists of ops) in one transaction and
        commit; returns the number of operations. Raises sqlite3.Error (rolled back).

        Runs of publishes are written together (``_PublishRun``): one row per
        message, but each channel's state, trim and restart once per run.
        """
        db = self._db
        count = 0
        run = _PublishRun()
        db.execute("BEGIN")
        try:
            for ops in batches:
                for op in ops:
                    if type(op) is PublishOp:
                        run.add(op)
                        continue
                    run.write(db)
                    run = _PublishRun()
                    self._apply(op)
                count += len(ops)
            run.write(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return count

    def _apply(self, op) -> None:
        db = self._db
        if type(op) is DeleteOp:
            self._delete(op.name)
        elif type(op) is EpochOp:
            db.execute("UPDATE channels SET epoch = ? WHERE name = ?", (op.epoch, op.name))
        elif type(op) is PruneOp:
            db.execute("DELETE FROM publish_ids WHERE at < ?", (op.before,))
        elif type(op) is RestoreOp:
            self._delete(op.name)
            db.execute("INSERT INTO channels (name, epoch, seq, buffer_size, expires_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (op.name, op.epoch, op.seq, len(op.messages), op.expires_at))
            db.executemany("INSERT INTO messages (name, seq, data) VALUES (?, ?, ?)",
                           [(op.name, seq, data) for seq, data in op.messages])
            db.executemany("INSERT OR REPLACE INTO publish_ids (publish_id, name, epoch, seq, at)"
                           " VALUES (?, ?, ?, ?, ?)",
                           [(pid, op.name, epoch, seq, at) for pid, seq, epoch, at in op.publish_ids])
        else:
            raise TypeError(f"not a store operation: {op!r}")

    def _delete(self, name: str) -> None:
        self._db.execute("DELETE FROM messages WHERE name = ?", (name,))
        self._db.execute("DELETE FROM channels WHERE name = ?", (name,))

    def counts(self) -> dict:
        """Row counts per table (for tests and logs)."""
        return {table: self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("channels", "messages", "publish_ids")}

    def used_bytes(self) -> int:
        """Bytes of the file's pages in use (free pages are reused, not counted)."""
        db = self._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * db.execute("PRAGMA page_size").fetchone()[0]

    def close(self, clean: bool) -> None:
        """Close the file; ``clean`` records that everything acknowledged is in it."""
        try:
            if clean:
                self._set_meta("clean", 1)
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()




class _Tickets:
    """Each submitted batch's ticket (1, 2, 3, ...): ``last_ticket`` is the newest
    submitted (0 before the first), ``committed_ticket`` the newest committed."""

    @property
    def last_ticket(self) -> int:
        return self._last_ticket

    @property
    def committed_ticket(self) -> int:
        return self._committed


class LoopCommitter(_Tickets):
    """``sync`` durability: commits the loop's batches on the loop thread; see the
    module docstring. The interface of ``StoreWriter``, and ``due_in`` and
    ``commit_due`` for the loop to call after each ``submit``.

    ``window_s`` (``commit_window_ms``): how long the first batch waits for others
    before their commit; the loop's poll wakes for it. While a commit runs the loop
    reads nothing: a heartbeat is answered after it, so a disk that stalls for
    longer than the edges' liveness window gets the worker marked down, as a
    stopped one would be.
    """

    notify_socket = None

    def __init__(self, store: Store, window_s: float = 0.0):
        self._store = store
        self._window_s = window_s
        self._pending: list = []  # batches (lists of ops) submitted, not committed
        self._first_at = None     # monotonic time the oldest of them was submitted
        self._last_ticket = 0
        self._committed = 0
        self._closed = False
        self.unflushed_ops = 0
        self.failed = False
        self.commits = 0
        self.commit_time = LatencyHistogram()  # read by the admin listener
        self.used_bytes = store.used_bytes()

    def start(self) -> None:
        pass

    def submit(self, ops: list) -> int:
        """Queue a batch for the next commit; returns its ticket."""
        self._last_ticket += 1
        self._pending.append(ops)
        self.unflushed_ops += len(ops)
        if self._first_at is None:
            self._first_at = time.monotonic()
        return self._last_ticket

    def due_in(self, now: float):
        """Seconds until the waiting batches are due (0: now); None when none waits."""
        if self._first_at is None:
            return None
        return max(0.0, self._first_at + self._window_s - now)

    def commit_due(self, now: float) -> bool:
        """Commit the waiting batches once their window has passed; True when it did.
        Raises StoreError when the store fails (nothing more is committed)."""
        if self._first_at is None or now < self._first_at + self._window_s:
            return False
        self._commit()
        return True

    def _commit(self) -> None:
        if self.failed:
            raise StoreError(f"writing {self._store.path} failed; see the log")
        batches, self._pending = self._pending, []
        self._first_at = None
        started = time.monotonic()
        try:
            self._store.apply(batches)
        except Exception as exc:
            self.failed = True
            log.exception("committing to %s failed; the worker cannot acknowledge more",
                          self._store.path)
            raise StoreError(f"writing {self._store.path} failed: {exc}") from None
        self.commits += 1
        self.commit_time.observe(time.monotonic() - started)
        self.used_bytes = self._store.used_bytes()
        self._committed = self._last_ticket
        self.unflushed_ops = 0

    def committed(self) -> int:
        """The highest committed ticket; raises StoreError once a commit has failed."""
        if self.failed:
            raise StoreError(f"writing {self._store.path} failed; see the log")
        return self._committed

    def stop(self, timeout_s: float) -> bool:
        """Commit what waits and close the file (marked clean when everything is in
        it). Calling it again returns the same answer."""
        if not self._closed:
            self._closed = True
            if self._pending and not self.failed:
                try:
                    self._commit()
                except StoreError:
                    pass
            try:
                self._store.close(not self.failed)
            except sqlite3.Error:
                log.exception("closing the store failed")
        return not self.failed and self._committed == self._last_ticket


class StoreWriter(_Tickets):
    """Commits the loop's batches on a thread of its own; see the module docstring.

    ``submit``, ``committed`` and ``stop`` are called from the loop thread only;
    ``notify_socket`` is the loop's end of the PAIR, to register with its poller.
    ``gather_s``: how long batches gather after the first one before a commit
    (async's flush interval, sync's commit window); 0 commits as soon as one waits.
    ``commits`` is read by the loop thread after ``stop``.
    """

    _STOP = object()

    def __init__(self, store: Store, context, gather_s: float = 0.0):
        self._store = store
        self._context = context
        self._gather_s = gather_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._address = f"inproc://firehose-store-{id(self):x}"
        self.notify_socket = context.socket(zmq.PAIR)
        self.notify_socket.setsockopt(zmq.LINGER, 0)
        self.notify_socket.bind(self._address)
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._stopping = threading.Event()
        self._last_ticket = 0
        self._committed = 0
        self._unflushed: list = []  # [(ticket, op count)] submitted, not yet committed
        self.unflushed_ops = 0
        self.failed = False
        self.commits = 0
        self.commit_time = LatencyHistogram()  # read by the admin listener
        self.used_bytes = store.used_bytes()  # after the last commit (read by the loop)

    def start(self) -> None:
        self._thread.start()

    def submit(self, ops: list) -> int:
        """Queue a batch for the next commit; returns its ticket."""
        self._last_ticket += 1
        self._unflushed.append((self._last_ticket, len(ops)))
        self.unflushed_ops += len(ops)
        self._queue.put((self._last_ticket, ops))
        return self._last_ticket

    def due_in(self, now: float):
        """None: the thread commits by itself (``LoopCommitter`` has the loop do it)."""
        return None

    def commit_due(self, now: float) -> bool:
        return False

    def committed(self) -> int:
        """Read the writer's notices; returns the highest committed ticket.

        Raises StoreError once the writer has failed (it commits nothing more)."""
        notify = self.notify_socket
        while not notify.closed and readable(notify):
            try:
                frame = notify.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not frame:
                self.failed = True
                break
            self._committed = max(self._committed, int.from_bytes(frame, "big"))
        unflushed = self._unflushed
        done = 0
        while done < len(unflushed) and unflushed[done][0] <= self._committed:
            self.unflushed_ops -= unflushed[done][1]
            done += 1
        del unflushed[:done]
        if self.failed:
            raise StoreError(f"writing {self._store.path} failed; see the log")
        return self._committed

    def stop(self, timeout_s: float) -> bool:
        """Commit what is queued, close the file and end the thread.

        Returns True when every submitted batch was committed within ``timeout_s``
        (the file is then marked clean). Calling it again returns the same answer."""
        if self.notify_socket.closed:
            return not self.failed and self._committed == self._last_ticket
        self._stopping.set()
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the store writer did not finish within %.1f s", timeout_s)
            return False
        try:
            self.committed()
        except StoreError:
            return False
        finally:
            self.notify_socket.close(linger=0)
        return self._committed == self._last_ticket

    def _run(self) -> None:
        notify = self._context.socket(zmq.PAIR)
        notify.setsockopt(zmq.LINGER, 0)
        notify.connect(self._address)
        store = self._store
        stopping = False
        clean = False
        try:
            while not stopping:
                item = self._queue.get()
                if item is self._STOP:
                    clean = True
                    break
                batches = [item]
                if self._gather_s > 0:
                    # a stop ends the wait: what is queued is committed at once
                    self._stopping.wait(self._gather_s)
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is self._STOP:
                        stopping = clean = True
                        break
                    batches.append(more)
                started = time.monotonic()
                store.apply(ops for _, ops in batches)
                self.commits += 1
                elapsed = time.monotonic() - started
                self.commit_time.observe(elapsed)
                self.used_bytes = store.used_bytes()
                notify.send(batches[-1][0].to_bytes(8, "big"))
                log.debug("committed %d batch(es) in %.1f ms", len(batches),
                          1000 * (time.monotonic() - started))
        except Exception:
            clean = False
            log.exception("the store writer failed; the worker cannot acknowledge more")
            notify.send(b"")
        finally:
            try:
                store.close(clean)
            except sqlite3.Error:
                log.exception("closing the store failed")
            notify.close(linger=1000)  # let the last notice reach the loop
