"""Reads of stored messages and keys: small ones in the event loop, long ones in a thread.

Small reads (dedup lookups, pages of up to ``LOOP_READ_ROWS``) run on a query-only
connection in the event loop thread: each is one range scan of the ``(room_id, seq)``
primary key or of the dedup index, measured at 0.1-0.3 ms for 50 rows, which is about what a
hop to a worker thread and back costs on its own. WAL lets them proceed while the writer
commits, so a read never waits for a flush. A longer read (a recovery gap of up to
``max_recovery``, 1000 rows = 2-3 ms) runs in the one reader thread, on a connection of its
own, so a wave of reconnecting clients cannot stall the loop.

The reader answers what it is asked; which seqs may be shown (only what is committed *and*
acknowledged to the loop) is the caller's bound (``Store``). Every SQLite error is a
``StoreError`` naming the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shardchat.node.store import schema
from shardchat.node.store.errors import StoreError
from shardchat.node.store.records import KeyRow, MessageRecord
from shardchat.node.store.threads import name_os_thread

LOOP_READ_ROWS = 200  # longer reads go to the reader thread

_COLUMNS = schema.MESSAGE_COLUMNS


class Reader:
    """The query-only connections of one store file: the loop's, and the reader thread's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._bulk: ThreadPoolExecutor | None = None
        self._bulk_local = threading.local()
        self._bulk_conns: list[sqlite3.Connection] = []

    def open(self) -> None:
        """The loop's connection; the reader thread starts with the first long read."""
        self._conn = schema.connect(self.path, query_only=True)

    async def close(self) -> None:
        if self._bulk is not None:
            await asyncio.to_thread(self._bulk.shutdown, wait=True)
            self._bulk = None
        for conn in self._bulk_conns:
            conn.close()
        self._bulk_conns.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- keys and dedup (loop) -----------------------------------------------------------

    def creation_key(self, key: str, since_ms: int) -> tuple[str, str] | None:
        """(room id, fingerprint) stored under ``key`` at ``since_ms`` or later. One
        primary-key probe."""
        rows = self._rows("SELECT room_id, fingerprint FROM creation_keys"
                          " WHERE key = ? AND created_at >= ?", (key, since_ms))
        return (rows[0][0], rows[0][1]) if rows else None

    def by_client_id(self, room_id: str, member: str, client_id: str, top: int
                     ) -> MessageRecord | None:
        """The message of ``(room, member, client_id)`` with seq <= ``top``, if stored."""
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM messages"
            " WHERE room_id = ? AND sender_member = ? AND client_id = ? AND seq <= ?",
            (room_id, member, client_id, top))
        return MessageRecord(room_id, *rows[0]) if rows else None

    def creation_keys_of(self, room_id: str) -> list[KeyRow]:
        """Every creation key of a room (they move with it)."""
        return [KeyRow(*r) for r in self._rows(
            "SELECT key, fingerprint, created_at FROM creation_keys WHERE room_id = ?",
            (room_id,))]

    def oldest_seq(self, room_id: str) -> int | None:
        """The lowest stored seq of a room, None when it stores none."""
        return self._rows("SELECT min(seq) FROM messages WHERE room_id = ?", (room_id,))[0][0]

    # -- messages ------------------------------------------------------------------------

    def last(self, room_id: str, top: int, limit: int) -> list[MessageRecord]:
        """The ``limit`` newest messages with seq <= ``top``, oldest first (loop)."""
        rows = self._rows(f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq <= ?"
                          " ORDER BY seq DESC LIMIT ?", (room_id, top, limit))
        return [MessageRecord(room_id, *r) for r in reversed(rows)]

    async def between(self, room_id: str, after: int, top: int) -> list[MessageRecord]:
        """Every stored message with ``after < seq <= top``, oldest first; in the reader
        thread when that is more than ``LOOP_READ_ROWS`` rows."""
        sql = (f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq > ? AND seq <= ?"
               " ORDER BY seq")
        params = (room_id, after, top)
        if top - after <= LOOP_READ_ROWS:
            rows = self._rows(sql, params)
        else:
            rows = await self._in_thread(_fetch_all, sql, params)
        return [MessageRecord(room_id, *r) for r in rows]

    async def page(self, room_id: str, after: int, limit: int) -> list[MessageRecord]:
        """At most ``limit`` stored messages with seq > ``after``, oldest first, in the
        reader thread (a move copies a room with these)."""
        rows = await self._in_thread(
            _fetch_all, f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?", (room_id, after, limit))
        return [MessageRecord(room_id, *r) for r in rows]

    async def newest(self, room_id: str, after: int, top: int, limit: int, max_bytes: int,
                     size: Callable[[MessageRecord], int]
                     ) -> tuple[list[MessageRecord], bool]:
        """The newest messages with ``after < seq <= top``, at most ``limit`` and at most
        ``max_bytes`` of ``size`` (the newest always, whatever its size), oldest first; and
        whether older ones of that range were left out for the bytes. Rows are read newest
        first and reading stops at the bound; ``size`` runs in the reader thread when more
        than ``LOOP_READ_ROWS`` rows may be read."""
        sql = (f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq > ? AND seq <= ?"
               " ORDER BY seq DESC LIMIT ?")
        args = (sql, (room_id, after, top, limit), room_id, max_bytes, size)
        if limit <= LOOP_READ_ROWS:
            assert self._conn is not None
            return self._wrap(_read_newest, self._conn, *args)
        return await self._in_thread(_read_newest, *args)

    # -- plumbing ------------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple) -> list[tuple]:
        assert self._conn is not None
        return self._wrap(_fetch_all, self._conn, sql, params)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._conn is not None, "the reader is not open"
        if self._bulk is None:
            self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reader")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._bulk, self._in_reader_thread, fn, args)

    def _in_reader_thread(self, fn: Callable[..., Any], args: tuple) -> Any:
        """Runs in the reader thread, on that thread's own connection."""
        conn = getattr(self._bulk_local, "conn", None)
        if conn is None:
            name_os_thread(b"store-reader")
            conn = self._bulk_local.conn = schema.connect(self.path, query_only=True)
            self._bulk_conns.append(conn)
        return self._wrap(fn, conn, *args)

    def _wrap(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path} failed: {exc}") from exc


def _fetch_all(conn: sqlite3.Connection, sql: str, params: tuple) -> list[tuple]:
    return conn.execute(sql, params).fetchall()


def _read_newest(conn: sqlite3.Connection, sql: str, params: tuple, room_id: str,
                 max_bytes: int, size: Callable[[MessageRecord], int]
                 ) -> tuple[list[MessageRecord], bool]:
    with contextlib.closing(conn.execute(sql, params)) as cursor:
        return newest_within((MessageRecord(room_id, *row) for row in cursor), max_bytes,
                             size)


def newest_within(newest_first: Iterable[MessageRecord], max_bytes: int,
                  size: Callable[[MessageRecord], int]) -> tuple[list[MessageRecord], bool]:
    """Messages taken newest first while they fit in ``max_bytes`` of ``size`` (the newest
    always), oldest first; and whether one was left out. Reading stops at the bound."""
    out: list[MessageRecord] = []
    used = 0
    for msg in newest_first:
        used += size(msg)
        if out and used > max_bytes:
            out.reverse()
            return out, True
        out.append(msg)
    out.reverse()
    return out, False
