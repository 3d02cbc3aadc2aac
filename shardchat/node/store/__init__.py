"""The node's embedded store: rooms and messages in one SQLite file, with group commit.

``Store`` is what the node uses. It runs in the event loop and keeps what must be decided
there, in arrival order: which rooms exist, each room's seq counters, dedup of retries, and
the bound of what a read may show. Everything else has a module and, where it has one, a
thread of its own:

* ``records.py``: the typed records the store takes and returns (no wire shapes here:
  ``shardchat/node/payloads.py`` makes those);
* ``writer.py``: ``GroupCommitWriter``, the writer thread (one transaction and one commit per
  batch of whatever was queued);
* ``retention.py``: pruning to the newest ``retention`` messages per room, in the writer
  thread after a commit;
* ``checkpoint.py``: WAL checkpoints, in their own thread (or Litestream's, when the store
  is replicated off the machine);
* ``reader.py``: reads, in the loop or in the reader thread by size;
* ``moves.py``: rooms that move (``Store.moves``): copies arriving, forwards of rooms that
  left, each write a job of the writer thread;
* ``schema.py``: tables, migrations, rows; ``integrity.py``: the check at open;
  ``lock.py``: one process per data directory; ``threads.py``: OS thread names.

Why the loop keeps seq and dedup:

* ``seq`` is assigned when ``append_message`` is called, so the order of seqs is the order
  of calls. If a commit fails, every write of that batch and every write queued behind it
  fails, and each room's counter goes back to its last committed seq: the next message
  that does get stored continues with no gap.
* Dedup by ``(room, sender_member, client_id)`` covers every stored message (a retry of a
  message already pruned is stored as new) and every message still in flight. The member
  is the server-issued identity (``members.py``), never the display name, which anyone can
  claim; see ``schema.migrate_dedup`` for stores written when dedup was keyed by name.
* Reads only show what is committed *and* acknowledged to the loop (``seq <= committed``),
  so nobody sees a message before its sender got the ack, nor one that a failed commit
  takes back.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shardchat.node.buckets import Buckets
from shardchat.node.store import integrity, schema
from shardchat.node.store.checkpoint import Checkpointer
from shardchat.node.store.errors import AckRefused, MoveConflict, StoreError
from shardchat.node.store.integrity import MARKER_NAME, RESTORE_DOC, StoreDamaged
from shardchat.node.store.lock import LOCK_NAME, DirectoryLock
from shardchat.node.store.moves import Moves
from shardchat.node.store.reader import LOOP_READ_ROWS, Reader, newest_within
from shardchat.node.store.recent import KEEP as RECENT_KEEP
from shardchat.node.store.recent import RecentMessages
from shardchat.node.store.records import (
    CreationKey,
    Forward,
    Incoming,
    KeyedRoom,
    KeyRow,
    MessageRecord,
    RoomRecord,
)
from shardchat.node.store.retention import Pruner
from shardchat.node.store.schema import DB_NAME, KEY_TTL_MS
from shardchat.node.store.writer import Batch, GroupCommitWriter

__all__ = [
    "DB_NAME", "KEY_TTL_MS", "LOCK_NAME", "LOOP_READ_ROWS", "MARKER_NAME", "RESTORE_DOC",
    "AckRefused", "CreationKey", "Forward", "Incoming", "KeyRow", "KeyedRoom", "MessageRecord",
    "MoveConflict", "Moves", "RoomRecord", "Store", "StoreDamaged", "StoreError",
]


# How an append ended, on the loop: (record, None, duplicate) or (None, error, False). The
# writer calls it with two arguments (``MessageDone``), so ``duplicate`` defaults to False.
AppendDone = Callable[..., None]


def _settle_append(future: asyncio.Future[tuple[MessageRecord, bool]],
                   record: MessageRecord | None, error: BaseException | None,
                   duplicate: bool = False) -> None:
    """``append_message``'s callback: its future gives (record, duplicate) or the error."""
    if future.done():  # its caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result((record, duplicate))


def _tell_all(first: AppendDone, copies: list[AppendDone], record: MessageRecord | None,
              error: BaseException | None) -> None:
    """A message with a ``client_id`` is settled: its sender first, then each copy of it
    that arrived in flight (as a duplicate of it, or with its error)."""
    first(record, error)
    for copy in copies:
        copy(record, error, error is None)


def _check_text(what: str, value: object) -> None:
    """Reject what SQLite could not store, here, so one bad value never fails a batch."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}.")
    if value.isascii():  # the common case, and no surrogate is ASCII: no copy to encode
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate).") from exc


class Store:
    """Rooms and messages of one node; see the module docstring for the design."""

    def __init__(self, directory: Path, *, retention: int = 10_000, fsync: bool = True,
                 max_recovery: int = 1000, prune_interval: float = 5.0,
                 own_checkpoints: bool = True) -> None:
        if retention < 1:
            raise ValueError("retention must keep at least 1 message per room.")
        if max_recovery < 0:
            raise ValueError("max_recovery must be 0 or more.")
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.fsync = fsync
        self.max_recovery = max_recovery  # read at every call: may be changed while open
        self._rooms: dict[str, RoomRecord] = {}
        self._pending_rooms: set[str] = set()
        self._assigned: dict[str, int] = {}  # last seq handed out, committed or in flight
        self._committed: dict[str, int] = {}  # last seq committed and known to the loop
        # by dedup key: the callbacks of the copies that arrived while the first is in flight
        self._inflight: dict[tuple, list[AppendDone]] = {}
        # the newest messages of rooms read lately (``recent.py``): welcomes without a read
        self.recent = RecentMessages(keep=min(RECENT_KEEP, retention))
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._closed_event: asyncio.Event | None = None
        self._lock = DirectoryLock(self.directory)
        self._reader = Reader(self.path)
        self._pruner = Pruner(self.path, retention=retention, interval=prune_interval)
        self._writer = GroupCommitWriter(self.path, fsync=fsync,
                                         on_committed=self._on_committed,
                                         on_refused=self._on_refused,
                                         housekeeping=self._pruner.after_commit)
        # own_checkpoints=False: Litestream checkpoints this file (``checkpoint.py``)
        self._checkpointer = Checkpointer(self.path, fsync=fsync, enabled=own_checkpoints)
        self.moves = Moves(self._writer, self._reader, owns=self._owns, adopt=self._adopt,
                           give_up=self._give_up)
        self.moves.changed.append(self.recent.drop)  # a move's step, a fence: read again
        # Sync replication's seam: awaited after a message's commit (and for a duplicate),
        # before the caller hears of it; raises AckRefused when it cannot confirm the copy
        # on the follower (``node/replication/gate.py``). None: acked at the commit.
        self.ack_gate: Callable[[], Awaitable[None]] | None = None

    @property
    def writer(self) -> GroupCommitWriter:
        """The writer thread's front, for what ships its commits (``writer.post_commit``)
        and for jobs of the replication (a snapshot, an adoption)."""
        return self._writer

    @property
    def retention(self) -> int:
        """Messages kept per room (pruning, ``retention.py``)."""
        return self._pruner.retention

    @property
    def prune_interval(self) -> float:
        return self._pruner.interval

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory and schema, load rooms and counters, start the threads."""
        if self._state != "new":
            raise StoreError(f"the store at {self.path} is {self._state}; use a new Store "
                             "to open it again.")
        self._state = "opening"
        try:
            await asyncio.to_thread(self._bootstrap)
            self._reader.open()
            await self._writer.start()
        except BaseException:
            await self._reader.close()
            self._lock.release()
            self._state = "new"
            raise
        self._checkpointer.start()
        self._closed_event = asyncio.Event()
        self._state = "open"

    async def close(self) -> None:
        """Commit everything queued (every pending future is resolved), then shut down."""
        if self._state in ("new", "opening", "closed"):
            return
        if self._state == "closing":
            assert self._closed_event is not None
            await self._closed_event.wait()
            return
        self._state = "closing"
        await self._writer.close()
        await self._checkpointer.close()
        await self._reader.close()
        self._lock.release()
        self._state = "closed"
        assert self._closed_event is not None
        self._closed_event.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed and old rows are pruned."""
        await asyncio.shield(self._writer.barrier())

    @property
    def commit_seconds(self) -> Buckets:
        """How long each commit took, fsync included (``GET /metrics``' histogram)."""
        return self._writer.stats.commit_seconds

    def stats(self) -> dict[str, Any]:
        """Counters of the writer (commits, messages and rooms written, largest batch) and
        of the newest messages kept in memory (``recent``: rooms, bytes, pages served from
        memory and read from the file)."""
        s = self._writer.stats
        return {"commits": s.commits, "messages": s.messages, "rooms": s.rooms,
                "failed_commits": s.failed_commits, "max_batch": s.max_batch,
                "pruned": self._pruner.pruned, "recent": self.recent.stats()}

    def _bootstrap(self) -> None:
        """Runs in a worker thread: lock the directory, check and create the schema, load
        rooms and counters."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.directory}: {exc}; "
                             "check the path and its permissions.") from exc
        used_before = self._lock.path.exists()  # opened here by any version
        self._lock.acquire()
        existed = integrity.expect_store(self.path, used_before)
        try:
            conn = schema.connect(self.path)
            try:
                if existed:
                    integrity.check(conn, self.path)
                schema.create(conn)
                self._rooms, tops = schema.load(conn)
                self.moves.loaded(*schema.load_moves(conn))
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:  # "malformed", "not a database", ...
            raise StoreDamaged(self.path, f"cannot be read ({exc})") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        self._assigned = dict(tops)
        self._committed = dict(tops)
        if not existed or not integrity.is_marked(self.directory):
            integrity.write_marker(self.directory, DB_NAME)

    # -- rooms ---------------------------------------------------------------------------

    async def create_room(self, room: RoomRecord, key: CreationKey | None = None) -> None:
        """Store a new room (with the key it was created under, atomically); durable when
        this returns. A known id raises ValueError."""
        self._require_open()
        _check_text("room id", room.id)
        _check_text("room name", room.name)
        if room.id in self._rooms or room.id in self._pending_rooms:
            raise ValueError(f"room {room.id!r} already exists on this node.")
        self._pending_rooms.add(room.id)
        await asyncio.shield(self._writer.write_room(room, key))

    def get_room(self, room_id: str) -> RoomRecord | None:
        return self._rooms.get(room_id)

    def find_key(self, key: str, now_ms: int | None = None) -> KeyedRoom | None:
        """The room created under ``key`` in the last ``KEY_TTL_MS``, once that room is
        committed, with that creation's fingerprint; else None. One primary-key probe."""
        self._require_open()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        hit = self._reader.creation_key(key, now_ms - KEY_TTL_MS)
        room = self._rooms.get(hit[0]) if hit is not None else None
        if hit is None or room is None:
            return None
        return KeyedRoom(room, hit[1])

    def room_count(self) -> int:
        return len(self._rooms)

    def room_ids(self) -> list[str]:
        """The ids of the rooms this node owns now (a copy: safe to walk across awaits)."""
        return list(self._rooms)

    def last_seq(self, room_id: str) -> int:
        """The last seq handed out in this room (0 when none), committed or in flight."""
        return self._assigned.get(room_id, 0)

    # -- messages ------------------------------------------------------------------------

    async def append_message(self, room_id: str, *, sender_sid: str, sender_name: str,
                             sender_member: str, text: str, client_id: str | None,
                             ts: int) -> tuple[MessageRecord, bool]:
        """Store a message; returns (message, duplicate) once it is durable.

        A repeat of an earlier (room, sender_member, client_id) returns the earlier message
        with ``duplicate=True`` and stores nothing, whether the earlier one is committed
        or still in flight. ``sender_member`` is the server-issued member identity: the
        same ``client_id`` under the same display name from another member is another
        message. ``append_now`` without the future: the same checks and order.
        """
        future: asyncio.Future[tuple[MessageRecord, bool]] = (
            asyncio.get_running_loop().create_future())
        self.append_now(room_id, sender_sid=sender_sid, sender_name=sender_name,
                        sender_member=sender_member, text=text, client_id=client_id, ts=ts,
                        done=functools.partial(_settle_append, future))
        # Each caller has a future of its own, so cancelling one only cancels its wait:
        # the write still commits and a duplicate's waiter is still told.
        record, duplicate = await future
        if self.ack_gate is None:
            return record, duplicate
        return await self._gated(record, duplicate)

    async def _gated(self, record: MessageRecord, duplicate: bool
                     ) -> tuple[MessageRecord, bool]:
        """``(record, duplicate)`` once the ack gate lets it through (at once without one);
        AckRefused, carrying both, when it does not."""
        if self.ack_gate is not None:
            try:
                await self.ack_gate()
            except AckRefused as exc:
                raise AckRefused(record, duplicate, exc.reason) from None
        return record, duplicate

    def append_now(self, room_id: str, *, sender_sid: str, sender_name: str,
                   sender_member: str, text: str, client_id: str | None, ts: int,
                   done: AppendDone) -> None:
        """``append_message`` for a caller that cannot wait (the message hot path): the seq
        is handed out now, in call order, and ``done(record, error, duplicate)`` runs on the
        loop once the message is durable (``error`` None) or its commit failed; at once for
        a repeat of a committed message. Bad arguments raise here, before any seq."""
        self._require_open()
        if room_id not in self._rooms:
            raise ValueError(f"room {room_id!r} does not exist on this node.")
        if not (type(text) is str and type(sender_name) is str and type(sender_sid) is str
                and type(sender_member) is str and text.isascii() and sender_name.isascii()
                and sender_sid.isascii() and sender_member.isascii()):
            # ASCII strings (nearly every message) need no look; anything else is checked
            for what, value in (("sender sid", sender_sid), ("sender name", sender_name),
                                ("sender member", sender_member), ("text", text)):
                _check_text(what, value)
        key = None
        if client_id is not None:
            _check_text("client_id", client_id)
            key = (room_id, sender_member, client_id)
            waiters = self._inflight.get(key)
            if waiters is not None:  # the first copy is in flight: told with it, after it
                waiters.append(done)
                return
            stored = self._reader.by_client_id(room_id, sender_member, client_id,
                                               self._committed.get(room_id, 0))
            if stored is not None:
                done(stored, None, True)
                return
        seq = self._assigned.get(room_id, 0) + 1
        self._assigned[room_id] = seq
        record = MessageRecord(room_id, seq, sender_sid, sender_name, text, int(ts),
                               client_id, sender_member)
        if key is None:
            # No copy can wait on it: the caller's callback is the writer's, nothing more.
            self._writer.write_message_then(record, done)
            return
        waiters = self._inflight[key] = []
        self._writer.write_message_then(record, functools.partial(_tell_all, done, waiters))

    async def history(self, room_id: str, *, before: int | None = None,
                      limit: int = 50) -> list[MessageRecord]:
        """The ``limit`` newest committed messages with seq < before, oldest first."""
        self._require_open()
        top = self._committed.get(room_id, 0)
        if before is not None:
            top = min(top, before - 1)
        if limit <= 0 or top <= 0:
            return []
        return self._reader.last(room_id, top, limit)

    async def since(self, room_id: str, after_seq: int) -> list[MessageRecord] | None:
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
        messages = await self._reader.between(room_id, after_seq, top)
        if len(messages) != wanted:  # (room_id, seq) is unique, so fewer rows = pruned
            return None
        return messages

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
        oldest = self._reader.oldest_seq(room_id)
        return wanted if oldest is not None and oldest <= after_seq + 1 else None

    async def newest(self, room_id: str, *, after: int = 0, before: int | None = None,
                     limit: int, max_bytes: int, size: Callable[[MessageRecord], int]
                     ) -> tuple[list[MessageRecord], bool]:
        """The newest committed messages with ``after < seq < before``, at most ``limit``
        and at most ``max_bytes`` of ``size`` (the newest always, whatever its size),
        oldest first; and whether older ones of that range were left out for the bytes.

        Rows are read newest first and reading stops at the bound, so a long recovery gap
        of large messages costs the rows that are sent, not the whole gap. ``size`` may run
        in the reader thread."""
        self._require_open()
        top = self._committed.get(room_id, 0)
        if before is not None:
            top = min(top, before - 1)
        if limit <= 0 or top <= after:
            return [], False
        cached = self.recent.get(room_id, max(after + 1, top - limit + 1), top)
        if cached is not None:
            return newest_within(reversed(cached), max_bytes, size)
        records, cut = await self._reader.newest(room_id, after, top, limit, max_bytes, size)
        if (not cut and records and records[-1].seq == top
                and top == self._committed.get(room_id)):  # nothing committed meanwhile
            self.recent.seed(room_id, records, complete=after == 0 and len(records) < limit)
        return records, cut

    # -- the writer's callbacks (event loop) ---------------------------------------------

    def _on_committed(self, batch: Batch) -> None:
        """A batch is durable: publish its rooms, advance the counters, end its dedup
        entries (its waiters wake right after this)."""
        for w in batch.rooms:
            rid = w.room.id
            self._pending_rooms.discard(rid)
            self._rooms[rid] = w.room
            self._assigned.setdefault(rid, 0)
            self._committed.setdefault(rid, 0)
        committed, inflight, recent = self._committed, self._inflight, self.recent.committed
        for w in batch.messages:
            m = w.message
            if m.seq > committed.get(m.room_id, 0):
                committed[m.room_id] = m.seq
            recent(m)
            if m.client_id is not None:  # ``dedup_key`` is None without one
                inflight.pop(m.dedup_key, None)

    def _on_refused(self, batch: Batch) -> None:
        """A commit failed, and ``batch`` is every write that was queued: nothing is in
        flight any more, so every counter falls back to what is stored."""
        self._assigned = dict(self._committed)
        self.recent.clear()  # nothing of the batch is stored: no entry may run ahead
        for w in batch.messages:
            key = w.message.dedup_key
            if key is not None:  # copies waiting on it are refused with it (``_tell_all``)
                self._inflight.pop(key, None)
        for r in batch.rooms:
            self._pending_rooms.discard(r.room.id)

    # -- rooms arriving and leaving by a move (``moves.py``, when the write is durable) ---

    def _owns(self, room_id: str) -> bool:
        return room_id in self._rooms or room_id in self._pending_rooms

    def _adopt(self, room: RoomRecord, last_seq: int) -> None:
        """An activated room is a room of this node, its seq going on from ``last_seq``."""
        self._rooms[room.id] = room
        self._assigned[room.id] = self._committed[room.id] = last_seq
        self.recent.drop(room.id)

    def _give_up(self, room_id: str) -> None:
        """A forwarded room is not one of this node's any more (nothing of it is in flight:
        the move froze and flushed it first)."""
        self._rooms.pop(room_id, None)
        self._assigned.pop(room_id, None)
        self._committed.pop(room_id, None)
        self.recent.drop(room_id)

    def _require_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"the store at {self.path} is {self._state}, not open.")
