"""The follower's copy of another instance's store: one SQLite file per followed instance.

Instance M keeps its copy of instance N at ``<data_dir>/i<M>/followed/i<N>.sqlite3``, apart
from its own store: nothing in it is served, counted or moved until M adopts N
(``adopt.py``), so a follower can never answer for a room it only copies. The file has the
owner's schema (``store/schema.py``), so a snapshot is a plain copy of the owner's file, and
one table of its own, ``followed``, holding the epoch and position applied (written in the
same transaction as the records, so a crash never leaves the two apart).

No thread of its own: the follow task (``follow.py``) calls it in a worker thread, one call
at a time. Every write commits with ``synchronous = FULL``: a position the follower acks is
on its disk, which is what a sync ack promises.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

from shardchat.names import storage_name
from shardchat.node.store import schema

_META = "CREATE TABLE IF NOT EXISTS followed (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_INSERT_ROOM = ("INSERT OR IGNORE INTO rooms (id, name, private, created_at, state)"
                " VALUES (?, ?, ?, ?, 'active')")
_REPLACE_ROOM = ("INSERT OR REPLACE INTO rooms (id, name, private, created_at, state)"
                 " VALUES (?, ?, ?, ?, ?)")
_INSERT_KEY = ("INSERT OR REPLACE INTO creation_keys (key, room_id, fingerprint, created_at)"
               " VALUES (?, ?, ?, ?)")
_INSERT_MESSAGE = ("INSERT OR IGNORE INTO messages (room_id, seq, sender_sid, sender_name,"
                   " text, ts, client_id, sender_member) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_REPLACE_FORWARD = ("INSERT OR REPLACE INTO forwards (room_id, instance, move_id, last_seq,"
                    " moved_at, activated) VALUES (?, ?, ?, ?, ?, ?)")


def copy_path(data_dir: Path, follower: int, owner: int) -> Path:
    """Where ``follower`` keeps its copy of ``owner``."""
    return data_dir / storage_name(follower) / "followed" / f"{storage_name(owner)}.sqlite3"


def _open(path: Path) -> sqlite3.Connection:
    conn = schema.connect(path)
    conn.execute("PRAGMA synchronous = FULL")
    schema.create(conn)
    conn.execute(_META)
    return conn


class FollowedCopy:
    """The copy of one owner; see the module docstring."""

    def __init__(self, path: Path, retention: int) -> None:
        self.path = path
        self.retention = retention
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _open(self.path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "open() the copy first"
        return self._conn

    def position(self) -> tuple[str, int]:
        """(epoch, position) applied; ("", 0) for a copy that holds nothing yet."""
        meta = dict(self.conn.execute("SELECT key, value FROM followed"))
        return meta.get("epoch", ""), int(meta.get("pos", 0))

    def apply(self, epoch: str, records: list[dict[str, Any]]) -> int:
        """Apply records (ascending positions) in one transaction; the position now held."""
        conn = self.conn
        tops: dict[str, int | None] = {}  # room -> newest seq applied (None: look it up)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for record in records:
                image = record.get("image")
                if image is not None:
                    _apply_image(conn, image)
                    tops[image["id"]] = None
                    continue
                conn.executemany(_INSERT_ROOM, record["rooms"])
                conn.executemany(_INSERT_KEY, record["keys"])
                conn.executemany(_INSERT_MESSAGE, record["messages"])
                for m in record["messages"]:
                    top = tops.get(m[0], 0)
                    if top is not None and m[1] > top:
                        tops[m[0]] = m[1]
            for room_id, top in tops.items():
                if top is None:
                    (top,) = conn.execute("SELECT MAX(seq) FROM messages WHERE room_id = ?",
                                          (room_id,)).fetchone()
                if top is not None and top > self.retention:
                    schema.delete_through(conn, room_id, top - self.retention)
            pos = records[-1]["pos"]
            _set_position(conn, epoch, pos)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return pos

    def install(self, snapshot: Path, epoch: str, pos: int) -> None:
        """Replace the copy by ``snapshot`` (a copy of the owner's file at ``pos``)."""
        conn = _open(snapshot)
        try:
            conn.execute("DELETE FROM followed")
            _set_position(conn, epoch, pos)
        finally:
            conn.close()
        with open(snapshot, "rb") as f:
            os.fsync(f.fileno())
        self.close()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        os.replace(snapshot, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.open()

    def summary(self) -> dict[str, int]:
        """Rooms served by the owner and messages held, for metrics and tests."""
        (rooms,) = self.conn.execute("SELECT COUNT(*) FROM rooms WHERE state = ?",
                                     (schema.ACTIVE,)).fetchone()
        (messages,) = self.conn.execute("SELECT COUNT(*) FROM messages").fetchone()
        return {"rooms": rooms, "messages": messages}


def _set_position(conn: sqlite3.Connection, epoch: str, pos: int) -> None:
    conn.executemany("INSERT OR REPLACE INTO followed (key, value) VALUES (?, ?)",
                     [("epoch", epoch), ("pos", str(pos))])


def _apply_image(conn: sqlite3.Connection, image: dict[str, Any]) -> None:
    """One room as the owner holds it now (``records.read_image``)."""
    room_id, room = image["id"], image["room"]
    if room is None or room[4] != schema.ACTIVE:
        conn.execute("DELETE FROM messages WHERE room_id = ?", (room_id,))
    if room is None:
        conn.execute("DELETE FROM rooms WHERE id = ?", (room_id,))
        conn.execute("DELETE FROM creation_keys WHERE room_id = ?", (room_id,))
    else:
        conn.execute(_REPLACE_ROOM, room)
        messages = image["messages"]
        if messages:  # one unbroken range: what lies below the image's oldest goes
            conn.execute("DELETE FROM messages WHERE room_id = ? AND seq < ?",
                         (room_id, messages[0][1]))
        conn.executemany(_INSERT_MESSAGE, messages)
    conn.executemany(_INSERT_KEY, image["keys"])
    if image["forward"] is None:
        conn.execute("DELETE FROM forwards WHERE room_id = ?", (room_id,))
    else:
        conn.execute(_REPLACE_FORWARD, image["forward"])
