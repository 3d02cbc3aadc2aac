"""The node's embedded store: rooms and messages in one SQLite file, with group commit.

Why this shape:

* One database per node (``<data_dir>/store.sqlite3``) in WAL mode. Rooms never move
  between nodes, so nothing here is shared and SQLite is all the database a node needs.
* The event loop never waits for a disk flush. A single writer thread owns the write
  connection. Every write is queued; the writer takes *everything* queued, writes it in
  one transaction and commits once, then resolves every waiting future on the loop. While
  one commit runs, new writes pile up and share the next one, so a burst of N messages
  costs far fewer than N fsyncs, with no artificial delay added to a quiet room.
* ``seq`` is assigned in the event loop when ``append_message`` is called, so the order
  of seqs is the order of calls. If a commit fails, every write of that batch and every
  write queued behind it fails, and each room's counter goes back to its last committed
  seq: the next message that does get stored continues with no gap.
* Small reads (dedup lookups, ``history`` pages of up to 100, short recovery gaps) run on
  a query-only connection in the event loop thread: each is one range scan of the
  ``(room_id, seq)`` primary key or of the dedup index, measured at 0.1-0.3 ms for 50
  rows, which is about what a hop to a worker thread and back costs on its own. WAL lets
  them proceed while the writer commits, so a read never waits for a flush. A recovery
  gap longer than ``LOOP_READ_ROWS`` (up to ``max_recovery``, 1000 rows = 2-3 ms) is read
  in a reader thread with its own connection instead, so a wave of reconnecting clients
  cannot stall the loop. Reads only show what is committed *and* acknowledged to the loop
  (``seq <= committed``), so nobody sees a message before its sender got the ack, nor one
  that a failed commit takes back.
* Old messages are pruned to the newest ``retention`` per room by the writer thread after
  a commit has been acknowledged, at most once every ``prune_interval`` seconds per room.
  Dedup by ``(room, sender_member, client_id)`` covers every stored message (a retry of a
  message already pruned is stored as new) and every message still in flight. The member
  is the server-issued identity (``members.py``), never the display name, which anyone can
  claim; see ``_migrate_dedup`` for stores written when dedup was keyed by name.
* ``store.lock`` in the directory is held (flock) while the store is open, so a second
  process on the same data directory fails at open instead of reusing seqs. The kernel
  drops the lock when a process dies, even by ``kill -9``.
* A damaged store is refused at open (``StoreDamaged``), never served half-read. SQLite reads
  an empty file as an empty database, so ``store.created``, written once the first open has
  created the schema, marks a directory that holds a store: with it, a missing or empty
  store file is damage, not a fresh start. Every open runs ``PRAGMA quick_check`` (b-tree
  structure, page use, record shapes; measured at 80-130 ms for 100k messages, 27 MB, and
  0.55 s for 1M; ``integrity_check`` also compares indexes with their tables, at 3-4 times
  the cost). Damage it cannot see (bytes flipped inside a message) or that appears later is
  a read error at run time, which the room service answers with ``unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
LOOP_READ_ROWS = 200  # longer recovery reads go to the reader thread
LOCK_NAME = "store.lock"
MARKER_NAME = "store.created"  # this directory holds a store: an empty one is damage
RESTORE_DOC = 'docs/operations.md, "Restoring a damaged store"'
CHECK_ERRORS = 3  # problems quick_check reports (the first says enough)
CHECKPOINT_POLL = 1.0  # seconds between looks at the WAL's size
CHECKPOINT_WAL_BYTES = 8 * 1024 * 1024  # checkpoint once the WAL is this large ...
CHECKPOINT_MAX_AGE = 30.0  # ... or this many seconds after the last checkpoint
SCHEMA_VERSION = 2  # 2: dedup keyed by sender_member instead of sender_name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    private     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    room_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    sender_sid  TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    text        TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    client_id   TEXT,
    sender_member TEXT,
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS creation_keys (
    key         TEXT PRIMARY KEY,
    room_id     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS creation_keys_age ON creation_keys (created_at);
"""

# The dedup index, created by ``_migrate_dedup`` once the column exists. Rows with no member
# (written before member identities existed) are outside it: nobody can claim them.
_DEDUP_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_member_dedup"
    " ON messages (room_id, sender_member, client_id)"
    " WHERE client_id IS NOT NULL AND sender_member IS NOT NULL"
)
_OLD_DEDUP_INDEX = "messages_dedup"  # (room_id, sender_name, client_id), schema 1

_INSERT_ROOM = "INSERT INTO rooms (id, name, private, created_at) VALUES (?, ?, ?, ?)"
_INSERT_MESSAGE = (
    "INSERT INTO messages (room_id, seq, sender_sid, sender_name, text, ts, client_id,"
    " sender_member) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = "seq, sender_sid, sender_name, text, ts, client_id, sender_member"
# An Idempotency-Key is remembered this long (docs/protocol.md); older ones are pruned
# whenever a keyed room is written, in the same transaction.
KEY_TTL_MS = 24 * 3600 * 1000
_INSERT_KEY = ("INSERT OR REPLACE INTO creation_keys (key, room_id, fingerprint, created_at)"
               " VALUES (?, ?, ?, ?)")


class StoreError(Exception):
    """The store cannot do what was asked: it is closed, or a commit failed.

    The caller should tell the user to try again; nothing of the failed write was kept.
    """


class StoreDamaged(StoreError):
    """The store file is missing, empty, truncated or fails its integrity check.

    The node must not start on it: serving it would lose rooms silently or answer joins
    with read errors. The message names the file and how to restore it."""

    def __init__(self, path: Path, problem: str):
        super().__init__(
            f"the store {path} {problem}. This node will not serve a damaged store: restore "
            f"{path.name} from a backup or a replica ({RESTORE_DOC}); to start this instance "
            f"empty instead, move {path.name} and {MARKER_NAME} out of {path.parent}.")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class RoomRecord:
    """A room as stored: what the node needs to serve it after a restart."""

    id: str
    name: str
    private: bool
    created_at: int  # epoch ms

    def to_public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "private": self.private}


@dataclass(frozen=True)
class CreationKey:
    """The Idempotency-Key a room was created under, and a digest of what was asked."""

    key: str
    fingerprint: str


# -- queued writes --------------------------------------------------------------------


@dataclass(eq=False)
class _RoomWrite:
    record: RoomRecord
    future: asyncio.Future
    key: CreationKey | None = None  # stored in the room's own transaction


@dataclass(eq=False)
class _MessageWrite:
    message: dict[str, Any]
    key: tuple[str, str, str] | None  # dedup key (room, sender_member, client_id)
    future: asyncio.Future

    def row(self) -> tuple:
        m, sender = self.message, self.message["from"]
        return (m["room"], m["seq"], sender["sid"], sender["name"], m["text"], m["ts"],
                m["client_id"], sender["member"])


@dataclass(eq=False)
class _Barrier:
    """Resolves once the writer has committed and pruned everything queued before it."""

    future: asyncio.Future


@dataclass
class _Stats:
    commits: int = 0
    messages: int = 0
    rooms: int = 0
    failed_commits: int = 0
    max_batch: int = 0
    pruned: int = 0


def _message(room_id: str, seq: int, sid: str, name: str, text: str, ts: int,
             client_id: str | None, member: str | None) -> dict[str, Any]:
    """A message as clients get it; ``member`` is None for messages stored before member
    identities existed."""
    return {"seq": seq, "room": room_id, "from": {"sid": sid, "name": name, "member": member},
            "text": text, "ts": ts, "client_id": client_id}


def _from_row(room_id: str, row: tuple) -> dict[str, Any]:
    return _message(room_id, *row)


def _check_text(what: str, value: object) -> None:
    """Reject what SQLite could not store, here, so one bad value never fails a batch."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate).") from exc


class Store:
    """Rooms and messages of one node; see the module docstring for the design."""

    def __init__(self, directory: Path, *, retention: int = 10_000, fsync: bool = True,
                 max_recovery: int = 1000, prune_interval: float = 5.0) -> None:
        if retention < 1:
            raise ValueError("retention must keep at least 1 message per room.")
        if max_recovery < 0:
            raise ValueError("max_recovery must be 0 or more.")
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.retention = retention
        self.fsync = fsync
        self.max_recovery = max_recovery
        self.prune_interval = prune_interval
        # event-loop state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: sqlite3.Connection | None = None
        self._bulk: ThreadPoolExecutor | None = None
        self._bulk_local = threading.local()
        self._bulk_conns: list[sqlite3.Connection] = []
        self._rooms: dict[str, RoomRecord] = {}
        self._pending_rooms: set[str] = set()
        self._assigned: dict[str, int] = {}
        self._committed: dict[str, int] = {}
        self._inflight: dict[tuple[str, str, str], _MessageWrite] = {}
        self._state = "new"  # new -> open -> closing -> closed
        self._closed_event: asyncio.Event | None = None
        self._lock_fd: int | None = None
        # shared with the writer thread, guarded by _cond
        self._cond = threading.Condition()
        self._queue: list[Any] = []
        self._halted = False  # a commit failed; the loop has not rolled back yet
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self._stats = _Stats()

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory and schema, load rooms and counters, start the writer."""
        if self._state != "new":
            raise StoreError(f"the store at {self.path} is {self._state}; use a new Store "
                             "to open it again.")
        self._state = "opening"
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._bootstrap)
            self._reader = self._connect(query_only=True)
            await self._start_writer()
        except BaseException:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._release_lock()
            self._state = "new"
            raise
        self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reader")
        self._closed_event = asyncio.Event()
        self._state = "open"

    async def _start_writer(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._writer_main, args=(started, failure),
                                        name=f"store-writer:{self.directory}", daemon=True)
        self._thread.start()
        await asyncio.to_thread(started.wait)
        if failure:
            raise StoreError(f"cannot open {self.path} for writing: {failure[0]}")
        self._checkpoint_stop.clear()
        self._checkpointer = threading.Thread(target=self._checkpointer_main,
                                              name=f"store-checkpoint:{self.directory}",
                                              daemon=True)
        self._checkpointer.start()

    async def close(self) -> None:
        """Commit everything queued (every pending future is resolved), then shut down."""
        if self._state in ("new", "opening", "closed"):
            return
        if self._state == "closing":
            assert self._closed_event is not None
            await self._closed_event.wait()
            return
        self._state = "closing"
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        assert self._thread is not None
        await asyncio.to_thread(self._thread.join)
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            await asyncio.to_thread(self._checkpointer.join)
        # The writer's last call_soon_threadsafe callbacks were queued before join's
        # completion, so they have run by now: every pending future is resolved.
        if self._reader is not None:
            self._reader.close()
        if self._bulk is not None:
            await asyncio.to_thread(self._bulk.shutdown, wait=True)
        for conn in self._bulk_conns:
            conn.close()
        self._release_lock()
        self._state = "closed"
        assert self._closed_event is not None
        self._closed_event.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed and old rows are pruned."""
        future = self._loop_future()
        self._enqueue(_Barrier(future))
        await asyncio.shield(future)

    def stats(self) -> dict[str, int]:
        """Counters of the writer: commits, messages and rooms written, largest batch."""
        s = self._stats
        return {"commits": s.commits, "messages": s.messages, "rooms": s.rooms,
                "failed_commits": s.failed_commits, "max_batch": s.max_batch,
                "pruned": s.pruned}

    # -- rooms ---------------------------------------------------------------------------

    async def create_room(self, room: RoomRecord, key: CreationKey | None = None) -> None:
        """Store a new room (with the key it was created under, atomically); durable when
        this returns. A known id raises ValueError."""
        self._require_open()
        _check_text("room id", room.id)
        _check_text("room name", room.name)
        if room.id in self._rooms or room.id in self._pending_rooms:
            raise ValueError(f"room {room.id!r} already exists on this node.")
        future = self._loop_future()
        self._pending_rooms.add(room.id)
        self._enqueue(_RoomWrite(room, future, key))
        await asyncio.shield(future)

    def get_room(self, room_id: str) -> RoomRecord | None:
        return self._rooms.get(room_id)

    def find_key(self, key: str, now_ms: int | None = None) -> tuple[str, str] | None:
        """(room id, fingerprint) of the room created under ``key`` in the last
        ``KEY_TTL_MS``, once that room is committed; else None. One primary-key probe."""
        self._require_open()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        rows = self._read("SELECT room_id, fingerprint FROM creation_keys"
                          " WHERE key = ? AND created_at >= ?", (key, now_ms - KEY_TTL_MS))
        if not rows or rows[0][0] not in self._rooms:
            return None
        return rows[0][0], rows[0][1]

    def room_count(self) -> int:
        return len(self._rooms)

    def last_seq(self, room_id: str) -> int:
        """The last seq handed out in this room (0 when none), committed or in flight."""
        return self._assigned.get(room_id, 0)

    # -- messages ------------------------------------------------------------------------

    async def append_message(self, room_id: str, *, sender_sid: str, sender_name: str,
                             sender_member: str, text: str, client_id: str | None,
                             ts: int) -> tuple[dict[str, Any], bool]:
        """Store a message; returns (message, duplicate) once it is durable.

        A repeat of an earlier (room, sender_member, client_id) returns the earlier message
        with ``duplicate=True`` and stores nothing, whether the earlier one is committed
        or still in flight. ``sender_member`` is the server-issued member identity: the
        same ``client_id`` under the same display name from another member is another
        message.
        """
        self._require_open()
        if room_id not in self._rooms:
            raise ValueError(f"room {room_id!r} does not exist on this node.")
        for what, value in (("sender sid", sender_sid), ("sender name", sender_name),
                            ("sender member", sender_member), ("text", text)):
            _check_text(what, value)
        key = None
        if client_id is not None:
            _check_text("client_id", client_id)
            key = (room_id, sender_member, client_id)
            earlier = self._find_duplicate(key)
            if earlier is not None:
                return await earlier, True
        seq = self._assigned.get(room_id, 0) + 1
        self._assigned[room_id] = seq
        message = _message(room_id, seq, sender_sid, sender_name, text, int(ts), client_id,
                           sender_member)
        write = _MessageWrite(message, key, self._loop_future())
        self._enqueue(write)
        if key is None:
            # Nobody else can wait on this future, so it needs no shield (a shield costs
            # a second future and two callbacks per message); cancelling the caller only
            # cancels its wait, the write still commits.
            return await write.future, False
        self._inflight[key] = write
        return await asyncio.shield(write.future), False

    def _find_duplicate(self, key: tuple[str, str, str]) -> Any:
        """An awaitable giving the earlier message with this key, or None when new."""
        pending = self._inflight.get(key)
        if pending is not None:
            return asyncio.shield(pending.future)
        room_id, member, client_id = key
        rows = self._read(
            f"SELECT {_COLUMNS} FROM messages"
            " WHERE room_id = ? AND sender_member = ? AND client_id = ? AND seq <= ?",
            (room_id, member, client_id, self._committed.get(room_id, 0)))
        if not rows:
            return None
        done = self._loop_future()
        done.set_result(_from_row(room_id, rows[0]))
        return done

    async def history(self, room_id: str, *, before: int | None = None,
                      limit: int = 50) -> list[dict[str, Any]]:
        """The ``limit`` newest committed messages with seq < before, oldest first."""
        self._require_open()
        top = self._committed.get(room_id, 0)
        if before is not None:
            top = min(top, before - 1)
        if limit <= 0 or top <= 0:
            return []
        rows = self._read(
            f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq <= ?"
            " ORDER BY seq DESC LIMIT ?", (room_id, top, limit))
        return [_from_row(room_id, r) for r in reversed(rows)]

    async def since(self, room_id: str, after_seq: int) -> list[dict[str, Any]] | None:
        """Every committed message after ``after_seq``, or None when that can't be complete.

        None means: the gap was pruned, it is longer than ``max_recovery``, or the client
        claims a seq this room never handed out.
        """
        self._require_open()
        if after_seq < 0:
            raise ValueError("after_seq must be 0 or more.")
        if after_seq > self.last_seq(room_id):
            return None
        top = self._committed.get(room_id, 0)
        wanted = top - after_seq
        if wanted <= 0:
            return []
        if wanted > self.max_recovery:
            return None
        sql = (f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq > ? AND seq <= ?"
               " ORDER BY seq")
        params = (room_id, after_seq, top)
        if wanted <= LOOP_READ_ROWS:
            rows = self._read(sql, params)
        else:
            assert self._loop is not None and self._bulk is not None
            rows = await self._loop.run_in_executor(self._bulk, self._read_bulk, sql, params)
        if len(rows) != wanted:  # (room_id, seq) is unique, so fewer rows = pruned
            return None
        return [_from_row(room_id, r) for r in rows]

    def gap(self, room_id: str, after_seq: int) -> int | None:
        """How many committed messages follow ``after_seq``, or None when they cannot all
        be given (the reasons of ``since``), without reading them: a room's stored seqs are
        one unbroken range (a commit never leaves a hole, pruning takes the oldest), so the
        gap is whole when the oldest stored message is at most ``after_seq + 1``. One
        primary-key lookup, so a recovery can then read only the part it sends."""
        self._require_open()
        if after_seq < 0:
            raise ValueError("after_seq must be 0 or more.")
        if after_seq > self.last_seq(room_id):
            return None
        wanted = self._committed.get(room_id, 0) - after_seq
        if wanted <= 0:
            return 0
        if wanted > self.max_recovery:
            return None
        rows = self._read("SELECT min(seq) FROM messages WHERE room_id = ?", (room_id,))
        oldest = rows[0][0]
        return wanted if oldest is not None and oldest <= after_seq + 1 else None

    async def newest(self, room_id: str, *, after: int = 0, before: int | None = None,
                     limit: int, max_bytes: int, size: Callable[[dict[str, Any]], int]
                     ) -> tuple[list[dict[str, Any]], bool]:
        """The newest committed messages with ``after < seq < before``, at most ``limit``
        and at most ``max_bytes`` of ``size`` (the newest always, whatever its size),
        oldest first; and whether older ones of that range were left out for the bytes.

        Rows are read newest first and reading stops at the bound, so a long recovery gap
        of large messages costs the rows that are sent, not the whole gap."""
        self._require_open()
        top = self._committed.get(room_id, 0)
        if before is not None:
            top = min(top, before - 1)
        if limit <= 0 or top <= after:
            return [], False
        sql = (f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq > ? AND seq <= ?"
               " ORDER BY seq DESC LIMIT ?")
        args = (sql, (room_id, after, top, limit), room_id, max_bytes, size)
        if limit <= LOOP_READ_ROWS:
            assert self._reader is not None
            return self._read_newest(self._reader, *args)
        assert self._loop is not None and self._bulk is not None
        return await self._loop.run_in_executor(self._bulk, self._read_newest_bulk, *args)

    def _read_newest(self, conn: sqlite3.Connection, sql: str, params: tuple, room_id: str,
                     max_bytes: int, size: Callable[[dict[str, Any]], int]
                     ) -> tuple[list[dict[str, Any]], bool]:
        out: list[dict[str, Any]] = []
        used = 0
        try:
            with contextlib.closing(conn.execute(sql, params)) as cursor:
                for row in cursor:
                    msg = _from_row(room_id, row)
                    used += size(msg)
                    if out and used > max_bytes:
                        out.reverse()
                        return out, True
                    out.append(msg)
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path} failed: {exc}") from exc
        out.reverse()
        return out, False

    def _read_newest_bulk(self, *args: Any) -> tuple[list[dict[str, Any]], bool]:
        """``_read_newest`` in the reader thread, on that thread's own connection."""
        conn = getattr(self._bulk_local, "conn", None)
        if conn is None:
            conn = self._bulk_local.conn = self._connect(query_only=True)
            self._bulk_conns.append(conn)
        return self._read_newest(conn, *args)

    # -- event-loop helpers --------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"the store at {self.path} is {self._state}, not open.")

    def _loop_future(self) -> asyncio.Future:
        assert self._loop is not None
        return self._loop.create_future()

    def _enqueue(self, item: Any) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify()

    def _read(self, sql: str, params: tuple) -> list[tuple]:
        assert self._reader is not None
        try:
            return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path} failed: {exc}") from exc

    def _read_bulk(self, sql: str, params: tuple) -> list[tuple]:
        """Runs in the reader thread, on that thread's own connection."""
        conn = getattr(self._bulk_local, "conn", None)
        if conn is None:
            conn = self._bulk_local.conn = self._connect(query_only=True)
            self._bulk_conns.append(conn)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path} failed: {exc}") from exc

    def _committed_batch(self, batch: list[Any]) -> None:
        """Loop side of a successful commit: publish rooms, advance counters, wake waiters."""
        for item in batch:
            if isinstance(item, _MessageWrite):
                m = item.message
                if m["seq"] > self._committed.get(m["room"], 0):
                    self._committed[m["room"]] = m["seq"]
                if item.key is not None:
                    self._inflight.pop(item.key, None)
                _settle(item.future, m)
            elif isinstance(item, _RoomWrite):
                rid = item.record.id
                self._pending_rooms.discard(rid)
                self._rooms[rid] = item.record
                self._assigned.setdefault(rid, 0)
                self._committed.setdefault(rid, 0)
                _settle(item.future, None)

    def _failed_batch(self, batch: list[Any], error: BaseException) -> None:
        """Loop side of a failed commit: fail it and everything behind it, undo seqs."""
        with self._cond:
            batch = batch + self._queue  # written by the loop after the failure
            self._queue = []
            self._halted = False
            self._cond.notify_all()
        # Nothing is in flight any more, so every counter falls back to what is stored.
        self._assigned = dict(self._committed)
        exc = StoreError(f"commit to {self.path} failed: {error}")
        for item in batch:
            if isinstance(item, _MessageWrite):
                if item.key is not None and self._inflight.get(item.key) is item:
                    del self._inflight[item.key]
                _settle(item.future, error=exc)
            elif isinstance(item, _RoomWrite):
                self._pending_rooms.discard(item.record.id)
                _settle(item.future, error=exc)
            else:
                _settle(item.future, None)

    def _call_soon(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody waits
            self._loop.call_soon_threadsafe(callback, *args)

    # -- opening -------------------------------------------------------------------------

    def _connect(self, *, query_only: bool = False) -> sqlite3.Connection:
        """A connection in autocommit mode: transactions are always explicit here.

        The reader lives in the event loop, so its busy timeout is short; in WAL mode a
        reader only waits in rare recovery cases anyway.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {100 if query_only else 5000}")
        if query_only:
            conn.execute("PRAGMA query_only = ON")
        return conn

    def _bootstrap(self) -> None:
        """Runs in a worker thread: lock the directory, create the schema, load state."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.directory}: {exc}; "
                             "check the path and its permissions.") from exc
        used_before = (self.directory / LOCK_NAME).exists()  # opened here by any version
        self._take_lock()
        existed = self._expect_store(used_before)
        try:
            conn = self._connect()
            try:
                if existed:
                    self._check_integrity(conn)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
                _migrate_dedup(conn)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._load(conn)
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:  # "malformed", "not a database", ...
            raise StoreDamaged(self.path, f"cannot be read ({exc})") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        if not existed or not (self.directory / MARKER_NAME).exists():
            self._write_marker()

    def _expect_store(self, used_before: bool) -> bool:
        """True when a store file with content is here. Refuses a missing or empty file in a
        directory whose marker says a store was created in it, and an empty file where an
        earlier open left its lock (a store from before the marker existed)."""
        try:
            size: int | None = self.path.stat().st_size
        except FileNotFoundError:
            size = None
        marked = (self.directory / MARKER_NAME).exists()
        if marked and size is None:
            raise StoreDamaged(self.path, f"is missing, but {MARKER_NAME} says this "
                               "directory held a store")
        if size == 0 and (marked or used_before):
            why = MARKER_NAME if marked else LOCK_NAME
            raise StoreDamaged(self.path, f"is empty (0 bytes), but {why} says this "
                               "directory held a store")
        return bool(size)

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """``PRAGMA quick_check`` before anything is written (see the module docstring)."""
        started = time.monotonic()
        rows = conn.execute(f"PRAGMA quick_check({CHECK_ERRORS})").fetchall()
        problems = [str(r[0]).replace("*** in database main ***", "").strip() for r in rows]
        if problems != ["ok"]:
            detail = "; ".join(p.replace("\n", "; ") for p in problems if p)
            raise StoreDamaged(self.path, f"fails its integrity check ({detail})")
        log.info("store %s passed its integrity check in %.0f ms", self.path,
                 (time.monotonic() - started) * 1000)

    def _write_marker(self) -> None:
        """Mark the directory as holding a store, durably (file and directory fsynced)."""
        marker = self.directory / MARKER_NAME
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                os.write(fd, f"{DB_NAME} created {when}; while this file exists, a missing or "
                         "empty store is refused\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write {marker}: {exc}") from exc

    def _load(self, conn: sqlite3.Connection) -> None:
        for rid, name, private, created_at in conn.execute(
                "SELECT id, name, private, created_at FROM rooms"):
            self._rooms[rid] = RoomRecord(rid, name, bool(private), created_at)
        for rid in self._rooms:
            # One primary-key probe per room; a GROUP BY would scan every message.
            (top,) = conn.execute("SELECT MAX(seq) FROM messages WHERE room_id = ?",
                                  (rid,)).fetchone()
            self._assigned[rid] = self._committed[rid] = top or 0

    def _take_lock(self) -> None:
        """One process per store: a second node on the same data dir would reuse seqs."""
        if fcntl is None:  # pragma: no cover
            return
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create {self.directory / LOCK_NAME}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreError(
                f"{self.directory} is in use by another process; stop it or give this "
                "node its own data directory.") from exc
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- writer thread -------------------------------------------------------------------

    def _writer_main(self, started: threading.Event, failure: list[BaseException]) -> None:
        _name_os_thread(b"store-writer")
        try:
            conn = self._connect()
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            # Checkpoints run in their own thread (``_checkpointer_main``): SQLite's automatic
            # checkpoint would run inside a commit, with its fsyncs, and stall every ack and
            # broadcast waiting on that commit (seen as 50-130 ms latency spikes).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        cuts: dict[str, tuple[float, int]] = {}
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                tops = self._write(conn, batch)
                if tops:
                    self._prune(conn, tops, cuts)
                barriers = [b for b in batch if isinstance(b, _Barrier)]
                if barriers:
                    self._call_soon(_settle_all, barriers)
        finally:
            conn.close()

    def _checkpointer_main(self) -> None:
        """Copy committed WAL frames into the database file, off the commit path.

        A PASSIVE checkpoint never blocks the writer or readers. It runs once the WAL passes
        ``CHECKPOINT_WAL_BYTES`` or ``CHECKPOINT_MAX_AGE`` seconds after the last one: each
        checkpoint fsyncs the database file, and on a shared disk those fsyncs queue with
        the writer's, so fewer, larger checkpoints disturb commits least. After the writer
        has stopped, a final TRUNCATE checkpoint leaves a compact database behind."""
        _name_os_thread(b"store-ckpt")
        try:
            conn = self._connect()
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
        except sqlite3.Error:
            log.exception("cannot open a checkpoint connection to %s", self.path)
            return
        wal = self.path.with_name(self.path.name + "-wal")
        last = time.monotonic()
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_POLL):
                try:
                    size = wal.stat().st_size
                except OSError:
                    continue
                if size < CHECKPOINT_WAL_BYTES and time.monotonic() - last < CHECKPOINT_MAX_AGE:
                    continue
                last = time.monotonic()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # a busy moment: the next round catches up
                    log.debug("checkpoint of %s skipped: %s", self.path, exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()

    def _next_batch(self) -> list[Any] | None:
        """Everything queued, once there is something and no failure is being undone."""
        with self._cond:
            while self._halted or (not self._queue and not self._stopping):
                self._cond.wait()
            if not self._queue:
                return None
            batch, self._queue = self._queue, []
            return batch

    def _write(self, conn: sqlite3.Connection, batch: list[Any]) -> dict[str, int] | None:
        """One transaction, one commit; returns each room's newest seq, None if it failed."""
        rooms = [i.record for i in batch if isinstance(i, _RoomWrite)]
        messages = [i for i in batch if isinstance(i, _MessageWrite)]
        if not rooms and not messages:
            return {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            if rooms:
                conn.executemany(_INSERT_ROOM, [(r.id, r.name, int(r.private), r.created_at)
                                                for r in rooms])
                self._write_keys(conn, batch)
            if messages:
                conn.executemany(_INSERT_MESSAGE, [m.row() for m in messages])
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            with self._cond:
                self._halted = True
                rest, self._queue = self._queue, []
            self._stats.failed_commits += 1
            log.error("commit to %s failed, %d queued writes refused: %s", self.path,
                      len(batch) + len(rest), exc)
            self._call_soon(self._failed_batch, batch + rest, exc)
            return None
        s = self._stats
        s.commits += 1
        s.messages += len(messages)
        s.rooms += len(rooms)
        s.max_batch = max(s.max_batch, len(messages) + len(rooms))
        self._call_soon(self._committed_batch, batch)
        return {m.message["room"]: m.message["seq"] for m in messages}  # seqs ascend

    @staticmethod
    def _write_keys(conn: sqlite3.Connection, batch: list[Any]) -> None:
        """Inside the batch's transaction: the creation keys of its rooms, and expired keys
        out (a key is only written after a lookup found none alive, so REPLACE only ever
        replaces an expired one)."""
        keyed = [(i.key.key, i.record.id, i.key.fingerprint, i.record.created_at)
                 for i in batch if isinstance(i, _RoomWrite) and i.key is not None]
        if keyed:
            cutoff = int(time.time() * 1000) - KEY_TTL_MS
            conn.execute("DELETE FROM creation_keys WHERE created_at < ?", (cutoff,))
            conn.executemany(_INSERT_KEY, keyed)

    def _prune(self, conn: sqlite3.Connection, tops: dict[str, int],
               cuts: dict[str, tuple[float, int]]) -> None:
        """Keep the newest ``retention`` messages of each room written in the last batch.

        ``tops`` is each room's newest committed seq; ``cuts`` remembers, per room, when it
        was last pruned and up to which seq. All due rooms share one transaction, and a
        room with nothing new to drop costs nothing. Errors wait for the next commit.
        """
        now = time.monotonic()
        due: list[tuple[str, int]] = []
        for room_id, top in tops.items():
            when, done = cuts.get(room_id, (float("-inf"), 0))
            cut = top - self.retention
            if cut > done and now - when >= self.prune_interval:
                due.append((room_id, cut))
        if not due:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            dropped = 0
            for room_id, cut in due:
                cur = conn.execute("DELETE FROM messages WHERE room_id = ? AND seq <= ?",
                                   (room_id, cut))
                dropped += max(cur.rowcount, 0)
            conn.execute("COMMIT")
        except Exception as exc:  # the writer must survive housekeeping errors
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            log.warning("pruning old messages in %s failed, will retry: %s", self.path, exc)
            return
        self._stats.pruned += dropped
        for room_id, cut in due:
            cuts[room_id] = (now, cut)

def _migrate_dedup(conn: sqlite3.Connection) -> None:
    """Move dedup from (room, sender_name, client_id) to (room, sender_member, client_id).

    Stores of schema 1 have no ``sender_member`` column and a unique index on the display
    name. The column is added (an O(1) change in SQLite; building the new index reads the
    table once, at the first start after the upgrade) and the old index is dropped: it
    must go, since two members of the same name may now both use one ``client_id``, and
    the old index would fail their commit. Old rows keep ``sender_member`` NULL, which the
    new index and every dedup lookup leave out: their dedup key was a name anyone could
    claim, and the only retries that could match them come from connections made before the
    upgrade, which hold no member token. Every stored message stays; only the convenience
    of deduplicating a retry across the upgrade is given up. One transaction, so a crash
    mid-way leaves the old schema, and running it again is a no-op.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if "sender_member" not in columns:
            conn.execute("ALTER TABLE messages ADD COLUMN sender_member TEXT")
        conn.execute(f"DROP INDEX IF EXISTS {_OLD_DEDUP_INDEX}")
        conn.execute(_DEDUP_INDEX)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _name_os_thread(name: bytes) -> None:
    """Give the current thread a name ``top -H``, py-spy and /proc show (Linux only), so
    the writer's CPU can be told from the event loop's."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME


def _settle(future: asyncio.Future, result: Any = None, *,
            error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(barriers: list[_Barrier]) -> None:
    for b in barriers:
        _settle(b.future, None)
