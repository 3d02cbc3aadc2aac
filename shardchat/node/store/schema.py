"""The store's tables: how they are created and migrated, and the rows that go into them.

One database per node (``<data_dir>/store.sqlite3``) in WAL mode: rooms never share a node's
file with another node, so SQLite is all the database a node needs. Every statement that
names a table or a column is here (those of rooms that move in ``moves.py``, beside the
writes they make), so the writer thread, the reader and the opening share one definition,
and so will a follower that applies the batches of another node.

No thread of its own: the functions run on whichever thread owns the connection they get
(the opening's worker thread creates and migrates, the writer thread inserts).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from shardchat.node import faults
from shardchat.node.store.records import CreationKey, Forward, Incoming, MessageRecord, RoomRecord

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
# 2: dedup keyed by sender_member instead of sender_name; 3: rooms that move (the room's
# state, source and move, and the forwards table); 4: adopted_rooms, the rooms this node took
# over from a lost instance (node/replication/adopt.py), which that instance must not serve.
# The messages table's layout (``migrate_layout``) is not part of the version: every
# statement reads and writes both layouts alike.
SCHEMA_VERSION = 4
# A store of the old layout holding at most this many messages is rebuilt at open (a few
# seconds at most); a larger one keeps its layout until it is drained and restarted.
LAYOUT_REBUILD_MAX_ROWS = 200_000
ACTIVE, INCOMING = "active", "incoming"  # rooms.state: served here / arriving by a move
# An Idempotency-Key is remembered this long (docs/protocol.md); older ones are pruned
# whenever a keyed room is written, in the same transaction.
KEY_TTL_MS = 24 * 3600 * 1000

# The messages table: a rowid table, so rows are stored in the order they commit and a
# commit appends to the table's last pages; PRIMARY KEY (room_id, seq) is then a separate
# index of small entries. Earlier releases made it WITHOUT ROWID, clustered by (room,
# seq): see ``migrate_layout`` for what that cost.
_MESSAGE_TABLE = """
    room_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    sender_sid  TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    text        TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    client_id   TEXT,
    sender_member TEXT,
    PRIMARY KEY (room_id, seq)
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS rooms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    private     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages ({_MESSAGE_TABLE});
CREATE TABLE IF NOT EXISTS creation_keys (
    key         TEXT PRIMARY KEY,
    room_id     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS creation_keys_age ON creation_keys (created_at);
CREATE TABLE IF NOT EXISTS forwards (
    room_id     TEXT PRIMARY KEY,
    instance    INTEGER NOT NULL,
    move_id     TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    moved_at    INTEGER NOT NULL,
    activated   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS adopted_rooms (
    room_id     TEXT PRIMARY KEY,
    instance    INTEGER NOT NULL,
    adopted_at  INTEGER NOT NULL
) WITHOUT ROWID;
"""
# Added to ``rooms`` by ``migrate_moves`` (a room of schema 2 is an active room).
_ROOM_MOVE_COLUMNS = (("state", f"TEXT NOT NULL DEFAULT '{ACTIVE}'"), ("source", "INTEGER"),
                      ("move_id", "TEXT"))

# The dedup index, created by ``migrate_dedup`` once the column exists. Rows with no member
# (written before member identities existed) are outside it: nobody can claim them.
DEDUP_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_member_dedup"
    " ON messages (room_id, sender_member, client_id)"
    " WHERE client_id IS NOT NULL AND sender_member IS NOT NULL"
)
_OLD_DEDUP_INDEX = "messages_dedup"  # (room_id, sender_name, client_id), schema 1

_INSERT_ROOM = "INSERT INTO rooms (id, name, private, created_at) VALUES (?, ?, ?, ?)"
# The columns in MessageRecord's field order: a record is a row, and a row (with its room
# id first) is a record's arguments.
_INSERT_MESSAGE = (
    "INSERT INTO messages (room_id, seq, sender_sid, sender_name, text, ts, client_id,"
    " sender_member) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
MESSAGE_COLUMNS = "seq, sender_sid, sender_name, text, ts, client_id, sender_member"
_INSERT_KEY = ("INSERT OR REPLACE INTO creation_keys (key, room_id, fingerprint, created_at)"
               " VALUES (?, ?, ?, ?)")


def connect(path: Path, *, query_only: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are always explicit here.

    A query-only connection may serve the event loop, so its busy timeout is short; in WAL
    mode a reader only waits in rare recovery cases anyway.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {100 if query_only else 5000}")
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


def create(conn: sqlite3.Connection) -> None:
    """WAL mode, the tables, every migration, the schema version: idempotent."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_SCHEMA)
    migrate_dedup(conn)
    migrate_moves(conn)
    started = time.monotonic()
    layout = migrate_layout(conn)
    if layout == "rebuilt":
        log.info("rebuilt the store's messages table in arrival order in %.1f s (it was "
                 "clustered by room, as earlier releases made it)", time.monotonic() - started)
    elif layout == "kept":
        log.warning("kept the store's messages table clustered by room, as earlier releases "
                    "made it: it holds more than %s messages, too many to rebuild at start. "
                    "It works the same, with more CPU per write; drain the instance and "
                    "restart it to rebuild it in arrival order (docs/operations.md).",
                    f"{LAYOUT_REBUILD_MAX_ROWS:,}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def _migration(conn: sqlite3.Connection) -> Iterator[None]:
    """One migration's transaction: all of it or, on any error or crash, none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate_dedup(conn: sqlite3.Connection) -> None:
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
    with _migration(conn):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if "sender_member" not in columns:
            conn.execute("ALTER TABLE messages ADD COLUMN sender_member TEXT")
        conn.execute(f"DROP INDEX IF EXISTS {_OLD_DEDUP_INDEX}")
        conn.execute(DEDUP_INDEX)


def migrate_moves(conn: sqlite3.Connection) -> None:
    """Schema 2 -> 3: ``rooms`` gets ``state`` (every existing room is ``active``),
    ``source`` and ``move_id``, each an O(1) change in SQLite; the ``forwards`` table is in
    ``_SCHEMA``. One transaction; running it again changes nothing."""
    with _migration(conn):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(rooms)")}
        for name, decl in _ROOM_MOVE_COLUMNS:
            if name not in columns:
                conn.execute(f"ALTER TABLE rooms ADD COLUMN {name} {decl}")


def clustered(conn: sqlite3.Connection) -> bool:
    """Whether the messages table still has the layout of earlier releases."""
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table'"
                          " AND name = 'messages'").fetchone()
    return "WITHOUT ROWID" in sql.upper()


def migrate_layout(conn: sqlite3.Connection) -> str | None:
    """The messages table from WITHOUT ROWID (every store made by earlier releases) to a
    rowid table: "rebuilt", "kept" (too many rows to rebuild now), or None (nothing
    to do).

    Clustered by (room, seq), a commit of messages to many rooms wrote one leaf page of
    whole rows per room, and those leaves, full of rows of about 200 bytes, split every
    twenty or so messages of their room, rewriting their neighbours. In arrival order a
    commit appends to the table's last pages, and per room it touches one leaf of the
    (room_id, seq) index, whose entries are a tenth the size. The writer thread's CPU per
    message fell by 25-30 % in a store holding 400,000 messages and by half in a new one
    (``python -m bench.storelayout``; docs/performance.md, "The store's layout"). What it
    costs: a history page of 50 messages reads them from 50 places instead of two or three
    leaves, 1.4-3.2 times the CPU (about 0.1 ms), which is why a room's newest messages
    are also kept in memory (``recent.py``) for the joins that read them.

    The rebuild copies every row, in the order they were committed (ts, then room and
    seq), into the new table, then puts it in the old one's place and builds the dedup
    index again: one transaction, so a crash part-way leaves the old table as it was and
    the next start does it again. It takes about 2 s per 100,000 messages and the table's
    size again in free disk, so only a store of at most ``LAYOUT_REBUILD_MAX_ROWS``
    messages is rebuilt; a larger one keeps its layout, which works the same, slower to
    write, until it is drained (its rooms move away) and restarted (docs/operations.md,
    "The messages table's layout")."""
    if not clustered(conn):
        return None
    # stops counting past the limit: a store of millions of rows costs no full count
    (rows,) = conn.execute("SELECT count(*) FROM (SELECT 1 FROM messages LIMIT ?)",
                           (LAYOUT_REBUILD_MAX_ROWS + 1,)).fetchone()
    if rows > LAYOUT_REBUILD_MAX_ROWS:
        return "kept"
    with _migration(conn):
        conn.execute("DROP TABLE IF EXISTS messages_rebuilt")
        conn.execute(f"CREATE TABLE messages_rebuilt ({_MESSAGE_TABLE})")
        columns = "room_id, " + MESSAGE_COLUMNS
        conn.execute(f"INSERT INTO messages_rebuilt ({columns}) SELECT {columns}"
                     " FROM messages ORDER BY ts, room_id, seq")
        faults.reach("store.layout_copied")
        conn.execute("DROP TABLE messages")  # and its indexes
        conn.execute("ALTER TABLE messages_rebuilt RENAME TO messages")
        conn.execute(DEDUP_INDEX)
    return "rebuilt"


def load(conn: sqlite3.Connection) -> tuple[dict[str, RoomRecord], dict[str, int]]:
    """Every room served here, and each one's highest stored seq (0 when it has none).
    Rooms arriving by a move are not among them (``load_moves``)."""
    rooms = {rid: RoomRecord(rid, name, bool(private), created_at)
             for rid, name, private, created_at in conn.execute(
                 "SELECT id, name, private, created_at FROM rooms WHERE state = ?",
                 (ACTIVE,))}
    tops = {}
    for rid in rooms:
        # One primary-key probe per room; a GROUP BY would scan every message.
        (top,) = conn.execute("SELECT MAX(seq) FROM messages WHERE room_id = ?",
                              (rid,)).fetchone()
        tops[rid] = top or 0
    return rooms, tops


def load_moves(conn: sqlite3.Connection
               ) -> tuple[dict[str, Incoming], dict[str, Forward]]:
    """The rooms arriving here by a move, and the forwards of rooms that left."""
    incoming = {
        rid: Incoming(RoomRecord(rid, name, bool(private), created_at), source, move_id)
        for rid, name, private, created_at, source, move_id in conn.execute(
            "SELECT id, name, private, created_at, source, move_id FROM rooms"
            " WHERE state = ?", (INCOMING,))}
    forwards = {
        rid: Forward(rid, instance, move_id, last_seq, moved_at, bool(activated))
        for rid, instance, move_id, last_seq, moved_at, activated in conn.execute(
            "SELECT room_id, instance, move_id, last_seq, moved_at, activated"
            " FROM forwards")}
    return incoming, forwards


def insert_rooms(conn: sqlite3.Connection,
                 rooms: Iterable[tuple[RoomRecord, CreationKey | None]]) -> None:
    """Inside the caller's transaction: new rooms, each with the creation key it was made
    under if any; expired keys go out whenever a key comes in (a key is only written after
    a lookup found none alive, so REPLACE only ever replaces an expired one)."""
    written = list(rooms)
    conn.executemany(_INSERT_ROOM, [(r.id, r.name, int(r.private), r.created_at)
                                    for r, _ in written])
    keyed = [(k.key, r.id, k.fingerprint, r.created_at) for r, k in written if k is not None]
    if keyed:
        cutoff = int(time.time() * 1000) - KEY_TTL_MS
        conn.execute("DELETE FROM creation_keys WHERE created_at < ?", (cutoff,))
        conn.executemany(_INSERT_KEY, keyed)


def insert_messages(conn: sqlite3.Connection, messages: Iterable[MessageRecord]) -> None:
    """Inside the caller's transaction: new messages, one row each."""
    conn.executemany(_INSERT_MESSAGE, [
        (m.room_id, m.seq, m.sender_sid, m.sender_name, m.text, m.ts, m.client_id,
         m.sender_member) for m in messages])


def delete_through(conn: sqlite3.Connection, room_id: str, seq: int) -> int:
    """Inside the caller's transaction: a room's messages up to ``seq``; how many went."""
    cur = conn.execute("DELETE FROM messages WHERE room_id = ? AND seq <= ?", (room_id, seq))
    return max(cur.rowcount, 0)
